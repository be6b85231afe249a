//! The ProtectedVM decision: from the spec, the operator's last decisions (read back from
//! status), the policy, what the agent reported, the current job and the time, decide the next
//! job, the status, the conditions, the events and when to look again.
//!
//! ```text
//!            EnableProtection ok        FinalizeProtection ok
//!  Pending ──> EnablingProtection ──> InitialReplication ──> FinalizingProtection ──> Protected
//!                                      (copy step running)                            │   ▲
//!                    ResyncRequired (automatic, in the window) or a resync request ──┤   │ ok
//!                                                                                     ▼   │
//!   FailoverCommitted <── Commit ok ── FailedOver <── Failover ok ── FailingOver    Resynchronizing
//!
//!  any phase ── protection Disabled or the VM deleted ──> DisablingProtection ──> Disabled
//! ```
//!
//! # Guarantees
//!
//! - At most one job per VM runs at a time; a request waits while another job runs.
//! - A failed job is retried only at its retry time (the later of what the agent asked and
//!   the ASR backoff of [`crate::retry::next_retry`]), never sooner, unless someone sets a new
//!   `retry` token; a non-recoverable failure is retried only after the spec changes or a
//!   `retry` token, so nothing hot-loops.
//! - A request token is echoed in `handled` exactly when its request ended: done, failed for
//!   good, or rejected (with a `RequestRejected` event saying why).
//! - The decision is idempotent: deciding again from the state it produced (with the same
//!   facts and time) creates no job and changes nothing.
//!
//! # Assumptions
//!
//! The shell creates the job before it writes the status that names it, and job names are
//! deterministic (`<vm>-<kind>-<sequence>`), so that a crash between the two writes leads
//! to the same name, which the shell adopts.

use std::time::{Duration, SystemTime};

use crate::conditions::{ObservedCondition, Verdict, VmConditionFacts, set_verdicts, types};
use crate::health::{Health, HealthInputs, decide_health, next_health_change};
use crate::model::{
    ErrorReport, FailoverKind, JobKind, JobParams, JobState, Phase, PointChoice, PolicySettings,
    ResyncReason,
};
use crate::retry::{ErrorClass, RetryDecision, next_retry};
use crate::rpo::rpo;

/// The copy interval assumed while a VM's policy cannot be read.
pub const DEFAULT_COPY_INTERVAL: Duration = Duration::from_secs(300);
/// The RPO threshold assumed while a VM's policy cannot be read.
pub const DEFAULT_RPO_THRESHOLD: Duration = Duration::from_secs(30 * 60);
/// The longest a VM goes without being looked at again.
pub const MAX_REQUEUE: Duration = Duration::from_secs(10 * 60);
/// The shortest requeue: no hot loop, whatever the inputs say.
pub const MIN_REQUEUE: Duration = Duration::from_secs(1);
/// How often to look again while the policy is missing or not usable.
const POLICY_RECHECK: Duration = Duration::from_secs(60);
/// How often to look again while disabling waits for a running job.
const DISABLE_RECHECK: Duration = Duration::from_secs(30);

/// Event reasons (stable: alerting matches them).
pub mod reasons {
    /// A job was created.
    pub const JOB_CREATED: &str = "JobCreated";
    /// An agent claimed a job.
    pub const JOB_STARTED: &str = "JobStarted";
    /// A job succeeded.
    pub const JOB_SUCCEEDED: &str = "JobSucceeded";
    /// A job failed.
    pub const JOB_FAILED: &str = "JobFailed";
    /// A request cannot be honoured in the VM's state.
    pub const REQUEST_REJECTED: &str = "RequestRejected";
    /// An unclaimed job was withdrawn (protection is being disabled).
    pub const JOB_WITHDRAWN: &str = "JobWithdrawn";
    /// Health turned Normal.
    pub const HEALTH_NORMAL: &str = "HealthNormal";
    /// Health turned Warning.
    pub const HEALTH_WARNING: &str = "HealthWarning";
    /// Health turned Critical.
    pub const HEALTH_CRITICAL: &str = "HealthCritical";
}

