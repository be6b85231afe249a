//! Conditions, set in one place: a condition's `lastTransitionTime` moves only when its status
//! really changes, so that `kubectl describe` and alerting see real transitions and not every
//! reconcile. Reasons are stable CamelCase words.
//!
//! Every condition of every resource is decided here, from a small summary the decision of
//! that resource hands over ([`VmConditionFacts`], [`PolicyConditionFacts`]):
//!
//! | resource | condition | True when |
//! |---|---|---|
//! | ProtectedVM | `Protected` | the replication relationship exists (Protected, Resynchronizing, FailingOver) |
//! | ProtectedVM | `InitialReplicationComplete` | FinalizeProtection succeeded (until protection is disabled) |
//! | ProtectedVM | `Replicating` | delta cycles run (Unknown while the agent is silent) |
//! | ProtectedVM | `ResyncRequired` | delta replication cannot continue without a resync |
//! | ProtectedVM | `Resynchronizing` | a Resynchronize job runs |
//! | ProtectedVM | `TestFailoverSucceeded` | a test failover's disks exist |
//! | ProtectedVM | `FailedOver` | the VM failed over (and maybe committed) |
//! | ProtectedVM | `Ready` | phase Protected and health Normal, no resync required (see below) |
//! | ReplicationPolicy | `Ready` | every field is usable and the target answers |
//! | ReplicationPolicy | `DeletionBlocked` | the policy is being deleted while VMs use it |
//! | ReplicationJob | `Complete` | the job succeeded (absent until then) |
//! | ReplicationJob | `Failed` | the job failed; the reason is the error's (absent until then) |
//!
//! `Ready` is the kstatus-style summary that `kubectl wait --for=condition=Ready` and GitOps
//! health checks read. It is True only when the VM is protected *and* replicating within the
//! policy's targets; otherwise it is False and its reason says why, first match wins:
//!
//! | phase | Ready | reason |
//! |---|---|---|
//! | Protected, health Normal, no resync required | True | `Protected` |
//! | Protected, health Warning or Critical | False | the health reason (`AgentQuiet`, `RpoOverThreshold`, `CyclesMissed`, `NoRecentCycle`, `AgentLost`, `NonRecoverableError`, `ResyncBlocked`) |
//! | Protected, a resync required | False | `ResyncRequired` |
//! | any other phase, the current operation failed | False | the error's reason (`StoreUnreachable`, ...) |
//! | any other phase, waiting for something | False | the wait's reason (`PolicyNotFound`, `PolicyNotReady`, `WaitingForStartTime`, `WaitingForJob`) |
//! | any other phase | False | the phase: `Pending`, `EnablingProtection`, `InitialReplication`, `FinalizingProtection`, `Resynchronizing`, `FailingOver`, `FailedOver`, `FailoverCommitted`, `DisablingProtection`, `Disabled` |
//!
//! A ReplicationJob follows the conventions of a Kubernetes Job: while it is pending or running
//! it has neither condition; it ends with `Complete=True` (reason `Succeeded`) or with
//! `Failed=True` (reason: its error's reason, e.g. `AgentStopped`, `StoreUnreachable`).

use std::time::SystemTime;

use crate::health::Health;
use crate::model::{ErrorReport, JobKind, JobState, Phase, ResyncReason};

/// Condition types of a ProtectedVM, a ReplicationPolicy and a ReplicationJob.
pub mod types {
    /// ProtectedVM: the replication relationship exists.
    pub const PROTECTED: &str = "Protected";
    /// ProtectedVM: the first recovery point was cut.
    pub const INITIAL_REPLICATION_COMPLETE: &str = "InitialReplicationComplete";
    /// ProtectedVM: delta cycles run.
    pub const REPLICATING: &str = "Replicating";
    /// ProtectedVM: a resync is needed.
    pub const RESYNC_REQUIRED: &str = "ResyncRequired";
    /// ProtectedVM: a resync runs.
    pub const RESYNCHRONIZING: &str = "Resynchronizing";
    /// ProtectedVM: a test failover's disks exist.
    pub const TEST_FAILOVER_SUCCEEDED: &str = "TestFailoverSucceeded";
    /// ProtectedVM: failed over.
    pub const FAILED_OVER: &str = "FailedOver";
    /// True when the replica moved to a newer epoch than the agent's (a failover elsewhere
    /// fenced it): the agent writes nothing more for the VM.
    pub const FENCED: &str = "Fenced";
    /// ProtectedVM: protected and healthy; ReplicationPolicy: usable.
    pub const READY: &str = "Ready";
    /// ReplicationPolicy: deletion waits for the VMs that use it.
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
    /// ReplicationJob: succeeded.
    pub const COMPLETE: &str = "Complete";
    /// ReplicationJob: failed.
    pub const FAILED: &str = "Failed";
}

