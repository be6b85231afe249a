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
//!          │                              │
//!          └──── reprotect ───────────────┴──> Reprotecting ── Reprotect ok ──> Protected (reverse)
//!                                                                                 │ failover
//!   Protected (forward) <── Reprotect ok ── Reprotecting <── reprotect ── FailedBack <── FailingBack
//!          planned: Failover presync (a cycle, the VM runs), Failback presync (disks, the VM runs), ┘ │
//!          then Failover (stop, ship, point), Failback (disks); unplanned: the last two only       │
//!   a presync job or the Failover failed for good ──> Protected (reverse), the request answered ──┘
//!   (while Protected in reverse, a Failback presync job with no request keeps the original
//!   disks in step with each new point, the phase unchanged; a planned failback then skips its
//!   presync steps: stop, ship, point, and the original disks get only what changed since;
//!   an unplanned one's Failover runs at the primary site, from the store, when the recovered
//!   VM's agent is lost; an unplanned request replaces a planned step or a re-protect that
//!   failed, or that waits unclaimed on a lost agent: withdrawn)
//!
//!  any phase ── protection Disabled or the VM deleted ──> DisablingProtection ──> Disabled
//! ```
//!
//! # Guarantees
//!
//! - At most one job per VM runs at a time; a request waits while another job runs (two
//!   exceptions, for jobs no agent claimed yet: an unplanned failover asked while a planned
//!   failover's or failback's step, or a re-protect, waits on an agent lost for
//!   `JOB_AGENT_LOST` withdraws it; a failover, test failover, cleanup or resync request
//!   withdraws a job keeping the original disks in step).
//! - A failed job is retried only at its retry time (the later of what the agent asked and
//!   the ASR backoff of [`crate::retry::next_retry`]), never sooner, unless someone sets a new
//!   `retry` token; a non-recoverable failure is retried only after the spec changes or a
//!   `retry` token, so nothing hot-loops. Jobs keeping the original disks in step answer no
//!   request: one that failed, even for good, runs again within [`IN_STEP_RETRY`].
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

use crate::conditions::{ObservedCondition, Verdict};
use crate::health::Health;
use crate::model::{
    ErrorReport, FailoverKind, JobKind, JobParams, JobState, Phase, PointChoice, PolicySettings,
    ResyncReason,
};
// For the tests (`use super::*`): the passes use it, this module does not.
#[cfg(test)]
use crate::retry::ErrorClass;

mod disable;
mod jobs;
mod protection;

pub use jobs::{IN_STEP_RETRY, keeps_in_step, store_only, unplanned_failback};
mod requests;
mod status;