/// A test failover request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestFailoverAsk {
    /// The token.
    pub token: String,
    /// Which point.
    pub point: PointChoice,
}

/// A failover request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverAsk {
    /// The token.
    pub token: String,
    /// Planned or unplanned.
    pub kind: FailoverKind,
    /// Which point.
    pub point: PointChoice,
}

/// The requests in the spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// Resynchronize now.
    pub resync: Option<String>,
    /// Test failover.
    pub test_failover: Option<TestFailoverAsk>,
    /// Clean up the test failover.
    pub cleanup_test_failover: Option<String>,
    /// Fail over.
    pub failover: Option<FailoverAsk>,
    /// Commit the failover.
    pub commit: Option<String>,
    /// Retry what failed, now.
    pub retry: Option<String>,
}

/// The request tokens handled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// Resync.
    pub resync: Option<String>,
    /// Test failover.
    pub test_failover: Option<String>,
    /// Cleanup.
    pub cleanup_test_failover: Option<String>,
    /// Failover.
    pub failover: Option<String>,
    /// Commit.
    pub commit: Option<String>,
    /// Retry.
    pub retry: Option<String>,
}

/// What the decisions need of the spec and metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct VmSpec {
    /// The VM resource's name (job names start with it).
    pub name: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// `metadata.creationTimestamp`.
    pub created: SystemTime,
    /// Whether `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `spec.protection == Enabled`.
    pub protect: bool,
    /// `spec.deleteReplicaOnDisable`.
    pub delete_replica: bool,
    /// `spec.requests`.
    pub requests: Requests,
}

/// The job the VM waits on, or the last one it ran, as the operator remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    /// The job's name.
    pub name: String,
    /// Its kind.
    pub kind: JobKind,
    /// Its state, as last taken in.
    pub state: JobState,
    /// The VM's job counter when it was created.
    pub sequence: u32,
    /// 1 for a first try, 2 for the first retry, ...
    pub attempt: u32,
    /// Its parameters (a retry asks for the same).
    pub params: JobParams,
    /// The error of the operation's last failed attempt, until the operation succeeds.
    pub error: Option<ErrorReport>,
}

/// The operator's decisions about a VM, as its status holds them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmState {
    /// The generation decided for.
    pub observed_generation: Option<i64>,
    /// The policy generation decided with.
    pub policy_generation: Option<i64>,
    /// The phase.
    pub phase: Phase,
    /// The health.
    pub health: Option<Health>,
    /// The health's reason.
    pub health_reason: String,
    /// The health's message.
    pub health_message: String,
    /// The RPO as last written.
    pub rpo: Option<Duration>,
    /// When the next cycle is due.
    pub next_cycle: Option<SystemTime>,
    /// The error shown: the current operation's, else the agent's last cycle error.
    pub last_error: Option<ErrorReport>,
    /// The tokens handled.
    pub handled: Handled,
    /// The current (or last) job.
    pub job: Option<JobRecord>,
    /// When the last resync completed.
    pub last_resync: Option<SystemTime>,
    /// Whether a test failover's disks exist.
    pub test_failover_exists: bool,
    /// The conditions.
    pub conditions: Vec<ObservedCondition>,
}

/// One disk, as the agent reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskFacts {
    /// The disk's name.
    pub name: String,
    /// Its size.
    pub size_bytes: u64,
    /// Its change logs awaiting shipment.
    pub pending_log_bytes: u64,
}

/// What the agent reported about the VM: facts only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentFacts {
    /// When the report was written.
    pub report_time: Option<SystemTime>,
    /// When the last cycle started.
    pub last_cycle_start: Option<SystemTime>,
    /// When the last successful cycle ended.
    pub last_successful_cycle: Option<SystemTime>,
    /// Successful cycles in the hour before the report.
    pub cycles_succeeded_last_hour: u32,
    /// Per disk.
    pub disks: Vec<DiskFacts>,
    /// The time the latest durable recovery point captures.
    pub latest_point: Option<SystemTime>,
    /// The last cycle error, while it stands.
    pub last_error: Option<ErrorReport>,
    /// Change tracking lost: why and when.
    pub tracking_lost: Option<(ResyncReason, SystemTime)>,
}

