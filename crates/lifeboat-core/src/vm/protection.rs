//! Protection wanted: the phase's next job. Enable protection (once the policy exists, is
//! usable and its start time has come), finalize it; while protected, a failover (before
//! anything else), a test failover or its cleanup, a requested resync, or an automatic one
//! when delta replication cannot go on (in the resync window); once failed over, the commit.

use std::time::{Duration, SystemTime};

use crate::model::{FailoverKind, JobKind, JobParams, JobState, Phase, PointChoice, ResyncReason};

use super::jobs::{RetryGate, keeps_in_step};
use super::requests::Ask;
use super::{FailoverAsk, Pass};

/// How often to look again while the policy is missing or not usable.
const POLICY_RECHECK: Duration = Duration::from_secs(60);

impl Pass<'_> {
    pub(super) fn protect(&mut self) {
        if matches!(self.state.phase, Phase::Disabled) {
            self.state.phase = Phase::Pending;
        }
        self.unplanned_takes_over();
        self.in_step_gives_way();
        if !self.idle() {
            // One job at a time: requests wait.
            return;
        }
        if self.state.phase == Phase::DisablingProtection {
            // The disable job failed and protection is wanted again: start over.
            self.state.phase = Phase::Pending;
        }
        match self.state.phase {
            Phase::Pending => self.start_protection(),
            Phase::EnablingProtection | Phase::InitialReplication => {
                if self.retry_failed().is_none() {
                    self.start_protection();
                }
            }
            Phase::FinalizingProtection => {
                let finalize_failed = self
                    .state
                    .job
                    .as_ref()
                    .is_some_and(|j| j.kind == JobKind::FinalizeProtection);
                if !finalize_failed || self.retry_failed().is_none() {
                    self.start_job(JobKind::FinalizeProtection, JobParams::default(), 1);
                }
            }
            Phase::Protected | Phase::Resynchronizing | Phase::FailingOver => self.replicating(),
            Phase::FailedOver | Phase::FailoverCommitted => {
                if self.retry_failed() == Some(true) {
                    return;
                }
                let committed = self.state.phase == Phase::FailoverCommitted;
                self.reject_requests_after_failover(!committed);
                if let Some(token) = self.ask_reprotect() {
                    self.reprotect(token, true);
                }
                // NB: a re-protect that was rejected leaves the other requests their turn in
                // the same pass (deciding again must change nothing).
                if self.create.is_some() {
                    return;
                }
                if let Some(token) = self.ask_commit().filter(|_| !committed) {
                    // NB: the point travels with the job, so that an agent that has only the
                    // store (the VM's is lost) knows which point the failover kept.
                    let point = self.input.failover.and_then(|d| d.point.clone());
                    self.start_request(
                        JobKind::Commit,
                        JobParams {
                            request_token: Some(token),
                            point: point.map(PointChoice::Named),
                            ..JobParams::default()
                        },
                    );
                } else if let Some(token) = self.ask_cleanup() {
                    self.cleanup_or_nothing(token);
                }
            }
            Phase::Reprotecting => {
                // A re-protect that failed for good waits for a retry token or a new spec.
                self.retry_failed();
            }
            Phase::FailingBack => self.failing_back(),
            Phase::FailedBack => {
                if self.retry_failed() == Some(true) {
                    return;
                }
                self.reject_requests_after_failover(true);
                if let Some(token) = self.ask_commit() {
                    self.reject(
                        Ask::Commit,
                        token,
                        "FailedBack",
                        "a failback has nothing to commit: the original disks hold its point",
                    );
                }
                if let Some(token) = self.ask_reprotect() {
                    self.reprotect(token, false);
                }
                if self.create.is_none()
                    && let Some(token) = self.ask_cleanup()
                {
                    self.cleanup_or_nothing(token);
                }
            }
            Phase::DisablingProtection | Phase::Disabled => {}
        }
    }

    /// A planned failover (or failback) step, or a re-protect, that cannot go on gives way to
    /// an unplanned failover asked since, which starts in this pass: one that failed (its
    /// retry would wait out the backoff, for a node that may be gone for good), or one that no
    /// agent claimed while its node's agent has been silent for `JOB_AGENT_LOST` (it did
    /// nothing yet: it is withdrawn). One still running is left to end, or to be taken from
    /// its lost agent. The unplanned one needs only the store (and the primary site, for a
    /// failback); a planned failover's request is left unanswered (the new one replaces it), a
    /// re-protect's is answered.
    fn unplanned_takes_over(&mut self) {
        let Some(record) = self.state.job.clone() else {
            return;
        };
        let replaced = |ask: &FailoverAsk| {
            ask.kind == FailoverKind::Unplanned
                && record.params.request_token.as_deref() != Some(ask.token.as_str())
        };
        let Some(ask) = self.ask_failover().filter(replaced) else {
            return;
        };
        // NB: a re-protect too: one that cannot go on (its node lost) would hold the VM away
        // from a site that still has its disks; the unplanned failover (a failback, in
        // reverse) starts from the replica's points instead.
        let replaceable = match record.kind {
            JobKind::Failover => record.params.failover == Some(FailoverKind::Planned),
            JobKind::Reprotect => true,
            _ => false,
        };
        // NB: only when the unplanned one starts in this pass: a withdrawn step is never
        // retried for a request that was rejected.
        if !replaceable || !self.has_recovery_point() {
            return;
        }
        match record.state {
            JobState::Failed => {}
            JobState::Pending => {
                let Some(silence) = super::jobs::lost_for(self.input.job_heartbeat, self.now)
                else {
                    return;
                };
                let why = format!(
                    "no agent claimed it, its node's agent has been silent for {}s, and an unplanned {} was asked ({})",
                    silence.as_secs(),
                    if self.state.reverse {
                        "failback"
                    } else {
                        "failover"
                    },
                    ask.token
                );
                self.withdraw(record.clone(), true, &why);
            }
            JobState::Running | JobState::WaitingForInput | JobState::Succeeded => return,
        }
        if record.kind == JobKind::Reprotect {
            // NB: its request ends here, given up for the failover.
            self.state.handled.reprotect = record.params.request_token.clone();
        }
        if matches!(
            self.state.phase,
            Phase::FailingOver | Phase::FailingBack | Phase::Reprotecting
        ) {
            self.state.phase = Phase::Protected;
        }
    }

    /// Re-protect from the point the VM runs from now (the failover's, or the failback's):
    /// in reverse after a failover (`reverse`), forward again after a failback.
    fn reprotect(&mut self, token: String, reverse: bool) {
        if reverse && self.input.spec.recovery_site.is_none() {
            self.reject(
                Ask::Reprotect,
                token,
                "NoRecoverySite",
                "spec.recoverySite must say where the recovered VM runs (its node, hypervisor and disks)",
            );
            return;
        }
        let Some(point) = self.input.failover.and_then(|d| d.point.clone()) else {
            self.reject(
                Ask::Reprotect,
                token,
                "NoFailoverPoint",
                "status.failover does not name the point the VM started from",
            );
            return;
        };
        self.state.reverse = reverse;
        self.state.original_in_step = None;
        self.start_request(
            JobKind::Reprotect,
            JobParams {
                request_token: Some(token),
                point: Some(PointChoice::Named(point)),
                ..JobParams::default()
            },
        );
    }

    /// A failback: a planned one's first Failover job (a cycle of the running recovered VM: a
    /// fresh point) and first Failback job (the primary site's disks brought to that point,
    /// the recovered VM still running), then its Failover job (stop, ship, point), then its
    /// Failback job (the primary site's disks brought to that point), each retried as any job
    /// is.
    fn failing_back(&mut self) {
        if self.retry_failed().is_some() {
            return;
        }
        let Some(done) = self
            .state
            .job
            .clone()
            .filter(|j| j.state == JobState::Succeeded)
        else {
            return;
        };
        match (done.kind, done.params.presync) {
            // The running VM's changes are in a fresh point: bring the original disks to it.
            (JobKind::Failover, true) => {
                self.start_job(
                    JobKind::Failback,
                    JobParams {
                        to_primary: false,
                        ..done.params
                    },
                    1,
                );
                return;
            }
            // The original disks hold that point: now stop the recovered VM and ship the rest.
            (JobKind::Failback, true) => {
                self.start_job(
                    JobKind::Failover,
                    JobParams {
                        presync: false,
                        to_primary: true,
                        ..done.params
                    },
                    1,
                );
                return;
            }
            (JobKind::Failover, false) if done.params.to_primary => {}
            _ => return,
        }
        // NB: the point its Failover job chose (the newest for a planned one; an unplanned
        // one may name an older point): nothing has cut a point since, the replica is fenced.
        self.start_job(
            JobKind::Failback,
            JobParams {
                request_token: done.params.request_token,
                point: done.params.point.or(Some(PointChoice::Latest)),
                ..JobParams::default()
            },
            1,
        );
    }

    fn start_protection(&mut self) {
        self.reject_requests_before_protection();
        if self.create.is_some() {
            return; // a cleanup of an old test failover goes first
        }
        let Some(policy) = self.input.policy else {
            self.waiting = Some((
                "PolicyNotFound",
                "the ReplicationPolicy does not exist".into(),
            ));
            self.wake.push(self.now + POLICY_RECHECK);
            return;
        };
        if let Some(problem) = &policy.blocking_problem {
            self.waiting = Some((
                "PolicyNotReady",
                format!("the ReplicationPolicy is not usable: {problem}"),
            ));
            self.wake.push(self.now + POLICY_RECHECK);
            return;
        }
        if let Some(start) = policy.initial_replication_start.filter(|s| *s > self.now) {
            self.waiting = Some((
                "WaitingForStartTime",
                format!(
                    "initial replication starts at {}",
                    crate::rpo::format_rfc3339(start)
                ),
            ));
            self.wake.push(start);
            return;
        }
        self.start_job(JobKind::EnableProtection, JobParams::default(), 1);
    }

    /// Protected (or a resync or failover that failed and waits for its retry).
    fn replicating(&mut self) {
        // A failover goes before anything else, a pending retry included.
        if let Some(ask) = self.ask_failover() {
            if !self.has_recovery_point() {
                self.reject(
                    Ask::Failover,
                    ask.token,
                    "NoRecoveryPoint",
                    "the VM has no recovery point yet",
                );
            } else {
                // NB: a planned failback first ships and brings the original disks to a fresh
                // point while the recovered VM runs on; it is stopped only for its last changes.
                self.start_request(
                    JobKind::Failover,
                    JobParams {
                        request_token: Some(ask.token),
                        failover: Some(ask.kind),
                        point: Some(ask.point),
                        to_primary: self.state.reverse,
                        presync: self.state.reverse
                            && ask.kind == FailoverKind::Planned
                            && !self.original_in_step(),
                        ..JobParams::default()
                    },
                );
                return;
            }
        }
        // NB: a failed job that kept the original disks in step blocks nothing: the next
        // one starts when its retry is due (`keep_original_in_step`).
        let in_step = self
            .state
            .job
            .as_ref()
            .is_some_and(|j| keeps_in_step(j.kind, &j.params));
        let retried = if in_step { None } else { self.retry_failed() };
        let blocked = match retried {
            Some(true) => return,
            Some(false) => self.state.job.as_ref().map(|j| j.kind),
            None => None,
        };
        if self.state.phase != Phase::Protected {
            return;
        }
        if let Some(token) = self.ask_cleanup() {
            self.cleanup_or_nothing(token);
            if self.create.is_some() {
                return;
            }
        }
        if let Some(ask) = self.ask_test_failover() {
            if self.state.test_failover_exists {
                self.reject(
                    Ask::TestFailover,
                    ask.token,
                    "TestFailoverExists",
                    "clean up the current test failover first",
                );
            } else if !self.has_recovery_point() {
                self.reject(
                    Ask::TestFailover,
                    ask.token,
                    "NoRecoveryPoint",
                    "the VM has no recovery point yet",
                );
            } else {
                self.start_request(
                    JobKind::TestFailover,
                    JobParams {
                        request_token: Some(ask.token),
                        point: Some(ask.point),
                        ..JobParams::default()
                    },
                );
                return;
            }
        }
        if let Some(token) = self.ask_resync() {
            self.start_request(
                JobKind::Resynchronize,
                JobParams {
                    request_token: Some(token),
                    resync_reason: Some(ResyncReason::Requested),
                    ..JobParams::default()
                },
            );
            return;
        }
        if let Some(token) = self.ask_commit() {
            self.reject(
                Ask::Commit,
                token,
                "NotFailedOver",
                "only a failover can be committed",
            );
        }
        self.reject_reprotect("the VM is protected already");
        if blocked != Some(JobKind::Resynchronize)
            && let Some(reason) = self.resync_required()
            && let Some(policy) = self.input.policy.filter(|p| p.resync_automatic)
        {
            match &policy.resync_window {
                Some(window) if !window.contains(self.now) => {
                    if let Some(opening) = window.next_opening(self.now) {
                        self.wake.push(opening);
                    }
                }
                _ => self.start_job(
                    JobKind::Resynchronize,
                    JobParams {
                        resync_reason: Some(reason),
                        ..JobParams::default()
                    },
                    1,
                ),
            }
        }
        if self.create.is_none() {
            self.keep_original_in_step();
        }
    }

    /// Whether a planned failback can stop the recovered VM at once: the original disks at
    /// the primary site hold a point at most two copy intervals old, and the recovered VM's
    /// cycles keep up (its last one succeeded within two intervals, none failing since), so
    /// that what it has not shipped is a cycle or two of writes. Otherwise the failback first
    /// brings them to a fresh point while the VM runs.
    fn original_in_step(&self) -> bool {
        let recent = |t: Option<SystemTime>| t.is_some_and(|t| t + 2 * self.interval >= self.now);
        let agent = self.input.agent;
        recent(self.state.original_in_step)
            && recent(agent.and_then(|a| a.last_successful_cycle))
            && agent.is_some_and(|a| a.last_error.is_none())
    }

    /// Replicating in reverse: bring the original disks to the newest point when one was
    /// cut since they last were (since the re-protect, at first), at most once per copy
    /// interval, while the primary site's agent lives. A failed attempt waits for its retry
    /// time (at most `IN_STEP_RETRY` away, or a retry token).
    fn keep_original_in_step(&mut self) {
        if !self.state.reverse || self.state.phase != Phase::Protected {
            return;
        }
        let attempt = match &self.state.job {
            // NB: a failed job of another kind keeps its record (and its retry gate) while it
            // may run again; one no retry will start but a token (a request failed for good
            // and answered) gives way, unless it is a resync (its record keeps the automatic
            // one from starting again). One of ours withdrawn (no error) did nothing: the
            // next is a first attempt.
            Some(j) if j.state == JobState::Failed => {
                match (self.retry_gate(j), keeps_in_step(j.kind, &j.params)) {
                    (RetryGate::At(at), true) => {
                        self.wake.push(at);
                        return;
                    }
                    (RetryGate::Now, true) if j.error.is_some() => j.attempt + 1,
                    (RetryGate::Now, true) => 1,
                    (RetryGate::Never, false) if j.kind != JobKind::Resynchronize => 1,
                    _ => return,
                }
            }
            _ => 1,
        };
        let since = self.state.original_in_step.max(self.state.last_resync);
        let newer = self
            .input
            .agent
            .and_then(|a| a.latest_point)
            .is_some_and(|p| since.is_none_or(|s| p > s));
        if !newer || !super::jobs::alive(self.input.primary_heartbeat, self.now) {
            return;
        }
        if let Some(due) = self.state.original_in_step.map(|t| t + self.interval)
            && due > self.now
        {
            self.wake.push(due);
            return;
        }
        self.start_job(
            JobKind::Failback,
            JobParams {
                point: Some(PointChoice::Latest),
                presync: true,
                ..JobParams::default()
            },
            attempt,
        );
    }

    /// A job keeping the original disks in step that no agent claimed yet gives way (it is
    /// withdrawn: it did nothing) to a request, or when the primary site's agent is lost. One
    /// running is waited for (or taken from its agent when that is lost, as any job is).
    fn in_step_gives_way(&mut self) {
        let Some(record) = self
            .state
            .job
            .clone()
            .filter(|j| j.state == JobState::Pending && keeps_in_step(j.kind, &j.params))
        else {
            return;
        };
        let why = if self.ask_failover().is_some() {
            "a failback was asked".to_owned()
        } else if self.ask_test_failover().is_some()
            || self.ask_cleanup().is_some()
            || self.ask_resync().is_some()
        {
            "a request was made".to_owned()
        } else if let Some(silence) = super::jobs::lost_for(self.input.primary_heartbeat, self.now)
        {
            format!(
                "the primary site's agent has been silent for {}s",
                silence.as_secs()
            )
        } else {
            return;
        };
        self.withdraw(record, false, &why);
    }

    /// Why delta replication cannot go on, from facts newer than the last resync.
    pub(super) fn resync_required(&self) -> Option<ResyncReason> {
        if !matches!(self.state.phase, Phase::Protected | Phase::Resynchronizing) {
            return None;
        }
        let agent = self.input.agent?;
        let after_last_resync = |t: SystemTime| self.state.last_resync.is_none_or(|r| t > r);
        if let Some((reason, at)) = agent.tracking_lost
            && after_last_resync(at)
        {
            return Some(reason);
        }
        let threshold = self.input.policy.map_or(50, |p| p.log_threshold_percent);
        let over = agent.disks.iter().any(|d| {
            d.size_bytes > 0
                && u128::from(d.pending_log_bytes) * 100
                    >= u128::from(d.size_bytes) * u128::from(threshold)
        });
        (over && agent.report_time.is_some_and(after_last_resync))
            .then_some(ResyncReason::LogThresholdReached)
    }
}