/// True, False or Unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// Not known (the agent has not reported).
    Unknown,
}

/// A condition as the core decides it; the operator turns it into a Kubernetes `Condition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedCondition {
    /// `Protected`, `Replicating`, `ResyncRequired`, ...
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A stable CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: SystemTime,
    /// The generation the condition was decided for.
    pub observed_generation: Option<i64>,
}

/// Set (or add) the condition `type_` in `conditions`, keeping its `lastTransitionTime` unless
/// its status changes. Returns whether anything changed, so that callers skip no-op writes.
pub fn set_condition(
    conditions: &mut Vec<ObservedCondition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: SystemTime,
) -> bool {
    let fresh = ObservedCondition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: now,
        observed_generation,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        None => {
            conditions.push(fresh);
            true
        }
        Some(existing) => {
            let transition = if existing.status == status {
                existing.last_transition_time
            } else {
                now
            };
            let updated = ObservedCondition {
                last_transition_time: transition,
                ..fresh
            };
            let changed = *existing != updated;
            *existing = updated;
            changed
        }
    }
}

/// A condition's decided value, before it is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A stable CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
}

impl Verdict {
    /// A True verdict.
    pub fn yes(reason: &str, message: impl Into<String>) -> Self {
        Self::new(ConditionStatus::True, reason, message)
    }

    /// A False verdict.
    pub fn no(reason: &str, message: impl Into<String>) -> Self {
        Self::new(ConditionStatus::False, reason, message)
    }