/// The copy interval assumed while a VM's policy cannot be read.
pub const DEFAULT_COPY_INTERVAL: Duration = Duration::from_secs(300);
/// The RPO threshold assumed while a VM's policy cannot be read.
pub const DEFAULT_RPO_THRESHOLD: Duration = Duration::from_secs(30 * 60);
/// The longest a VM goes without being looked at again.
pub const MAX_REQUEUE: Duration = Duration::from_secs(10 * 60);
/// The shortest requeue: no hot loop, whatever the inputs say.
pub const MIN_REQUEUE: Duration = Duration::from_secs(1);
/// How long an agent may be silent before the jobs it holds are taken from it: twelve missed
/// heartbeats (every 10 s), three times its Lease's 40 s. Store-only jobs then go to a
/// recovery node; fencing keeps an agent that was only cut off from writing again.
pub const JOB_AGENT_LOST: Duration = Duration::from_secs(120);

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
    /// An unclaimed job was withdrawn (protection is being disabled, or a planned failover
    /// stranded on a lost node gives way to an unplanned one).
    pub const JOB_WITHDRAWN: &str = "JobWithdrawn";
    /// A store-only job goes to a recovery node (the VM's agent is lost), or an unplanned
    /// failback's Failover to the primary site's node (the recovered VM's agent is lost).
    pub const JOB_RELOCATED: &str = "JobRelocated";
    /// Health turned Normal.
    pub const HEALTH_NORMAL: &str = "HealthNormal";
    /// Health turned Warning.
    pub const HEALTH_WARNING: &str = "HealthWarning";
    /// Health turned Critical.
    pub const HEALTH_CRITICAL: &str = "HealthCritical";
    /// The VM a (test) failover brings up on its disks came up.
    pub const RECOVERED_VM_UP: &str = "RecoveredVmUp";
    /// It did not: its template, its placement or its hook failed.
    pub const RECOVERED_VM_FAILED: &str = "RecoveredVmFailed";
    /// A test failover's VM was taken down before its cleanup.
    pub const RECOVERED_VM_REMOVED: &str = "RecoveredVmRemoved";
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
    /// Re-protect after a failover or a failback.
    pub reprotect: Option<String>,
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
    /// Re-protect.
    pub reprotect: Option<String>,
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
    /// `spec.recoverySite.nodeName`, when the spec says where the recovered VM runs (what
    /// re-protect needs).
    pub recovery_site: Option<String>,
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
    /// The VM replicates (or last replicated) from the recovery site back to the primary: set
    /// when a re-protect after a failover starts, cleared when the one after a failback does.
    pub reverse: bool,
    /// Replicating in reverse: the primary site's original disks hold the point of this time
    /// (and so every change captured before it), brought there by the last job that kept them
    /// in step ([`jobs::keeps_in_step`]); cleared when one fails, when a re-protect starts
    /// and when protection is disabled.
    pub original_in_step: Option<SystemTime>,
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
    /// The time of the recovery point it ended at (a failover's, a failback's), when it says.
    pub point_time: Option<SystemTime>,
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
    /// The last heartbeat of the agent that replicates the VM (its Lease), if it ever had
    /// one: the primary site's node's, or in reverse the recovery site's.
    pub heartbeat: Option<SystemTime>,
    /// The last heartbeat of the primary site's agent (`spec.nodeName`): the same as
    /// `heartbeat` unless the VM replicates in reverse.
    pub primary_heartbeat: Option<SystemTime>,
    /// The last heartbeat of the agent on the current job's node (when it is not the VM's).
    pub job_heartbeat: Option<SystemTime>,
    /// The VM's recovery nodes, in order of preference, with their agents' last heartbeats.
    pub recovery: &'a [(String, Option<SystemTime>)],
    /// Where the last failover's disks are, if it wrote any.
    pub failover: Option<&'a Materialised>,
    /// Where the last test failover's disks are, if it wrote any.
    pub test_failover: Option<&'a Materialised>,
}

/// Disks a (test) failover materialised: the node whose folder holds them and the point.
/// A commit or cleanup runs there while that node's agent is alive (after a failover on a
/// recovery node the VM's own agent is fenced and holds nothing of it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Materialised {
    /// The node whose agent wrote them: `None` for the VM's own (as [`NewJob::node`]).
    pub node: Option<String>,
    /// That agent's last heartbeat.
    pub heartbeat: Option<SystemTime>,
    /// The recovery point they hold.
    pub point: Option<String>,
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
    /// The node whose agent runs it: `None` for the VM's own, else a recovery node (a
    /// store-only job while the VM's agent is lost).
    pub node: Option<String>,
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
    /// Copy a failback's result (its Failover job's, then its Failback job's) from the job
    /// that just succeeded, keeping the recovered VM the failover brought up, which a planned
    /// failback (it stopped that VM) takes down once it is done.
    FailbackFromJob,
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
    /// A job to mark Failed with this error before anything else: its agent is lost (the
    /// job is taken from it, and runs again elsewhere or later).
    pub fail_job: Option<(String, ErrorReport)>,
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

struct Pass<'a> {
    input: &'a VmInput<'a>,
    now: SystemTime,
    interval: Duration,
    state: VmState,
    create: Option<NewJob>,
    delete: Option<String>,
    fail: Option<(String, ErrorReport)>,
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
            fail: None,
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
}

#[cfg(test)]
mod tests;
