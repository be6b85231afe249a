//! The current job: taking in how it went (started, succeeded or failed, with the phase, the
//! request tokens echoed and the failure's retry time that follow), retrying a failed
//! operation when due (or at once on a new `retry` token), and creating the next job.

use std::time::SystemTime;

use crate::conditions::Verdict;
use crate::model::{ErrorReport, FailoverKind, JobKind, JobParams, JobState, Phase};
use crate::retry::{ErrorClass, RetryDecision, next_retry};

use super::{
    FinishedJob, JobFacts, JobObservation, JobRecord, NewJob, Pass, ResultChange, job_name, reasons,
};

/// The error reason of a job taken from a lost agent.
pub const AGENT_LOST: &str = "AgentLost";

/// Whether a job needs only the replica store (no hypervisor): any agent can run it.
pub fn store_only(kind: JobKind, params: &JobParams) -> bool {
    match kind {
        JobKind::TestFailover | JobKind::CleanupTestFailover | JobKind::Commit => true,
        // NB: a failback's Failover runs on the recovery site's node, which holds the engine
        // that replicates (and whose epoch it ends), unplanned or not; an unplanned one goes
        // to the primary site's node, from the store, when that agent is lost
        // (`unplanned_failback`).
        JobKind::Failover => params.failover == Some(FailoverKind::Unplanned) && !params.to_primary,
        _ => false,
    }
}

/// Whether a job is an unplanned failback's Failover: it only chooses the point and fences
/// the replica, which the store alone can do, so that the primary site's agent runs it when
/// the recovered VM's node is lost (a planned one stops the recovered VM: it needs that node).
pub fn unplanned_failback(kind: JobKind, params: &JobParams) -> bool {
    kind == JobKind::Failover
        && params.to_primary
        && !params.presync
        && params.failover == Some(FailoverKind::Unplanned)
}

/// Whether a job keeps the primary site's original disks in step while the VM replicates in
/// reverse: a Failback job with `presync` and no request (a planned failback's own carries
/// its request's token). It brings them to the newest point while the recovered VM runs
/// (ASR keeps the original VM's disks as the reverse replica), so that a failback has only
/// the changes made since to move, with the recovered VM stopped. It never changes the
/// phase, answers no request, and its failure only puts off the next one.
pub fn keeps_in_step(kind: JobKind, params: &JobParams) -> bool {
    kind == JobKind::Failback && params.presync && params.request_token.is_none()
}

/// The longest a job keeping the original disks in step that failed waits before it is tried
/// again (at least a copy interval), whatever failed, even a failure an administrator must
/// mend.
pub const IN_STEP_RETRY: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Whether an agent whose last heartbeat is `beat` counts as alive at `now`.
pub(super) fn alive(beat: Option<SystemTime>, now: SystemTime) -> bool {
    beat.is_some_and(|b| now.duration_since(b).unwrap_or_default() < super::JOB_AGENT_LOST)
}

/// How long an agent whose last heartbeat is `beat` has been silent at `now`, when that is
/// long enough to count it as lost; an agent that never had a heartbeat is not known to be.
pub(super) fn lost_for(beat: Option<SystemTime>, now: SystemTime) -> Option<std::time::Duration> {
    beat.and_then(|b| now.duration_since(b).ok())
        .filter(|silence| *silence >= super::JOB_AGENT_LOST)
}

/// When a failed operation may run again.
pub(super) enum RetryGate {
    Now,
    At(SystemTime),
    Never,
}

