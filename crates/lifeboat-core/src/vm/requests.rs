//! The requests in the spec: which tokens are new (not yet in `handled`), rejecting those the
//! VM's state cannot honour (echoing the token, with a `RequestRejected` event and, for a
//! (test) failover, its condition's verdict), and a cleanup with nothing to clean.

use crate::conditions::Verdict;
use crate::model::{JobKind, JobParams};

use super::{FailoverAsk, Pass, TestFailoverAsk, reasons};

/// The kinds of request, for rejections.
#[derive(Clone, Copy)]
pub(super) enum Ask {
    Resync,
    TestFailover,
    Failover,
    Commit,
    Reprotect,
}

impl Pass<'_> {
    fn new_token<T: Clone>(
        asked: Option<&T>,
        token: impl Fn(&T) -> &String,
        handled: Option<&String>,
    ) -> Option<T> {
        asked.filter(|a| Some(token(a)) != handled).cloned()
    }

    pub(super) fn ask_resync(&self) -> Option<String> {
        Self::new_token(
            self.input.spec.requests.resync.as_ref(),
            |t| t,
            self.state.handled.resync.as_ref(),
        )
    }

    pub(super) fn ask_test_failover(&self) -> Option<TestFailoverAsk> {
        Self::new_token(
            self.input.spec.requests.test_failover.as_ref(),
            |a| &a.token,
            self.state.handled.test_failover.as_ref(),
        )
    }

    pub(super) fn ask_cleanup(&self) -> Option<String> {
        Self::new_token(
            self.input.spec.requests.cleanup_test_failover.as_ref(),
            |t| t,
            self.state.handled.cleanup_test_failover.as_ref(),
        )
    }

    pub(super) fn ask_failover(&self) -> Option<FailoverAsk> {
        Self::new_token(
            self.input.spec.requests.failover.as_ref(),
            |a| &a.token,
            self.state.handled.failover.as_ref(),
        )
    }

    pub(super) fn ask_commit(&self) -> Option<String> {
        Self::new_token(
            self.input.spec.requests.commit.as_ref(),
            |t| t,
            self.state.handled.commit.as_ref(),
        )
    }

    pub(super) fn ask_reprotect(&self) -> Option<String> {
        Self::new_token(
            self.input.spec.requests.reprotect.as_ref(),
            |t| t,
            self.state.handled.reprotect.as_ref(),
        )
    }

    /// A re-protect where the VM has not failed over (or back): nothing to re-protect.
    pub(super) fn reject_reprotect(&mut self, why: &str) {
        if let Some(token) = self.ask_reprotect() {
            self.reject(Ask::Reprotect, token, "NothingToReprotect", why);
        }
    }

    pub(super) fn reject(&mut self, ask: Ask, token: String, reason: &'static str, why: &str) {
        let (name, slot) = match ask {
            Ask::Resync => ("resync", &mut self.state.handled.resync),
            Ask::TestFailover => ("testFailover", &mut self.state.handled.test_failover),
            Ask::Failover => ("failover", &mut self.state.handled.failover),
            Ask::Commit => ("commit", &mut self.state.handled.commit),
            Ask::Reprotect => ("reprotect", &mut self.state.handled.reprotect),
        };
        *slot = Some(token.clone());
        let verdict = Verdict::no(reason, format!("request {token:?} rejected: {why}"));
        match ask {
            Ask::TestFailover => self.test_failover_outcome = Some(verdict),
            Ask::Failover => self.failover_outcome = Some(verdict),
            Ask::Resync | Ask::Commit | Ask::Reprotect => {}
        }
        self.notice(
            true,
            reasons::REQUEST_REJECTED,
            format!("{name} request {token:?} rejected ({reason}): {why}"),
        );
    }

    /// Cleanup with nothing to clean: done at once.
    pub(super) fn cleanup_or_nothing(&mut self, token: String) {
        if self.state.test_failover_exists {
            self.start_request(
                JobKind::CleanupTestFailover,
                JobParams {
                    request_token: Some(token),
                    ..JobParams::default()
                },
            );
        } else {
            self.state.handled.cleanup_test_failover = Some(token);
        }
    }

    /// Requests that cannot be honoured before the VM has a recovery point.
    pub(super) fn reject_requests_before_protection(&mut self) {
        if let Some(ask) = self.ask_failover() {
            self.reject(
                Ask::Failover,
                ask.token,
                "NoRecoveryPoint",
                "the VM has no recovery point yet",
            );
        }
        if let Some(ask) = self.ask_test_failover() {
            self.reject(
                Ask::TestFailover,
                ask.token,
                "NoRecoveryPoint",
                "the VM has no recovery point yet",
            );
        }
        if let Some(token) = self.ask_resync() {
            self.reject(
                Ask::Resync,
                token,
                "NotProtected",
                "only a protected VM can be resynchronized",
            );
        }
        if let Some(token) = self.ask_commit() {
            self.reject(
                Ask::Commit,
                token,
                "NotFailedOver",
                "only a failover can be committed",
            );
        }
        self.reject_reprotect("only a VM that failed over or failed back can be re-protected");
        if let Some(token) = self.ask_cleanup() {
            self.cleanup_or_nothing(token);
        }
    }

    /// Requests that cannot be honoured once the VM failed over.
    pub(super) fn reject_requests_after_failover(&mut self, commit_allowed: bool) {
        if let Some(ask) = self.ask_failover() {
            self.reject(
                Ask::Failover,
                ask.token,
                "AlreadyFailedOver",
                "the VM has already failed over",
            );
        }
        if let Some(ask) = self.ask_test_failover() {
            self.reject(
                Ask::TestFailover,
                ask.token,
                "NotReplicating",
                "a failed-over VM does not replicate",
            );
        }
        if let Some(token) = self.ask_resync() {
            self.reject(
                Ask::Resync,
                token,
                "NotReplicating",
                "a failed-over VM does not replicate",
            );
        }
        if !commit_allowed && let Some(token) = self.ask_commit() {
            self.reject(
                Ask::Commit,
                token,
                "AlreadyCommitted",
                "the failover was committed already",
            );
        }
    }
}
