//! From the API types (`lifeboat-api`) to the decisions' words (`lifeboat-core`) and back.
//! Nothing is decided here: every function is a plain translation, and the round trip
//! status → core state → status is lossless (a test holds it to that), so that deciding
//! again from a written status decides the same.
//!
//! ```text
//!  ProtectedVM ──vm_spec, vm_state, agent_facts──> core::vm ──VmState──> vm_status ──> status
//!  ReplicationJob ──job_facts──┘                                 ▲
//!  ReplicationPolicy ──policy_spec──> core::policy::check_policy ┘ (settings)
//! ```

use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use lifeboat_api::common::{
    ErrorClass as ApiErrorClass, ErrorStatus, Health as ApiHealth, RecoveryPointKind,
    RecoveryPointSelector,
};
use lifeboat_api::contract::INITIAL_REPLICATION_STEP;
use lifeboat_api::job::{
    JobParameters, JobPhase, JobType, ResyncReason as ApiResyncReason, StepState,
};
use lifeboat_api::policy::{ResyncMode, TimeWindow, Weekday};
use lifeboat_api::protected_vm::{
    AgentReport, FailoverResult, FailoverType, HandledRequests, JobReference, ProtectionState,
    RecoveredVm, ReplicationDirection,
};
use lifeboat_api::{
    ProtectedVM, ProtectedVMStatus, ProtectionPhase, ReplicationJob, ReplicationPolicy,
};
use lifeboat_core::conditions::ObservedCondition;
use lifeboat_core::policy::{PolicySpec, PolicyState};
use lifeboat_core::vm::{
    AgentFacts, DiskFacts, FailoverAsk, Handled, JobFacts, JobRecord, Requests, ResultChange,
    TestFailoverAsk, VmSpec, VmState,
};
use lifeboat_core::window::WindowSpec;
use lifeboat_core::{
    ConditionStatus, ErrorClass, ErrorReport, FailoverKind, Health, JobKind, JobParams, JobState,
    Phase, PointChoice, ResyncReason, format_duration,
};

// ---- time ----

/// An API time as a `SystemTime`.
pub fn system_time(time: &Time) -> SystemTime {
    SystemTime::from(time.0)
}