/// The current job as found in the API.
#[derive(Clone, Debug, PartialEq)]
pub struct JobFacts {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: JobState,
    /// An EnableProtection job is copying the disks.
    pub copying: bool,
    /// When the agent started it.
    pub start_time: Option<SystemTime>,
    /// When it ended.
    pub completion_time: Option<SystemTime>,
    /// Why it failed.
    pub error: Option<ErrorReport>,
}

/// What the shell knows of the job the state names.
#[derive(Clone, Debug, PartialEq)]
pub enum JobObservation {
    /// There is no current job, or it was not looked up (it is finished).
    NotLookedUp,
    /// The API server says it does not exist.
    Missing,
    /// As found.
    Found(JobFacts),
}

/// Everything a VM's decision is made from.
#[derive(Clone, Debug)]
pub struct VmInput<'a> {
    /// The time of the decision.
    pub now: SystemTime,
    /// The spec.
    pub spec: &'a VmSpec,
    /// The last decisions.
    pub state: &'a VmState,
    /// The policy, if it exists.
    pub policy: Option<&'a PolicySettings>,
    /// The agent's report, if any.
    pub agent: Option<&'a AgentFacts>,
    /// The current job.
    pub job: &'a JobObservation,
    /// The last heartbeat of the node's agent (its Lease), if it ever had one.
    pub heartbeat: Option<SystemTime>,
}

/// A job to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewJob {
    /// Its name: `<vm>-<kind>-<sequence>`.
    pub name: String,
    /// Its kind.
    pub kind: JobKind,
    /// The VM's job counter.
    pub sequence: u32,
    /// 1 for a first try.
    pub attempt: u32,
    /// Its parameters.
    pub params: JobParams,
}

/// A job that ended in this pass, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedJob {
    /// Its kind.
    pub kind: JobKind,
    /// Whether it succeeded.
    pub succeeded: bool,
    /// From start to completion, when both are known.
    pub duration: Option<Duration>,
}

/// How the (test) failover results in status change: the shell copies them from the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResultChange {
    /// Keep them as they are.
    #[default]
    Keep,
    /// Copy the test failover's result from the job that just succeeded.
    TestFailoverFromJob,
    /// The test failover's disks are gone.
    ClearTestFailover,
    /// Copy the failover's result from the job that just succeeded.
    FailoverFromJob,
}

/// A Kubernetes Event to publish about the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// A stable reason from [`reasons`].
    pub reason: &'static str,
    /// For people.
    pub note: String,
}

/// The decision.
#[derive(Clone, Debug, PartialEq)]
pub struct VmDecision {
    /// The new decisions, for status.
    pub state: VmState,
    /// Whether `state` differs from the input's (the shell writes status only then).
    pub changed: bool,
    /// A job to create (before writing status).
    pub create_job: Option<NewJob>,
    /// An unclaimed job to delete (protection is being disabled).
    pub delete_job: Option<String>,
    /// Events.
    pub notices: Vec<Notice>,
    /// A job that ended, for metrics.
    pub finished_job: Option<FinishedJob>,
    /// How the (test) failover results change.
    pub results: ResultChange,
    /// The finalizer may go: the VM is being deleted and protection is disabled.
    pub release_finalizer: bool,
    /// When to decide again if nothing happens meanwhile.
    pub requeue_after: Duration,
    /// Cycles due in the last hour that did not succeed, for metrics.
    pub cycles_missed_last_hour: u32,
}

/// The name of the `sequence`-th job of VM `vm`: `<vm>-<kind>-<sequence>`, at most 253
/// characters (a long VM name is cut and marked with a hash of the whole name).
pub fn job_name(vm: &str, kind: JobKind, sequence: u32) -> String {
    let suffix = format!("-{}-{sequence}", kind.short_name());
    if vm.len() + suffix.len() <= 253 {
        return format!("{vm}{suffix}");
    }
    let hash = vm.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let keep = 253 - suffix.len() - 9;
    let cut = vm.get(..keep).unwrap_or(vm).trim_end_matches(['-', '.']);
    format!("{cut}-{:08x}{suffix}", hash & 0xffff_ffff)
}