impl Pass<'_> {
    pub(super) fn absorb_job(&mut self) {
        let Some(mut record) = self.state.job.clone() else {
            return;
        };
        let facts = match self.input.job {
            JobObservation::Found(f) if f.name == record.name => match self.lost_agent(f) {
                Some(lost) => {
                    self.fail = lost.error.clone().map(|e| (lost.name.clone(), e));
                    lost
                }
                None => f.clone(),
            },
            JobObservation::Missing if !record.state.is_finished() => JobFacts {
                name: record.name.clone(),
                state: JobState::Failed,
                copying: false,
                start_time: None,
                completion_time: Some(self.now),
                error: Some(ErrorReport {
                    class: ErrorClass::Recoverable,
                    reason: "JobDeleted".into(),
                    message: format!("job {} was deleted before it ended", record.name),
                    retry_count: 0,
                    next_retry_time: None,
                    first_seen_time: None,
                }),
                point_time: None,
            },
            _ => return,
        };
        if record.state.is_finished() {
            return;
        }
        // NB: one keeping the original disks in step runs every copy interval: its events
        // are its failures, and its first success after one (a retry).
        let routine = keeps_in_step(record.kind, &record.params) && record.attempt == 1;
        if record.state == JobState::Pending && facts.state != JobState::Pending && !routine {
            self.notice(
                false,
                reasons::JOB_STARTED,
                format!("{} job {} started", record.kind.as_str(), record.name),
            );
        }
        if facts.state.is_finished() {
            self.job_ended(&mut record, &facts, routine);
        } else {
            record.state = facts.state;
            if record.kind == JobKind::EnableProtection
                && facts.copying
                && self.state.phase == Phase::EnablingProtection
            {
                self.state.phase = Phase::InitialReplication;
            }
        }
        self.state.job = Some(record);
    }

    fn job_ended(&mut self, record: &mut JobRecord, facts: &JobFacts, routine: bool) {
        let kind = record.kind;
        let succeeded = facts.state == JobState::Succeeded;
        self.finished = Some(FinishedJob {
            kind,
            succeeded,
            duration: facts
                .completion_time
                .zip(facts.start_time)
                .and_then(|(end, start)| end.duration_since(start).ok()),
        });
        record.state = facts.state;
        let in_step = keeps_in_step(kind, &record.params);
        if in_step {
            // NB: the point it says it brought the disks to; an agent that does not say took
            // the newest when it started (a point cut before then and saved after may be
            // missing: the next job brings it). One that failed may have left them anywhere
            // between two points.
            self.state.original_in_step = succeeded
                .then(|| facts.point_time.or(facts.start_time))
                .flatten();
        }
        if succeeded {
            record.error = None;
            if !routine {
                self.notice(
                    false,
                    reasons::JOB_SUCCEEDED,
                    format!("{} job {} succeeded", kind.as_str(), record.name),
                );
            }
            self.job_succeeded(kind, &record.params, facts.completion_time);
        } else {
            let error = self.failure(record, facts);
            let next = match (error.class, error.next_retry_time) {
                (ErrorClass::Recoverable, Some(at)) => {
                    format!("retry at {}", crate::rpo::format_rfc3339(at))
                }
                (ErrorClass::NonRecoverable, Some(at)) if in_step => format!(
                    "tried again at {} (or at once on spec.requests.retry)",
                    crate::rpo::format_rfc3339(at)
                ),
                _ => "no retry: an administrator must act (then set spec.requests.retry)".into(),
            };
            self.notice(
                true,
                reasons::JOB_FAILED,
                format!(
                    "{} job {} failed ({}): {}; {next}",
                    kind.as_str(),
                    record.name,
                    error.reason,
                    error.message
                ),
            );
            if error.class == ErrorClass::NonRecoverable {
                self.request_failed_for_good(kind, &record.params, &error);
            }
            record.error = Some(error);
        }
    }

    fn job_succeeded(&mut self, kind: JobKind, params: &JobParams, ended: Option<SystemTime>) {
        let (token, to_primary) = (params.request_token.clone(), params.to_primary);
        let handled = &mut self.state.handled;
        match kind {
            JobKind::EnableProtection => self.state.phase = Phase::FinalizingProtection,
            JobKind::FinalizeProtection => self.state.phase = Phase::Protected,
            JobKind::Resynchronize => {
                self.state.phase = Phase::Protected;
                self.state.last_resync = Some(ended.unwrap_or(self.now));
                if token.is_some() {
                    handled.resync = token;
                }
            }
            JobKind::TestFailover => {
                self.state.test_failover_exists = true;
                self.results = ResultChange::TestFailoverFromJob;
                handled.test_failover = token;
            }
            JobKind::CleanupTestFailover => {
                self.state.test_failover_exists = false;
                self.results = ResultChange::ClearTestFailover;
                handled.cleanup_test_failover = token;
                self.test_failover_outcome = Some(Verdict::no(
                    "CleanedUp",
                    "the test failover's disks were removed",
                ));
            }
            // NB: a planned failback's first steps, while the recovered VM runs: the next
            // job follows in the next pass.
            JobKind::Failover | JobKind::Failback if params.presync => {}
            // NB: a failback's first half: its point is in status from this pass on, and the
            // Failback job that writes the original disks with it follows in the next.
            JobKind::Failover if to_primary => self.results = ResultChange::FailbackFromJob,
            JobKind::Failover => {
                self.state.phase = Phase::FailedOver;
                self.results = ResultChange::FailoverFromJob;
                handled.failover = token;
            }
            JobKind::Commit => {
                self.state.phase = Phase::FailoverCommitted;
                handled.commit = token;
            }
            JobKind::Reprotect => {
                self.state.phase = Phase::Protected;
                self.state.last_resync = Some(ended.unwrap_or(self.now));
                handled.reprotect = token;
            }
            JobKind::Failback => {
                self.state.phase = Phase::FailedBack;
                self.results = ResultChange::FailbackFromJob;
                handled.failover = token;
            }
            JobKind::DisableProtection => self.state.phase = Phase::Disabled,
        }
    }

    /// The error of a failed attempt, with its retry decided.
    fn failure(&self, record: &JobRecord, facts: &JobFacts) -> ErrorReport {
        let failed_at = facts.completion_time.unwrap_or(self.now);
        let mut error = facts.error.clone().unwrap_or_else(|| ErrorReport {
            class: ErrorClass::Recoverable,
            reason: "JobFailed".into(),
            message: "the job failed without saying why".into(),
            retry_count: 0,
            next_retry_time: None,
            first_seen_time: None,
        });
        error.retry_count = record.attempt.saturating_sub(1);
        error.first_seen_time = record
            .error
            .as_ref()
            .and_then(|e| e.first_seen_time)
            .or(Some(failed_at));
        // NB: the agent's own retry time is honoured, but never sooner than the ASR backoff:
        // an agent that asks for an immediate retry must not make the operator hot-loop.
        // NB: a store-only job taken from a lost agent runs again at once, on a live one.
        if error.reason == AGENT_LOST
            && (store_only(record.kind, &record.params) && self.live_recovery_node().is_some()
                || self.failback_goes_home(record.kind, &record.params))
        {
            error.next_retry_time = Some(failed_at);
            return error;
        }
        error.next_retry_time =
            match next_retry(error.class, record.attempt, failed_at, self.interval) {
                RetryDecision::RetryAt(seed) => {
                    Some(error.next_retry_time.map_or(seed, |t| t.max(seed)))
                }
                RetryDecision::GiveUp => None,
            };
        // NB: keeping the original disks in step answers no request and nothing waits on it:
        // it is tried again within `IN_STEP_RETRY` whatever failed, even a failure an
        // administrator must mend (the disks held open by the VM left paused there, say), so
        // that it heals once mended.
        if keeps_in_step(record.kind, &record.params) {
            let latest = failed_at + IN_STEP_RETRY.max(self.interval);
            error.next_retry_time = Some(error.next_retry_time.map_or(latest, |t| t.min(latest)));
        }
        error
    }

    /// A request whose job failed for good is over: echo its token.
    fn request_failed_for_good(&mut self, kind: JobKind, params: &JobParams, error: &ErrorReport) {
        let token = params.request_token.clone();
        let handled = &mut self.state.handled;
        match kind {
            // NB: a failback that could not write the original disks while the recovered VM
            // ran, or could not stop it (or ship its changes): it keeps replicating, as a
            // failover in that case does.
            JobKind::Failover if params.to_primary => {
                self.state.phase = Phase::Protected;
                handled.failover = token;
                self.failover_outcome = Some(Verdict::no(&error.reason, error.message.clone()));
            }
            // NB: kept in step for no request: the next one is due later, nothing else.
            JobKind::Failback if keeps_in_step(kind, params) => {}
            JobKind::Failback if params.presync => {
                self.state.phase = Phase::Protected;
                handled.failover = token;
                self.failover_outcome = Some(Verdict::no(&error.reason, error.message.clone()));
            }
            // NB: the phase stays: the job waits for a retry token or a spec change, as an
            // enable does (the source VM is stopped, the point is cut).
            JobKind::Failback => {
                handled.failover = token;
                self.failover_outcome = Some(Verdict::no(&error.reason, error.message.clone()));
            }
            JobKind::Reprotect => handled.reprotect = token,
            JobKind::Failover => {
                self.state.phase = Phase::Protected;
                handled.failover = token;
                self.failover_outcome = Some(Verdict::no(&error.reason, error.message.clone()));
            }
            JobKind::TestFailover => {
                handled.test_failover = token;
                self.test_failover_outcome =
                    Some(Verdict::no(&error.reason, error.message.clone()));
            }
            JobKind::CleanupTestFailover => handled.cleanup_test_failover = token,
            JobKind::Commit => handled.commit = token,
            JobKind::Resynchronize => {
                self.state.phase = Phase::Protected;
                if token.is_some() {
                    handled.resync = token;
                }
            }
            JobKind::EnableProtection
            | JobKind::FinalizeProtection
            | JobKind::DisableProtection => {}
        }
    }

    pub(super) fn take_retry_request(&mut self) {
        if let Some(token) = &self.input.spec.requests.retry
            && self.state.handled.retry.as_ref() != Some(token)
        {
            self.state.handled.retry = Some(token.clone());
            self.retry_asked = true;
        }
    }

    pub(super) fn retry_gate(&self, record: &JobRecord) -> RetryGate {
        let Some(error) = &record.error else {
            return RetryGate::Now;
        };
        // NB: a job keeping the original disks in step runs again at its retry time whatever
        // failed (`failure` sets one within `IN_STEP_RETRY`).
        let in_step = keeps_in_step(record.kind, &record.params);
        let at_its_time = || match error.next_retry_time {
            Some(at) if at > self.now => RetryGate::At(at),
            _ => RetryGate::Now,
        };
        match error.class {
            _ if self.retry_asked => RetryGate::Now,
            ErrorClass::Recoverable => at_its_time(),
            ErrorClass::NonRecoverable if in_step => at_its_time(),
            ErrorClass::NonRecoverable if self.spec_changed && !answered(record) => RetryGate::Now,
            ErrorClass::NonRecoverable => RetryGate::Never,
        }
    }

    /// The current job failed: retry it when due. `Some(true)`: retried or waiting for the
    /// retry; `Some(false)`: blocked for good; `None`: the current job did not fail.
    pub(super) fn retry_failed(&mut self) -> Option<bool> {
        let record = self
            .state
            .job
            .clone()
            .filter(|j| j.state == JobState::Failed)?;
        match self.retry_gate(&record) {
            RetryGate::Now => {
                self.start_job(record.kind, record.params.clone(), record.attempt + 1);
                Some(true)
            }
            RetryGate::At(at) => {
                self.wake.push(at);
                Some(true)
            }
            RetryGate::Never => Some(false),
        }
    }

    pub(super) fn start_job(&mut self, kind: JobKind, params: JobParams, attempt: u32) {
        let previous = self.state.job.take();
        let sequence = previous.as_ref().map_or(0, |j| j.sequence) + 1;
        let name = job_name(&self.input.spec.name, kind, sequence);
        // NB: a retry keeps the operation's error, so that status shows what is being retried.
        let error = previous
            .filter(|p| attempt > 1 && p.kind == kind)
            .and_then(|p| p.error);
        let in_step = keeps_in_step(kind, &params);
        if !in_step || attempt > 1 {
            self.notice(
                false,
                reasons::JOB_CREATED,
                match attempt {
                    1 => format!("{} job {name} created", kind.as_str()),
                    n => format!("{} job {name} created (attempt {n})", kind.as_str()),
                },
            );
        }
        let node = self.place(kind, &params);
        if node.is_none() && self.failback_goes_home(kind, &params) {
            self.notice(
                true,
                reasons::JOB_RELOCATED,
                format!(
                    "{} job {name} goes to the primary site's node: the recovered VM's agent has been silent for over {}s (the failback chooses its point from the store)",
                    kind.as_str(),
                    super::JOB_AGENT_LOST.as_secs()
                ),
            );
        }
        if let Some(node) = &node {
            let why = match self.disks_elsewhere(kind) {
                Some((disks, _)) if disks == node => "it holds the disks the job is about".into(),
                _ => format!(
                    "the agent of the VM's node has been silent for over {}s",
                    super::JOB_AGENT_LOST.as_secs()
                ),
            };
            self.notice(
                true,
                reasons::JOB_RELOCATED,
                format!("{} job {name} goes to node {node}: {why}", kind.as_str()),
            );
        }
        self.create = Some(NewJob {
            name: name.clone(),
            kind,
            sequence,
            attempt,
            params: params.clone(),
            node,
        });
        self.state.job = Some(JobRecord {
            name,
            kind,
            state: JobState::Pending,
            sequence,
            attempt,
            params,
            error,
        });
        match kind {
            JobKind::EnableProtection => self.state.phase = Phase::EnablingProtection,
            JobKind::FinalizeProtection => self.state.phase = Phase::FinalizingProtection,
            JobKind::Resynchronize => self.state.phase = Phase::Resynchronizing,
            // NB: the failback overwrites the original disks from here on: they are no
            // longer known to be in step (a failback that fails before the stop gets them
            // kept in step again).
            JobKind::Failover if self.state.reverse => {
                self.state.phase = Phase::FailingBack;
                self.state.original_in_step = None;
            }
            JobKind::Failover => self.state.phase = Phase::FailingOver,
            JobKind::Reprotect => self.state.phase = Phase::Reprotecting,
            JobKind::Failback if in_step => {}
            JobKind::Failback => self.state.phase = Phase::FailingBack,
            JobKind::DisableProtection => self.state.phase = Phase::DisablingProtection,
            JobKind::TestFailover | JobKind::CleanupTestFailover | JobKind::Commit => {}
        }
    }

    /// The current job as failed, when the agent that holds it (or, for a store-only job
    /// that no agent claimed, the agent it waits for) is lost, so that it runs again
    /// elsewhere or later and no request waits behind it.
    fn lost_agent(&self, facts: &JobFacts) -> Option<JobFacts> {
        let record = self.state.job.as_ref()?;
        let silence = lost_for(self.input.job_heartbeat, self.now)?;
        let taken = match facts.state {
            JobState::Running | JobState::WaitingForInput => true,
            // NB: an unclaimed job is taken only when it has somewhere better to go.
            JobState::Pending => {
                store_only(record.kind, &record.params) && self.live_recovery_node().is_some()
                    || self.failback_goes_home(record.kind, &record.params)
            }
            JobState::Succeeded | JobState::Failed => false,
        };
        taken.then(|| JobFacts {
            state: JobState::Failed,
            completion_time: Some(self.now),
            error: Some(ErrorReport {
                class: ErrorClass::Recoverable,
                reason: AGENT_LOST.into(),
                message: format!(
                    "the agent holding job {} has been silent for {}s (over {}s): the job is taken from it",
                    record.name,
                    silence.as_secs(),
                    super::JOB_AGENT_LOST.as_secs()
                ),
                retry_count: 0,
                next_retry_time: None,
                first_seen_time: None,
            }),
            ..facts.clone()
        })
    }

    /// Whether a failback's unplanned Failover runs at the primary site, from the store: the
    /// recovered VM's agent (the one that replicates in reverse) is lost, the primary's lives.
    pub(super) fn failback_goes_home(&self, kind: JobKind, params: &JobParams) -> bool {
        // NB: lost as a job is taken from its agent.
        self.state.reverse
            && unplanned_failback(kind, params)
            && lost_for(self.input.heartbeat, self.now).is_some()
            && alive(self.input.primary_heartbeat, self.now)
    }

    /// Withdraw the unclaimed job `record` (it did nothing yet): delete it, say `why` (a
    /// warning, or not), and keep it as ended without an error.
    pub(super) fn withdraw(&mut self, record: JobRecord, warning: bool, why: &str) {
        self.delete = Some(record.name.clone());
        self.notice(
            warning,
            reasons::JOB_WITHDRAWN,
            format!(
                "{} job {} withdrawn: {why}",
                record.kind.as_str(),
                record.name
            ),
        );
        self.state.job = Some(JobRecord {
            state: JobState::Failed,
            error: None,
            ..record
        });
    }

    /// The first recovery node whose agent is alive.
    fn live_recovery_node(&self) -> Option<&str> {
        self.input
            .recovery
            .iter()
            .find(|(_, beat)| alive(*beat, self.now))
            .map(|(node, _)| node.as_str())
    }

    /// The node (not the VM's) holding the disks a commit or a cleanup is about, with its
    /// agent's last heartbeat.
    fn disks_elsewhere(&self, kind: JobKind) -> Option<(&str, Option<SystemTime>)> {
        let disks = match kind {
            JobKind::Commit => self.input.failover,
            JobKind::CleanupTestFailover => self.input.test_failover,
            _ => None,
        }?;
        Some((disks.node.as_deref()?, disks.heartbeat))
    }

    /// Where a new job runs: the VM's node, unless the job needs only the store and the
    /// VM's agent is lost while a recovery node's is alive. A commit or a cleanup follows the
    /// disks it is about when another node holds them: there while that node's agent is alive,
    /// else on a live recovery node, else it waits there (never on the VM's node, whose agent
    /// a failover elsewhere fenced).
    fn place(&self, kind: JobKind, params: &JobParams) -> Option<String> {
        // NB: replicating in reverse, the VM's work is on the recovery site's node; the
        // Failback job writes the primary site's disks, on its node.
        if self.state.reverse
            && kind != JobKind::Failback
            && !store_only(kind, params)
            && !self.failback_goes_home(kind, params)
            && let Some(node) = &self.input.spec.recovery_site
        {
            return Some(node.clone());
        }
        if let Some((node, beat)) = self.disks_elsewhere(kind) {
            let live = alive(beat, self.now).then_some(node);
            return live
                .or_else(|| self.live_recovery_node())
                .or(Some(node))
                .map(str::to_owned);
        }
        if !store_only(kind, params) || alive(self.input.heartbeat, self.now) {
            return None;
        }
        self.live_recovery_node().map(str::to_owned)
    }

    /// Start the job of a request. A request is asked again at every pass until its token is
    /// echoed, which a recoverable failure does not do: when its own job is the one that
    /// failed, asking again is that job's retry, and it follows the retry schedule like any
    /// other (never sooner than the backoff, the attempt counted on), not a new attempt 1.
    pub(super) fn start_request(&mut self, kind: JobKind, params: JobParams) {
        let retrying = params.request_token.is_some()
            && self.state.job.as_ref().is_some_and(|j| {
                j.kind == kind
                    && j.state == JobState::Failed
                    && j.params.request_token == params.request_token
            });
        if retrying {
            self.retry_failed();
        } else {
            self.start_job(kind, params, 1);
        }
    }
}

/// Whether a job that failed for good answered its request and left the VM replicating as it
/// was: a failover, or a failback's steps up to and with the stop (the request is echoed as
/// failed, the VM still runs). A spec change does not start it again (it would stop a VM
/// whose user was told it stays up); only a `retry` token does.
fn answered(record: &JobRecord) -> bool {
    record.params.request_token.is_some()
        && (record.kind == JobKind::Failover
            || (record.kind == JobKind::Failback && record.params.presync))
}