    fn new(status: ConditionStatus, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// What a ProtectedVM's conditions are decided from.
#[derive(Clone, Debug)]
pub struct VmConditionFacts<'a> {
    /// The phase, as decided in this pass.
    pub phase: Phase,
    /// Why a Pending VM waits, or why disabling waits: reason and message.
    pub waiting: Option<(&'a str, &'a str)>,
    /// The current job: its kind and state.
    pub current_job: Option<(JobKind, JobState)>,
    /// The current job is one of a planned failback's first steps, which run while the
    /// recovered VM still replicates.
    pub failback_presync: bool,
    /// The error of the current operation, while it stands.
    pub job_error: Option<&'a ErrorReport>,
    /// The agent's last cycle error, while it stands (while the VM is Protected).
    pub cycle_error: Option<&'a ErrorReport>,
    /// The agent's last error as it reported it, whatever the phase.
    pub agent_error: Option<&'a ErrorReport>,
    /// `AgentQuiet` or `AgentLost` while the node's agent is silent.
    pub agent_silent: Option<&'a str>,
    /// Why a resync is required, when it is.
    pub resync_required: Option<ResyncReason>,
    /// Why the running resync runs.
    pub resync_reason: Option<ResyncReason>,
    /// Whether a test failover's disks exist.
    pub test_failover_exists: bool,
    /// What happened to a test failover in this pass (failed, rejected, cleaned up), if anything.
    pub test_failover_outcome: Option<Verdict>,
    /// What happened to a failover request in this pass (failed, rejected), if anything.
    pub failover_outcome: Option<Verdict>,
    /// The health decided in this pass: Normal, Warning or Critical.
    pub health: Health,
    /// The health's stable reason (`Healthy`, `AgentQuiet`, `NonRecoverableError`, ...).
    pub health_reason: &'a str,
    /// The health's message.
    pub health_message: &'a str,
}

fn previous<'c>(conditions: &'c [ObservedCondition], type_: &str) -> Option<&'c ObservedCondition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The previous False verdict (a sticky outcome: failed, rejected, cleaned up), or `default`.
fn keep_false_or(conditions: &[ObservedCondition], type_: &str, default: Verdict) -> Verdict {
    previous(conditions, type_)
        .filter(|c| c.status == ConditionStatus::False)
        .map_or(default, |c| Verdict {
            status: c.status,
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
}

/// `Ready`: True only when the VM is protected and healthy; see the module's table.
fn vm_ready(facts: &VmConditionFacts<'_>) -> Verdict {
    use Phase as P;
    let (reason, message) = match facts.phase {
        P::Protected => {
            return if facts.health != Health::Normal {
                Verdict::no(facts.health_reason, facts.health_message)
            } else if let Some(reason) = facts.resync_required {
                Verdict::no(
                    "ResyncRequired",
                    format!("delta replication stopped: {}", reason.as_str()),
                )
            } else {
                Verdict::yes(
                    "Protected",
                    "the VM is protected and replicating within the policy's targets",
                )
            };
        }
        P::Pending => ("Pending", "protection has not started yet"),
        P::EnablingProtection => (
            "EnablingProtection",
            "checking prerequisites and creating the replica disks",
        ),
        P::InitialReplication => ("InitialReplication", "copying the disks"),
        P::FinalizingProtection => (
            "FinalizingProtection",
            "shipping the changes made during the copy",
        ),
        P::Resynchronizing => ("Resynchronizing", "a resynchronization runs"),
        P::FailingOver => ("FailingOver", "a failover is running"),
        P::FailedOver => ("FailedOver", "the VM failed over; it is not replicating"),
        P::FailoverCommitted => (
            "FailoverCommitted",
            "the failover was committed; it is not replicating",
        ),
        P::Reprotecting => (
            "Reprotecting",
            "re-protect runs: the blocks that differ from the point the VM started from are sent",
        ),
        P::FailingBack => ("FailingBack", "a failback to the primary site is running"),
        P::FailedBack => (
            "FailedBack",
            "the VM is back on the primary site's disks; it replicates again once re-protected",
        ),
        P::DisablingProtection => ("DisablingProtection", "protection is being disabled"),
        P::Disabled => ("Disabled", "the VM is not protected"),
    };
    match (facts.job_error, facts.waiting) {
        (Some(e), _) => Verdict::no(&e.reason, e.message.clone()),
        (None, Some((reason, message))) => Verdict::no(reason, message),
        (None, None) => Verdict::no(reason, message),
    }
}

/// The nine conditions of a ProtectedVM, in a stable order (`Ready` last of the first eight:
/// it came last; `Fenced` after it).
pub fn vm_verdicts(
    facts: &VmConditionFacts<'_>,
    conditions: &[ObservedCondition],
) -> [(&'static str, Verdict); 9] {
    use Phase as P;
    let phase = facts.phase;
    let failed = |default: Verdict| match facts.job_error {
        Some(e) => Verdict::no(&e.reason, e.message.clone()),
        None => default,
    };
    let protected = match phase {
        P::Pending => {
            let (reason, message) = facts
                .waiting
                .unwrap_or(("ProtectionPending", "protection has not started yet"));
            failed(Verdict::no(reason, message))
        }
        P::EnablingProtection => failed(Verdict::no(
            "EnablingProtection",
            "checking prerequisites and creating the replica disks",
        )),
        P::InitialReplication => failed(Verdict::no(
            "InitialReplicationInProgress",
            "copying the disks",
        )),
        P::FinalizingProtection => failed(Verdict::no(
            "FinalizingProtection",
            "shipping the changes made during the copy",
        )),
        P::Protected | P::Resynchronizing => Verdict::yes("Protected", "the VM is protected"),
        P::FailingOver => Verdict::yes("FailingOver", "a failover is running"),
        P::FailingBack => Verdict::yes("FailingBack", "a failback is running"),
        P::Reprotecting => failed(Verdict::no(
            "Reprotecting",
            "re-protect runs: the blocks that differ from the point the VM started from are sent",
        )),
        P::FailedBack => Verdict::no(
            "FailedBack",
            "the VM is back on the primary site's disks; it replicates again once re-protected",
        ),
        P::FailedOver => Verdict::no("FailedOver", "the VM failed over; it is not replicating"),
        P::FailoverCommitted => Verdict::no(
            "FailoverCommitted",
            "the failover was committed; it is not replicating",
        ),
        P::DisablingProtection => {
            let (reason, message) = facts
                .waiting
                .unwrap_or(("DisablingProtection", "protection is being disabled"));
            failed(Verdict::no(reason, message))
        }
        P::Disabled => Verdict::no("ProtectionDisabled", "the VM is not protected"),
    };
    // Disabling that waits for a running job says so, whatever the phase.
    let protected = match facts.waiting {
        Some((reason, message)) if !matches!(phase, P::Pending | P::DisablingProtection) => {
            Verdict {
                reason: reason.to_owned(),
                message: message.to_owned(),
                ..protected
            }
        }
        _ => protected,
    };
    let initial = match phase {
        P::Protected
        | P::Resynchronizing
        | P::FailingOver
        | P::FailedOver
        | P::FailoverCommitted
        | P::Reprotecting
        | P::FailingBack
        | P::FailedBack => Verdict::yes(
            "InitialReplicationComplete",
            "the first recovery point was cut",
        ),
        P::Pending | P::EnablingProtection => Verdict::no(
            "InitialReplicationPending",
            "the disks have not been copied yet",
        ),
        P::InitialReplication => Verdict::no("InitialReplicationInProgress", "copying the disks"),
        P::FinalizingProtection => Verdict::no(
            "FinalizingProtection",
            "shipping the changes made during the copy",
        ),
        P::DisablingProtection | P::Disabled => {
            Verdict::no("ProtectionDisabled", "the VM is not protected")
        }
    };
    let delta = || match (facts.agent_silent, facts.resync_required, facts.cycle_error) {
        (Some(silent), _, _) => Verdict {
            status: ConditionStatus::Unknown,
            reason: silent.to_owned(),
            message: "the node's agent has not reported lately".into(),
        },
        (None, Some(reason), _) => Verdict::no(
            "ResyncRequired",
            format!("delta replication stopped: {}", reason.as_str()),
        ),
        (None, None, Some(e)) => Verdict::no(&e.reason, e.message.clone()),
        (None, None, None) => Verdict::yes(
            "DeltaReplication",
            "changes are shipped every copy interval",
        ),
    };
    let replicating = match phase {
        P::Protected => delta(),
        // NB: a planned failback's first steps run while the recovered VM still replicates.
        P::FailingBack if facts.failback_presync => delta(),
        P::Resynchronizing => Verdict::no("Resynchronizing", "a resynchronization runs"),
        P::Pending | P::EnablingProtection | P::InitialReplication | P::FinalizingProtection => {
            Verdict::no(
                "NotYetProtected",
                "delta replication starts after finalize protection",
            )
        }
        P::FailingOver | P::FailedOver | P::FailoverCommitted => {
            Verdict::no("FailedOver", "replication stops at failover")
        }
        P::Reprotecting => Verdict::no(
            "Reprotecting",
            "delta replication starts when re-protect has sent the blocks that differ",
        ),
        P::FailingBack => Verdict::no(
            "FailingBack",
            "the failback stopped the recovered VM: replication stops",
        ),
        P::FailedBack => Verdict::no("FailedBack", "replication stops at failback"),
        P::DisablingProtection | P::Disabled => {
            Verdict::no("ProtectionDisabled", "the VM is not protected")
        }
    };
    let resync_required = match facts.resync_required {
        Some(reason) => Verdict::yes(
            reason.as_str(),
            "delta replication cannot continue without a resynchronization",
        ),
        None => Verdict::no("ResyncNotRequired", "change tracking is intact"),
    };
    let resynchronizing = if phase == P::Resynchronizing {
        let reason = facts
            .resync_reason
            .map_or("Resynchronizing", ResyncReason::as_str);
        Verdict::yes(
            reason,
            "comparing block checksums and sending the blocks that differ",
        )
    } else {
        Verdict::no("NotResynchronizing", "no resynchronization runs")
    };
    let test_failover = match (facts.current_job, &facts.test_failover_outcome) {
        (Some((JobKind::TestFailover, state)), _) if !state.is_finished() => {
            Verdict::no("TestFailoverInProgress", "a test failover is running")
        }
        _ if facts.test_failover_exists => Verdict::yes(
            "TestFailoverSucceeded",
            "the test failover's disks are ready; clean them up when done",
        ),
        (_, Some(outcome)) => outcome.clone(),
        (_, None) => keep_false_or(
            conditions,
            types::TEST_FAILOVER_SUCCEEDED,
            Verdict::no("NoTestFailover", "no test failover has run"),
        ),
    };
    let failed_over = match phase {
        P::FailingOver => Verdict::no("FailoverInProgress", "a failover is running"),
        P::FailedOver => Verdict::yes("FailedOver", "the VM failed over to a recovery point"),
        P::FailoverCommitted => Verdict::yes("FailoverCommitted", "the failover was committed"),
        _ => match &facts.failover_outcome {
            Some(outcome) => outcome.clone(),
            None => keep_false_or(
                conditions,
                types::FAILED_OVER,
                Verdict::no("NotFailedOver", "the VM has not failed over"),
            ),
        },
    };
    [
        (types::PROTECTED, protected),
        (types::INITIAL_REPLICATION_COMPLETE, initial),
        (types::REPLICATING, replicating),
        (types::RESYNC_REQUIRED, resync_required),
        (types::RESYNCHRONIZING, resynchronizing),
        (types::TEST_FAILOVER_SUCCEEDED, test_failover),
        (types::FAILED_OVER, failed_over),
        (types::READY, vm_ready(facts)),
        (types::FENCED, fenced(facts)),
    ]
}

/// `Fenced`: True while the agent's error (a cycle's or the current job's) says the store
/// refused it for an epoch it no longer holds.
fn fenced(facts: &VmConditionFacts<'_>) -> Verdict {
    match [facts.agent_error, facts.job_error]
        .into_iter()
        .flatten()
        .find(|e| e.reason == FENCED_REASON)
    {
        Some(e) => Verdict::yes(FENCED_REASON, e.message.clone()),
        None => Verdict::no("NotFenced", "the agent writes the replica's current epoch"),
    }
}

/// The error reason of a store that refused a fenced writer (`lifeboat_store`'s `Fenced`).
pub const FENCED_REASON: &str = "Fenced";

/// The conditions of a ReplicationJob in `state`, as a Kubernetes Job has them: none while it
/// is pending, running or waiting; `Complete=True` once it succeeded; `Failed=True` with the
/// error's reason and message (`(reason, message)`) once it failed.
pub fn job_verdicts(
    state: JobState,
    error: Option<(&str, &str)>,
) -> Option<(&'static str, Verdict)> {
    match state {
        JobState::Pending | JobState::Running | JobState::WaitingForInput => None,
        JobState::Succeeded => Some((
            types::COMPLETE,
            Verdict::yes("Succeeded", "the job succeeded"),
        )),
        JobState::Failed => {
            let (reason, message) = error.unwrap_or(("Failed", "the job failed"));
            Some((types::FAILED, Verdict::yes(reason, message)))
        }
    }
}

/// What a ReplicationPolicy's conditions are decided from.
#[derive(Clone, Debug)]
pub struct PolicyConditionFacts<'a> {
    /// The first invalid field: condition reason and message (naming the field).
    pub invalid: Option<(&'a str, &'a str)>,
    /// The target's reachability, when it was probed: `Err` holds why not.
    pub reachable: Option<Result<(), &'a str>>,
    /// Whether the policy is being deleted.
    pub deleting: bool,
    /// The ProtectedVMs that use the policy.
    pub users: &'a [String],
}

/// The conditions of a ReplicationPolicy: `Ready` and `DeletionBlocked`.
pub fn policy_verdicts(facts: &PolicyConditionFacts<'_>) -> [(&'static str, Verdict); 2] {
    let ready = match (facts.invalid, facts.reachable) {
        (Some((reason, message)), _) => Verdict::no(reason, message),
        (None, Some(Err(why))) => Verdict::no("TargetUnreachable", why),
        (None, Some(Ok(()))) => Verdict::yes("Ready", "the policy is valid and its target answers"),
        (None, None) => Verdict::yes(
            "Ready",
            "the policy is valid; the agents check its local target on their nodes",
        ),
    };
    let blocked = if facts.deleting && !facts.users.is_empty() {
        const SHOWN: usize = 5;
        let mut names = facts.users[..facts.users.len().min(SHOWN)].join(", ");
        if facts.users.len() > SHOWN {
            names.push_str(&format!(" and {} more", facts.users.len() - SHOWN));
        }
        Verdict::yes(
            "InUse",
            format!(
                "deletion waits until no ProtectedVM uses the policy: {} use it ({names})",
                facts.users.len()
            ),
        )
    } else {
        Verdict::no("NotBlocked", "nothing holds the policy back")
    };
    [(types::READY, ready), (types::DELETION_BLOCKED, blocked)]
}

/// Set every verdict with [`set_condition`]; returns whether anything changed.
pub fn set_verdicts(
    conditions: &mut Vec<ObservedCondition>,
    verdicts: impl IntoIterator<Item = (&'static str, Verdict)>,
    observed_generation: Option<i64>,
    now: SystemTime,
) -> bool {
    verdicts.into_iter().fold(false, |changed, (type_, v)| {
        set_condition(
            conditions,
            type_,
            v.status,
            &v.reason,
            &v.message,
            observed_generation,
            now,
        ) | changed
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Replicating",
            ConditionStatus::True,
            "CycleSucceeded",
            "ok",
            Some(1),
            t(10)
        ));
        assert!(
            !set_condition(
                &mut c,
                "Replicating",
                ConditionStatus::True,
                "CycleSucceeded",
                "ok",
                Some(1),
                t(20)
            ),
            "nothing changed"
        );
        assert_eq!(c[0].last_transition_time, t(10));
        assert!(set_condition(
            &mut c,
            "Replicating",
            ConditionStatus::True,
            "CycleSucceeded",
            "2 disks",
            Some(2),
            t(30)
        ));
        assert_eq!(
            c[0].last_transition_time,
            t(10),
            "a new message is not a transition"
        );
        assert!(set_condition(
            &mut c,
            "Replicating",
            ConditionStatus::False,
            "StoreUnreachable",
            "down",
            Some(2),
            t(40)
        ));
        assert_eq!(c[0].last_transition_time, t(40));
        assert!(set_condition(
            &mut c,
            "ResyncRequired",
            ConditionStatus::False,
            "TrackingIntact",
            "",
            Some(2),
            t(40)
        ));
        assert_eq!(c.len(), 2);
    }
}

#[cfg(test)]
mod verdict_tests {
    use super::*;
    use crate::retry::ErrorClass;

    fn facts(phase: Phase) -> VmConditionFacts<'static> {
        VmConditionFacts {
            phase,
            waiting: None,
            current_job: None,
            failback_presync: false,
            job_error: None,
            cycle_error: None,
            agent_error: None,
            agent_silent: None,
            resync_required: None,
            resync_reason: None,
            test_failover_exists: false,
            test_failover_outcome: None,
            failover_outcome: None,
            health: Health::Normal,
            health_reason: "Healthy",
            health_message: "replicating within the policy's targets",
        }
    }

    fn ready(f: &VmConditionFacts<'_>) -> (ConditionStatus, String) {
        let verdicts = vm_verdicts(f, &[]);
        let (type_, v) = &verdicts[7];
        assert_eq!(*type_, types::READY);
        (v.status, v.reason.clone())
    }

    fn error(reason: &str) -> ErrorReport {
        ErrorReport {
            class: ErrorClass::Recoverable,
            reason: reason.into(),
            message: "down".into(),
            retry_count: 0,
            next_retry_time: None,
            first_seen_time: None,
        }
    }

    #[test]
    fn ready_is_true_only_when_protected_and_healthy() {
        use ConditionStatus::{False, True};
        let no = |reason: &str| (False, reason.to_owned());
        assert_eq!(ready(&facts(Phase::Protected)), (True, "Protected".into()));
        for (phase, reason) in [
            (Phase::Pending, "Pending"),
            (Phase::EnablingProtection, "EnablingProtection"),
            (Phase::InitialReplication, "InitialReplication"),
            (Phase::FinalizingProtection, "FinalizingProtection"),
            (Phase::Resynchronizing, "Resynchronizing"),
            (Phase::FailingOver, "FailingOver"),
            (Phase::FailedOver, "FailedOver"),
            (Phase::FailoverCommitted, "FailoverCommitted"),
            (Phase::DisablingProtection, "DisablingProtection"),
            (Phase::Disabled, "Disabled"),
        ] {
            assert_eq!(ready(&facts(phase)), no(reason), "{phase:?}");
        }
    }

    #[test]
    fn ready_is_false_with_the_health_reason_when_a_protected_vm_is_not_normal() {
        for (health, reason) in [
            (Health::Warning, "AgentQuiet"),
            (Health::Warning, "RpoOverThreshold"),
            (Health::Warning, "CyclesMissed"),
            (Health::Warning, "NoRecentCycle"),
            (Health::Critical, "AgentLost"),
            (Health::Critical, "NonRecoverableError"),
            (Health::Critical, "ResyncBlocked"),
        ] {
            let f = VmConditionFacts {
                health,
                health_reason: reason,
                health_message: "behind",
                ..facts(Phase::Protected)
            };
            assert_eq!(
                ready(&f),
                (ConditionStatus::False, reason.to_owned()),
                "{health:?}"
            );
            assert_eq!(vm_verdicts(&f, &[])[7].1.message, "behind");
        }
        // A resync that is required (and can run: health stays Normal) stops replication.
        let resync = VmConditionFacts {
            resync_required: Some(ResyncReason::TrackingLost),
            ..facts(Phase::Protected)
        };
        assert_eq!(
            ready(&resync),
            (ConditionStatus::False, "ResyncRequired".into())
        );
        // Health counts only once protected: initial replication says so, whatever the health.
        let copying = VmConditionFacts {
            health: Health::Critical,
            health_reason: "AgentLost",
            ..facts(Phase::InitialReplication)
        };
        assert_eq!(
            ready(&copying),
            (ConditionStatus::False, "InitialReplication".into())
        );
    }

    #[test]
    fn ready_names_the_error_or_the_wait_before_the_phase() {
        let e = error("StoreUnreachable");
        let failed = VmConditionFacts {
            job_error: Some(&e),
            waiting: Some(("WaitingForJob", "waits")),
            ..facts(Phase::InitialReplication)
        };
        assert_eq!(
            ready(&failed),
            (ConditionStatus::False, "StoreUnreachable".into())
        );
        let waiting = VmConditionFacts {
            waiting: Some(("PolicyNotFound", "the ReplicationPolicy does not exist")),
            ..facts(Phase::Pending)
        };
        assert_eq!(
            ready(&waiting),
            (ConditionStatus::False, "PolicyNotFound".into())
        );
        // A Protected VM's readiness is its health's: a failed test failover does not count.
        let test_failed = VmConditionFacts {
            job_error: Some(&e),
            ..facts(Phase::Protected)
        };
        assert_eq!(
            ready(&test_failed),
            (ConditionStatus::True, "Protected".into())
        );
    }

    #[test]
    fn ready_keeps_its_transition_time_until_its_status_changes() {
        let t = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let ready_time = |c: &[ObservedCondition]| {
            previous(c, types::READY)
                .map(|c| (c.status, c.reason.clone(), c.last_transition_time))
                .expect("Ready is set")
        };
        let mut c = Vec::new();
        let pass = |c: &mut Vec<ObservedCondition>, f: &VmConditionFacts<'_>, at| {
            let verdicts = vm_verdicts(f, c);
            set_verdicts(c, verdicts, Some(1), at)
        };
        let initial = facts(Phase::InitialReplication);
        pass(&mut c, &initial, t(10));
        assert_eq!(
            ready_time(&c),
            (ConditionStatus::False, "InitialReplication".into(), t(10))
        );
        let finalizing = facts(Phase::FinalizingProtection);
        assert!(pass(&mut c, &finalizing, t(20)));
        assert_eq!(
            ready_time(&c),
            (ConditionStatus::False, "FinalizingProtection".into(), t(10)),
            "a new reason is not a transition"
        );
        let protected = facts(Phase::Protected);
        pass(&mut c, &protected, t(30));
        assert_eq!(
            ready_time(&c),
            (ConditionStatus::True, "Protected".into(), t(30))
        );
        assert!(
            !pass(&mut c, &protected, t(40)),
            "nothing changed, nothing to write"
        );
        assert_eq!(ready_time(&c).2, t(30));
    }

    #[test]
    fn a_job_has_complete_or_failed_once_it_ends_and_neither_before() {
        for state in [
            JobState::Pending,
            JobState::Running,
            JobState::WaitingForInput,
        ] {
            assert_eq!(job_verdicts(state, None), None, "{state:?}");
        }
        assert_eq!(
            job_verdicts(JobState::Succeeded, None),
            Some((
                types::COMPLETE,
                Verdict::yes("Succeeded", "the job succeeded")
            ))
        );
        assert_eq!(
            job_verdicts(
                JobState::Failed,
                Some(("AgentStopped", "the agent stopped"))
            ),
            Some((
                types::FAILED,
                Verdict::yes("AgentStopped", "the agent stopped")
            ))
        );
        assert_eq!(
            job_verdicts(JobState::Failed, None).map(|(t, v)| (t, v.reason)),
            Some((types::FAILED, "Failed".to_owned()))
        );
    }

    fn reasons(f: &VmConditionFacts<'_>) -> Vec<(String, ConditionStatus)> {
        vm_verdicts(f, &[])
            .into_iter()
            .map(|(_, v)| (v.reason, v.status))
            .collect()
    }

    #[test]
    fn every_reason_is_a_camel_case_word() {
        let error = ErrorReport {
            class: ErrorClass::Recoverable,
            reason: "StoreUnreachable".into(),
            message: "down".into(),
            retry_count: 0,
            next_retry_time: None,
            first_seen_time: None,
        };
        let phases = [
            Phase::Pending,
            Phase::EnablingProtection,
            Phase::InitialReplication,
            Phase::FinalizingProtection,
            Phase::Protected,
            Phase::Resynchronizing,
            Phase::FailingOver,
            Phase::FailedOver,
            Phase::FailoverCommitted,
            Phase::DisablingProtection,
            Phase::Disabled,
        ];
        for phase in phases {
            for f in [
                facts(phase),
                VmConditionFacts {
                    job_error: Some(&error),
                    cycle_error: Some(&error),
                    resync_required: Some(ResyncReason::TrackingLost),
                    test_failover_exists: true,
                    ..facts(phase)
                },
                VmConditionFacts {
                    agent_silent: Some("AgentLost"),
                    ..facts(phase)
                },
            ] {
                for (reason, _) in reasons(&f) {
                    assert!(
                        reason
                            .chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_uppercase())
                            && reason.chars().all(|c| c.is_ascii_alphanumeric()),
                        "{phase:?}: {reason:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn replicating_says_why_not() {
        let protected = facts(Phase::Protected);
        assert_eq!(
            reasons(&protected)[2],
            ("DeltaReplication".into(), ConditionStatus::True)
        );
        let silent = VmConditionFacts {
            agent_silent: Some("AgentQuiet"),
            ..protected.clone()
        };
        assert_eq!(
            reasons(&silent)[2],
            ("AgentQuiet".into(), ConditionStatus::Unknown)
        );
        let resync = VmConditionFacts {
            resync_required: Some(ResyncReason::LogThresholdReached),
            ..protected
        };
        assert_eq!(
            reasons(&resync)[2],
            ("ResyncRequired".into(), ConditionStatus::False)
        );
        assert_eq!(
            reasons(&resync)[3],
            ("LogThresholdReached".into(), ConditionStatus::True)
        );
        // A failback: replicating until the step that stops the recovered VM.
        let early = VmConditionFacts {
            failback_presync: true,
            ..facts(Phase::FailingBack)
        };
        assert_eq!(
            reasons(&early)[2],
            ("DeltaReplication".into(), ConditionStatus::True)
        );
        assert_eq!(
            reasons(&facts(Phase::FailingBack))[2],
            ("FailingBack".into(), ConditionStatus::False)
        );
    }

    #[test]
    fn a_policy_in_use_says_by_whom() {
        let users: Vec<String> = (0..7).map(|i| format!("vm{i}")).collect();
        let [ready, blocked] = policy_verdicts(&PolicyConditionFacts {
            invalid: None,
            reachable: Some(Err("connect to blob.example:443: refused")),
            deleting: true,
            users: &users,
        });
        assert_eq!(ready.1.reason, "TargetUnreachable");
        assert_eq!(blocked.1.reason, "InUse");
        assert!(
            blocked
                .1
                .message
                .contains("7 use it (vm0, vm1, vm2, vm3, vm4 and 2 more)"),
            "{}",
            blocked.1.message
        );
    }
}