/// Decide what happens next to a VM.
pub fn decide_vm(input: &VmInput<'_>) -> VmDecision {
    let mut pass = Pass::new(input);
    pass.absorb_job();
    pass.take_retry_request();
    if input.spec.deleting || !input.spec.protect {
        pass.disable();
    } else {
        pass.protect();
    }
    pass.conclude()
}

/// When a failed operation may run again.
enum RetryGate {
    Now,
    At(SystemTime),
    Never,
}

/// The kinds of request, for rejections.
#[derive(Clone, Copy)]
enum Ask {
    Resync,
    TestFailover,
    Failover,
    Commit,
}

struct Pass<'a> {
    input: &'a VmInput<'a>,
    now: SystemTime,
    interval: Duration,
    state: VmState,
    create: Option<NewJob>,
    delete: Option<String>,
    notices: Vec<Notice>,
    finished: Option<FinishedJob>,
    results: ResultChange,
    release: bool,
    wake: Vec<SystemTime>,
    waiting: Option<(&'static str, String)>,
    test_failover_outcome: Option<Verdict>,
    failover_outcome: Option<Verdict>,
    retry_asked: bool,
    spec_changed: bool,
}

impl<'a> Pass<'a> {
    fn new(input: &'a VmInput<'a>) -> Self {
        Self {
            input,
            now: input.now,
            interval: input
                .policy
                .map_or(DEFAULT_COPY_INTERVAL, |p| p.copy_interval),
            state: input.state.clone(),
            create: None,
            delete: None,
            notices: Vec::new(),
            finished: None,
            results: ResultChange::Keep,
            release: false,
            wake: Vec::new(),
            waiting: None,
            test_failover_outcome: None,
            failover_outcome: None,
            retry_asked: false,
            spec_changed: input
                .state
                .observed_generation
                .is_some_and(|g| g != input.spec.generation),
        }
    }

    fn notice(&mut self, warning: bool, reason: &'static str, note: String) {
        self.notices.push(Notice {
            warning,
            reason,
            note,
        });
    }

    fn idle(&self) -> bool {
        self.state
            .job
            .as_ref()
            .is_none_or(|j| j.state.is_finished())
    }

    fn has_recovery_point(&self) -> bool {
        self.input.agent.is_some_and(|a| a.latest_point.is_some())
    }

    // ---- the current job ----