/// A `SystemTime` as an API time (whole seconds, as the API server keeps them).
pub fn api_time(time: SystemTime) -> Time {
    Time(Timestamp::try_from(whole_seconds(time)).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// `time` without its fraction of a second.
///
/// NB: the API server keeps times to the second; deciding with a finer `now` would make every
/// decision differ from the status it was read back from, and rewrite it every time.
pub fn whole_seconds(time: SystemTime) -> SystemTime {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

// ---- enums ----

/// API phase → core phase.
pub fn phase(p: ProtectionPhase) -> Phase {
    match p {
        ProtectionPhase::Pending => Phase::Pending,
        ProtectionPhase::EnablingProtection => Phase::EnablingProtection,
        ProtectionPhase::InitialReplication => Phase::InitialReplication,
        ProtectionPhase::FinalizingProtection => Phase::FinalizingProtection,
        ProtectionPhase::Protected => Phase::Protected,
        ProtectionPhase::Resynchronizing => Phase::Resynchronizing,
        ProtectionPhase::FailingOver => Phase::FailingOver,
        ProtectionPhase::FailedOver => Phase::FailedOver,
        ProtectionPhase::FailoverCommitted => Phase::FailoverCommitted,
        ProtectionPhase::Reprotecting => Phase::Reprotecting,
        ProtectionPhase::FailingBack => Phase::FailingBack,
        ProtectionPhase::FailedBack => Phase::FailedBack,
        ProtectionPhase::DisablingProtection => Phase::DisablingProtection,
        ProtectionPhase::Disabled => Phase::Disabled,
    }
}

/// Core phase → API phase.
pub fn api_phase(p: Phase) -> ProtectionPhase {
    match p {
        Phase::Pending => ProtectionPhase::Pending,
        Phase::EnablingProtection => ProtectionPhase::EnablingProtection,
        Phase::InitialReplication => ProtectionPhase::InitialReplication,
        Phase::FinalizingProtection => ProtectionPhase::FinalizingProtection,
        Phase::Protected => ProtectionPhase::Protected,
        Phase::Resynchronizing => ProtectionPhase::Resynchronizing,
        Phase::FailingOver => ProtectionPhase::FailingOver,
        Phase::FailedOver => ProtectionPhase::FailedOver,
        Phase::FailoverCommitted => ProtectionPhase::FailoverCommitted,
        Phase::Reprotecting => ProtectionPhase::Reprotecting,
        Phase::FailingBack => ProtectionPhase::FailingBack,
        Phase::FailedBack => ProtectionPhase::FailedBack,
        Phase::DisablingProtection => ProtectionPhase::DisablingProtection,
        Phase::Disabled => ProtectionPhase::Disabled,
    }
}

/// API job type → core job kind.
pub fn job_kind(t: JobType) -> JobKind {
    match t {
        JobType::EnableProtection => JobKind::EnableProtection,
        JobType::FinalizeProtection => JobKind::FinalizeProtection,
        JobType::Resynchronize => JobKind::Resynchronize,
        JobType::TestFailover => JobKind::TestFailover,
        JobType::CleanupTestFailover => JobKind::CleanupTestFailover,
        JobType::Failover => JobKind::Failover,
        JobType::Commit => JobKind::Commit,
        JobType::Reprotect => JobKind::Reprotect,
        JobType::Failback => JobKind::Failback,
        JobType::DisableProtection => JobKind::DisableProtection,
    }
}

/// Core job kind → API job type.
pub fn api_job_type(k: JobKind) -> JobType {
    match k {
        JobKind::EnableProtection => JobType::EnableProtection,
        JobKind::FinalizeProtection => JobType::FinalizeProtection,
        JobKind::Resynchronize => JobType::Resynchronize,
        JobKind::TestFailover => JobType::TestFailover,
        JobKind::CleanupTestFailover => JobType::CleanupTestFailover,
        JobKind::Failover => JobType::Failover,
        JobKind::Commit => JobType::Commit,
        JobKind::Reprotect => JobType::Reprotect,
        JobKind::Failback => JobType::Failback,
        JobKind::DisableProtection => JobType::DisableProtection,
    }
}

/// API job phase → core job state.
pub fn job_state(p: JobPhase) -> JobState {
    match p {
        JobPhase::Pending => JobState::Pending,
        JobPhase::Running => JobState::Running,
        JobPhase::WaitingForInput => JobState::WaitingForInput,
        JobPhase::Succeeded => JobState::Succeeded,
        JobPhase::Failed => JobState::Failed,
    }
}

/// Core job state → API job phase.
pub fn api_job_phase(s: JobState) -> JobPhase {
    match s {
        JobState::Pending => JobPhase::Pending,
        JobState::Running => JobPhase::Running,
        JobState::WaitingForInput => JobPhase::WaitingForInput,
        JobState::Succeeded => JobPhase::Succeeded,
        JobState::Failed => JobPhase::Failed,
    }
}

fn resync_reason(r: ApiResyncReason) -> ResyncReason {
    match r {
        ApiResyncReason::LogThresholdReached => ResyncReason::LogThresholdReached,
        ApiResyncReason::TrackingLost => ResyncReason::TrackingLost,
        ApiResyncReason::CorruptLog => ResyncReason::CorruptLog,
        ApiResyncReason::Requested => ResyncReason::Requested,
    }
}

fn api_resync_reason(r: ResyncReason) -> ApiResyncReason {
    match r {
        ResyncReason::LogThresholdReached => ApiResyncReason::LogThresholdReached,
        ResyncReason::TrackingLost => ApiResyncReason::TrackingLost,
        ResyncReason::CorruptLog => ApiResyncReason::CorruptLog,
        ResyncReason::Requested => ApiResyncReason::Requested,
    }
}

fn failover_kind(t: FailoverType) -> FailoverKind {
    match t {
        FailoverType::Planned => FailoverKind::Planned,
        FailoverType::Unplanned => FailoverKind::Unplanned,
    }
}

fn api_failover_type(k: FailoverKind) -> FailoverType {
    match k {
        FailoverKind::Planned => FailoverType::Planned,
        FailoverKind::Unplanned => FailoverType::Unplanned,
    }
}

/// The point choice an API selector makes.
pub fn point(s: &RecoveryPointSelector) -> PointChoice {
    match s.kind {
        RecoveryPointKind::Latest => PointChoice::Latest,
        RecoveryPointKind::LatestProcessed => PointChoice::LatestProcessed,
        RecoveryPointKind::LatestAppConsistent => PointChoice::LatestAppConsistent,
        RecoveryPointKind::Named => PointChoice::Named(s.name.clone().unwrap_or_default()),
        // NB: the API server requires the time (the CRD's rule); without it, no point is at
        // or before the epoch's start, so none matches and the job says so. To the second,
        // as `not-after:` on the command line.
        RecoveryPointKind::NotAfter => PointChoice::NotAfter(
            s.time
                .as_ref()
                .and_then(|t| u64::try_from(t.0.as_second()).ok())
                .map_or(0, |s| s * 1000),
        ),
    }
}

/// The API's selector for a point choice.
pub fn api_point(p: &PointChoice) -> RecoveryPointSelector {
    let kind = |kind| RecoveryPointSelector {
        kind,
        ..RecoveryPointSelector::default()
    };
    match p {
        PointChoice::Latest => kind(RecoveryPointKind::Latest),
        PointChoice::LatestProcessed => kind(RecoveryPointKind::LatestProcessed),
        PointChoice::LatestAppConsistent => kind(RecoveryPointKind::LatestAppConsistent),
        PointChoice::Named(name) => RecoveryPointSelector {
            name: Some(name.clone()),
            ..kind(RecoveryPointKind::Named)
        },
        PointChoice::NotAfter(ms) => RecoveryPointSelector {
            time: Some(api_time(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(*ms),
            )),
            ..kind(RecoveryPointKind::NotAfter)
        },
    }
}

fn health(h: ApiHealth) -> Health {
    match h {
        ApiHealth::Normal => Health::Normal,
        ApiHealth::Warning => Health::Warning,
        ApiHealth::Critical => Health::Critical,
    }
}

fn api_health(h: Health) -> ApiHealth {
    match h {
        Health::Normal => ApiHealth::Normal,
        Health::Warning => ApiHealth::Warning,
        Health::Critical => ApiHealth::Critical,
    }
}

/// An API error as the core's.
pub fn error_report(e: &ErrorStatus) -> ErrorReport {
    ErrorReport {
        class: match e.class {
            ApiErrorClass::Recoverable => ErrorClass::Recoverable,
            ApiErrorClass::NonRecoverable => ErrorClass::NonRecoverable,
        },
        reason: e.reason.clone(),
        message: e.message.clone(),
        retry_count: e.retry_count,
        next_retry_time: e.next_retry_time.as_ref().map(system_time),
        first_seen_time: e.first_seen_time.as_ref().map(system_time),
    }
}

/// A core error as the API's.
pub fn error_status(e: &ErrorReport) -> ErrorStatus {
    ErrorStatus {
        class: match e.class {
            ErrorClass::Recoverable => ApiErrorClass::Recoverable,
            ErrorClass::NonRecoverable => ApiErrorClass::NonRecoverable,
        },
        reason: e.reason.clone(),
        message: e.message.clone(),
        retry_count: e.retry_count,
        next_retry_time: e.next_retry_time.map(api_time),
        first_seen_time: e.first_seen_time.map(api_time),
    }
}

/// API job parameters as the core's.
pub fn params(p: &JobParameters) -> JobParams {
    JobParams {
        request_token: p.request_token.clone(),
        failover: p.failover_type.map(failover_kind),
        point: p.recovery_point.as_ref().map(point),
        resync_reason: p.resync_reason.map(resync_reason),
        delete_replica: p.delete_replica,
        to_primary: p.to_primary,
        presync: p.presync,
    }
}

/// Core job parameters as the API's.
pub fn api_params(p: &JobParams) -> JobParameters {
    JobParameters {
        request_token: p.request_token.clone(),
        failover_type: p.failover.map(api_failover_type),
        recovery_point: p.point.as_ref().map(api_point),
        resync_reason: p.resync_reason.map(api_resync_reason),
        delete_replica: p.delete_replica,
        to_primary: p.to_primary,
        presync: p.presync,
    }
}

fn condition(c: &Condition) -> ObservedCondition {
    ObservedCondition {
        type_: c.type_.clone(),
        status: match c.status.as_str() {
            "True" => ConditionStatus::True,
            "False" => ConditionStatus::False,
            _ => ConditionStatus::Unknown,
        },
        reason: c.reason.clone(),
        message: c.message.clone(),
        last_transition_time: system_time(&c.last_transition_time),
        observed_generation: c.observed_generation,
    }
}

fn api_condition(c: &ObservedCondition) -> Condition {
    Condition {
        type_: c.type_.clone(),
        status: match c.status {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
        .into(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        last_transition_time: api_time(c.last_transition_time),
        observed_generation: c.observed_generation,
    }
}

/// Conditions as the core's.
pub fn conditions(cs: &[Condition]) -> Vec<ObservedCondition> {
    cs.iter().map(condition).collect()
}

/// Core conditions as the API's.
pub fn api_conditions(cs: &[ObservedCondition]) -> Vec<Condition> {
    cs.iter().map(api_condition).collect()
}

// ---- ProtectedVM ----

/// What the decisions need of a VM's metadata and spec.
pub fn vm_spec(vm: &ProtectedVM) -> VmSpec {
    let r = vm.spec.requests.clone().unwrap_or_default();
    VmSpec {
        name: vm.name_any(),
        generation: vm.metadata.generation.unwrap_or(0),
        created: vm
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(SystemTime::UNIX_EPOCH, system_time),
        deleting: vm.metadata.deletion_timestamp.is_some(),
        protect: vm.spec.protection == ProtectionState::Enabled,
        delete_replica: vm.spec.delete_replica_on_disable,
        requests: Requests {
            resync: r.resync,
            test_failover: r.test_failover.map(|t| TestFailoverAsk {
                token: t.token,
                point: point(&t.recovery_point),
            }),
            cleanup_test_failover: r.cleanup_test_failover,
            failover: r.failover.map(|f| FailoverAsk {
                token: f.token,
                kind: failover_kind(f.failover_type),
                point: f.recovery_point.as_ref().map_or(PointChoice::Latest, point),
            }),
            commit: r.commit,
            reprotect: r.reprotect,
            retry: r.retry,
        },
        recovery_site: vm.spec.recovery_site.as_ref().map(|r| r.node_name.clone()),
    }
}

/// The operator's last decisions, read back from a VM's status.
pub fn vm_state(status: Option<&ProtectedVMStatus>) -> VmState {
    let Some(s) = status else {
        return VmState::default();
    };
    let h = &s.handled_requests;
    VmState {
        observed_generation: s.observed_generation,
        policy_generation: s.policy_generation,
        phase: phase(s.phase),
        // NB: health is "not decided yet" until a reason was written with it.
        health: s.health_reason.as_ref().map(|_| health(s.health)),
        health_reason: s.health_reason.clone().unwrap_or_default(),
        health_message: s.health_message.clone().unwrap_or_default(),
        rpo: s.rpo_seconds.map(Duration::from_secs),
        next_cycle: s.next_cycle_time.as_ref().map(system_time),
        last_error: s.last_error.as_ref().map(error_report),
        handled: Handled {
            resync: h.resync.clone(),
            test_failover: h.test_failover.clone(),
            cleanup_test_failover: h.cleanup_test_failover.clone(),
            failover: h.failover.clone(),
            commit: h.commit.clone(),
            reprotect: h.reprotect.clone(),
            retry: h.retry.clone(),
        },
        job: s.current_job.as_ref().map(|j| JobRecord {
            name: j.name.clone(),
            kind: job_kind(j.job_type),
            state: job_state(j.phase),
            sequence: j.sequence,
            attempt: j.attempt,
            params: params(&j.parameters),
            error: j.last_error.as_ref().map(error_report),
        }),
        last_resync: s.last_resync_time.as_ref().map(system_time),
        original_in_step: s.original_disks_in_step_time.as_ref().map(system_time),
        test_failover_exists: s.test_failover.is_some(),
        reverse: s.direction == ReplicationDirection::Reverse,
        conditions: conditions(&s.conditions),
    }
}

/// The agent's report as facts for the decisions.
pub fn agent_facts(report: &AgentReport) -> AgentFacts {
    AgentFacts {
        report_time: report.report_time.as_ref().map(system_time),
        last_cycle_start: report.last_cycle_start_time.as_ref().map(system_time),
        last_successful_cycle: report.last_successful_cycle_time.as_ref().map(system_time),
        cycles_succeeded_last_hour: report.cycles.succeeded_last_hour,
        disks: report
            .disks
            .iter()
            .map(|d| DiskFacts {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                pending_log_bytes: d.pending_log_bytes,
            })
            .collect(),
        latest_point: report
            .recovery_points
            .latest
            .as_ref()
            .map(|p| system_time(&p.time)),
        last_error: report.last_error.as_ref().map(error_report),
        tracking_lost: report
            .tracking_lost
            .as_ref()
            .map(|t| (resync_reason(t.reason), system_time(&t.time))),
    }
}

/// What a job's status says, for the decisions.
pub fn job_facts(job: &ReplicationJob) -> JobFacts {
    let status = job.status.clone().unwrap_or_default();
    JobFacts {
        name: job.name_any(),
        state: job_state(status.phase),
        copying: status
            .steps
            .iter()
            .any(|s| s.name == INITIAL_REPLICATION_STEP && s.state == StepState::InProgress),
        start_time: status.start_time.as_ref().map(system_time),
        completion_time: status.completion_time.as_ref().map(system_time),
        error: status.error.as_ref().map(error_report),
        point_time: status
            .result
            .as_ref()
            .and_then(|r| r.recovery_point.as_ref())
            .map(|p| system_time(&p.time)),
    }
}

/// Set the conditions an ended job shows (`Complete=True`, or `Failed=True` with the error's
/// reason); a job that has not ended has none.
pub fn set_job_conditions(status: &mut lifeboat_api::job::ReplicationJobStatus, now: SystemTime) {
    let error = status
        .error
        .as_ref()
        .map(|e| (e.reason.as_str(), e.message.as_str()));
    let Some(verdict) = lifeboat_core::conditions::job_verdicts(job_state(status.phase), error)
    else {
        return;
    };
    let mut observed = conditions(&status.conditions);
    lifeboat_core::conditions::set_verdicts(&mut observed, [verdict], None, now);
    status.conditions = api_conditions(&observed);
}

/// Where the (test) failover results of a new status come from.
#[derive(Clone, Copy, Debug)]
pub struct Results<'a> {
    /// The test failover's, as the status had it.
    pub test_failover: Option<&'a FailoverResult>,
    /// The failover's, as the status had it.
    pub failover: Option<&'a FailoverResult>,
    /// Whether `failover` is a failback's result (copied from its jobs).
    pub failback: bool,
    /// A failback's: the failover's recovered VM, if there was one, which the failback keeps
    /// in its result to take it down.
    pub kept_vm: Option<&'a RecoveredVm>,
}

impl<'a> Results<'a> {
    /// The results after `change`: copied from `job` (the job that just ended), cleared, or
    /// kept as `old` had them.
    pub fn after(
        change: ResultChange,
        job: Option<&'a ReplicationJob>,
        old: &'a ProtectedVMStatus,
    ) -> Self {
        let from_job = job
            .and_then(|j| j.status.as_ref())
            .and_then(|s| s.result.as_ref());
        let failback = change == ResultChange::FailbackFromJob;
        Self {
            test_failover: match change {
                ResultChange::TestFailoverFromJob => from_job,
                ResultChange::ClearTestFailover => None,
                ResultChange::Keep
                | ResultChange::FailoverFromJob
                | ResultChange::FailbackFromJob => old.test_failover.as_ref(),
            },
            failover: match change {
                ResultChange::FailoverFromJob | ResultChange::FailbackFromJob => from_job,
                _ => old.failover.as_ref(),
            },
            failback,
            kept_vm: old
                .failover
                .as_ref()
                .and_then(|f| f.recovered_vm.as_ref())
                .filter(|_| failback),
        }
    }
}

/// The status the operator writes: its decisions, and the agent's facts that people read in
/// `kubectl get` (cycle times, pending bytes, disks, recovery points). `agent` is left out: it
/// is the agent's field.
pub fn vm_status(
    state: &VmState,
    report: Option<&AgentReport>,
    results: Results<'_>,
) -> ProtectedVMStatus {
    let h = &state.handled;
    let report = report.cloned().unwrap_or_default();
    ProtectedVMStatus {
        observed_generation: state.observed_generation,
        policy_generation: state.policy_generation,
        phase: api_phase(state.phase),
        direction: if state.reverse {
            ReplicationDirection::Reverse
        } else {
            ReplicationDirection::Forward
        },
        health: api_health(state.health.unwrap_or(Health::Normal)),
        health_reason: state.health.map(|_| state.health_reason.clone()),
        health_message: state.health.map(|_| state.health_message.clone()),
        rpo: state.rpo.map(format_duration),
        rpo_seconds: state.rpo.map(|r| r.as_secs()),
        last_successful_cycle_time: report.last_successful_cycle_time,
        last_cycle_duration_seconds: report.last_cycle_duration_seconds,
        next_cycle_time: state.next_cycle.map(api_time),
        pending_log_bytes: report.pending_log_bytes,
        disks: report.disks,
        recovery_points: report.recovery_points,
        last_error: state.last_error.as_ref().map(error_status),
        handled_requests: HandledRequests {
            resync: h.resync.clone(),
            test_failover: h.test_failover.clone(),
            cleanup_test_failover: h.cleanup_test_failover.clone(),
            failover: h.failover.clone(),
            commit: h.commit.clone(),
            reprotect: h.reprotect.clone(),
            retry: h.retry.clone(),
        },
        current_job: state.job.as_ref().map(|j| JobReference {
            name: j.name.clone(),
            job_type: api_job_type(j.kind),
            phase: api_job_phase(j.state),
            sequence: j.sequence,
            attempt: j.attempt,
            parameters: api_params(&j.params),
            last_error: j.error.as_ref().map(error_status),
        }),
        last_resync_time: state.last_resync.map(api_time),
        original_disks_in_step_time: state.original_in_step.map(api_time),
        // NB: the core only knows whether a test failover exists; its disks come from the job.
        test_failover: state
            .test_failover_exists
            .then(|| results.test_failover.cloned().unwrap_or_default()),
        failover: results.failover.cloned().map(|mut result| {
            if results.failback {
                result.failback = true;
                result.recovered_vm = results.kept_vm.cloned();
            }
            result
        }),
        conditions: api_conditions(&state.conditions),
        agent: None,
    }
}

// ---- ReplicationPolicy ----

fn weekday(d: Weekday) -> u8 {
    match d {
        Weekday::Monday => 0,
        Weekday::Tuesday => 1,
        Weekday::Wednesday => 2,
        Weekday::Thursday => 3,
        Weekday::Friday => 4,
        Weekday::Saturday => 5,
        Weekday::Sunday => 6,
    }
}

fn window(w: &TimeWindow) -> WindowSpec {
    WindowSpec {
        start: w.start.clone(),
        end: w.end.clone(),
        days: w.days.iter().copied().map(weekday).collect(),
        time_zone: w.time_zone.clone(),
    }
}

/// What the decisions need of a policy on a cluster: [`policy_spec`], and a local target
/// must be marked shared (the replica must outlive the VM's node).
pub fn cluster_policy_spec(policy: &ReplicationPolicy) -> PolicySpec {
    PolicySpec {
        unshared_local_in_cluster: policy.spec.target.local.as_ref().is_some_and(|l| !l.shared),
        ..policy_spec(policy)
    }
}

/// What the decisions need of a policy (standalone mode: any local folder will do).
pub fn policy_spec(policy: &ReplicationPolicy) -> PolicySpec {
    let s = &policy.spec;
    let azure = s.target.azure_blob.as_ref();
    PolicySpec {
        generation: policy.metadata.generation,
        copy_interval: s.copy_frequency.interval(),
        rpo_threshold: Duration::from_secs(u64::from(s.rpo_threshold_minutes) * 60),
        resync_automatic: s.resync.mode == ResyncMode::Automatic,
        resync_window: s.resync.window.as_ref().map(window),
        log_threshold_percent: s.resync.log_size_threshold_percent,
        initial_replication_start: s
            .initial_replication
            .as_ref()
            .and_then(|i| i.start_time.as_ref())
            .map(system_time),
        work_hours: s
            .bandwidth
            .as_ref()
            .and_then(|b| b.work_hours.as_ref())
            .map(window),
        account_url: azure.map(|a| a.account_url.clone()),
        token_credentials: azure.is_some_and(|a| a.credentials.workload_identity.is_some()),
        unshared_local_in_cluster: false,
    }
}

/// The operator's last decisions about a policy.
pub fn policy_state(policy: &ReplicationPolicy) -> PolicyState {
    let status = policy.status.clone().unwrap_or_default();
    PolicyState {
        observed_generation: status.observed_generation,
        conditions: conditions(&status.conditions),
        protected_vms: status.protected_vms,
    }
}

/// A policy's status from the decisions.
pub fn policy_status(state: &PolicyState) -> lifeboat_api::ReplicationPolicyStatus {
    lifeboat_api::ReplicationPolicyStatus {
        observed_generation: state.observed_generation,
        conditions: api_conditions(&state.conditions),
        protected_vms: state.protected_vms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_core::vm::{JobObservation, VmInput, decide_vm};

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A failback's jobs replace the failover's result, keeping its recovered VM (stopped by
    /// the failback, to be taken down) and marking the result a failback's; the next
    /// failover's result keeps nothing of it.
    #[test]
    fn a_failbacks_result_keeps_the_failovers_recovered_vm() {
        let up = RecoveredVm {
            name: "db".into(),
            definition: Some("/failover/db.xml".into()),
            succeeded: true,
            ..RecoveredVm::default()
        };
        let old = ProtectedVMStatus {
            failover: Some(FailoverResult {
                node: Some("node-a".into()),
                recovered_vm: Some(up.clone()),
                ..FailoverResult::default()
            }),
            ..ProtectedVMStatus::default()
        };
        let mut job = ReplicationJob::new(
            "db-failover-7",
            lifeboat_api::job::ReplicationJobSpec {
                vm_ref: lifeboat_api::common::LocalObjectReference { name: "db".into() },
                node_name: "node-b".into(),
                job_type: lifeboat_api::job::JobType::Failover,
                parameters: Default::default(),
            },
        );
        job.status = Some(lifeboat_api::job::ReplicationJobStatus {
            result: Some(FailoverResult {
                node: Some("node-b".into()),
                ..FailoverResult::default()
            }),
            ..Default::default()
        });
        let state = VmState::default();
        let failover = |change, old: &ProtectedVMStatus| {
            vm_status(&state, None, Results::after(change, Some(&job), old))
                .failover
                .unwrap_or_default()
        };
        let failback = failover(ResultChange::FailbackFromJob, &old);
        assert!(failback.failback);
        assert_eq!(failback.node.as_deref(), Some("node-b"), "the job's result");
        assert_eq!(failback.recovered_vm.as_ref(), Some(&up));
        let kept = ProtectedVMStatus {
            failover: Some(failback.clone()),
            ..ProtectedVMStatus::default()
        };
        assert_eq!(failover(ResultChange::Keep, &kept), failback);
        assert_eq!(
            failover(ResultChange::FailbackFromJob, &kept).recovered_vm,
            Some(up),
            "the Failback job's result keeps it too"
        );
        let next = failover(ResultChange::FailoverFromJob, &kept);
        assert!(!next.failback && next.recovered_vm.is_none());
    }

    #[test]
    fn every_enum_maps_both_ways() {
        for kind in JobKind::ALL {
            assert_eq!(job_kind(api_job_type(kind)), kind);
            assert_eq!(kind.as_str(), format!("{:?}", api_job_type(kind)));
        }
        for state in [
            JobState::Pending,
            JobState::Running,
            JobState::WaitingForInput,
            JobState::Succeeded,
            JobState::Failed,
        ] {
            assert_eq!(job_state(api_job_phase(state)), state);
        }
        for p in [
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
        ] {
            assert_eq!(phase(api_phase(p)), p);
        }
        for r in [
            ResyncReason::LogThresholdReached,
            ResyncReason::TrackingLost,
            ResyncReason::CorruptLog,
            ResyncReason::Requested,
        ] {
            assert_eq!(resync_reason(api_resync_reason(r)), r);
            assert_eq!(r.as_str(), format!("{:?}", api_resync_reason(r)));
        }
        for p in [
            PointChoice::Latest,
            PointChoice::LatestProcessed,
            PointChoice::LatestAppConsistent,
            PointChoice::Named("p1".into()),
            PointChoice::NotAfter(1_796_587_200_000),
        ] {
            assert_eq!(point(&api_point(&p)), p);
        }
    }

    #[test]
    fn on_a_cluster_a_local_target_must_be_a_share() {
        let policy = |target: serde_json::Value| -> ReplicationPolicy {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
                "metadata": {"name": "p"},
                "spec": {"target": target}
            }))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let node_local = policy(serde_json::json!({"local": {"path": "/r"}}));
        let share = policy(serde_json::json!({"local": {"path": "/r", "shared": true}}));
        let azure = policy(serde_json::json!({"azureBlob": {
            "accountUrl": "https://a.blob.core.windows.net", "container": "c",
            "credentials": {"accountKeySecretRef": {"name": "s", "key": "k"}}}}));
        assert!(cluster_policy_spec(&node_local).unshared_local_in_cluster);
        assert!(
            !policy_spec(&node_local).unshared_local_in_cluster,
            "standalone: any folder"
        );
        assert!(!cluster_policy_spec(&share).unshared_local_in_cluster);
        assert!(!cluster_policy_spec(&azure).unshared_local_in_cluster);
    }

    #[test]
    fn a_job_tells_the_decisions_the_point_it_ended_at() {
        let mut job = ReplicationJob::new(
            "web-failback-7",
            serde_json::from_value(serde_json::json!({
                "vmRef": {"name": "web"}, "nodeName": "n1", "type": "Failback",
                "parameters": {"presync": true}
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(job_facts(&job).point_time, None);
        job.status = Some(
            serde_json::from_value(serde_json::json!({
                "phase": "Succeeded",
                "result": {"recoveryPoint": {"name": "p", "time": "2026-12-08T00:20:31Z",
                           "consistency": "CrashConsistent"}}
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(
            job_facts(&job).point_time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_689_231))
        );
    }

    #[test]
    fn a_decided_state_survives_the_trip_through_status() {
        // A VM whose first job failed: every kind of field is set.
        let vm = ProtectedVM::new(
            "web",
            serde_json::from_value(serde_json::json!({
                "vmName": "web", "nodeName": "n1", "hypervisor": {"qemu": {"qmpSocket": "/q"}},
                "disks": [{"name": "os", "path": "/d", "blockNode": "b"}],
                "policyRef": {"name": "p"},
                "requests": {"resync": "r1", "retry": "x"}
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let spec = vm_spec(&vm);
        let policy = lifeboat_core::policy::check_policy(&PolicySpec {
            generation: Some(3),
            copy_interval: Duration::from_secs(300),
            rpo_threshold: Duration::from_secs(1800),
            resync_automatic: true,
            resync_window: None,
            log_threshold_percent: 50,
            initial_replication_start: None,
            work_hours: None,
            account_url: None,
            token_credentials: false,
            unshared_local_in_cluster: false,
        })
        .0;
        let first = decide_vm(&VmInput {
            now: at(1000),
            spec: &spec,
            state: &VmState::default(),
            policy: Some(&policy),
            agent: None,
            job: &JobObservation::NotLookedUp,
            heartbeat: Some(at(990)),
            primary_heartbeat: Some(at(990)),
            job_heartbeat: None,
            recovery: &[],
            failover: None,
            test_failover: None,
        });
        let name = first
            .create_job
            .as_ref()
            .map(|j| j.name.clone())
            .unwrap_or_default();
        let failed = decide_vm(&VmInput {
            now: at(1100),
            spec: &spec,
            state: &first.state,
            policy: Some(&policy),
            agent: None,
            job: &JobObservation::Found(JobFacts {
                name,
                state: JobState::Failed,
                copying: false,
                start_time: Some(at(1010)),
                completion_time: Some(at(1090)),
                error: Some(ErrorReport {
                    class: ErrorClass::Recoverable,
                    reason: "StoreUnreachable".into(),
                    message: "down".into(),
                    retry_count: 0,
                    next_retry_time: None,
                    first_seen_time: None,
                }),
                point_time: None,
            }),
            heartbeat: Some(at(1095)),
            primary_heartbeat: Some(at(1095)),
            job_heartbeat: Some(at(1095)),
            recovery: &[],
            failover: None,
            test_failover: None,
        });
        // And one replicating in reverse, its original disks kept in step.
        let in_step = VmState {
            reverse: true,
            last_resync: Some(at(900)),
            original_in_step: Some(at(1200)),
            ..failed.state.clone()
        };
        for state in [&first.state, &failed.state, &in_step] {
            let status = vm_status(
                state,
                None,
                Results {
                    test_failover: None,
                    failover: None,
                    failback: false,
                    kept_vm: None,
                },
            );
            let json = serde_json::to_value(&status).unwrap_or_default();
            let back: ProtectedVMStatus =
                serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(vm_state(Some(&back)), *state);
        }
        assert!(failed.state.last_error.is_some());
    }
}