    fn absorb_job(&mut self) {
        let Some(mut record) = self.state.job.clone() else {
            return;
        };
        let facts = match self.input.job {
            JobObservation::Found(f) if f.name == record.name => f.clone(),
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
            },
            _ => return,
        };
        if record.state.is_finished() {
            return;
        }
        if record.state == JobState::Pending && facts.state != JobState::Pending {
            self.notice(
                false,
                reasons::JOB_STARTED,
                format!("{} job {} started", record.kind.as_str(), record.name),
            );
        }
        if facts.state.is_finished() {
            self.job_ended(&mut record, &facts);
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

    fn job_ended(&mut self, record: &mut JobRecord, facts: &JobFacts) {
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
        let token = record.params.request_token.clone();
        if succeeded {
            record.error = None;
            self.notice(
                false,
                reasons::JOB_SUCCEEDED,
                format!("{} job {} succeeded", kind.as_str(), record.name),
            );
            self.job_succeeded(kind, token, facts.completion_time);
        } else {
            let error = self.failure(record, facts);
            let next = match (error.class, error.next_retry_time) {
                (ErrorClass::Recoverable, Some(at)) => {
                    format!("retry at {}", crate::rpo::format_rfc3339(at))
                }
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
                self.request_failed_for_good(kind, token, &error);
            }
            record.error = Some(error);
        }
    }

    fn job_succeeded(&mut self, kind: JobKind, token: Option<String>, ended: Option<SystemTime>) {
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
            JobKind::Failover => {
                self.state.phase = Phase::FailedOver;
                self.results = ResultChange::FailoverFromJob;
                handled.failover = token;
            }
            JobKind::Commit => {
                self.state.phase = Phase::FailoverCommitted;
                handled.commit = token;
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
        error.next_retry_time =
            match next_retry(error.class, record.attempt, failed_at, self.interval) {
                RetryDecision::RetryAt(seed) => {
                    Some(error.next_retry_time.map_or(seed, |t| t.max(seed)))
                }
                RetryDecision::GiveUp => None,
            };
        error
    }

    /// A request whose job failed for good is over: echo its token.
    fn request_failed_for_good(
        &mut self,
        kind: JobKind,
        token: Option<String>,
        error: &ErrorReport,
    ) {
        let handled = &mut self.state.handled;
        match kind {
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

    fn take_retry_request(&mut self) {
        if let Some(token) = &self.input.spec.requests.retry
            && self.state.handled.retry.as_ref() != Some(token)
        {
            self.state.handled.retry = Some(token.clone());
            self.retry_asked = true;
        }
    }

    fn retry_gate(&self, record: &JobRecord) -> RetryGate {
        let Some(error) = &record.error else {
            return RetryGate::Now;
        };
        match error.class {
            _ if self.retry_asked => RetryGate::Now,
            ErrorClass::Recoverable => match error.next_retry_time {
                Some(at) if at > self.now => RetryGate::At(at),
                _ => RetryGate::Now,
            },
            ErrorClass::NonRecoverable if self.spec_changed => RetryGate::Now,
            ErrorClass::NonRecoverable => RetryGate::Never,
        }
    }

    /// The current job failed: retry it when due. `Some(true)`: retried or waiting for the
    /// retry; `Some(false)`: blocked for good; `None`: the current job did not fail.
    fn retry_failed(&mut self) -> Option<bool> {
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

    fn start_job(&mut self, kind: JobKind, params: JobParams, attempt: u32) {
        let previous = self.state.job.take();
        let sequence = previous.as_ref().map_or(0, |j| j.sequence) + 1;
        let name = job_name(&self.input.spec.name, kind, sequence);
        // NB: a retry keeps the operation's error, so that status shows what is being retried.
        let error = previous
            .filter(|p| attempt > 1 && p.kind == kind)
            .and_then(|p| p.error);
        self.notice(
            false,
            reasons::JOB_CREATED,
            match attempt {
                1 => format!("{} job {name} created", kind.as_str()),
                n => format!("{} job {name} created (attempt {n})", kind.as_str()),
            },
        );
        self.create = Some(NewJob {
            name: name.clone(),
            kind,
            sequence,
            attempt,
            params: params.clone(),
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
            JobKind::Failover => self.state.phase = Phase::FailingOver,
            JobKind::DisableProtection => self.state.phase = Phase::DisablingProtection,
            JobKind::TestFailover | JobKind::CleanupTestFailover | JobKind::Commit => {}
        }
    }

    fn start_request(&mut self, kind: JobKind, params: JobParams) {
        self.start_job(kind, params, 1);
    }

    // ---- requests ----

    fn new_token<T: Clone>(
        asked: Option<&T>,
        token: impl Fn(&T) -> &String,
        handled: Option<&String>,
    ) -> Option<T> {
        asked.filter(|a| Some(token(a)) != handled).cloned()
    }

    fn ask_resync(&self) -> Option<String> {
        Self::new_token(
            self.input.spec.requests.resync.as_ref(),
            |t| t,
            self.state.handled.resync.as_ref(),
        )
    }

    fn ask_test_failover(&self) -> Option<TestFailoverAsk> {
        Self::new_token(
            self.input.spec.requests.test_failover.as_ref(),
            |a| &a.token,
            self.state.handled.test_failover.as_ref(),
        )
    }

    fn ask_cleanup(&self) -> Option<String> {
        Self::new_token(
            self.input.spec.requests.cleanup_test_failover.as_ref(),
            |t| t,
            self.state.handled.cleanup_test_failover.as_ref(),
        )
    }

    fn ask_failover(&self) -> Option<FailoverAsk> {
        Self::new_token(
            self.input.spec.requests.failover.as_ref(),
            |a| &a.token,
            self.state.handled.failover.as_ref(),
        )
    }

    fn ask_commit(&self) -> Option<String> {
        Self::new_token(
            self.input.spec.requests.commit.as_ref(),
            |t| t,
            self.state.handled.commit.as_ref(),
        )
    }

    fn reject(&mut self, ask: Ask, token: String, reason: &'static str, why: &str) {
        let (name, slot) = match ask {
            Ask::Resync => ("resync", &mut self.state.handled.resync),
            Ask::TestFailover => ("testFailover", &mut self.state.handled.test_failover),
            Ask::Failover => ("failover", &mut self.state.handled.failover),
            Ask::Commit => ("commit", &mut self.state.handled.commit),
        };
        *slot = Some(token.clone());
        let verdict = Verdict::no(reason, format!("request {token:?} rejected: {why}"));
        match ask {
            Ask::TestFailover => self.test_failover_outcome = Some(verdict),
            Ask::Failover => self.failover_outcome = Some(verdict),
            Ask::Resync | Ask::Commit => {}
        }
        self.notice(
            true,
            reasons::REQUEST_REJECTED,
            format!("{name} request {token:?} rejected ({reason}): {why}"),
        );
    }

    /// Cleanup with nothing to clean: done at once.
    fn cleanup_or_nothing(&mut self, token: String) {
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
    fn reject_requests_before_protection(&mut self) {
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
        if let Some(token) = self.ask_cleanup() {
            self.cleanup_or_nothing(token);
        }
    }

    /// Requests that cannot be honoured once the VM failed over.
    fn reject_requests_after_failover(&mut self, commit_allowed: bool) {
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

    // ---- protection ----

    fn protect(&mut self) {
        if matches!(self.state.phase, Phase::Disabled) {
            self.state.phase = Phase::Pending;
        }
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
            Phase::FailedOver => {
                if self.retry_failed() == Some(true) {
                    return;
                }
                self.reject_requests_after_failover(true);
                if let Some(token) = self.ask_commit() {
                    self.start_request(
                        JobKind::Commit,
                        JobParams {
                            request_token: Some(token),
                            ..JobParams::default()
                        },
                    );
                } else if let Some(token) = self.ask_cleanup() {
                    self.cleanup_or_nothing(token);
                }
            }
            Phase::FailoverCommitted => {
                if self.retry_failed() == Some(true) {
                    return;
                }
                self.reject_requests_after_failover(false);
                if let Some(token) = self.ask_cleanup() {
                    self.cleanup_or_nothing(token);
                }
            }
            Phase::DisablingProtection | Phase::Disabled => {}
        }
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
                self.start_request(
                    JobKind::Failover,
                    JobParams {
                        request_token: Some(ask.token),
                        failover: Some(ask.kind),
                        point: Some(ask.point),
                        ..JobParams::default()
                    },
                );
                return;
            }
        }
        let blocked = match self.retry_failed() {
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
    }

    /// Why delta replication cannot go on, from facts newer than the last resync.
    fn resync_required(&self) -> Option<ResyncReason> {
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

    // ---- disabling ----

    fn disable(&mut self) {
        let record = self.state.job.clone();
        if let Some(record) = record.filter(|j| !j.state.is_finished()) {
            if record.kind == JobKind::DisableProtection {
                return;
            }
            if record.state != JobState::Pending {
                self.waiting = Some((
                    "WaitingForJob",
                    format!(
                        "disabling waits for {} job {} to end",
                        record.kind.as_str(),
                        record.name
                    ),
                ));
                self.wake.push(self.now + DISABLE_RECHECK);
                return;
            }
            // NB: an unclaimed job did nothing yet: withdraw it instead of waiting for it.
            self.delete = Some(record.name.clone());
            self.notice(
                false,
                reasons::JOB_WITHDRAWN,
                format!(
                    "{} job {} withdrawn: protection is being disabled",
                    record.kind.as_str(),
                    record.name
                ),
            );
            let nothing_on_node = record.kind == JobKind::EnableProtection && record.attempt == 1;
            self.state.job = Some(JobRecord {
                state: JobState::Failed,
                error: None,
                ..record
            });
            if nothing_on_node {
                self.state.phase = Phase::Disabled;
            }
        }
        match self.state.phase {
            Phase::Pending | Phase::Disabled => self.state.phase = Phase::Disabled,
            _ => {
                let disable_failed = self.state.job.as_ref().is_some_and(|j| {
                    j.kind == JobKind::DisableProtection && j.state == JobState::Failed
                });
                if !disable_failed || self.retry_failed().is_none() {
                    self.start_job(
                        JobKind::DisableProtection,
                        JobParams {
                            delete_replica: self.input.spec.delete_replica,
                            ..JobParams::default()
                        },
                        1,
                    );
                }
            }
        }
        if self.state.phase == Phase::Disabled && self.input.spec.deleting {
            self.release = true;
        }
    }

    // ---- status ----

    fn replicating_since(&self) -> Option<SystemTime> {
        if self.state.phase != Phase::Protected {
            return None;
        }
        // NB: derived, not stored: delta replication (re)starts when the first point is cut
        // (InitialReplicationComplete turns True) and after every resync.
        let initial = self
            .state
            .conditions
            .iter()
            .find(|c| c.type_ == types::INITIAL_REPLICATION_COMPLETE)
            .filter(|c| c.status == crate::ConditionStatus::True)
            .map(|c| c.last_transition_time);
        initial.max(self.state.last_resync).or(Some(self.now))
    }

    fn conclude(mut self) -> VmDecision {
        let input = self.input;
        let now = self.now;
        let policy = input.policy;
        let rpo_threshold = policy.map_or(DEFAULT_RPO_THRESHOLD, |p| p.rpo_threshold);
        let agent = input.agent;
        let phase = self.state.phase;

        let resync_required = self.resync_required();
        let record = self.state.job.clone();
        let active = record.as_ref().filter(|j| !j.state.is_finished());
        let resync_blocked = record.as_ref().is_some_and(|j| {
            j.kind == JobKind::Resynchronize
                && j.state == JobState::Failed
                && j.error
                    .as_ref()
                    .is_some_and(|e| e.class == ErrorClass::NonRecoverable)
        });
        let resync_can_run = active.is_some_and(|j| j.kind == JobKind::Resynchronize)
            || self.ask_resync().is_some()
            || (!resync_blocked
                && policy.is_some_and(|p| {
                    p.resync_automatic && p.resync_window.as_ref().is_none_or(|w| w.contains(now))
                }));
        let job_error = record.as_ref().and_then(|j| j.error.clone());
        let cycle_error = agent
            .and_then(|a| a.last_error.clone())
            .filter(|_| phase == Phase::Protected);
        self.state.last_error = job_error.clone().or_else(|| cycle_error.clone());
        let worst_class = [&job_error, &cycle_error]
            .into_iter()
            .flatten()
            .map(|e| e.class)
            .max_by_key(|c| matches!(c, ErrorClass::NonRecoverable));

        // A sign of life: the Lease or a report; before either, the clock starts at creation.
        let heartbeat = phase.needs_agent().then(|| {
            input
                .heartbeat
                .max(agent.and_then(|a| a.report_time))
                .unwrap_or(input.spec.created)
        });
        let replicating_since = self.replicating_since();
        let cycles_due = replicating_since.map_or(0, |since| {
            let window = now
                .duration_since(since)
                .unwrap_or_default()
                .min(Duration::from_secs(3600));
            u32::try_from(window.as_secs() / self.interval.as_secs().max(1)).unwrap_or(u32::MAX)
        });
        let succeeded = agent.map_or(0, |a| a.cycles_succeeded_last_hour);
        let health_inputs = HealthInputs {
            now,
            copy_interval: self.interval,
            rpo_threshold,
            replicating_since,
            last_successful_cycle: agent.and_then(|a| a.last_successful_cycle),
            latest_point: agent.and_then(|a| a.latest_point),
            cycles_due_last_hour: cycles_due,
            cycles_missed_last_hour: cycles_due.saturating_sub(succeeded),
            last_error: worst_class,
            resync_required: resync_required.is_some(),
            resync_can_run,
            agent_heartbeat: heartbeat,
        };
        let health = decide_health(&health_inputs);
        if self.state.health.is_some_and(|h| h != health.health)
            || (self.state.health.is_none() && health.health != Health::Normal)
        {
            let (warning, reason) = match health.health {
                Health::Normal => (false, reasons::HEALTH_NORMAL),
                Health::Warning => (true, reasons::HEALTH_WARNING),
                Health::Critical => (true, reasons::HEALTH_CRITICAL),
            };
            self.notice(
                warning,
                reason,
                format!("{}: {}", health.reason, health.message),
            );
        }
        // NB: a message that only counts minutes (silent for 3m, 4m, ...) is not news: it is
        // rewritten when the health or its reason changes, so that a quiet VM costs no writes.
        if self.state.health != Some(health.health) || self.state.health_reason != health.reason {
            self.state.health_message = health.message.clone();
        }
        self.state.health = Some(health.health);
        self.state.health_reason = health.reason.to_owned();

        self.state.next_cycle = (phase == Phase::Protected)
            .then(|| {
                cycle_error
                    .as_ref()
                    .and_then(|e| e.next_retry_time)
                    .or_else(|| {
                        agent
                            .and_then(|a| a.last_cycle_start.or(a.last_successful_cycle))
                            .map(|t| t + self.interval)
                    })
            })
            .flatten();
        self.state.policy_generation = policy.and_then(|p| p.generation);
        self.state.observed_generation = Some(input.spec.generation);

        let agent_silent =
            matches!(health.reason, "AgentQuiet" | "AgentLost").then_some(health.reason);
        let waiting = self.waiting.as_ref().map(|(r, m)| (*r, m.as_str()));
        let facts = VmConditionFacts {
            phase,
            waiting,
            current_job: record.as_ref().map(|j| (j.kind, j.state)),
            job_error: job_error.as_ref(),
            cycle_error: cycle_error.as_ref(),
            agent_silent,
            resync_required,
            resync_reason: active
                .filter(|j| j.kind == JobKind::Resynchronize)
                .and_then(|j| j.params.resync_reason),
            test_failover_exists: self.state.test_failover_exists,
            test_failover_outcome: self.test_failover_outcome.clone(),
            failover_outcome: self.failover_outcome.clone(),
        };
        let verdicts = crate::conditions::vm_verdicts(&facts, &self.state.conditions);
        set_verdicts(
            &mut self.state.conditions,
            verdicts,
            Some(input.spec.generation),
            now,
        );

        // RPO: rewritten with everything else, or alone once it moved by a copy interval, so
        // that a VM costs at most one status write per cycle.
        let fresh_rpo = rpo(agent.and_then(|a| a.latest_point), now);
        let previous_rpo = input.state.rpo;
        self.state.rpo = previous_rpo;
        let rest_changed = self.state != *input.state;
        let rpo_moved = match (previous_rpo, fresh_rpo) {
            (Some(a), Some(b)) => a.abs_diff(b) >= self.interval,
            (a, b) => a != b,
        };
        if rest_changed || rpo_moved {
            self.state.rpo = fresh_rpo;
        }
        let changed = self.state != *input.state;

        // When to look again.
        if let Some(next) = next_health_change(&health_inputs) {
            self.wake.push(next);
        }
        if let Some(next_cycle) = self.state.next_cycle {
            // A report is due one interval after the last; look half an interval later.
            self.wake.push(next_cycle.max(now) + self.interval / 2);
        }
        if let Some(error) = &cycle_error
            && let Some(at) = error.next_retry_time
        {
            self.wake.push(at + self.interval / 2);
        }
        let requeue_after = self
            .wake
            .iter()
            .filter_map(|t| t.duration_since(now).ok())
            .min()
            .unwrap_or(MAX_REQUEUE)
            .clamp(MIN_REQUEUE, MAX_REQUEUE);

        VmDecision {
            state: self.state,
            changed,
            create_job: self.create,
            delete_job: self.delete,
            notices: self.notices,
            finished_job: self.finished,
            results: self.results,
            release_finalizer: self.release,
            requeue_after,
            cycles_missed_last_hour: health_inputs.cycles_missed_last_hour,
        }
    }
}

#[cfg(test)]
mod tests;
