//! `RecoveryPlan` (short name `rplan`): many ProtectedVMs recovered together, in order.
//!
//! The spec lists groups of VMs. A run takes the groups one after the other (cleanup in
//! reverse order): a group's optional manual gate waits for a `proceed` request (test failover
//! and failover only), its `before` hooks run, its VMs are asked in parallel, its `after`
//! hooks run. Requests are tokens, as on a ProtectedVM: a new token asks once,
//! `status.handledRequests` echoes it once the run is done. A step that fails stops the run
//! with its reason; a `retry` request resumes it at that step, without redoing the steps done.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{RecoveryPointSelector, RequestToken};
use crate::protected_vm::{FailoverType, MaterialisedDisk};

/// The desired state of a recovery plan.
// NB: each `printcolumn(...)` repeats the same keys, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "lifeboat.io",
    version = "v1alpha1",
    kind = "RecoveryPlan",
    plural = "recoveryplans",
    namespaced,
    status = "RecoveryPlanStatus",
    shortname = "rplan",
    category = "lifeboat",
    derive = "PartialEq",
    cel,
    doc = "Groups of ProtectedVMs recovered in order, with hooks and manual gates between groups.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Idle, Running, WaitingForGate, Succeeded or Failed"
    ),
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".status.action",
        description = "The run's action (TestFailover, PlannedFailover, ...)"
    ),
    printcolumn(
        name = "Step",
        type_ = "string",
        json_path = ".status.progression",
        description = "The step the run is at, or stopped at"
    ),
    printcolumn(
        name = "RTO",
        type_ = "number",
        json_path = ".status.recoveryTimeSeconds",
        description = "Seconds from the request to the end of the last step"
    ),
    printcolumn(
        name = "Last Drill",
        type_ = "boolean",
        json_path = ".status.lastDrill.succeeded",
        priority = 1,
        description = "Whether the last drill succeeded"
    ),
    printcolumn(
        name = "Next Drill",
        type_ = "date",
        json_path = ".status.nextDrillTime",
        priority = 1,
        description = "When the next drill is due"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.groups.all(g, self.groups.exists_one(h, h.name == g.name))",
     "message": "every group needs a name of its own"},
    {"rule": "self.groups.all(g, g.vms.all(v, self.groups.exists_one(h, h.vms.exists(w, w == v))))",
     "message": "a ProtectedVM can be in one group of a plan only"}
]))]
pub struct RecoveryPlanSpec {
    /// The groups, in the order they are recovered.
    #[schemars(length(min = 1, max = 10))]
    pub groups: Vec<PlanGroup>,
    /// Test the plan on a schedule: a drill is a test failover of every VM (gates passed by
    /// themselves, hooks run), each disk verified against its point's digests, then the
    /// cleanup, replication going on throughout. The last drill is in `status.lastDrill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<PlanDrill>,
    /// Actions asked for by token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<PlanRequests>,
}

/// A plan's drill schedule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanDrill {
    /// Hours between drills; the first comes one interval after the plan was created.
    #[schemars(range(min = 1, max = 8760))]
    pub interval_hours: u32,
}

/// How the last drill went.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrillStatus {
    /// When it started.
    pub start_time: Time,
    /// When it ended (its cleanup included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Whether every VM recovered, verified, and was cleaned up.
    pub succeeded: bool,
    /// Seconds from its start to the end of its test failover's last step (the recovery time
    /// the plan would take).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_time_seconds: Option<f64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One group: VMs recovered in parallel, with what runs around them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanGroup {
    /// The group's name, unique in the plan (`db`, `app`, `web`).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The ProtectedVMs of the group, by name, in the plan's namespace.
    // NB: bounded (10 groups of 50 names of 63 characters), so that the API server's estimate
    // of the one-group-per-VM rule's cost stays within its budget.
    #[schemars(length(min = 1, max = 50), inner(length(min = 1, max = 63)), extend("x-kubernetes-list-type" = "set"))]
    pub vms: Vec<String>,
    /// Wait for a person before the group starts: the run stops at the gate until a
    /// `spec.requests.proceed` token it has not seen arrives (`lifeboat plan proceed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<PlanGate>,
    /// Hooks run, one after the other, before the group's VMs are asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub before: Vec<PlanHook>,
    /// Hooks run, one after the other, once every VM of the group is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub after: Vec<PlanHook>,
}

/// A manual gate.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanGate {
    /// What the person should check before letting the run go on.
    #[schemars(length(min = 1, max = 1024))]
    pub message: String,
}

/// A hook: a command (standalone) or a Kubernetes Job (on a cluster) run with the plan's
/// results in its environment.
///
/// The environment holds `LIFEBOAT_PLAN`, `LIFEBOAT_NAMESPACE`, `LIFEBOAT_ACTION`,
/// `LIFEBOAT_TOKEN`, `LIFEBOAT_GROUP`, `LIFEBOAT_STAGE` (`before` or `after`),
/// `LIFEBOAT_VMS` (the group's VMs), `LIFEBOAT_DISKS_<VM>` (one `disk=location` line per disk
/// of each VM recovered so far), `LIFEBOAT_DISK_<VM>_<DISK>` (one disk's location; names
/// upper-cased, `_` for other characters), `LIFEBOAT_RECOVERED_<VM>` (where the definition of
/// the VM brought up on them went, for a VM with a `recoveredVm`) and `LIFEBOAT_RESULTS` (the per-VM outcomes so far,
/// as JSON). Hooks run for every action (`LIFEBOAT_ACTION`: TestFailover,
/// CleanupTestFailover, PlannedFailover, UnplannedFailover, Commit), so that what a hook
/// starts at a test failover it can stop at the cleanup.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.command) && size(self.command) > 0) || has(self.job)",
     "message": "a hook needs a command (standalone), a job (on a cluster), or both"}
]))]
pub struct PlanHook {
    /// The hook's name, in progress and errors.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Standalone: the program and its arguments (no shell: name `sh -c` for one), run in the
    /// manifests folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub command: Vec<String>,
    /// On a cluster: the Job the operator creates for the hook in the plan's namespace, as a
    /// batch/v1 JobSpec (its `template` at least). The environment above is added to each of
    /// its containers; the hook succeeds when the Job completes and fails when it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub job: Option<serde_json::Value>,
    /// How long the hook may run before it is stopped and counted as failed.
    #[serde(default = "default_hook_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

/// An object the API server keeps as it is given (a JobSpec, checked when the Job is made).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn default_hook_timeout() -> u32 {
    600
}

/// A plan's actions, asked for by token. Set a new token value to ask again.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanRequests {
    /// Test failover of every VM, group by group, replication going on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<PlanTestFailoverRequest>,
    /// Remove what the last test failover made, for every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub cleanup_test_failover: Option<RequestToken>,
    /// Fail every VM over, group by group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<PlanFailoverRequest>,
    /// Commit the failover of every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub commit: Option<RequestToken>,
    /// Let a run waiting at a gate go on (a token not seen before passes one gate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub proceed: Option<RequestToken>,
    /// Run the failed run again from the step that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub retry: Option<RequestToken>,
}

/// A plan's test failover request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.recoveryPoint.kind != 'Named'",
     "message": "a plan chooses points by rule (Latest, LatestAppConsistent, NotAfter): a point's name belongs to one VM"}
]))]
pub struct PlanTestFailoverRequest {
    /// The request token.
    #[schemars(length(min = 1, max = 63))]
    pub token: RequestToken,
    /// Which point of each VM. Absent: the latest.
    #[serde(default)]
    pub recovery_point: RecoveryPointSelector,
}

/// A plan's failover request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.recoveryPoint) || self.recoveryPoint.kind != 'Named'",
     "message": "a plan chooses points by rule (Latest, LatestAppConsistent, NotAfter): a point's name belongs to one VM"},
    {"rule": "self.type != 'Planned' || !has(self.recoveryPoint) || self.recoveryPoint.kind == 'Latest'",
     "message": "a planned failover always uses the latest point, after shipping what is pending"}
]))]
pub struct PlanFailoverRequest {
    /// The request token.
    #[schemars(length(min = 1, max = 63))]
    pub token: RequestToken,
    /// Planned or Unplanned.
    #[serde(rename = "type", default)]
    pub failover_type: FailoverType,
    /// Which point of each VM. Absent: the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<RecoveryPointSelector>,
}

/// Where a plan is.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum PlanPhase {
    /// No run yet.
    #[default]
    Idle,
    /// A run is going on.
    Running,
    /// A run waits at a group's manual gate for a `proceed` request.
    WaitingForGate,
    /// The last run finished.
    Succeeded,
    /// The last run stopped at a step that failed (`status.failure`); `retry` resumes it.
    Failed,
}

/// What a run does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum PlanAction {
    /// Test failover of every VM.
    #[default]
    TestFailover,
    /// Remove the test failovers.
    CleanupTestFailover,
    /// Planned failover (the sources stopped after shipping what is pending).
    PlannedFailover,
    /// Unplanned failover (the sources are gone).
    UnplannedFailover,
    /// Commit the failovers.
    Commit,
    /// A scheduled drill: test failover, verification, cleanup.
    Drill,
}

/// How one VM of a run went.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum VmOutcome {
    /// Its group has not started.
    #[default]
    Pending,
    /// Its request is out.
    Running,
    /// Done.
    Succeeded,
    /// Its request failed (`message`).
    Failed,
}

/// One VM of a run.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanVmStatus {
    /// The ProtectedVM's name.
    pub name: String,
    /// Its group.
    pub group: String,
    /// How it went.
    pub outcome: VmOutcome,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When its request went out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<MicroTime>,
    /// When it was done (or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<MicroTime>,
    /// The point it was recovered to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<String>,
    /// Where its recovered disks are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<MaterialisedDisk>,
    /// Whether every recovered disk was read back equal to its point's digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// The VM brought up on its disks (its `spec.recoveredVm`): where its definition went, or
    /// its name when it has no template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_vm: Option<String>,
}

/// The step a run stopped at, and why.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanFailure {
    /// The step (`app/before/migrate`, `db/vm/db-01`).
    pub step: String,
    /// Why.
    pub message: String,
}

/// The tokens of the requests handled.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanHandledRequests {
    /// The last test failover done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<RequestToken>,
    /// The last cleanup done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_test_failover: Option<RequestToken>,
    /// The last failover done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<RequestToken>,
    /// The last commit done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<RequestToken>,
    /// The last proceed that passed a gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proceed: Option<RequestToken>,
    /// The last retry taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RequestToken>,
}

/// The observed state of a recovery plan: its last run.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanStatus {
    /// Where the plan is.
    #[serde(default)]
    pub phase: PlanPhase,
    /// The last run's action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<PlanAction>,
    /// The last run's request token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<RequestToken>,
    /// The step the run is at (or stopped at), in words: `app: waiting at the gate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progression: Option<String>,
    /// The steps of the run done, so that a retry does not redo them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed_steps: Vec<String>,
    /// Every VM of the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<PlanVmStatus>,
    /// When the run was asked for (a retry keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Seconds from the request to the end of its last step (the measured recovery time; a
    /// retried run counts from the first request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_time_seconds: Option<f64>,
    /// The step the run stopped at, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<PlanFailure>,
    /// The last drill (`spec.drill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill: Option<DrillStatus>,
    /// When the next drill is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_drill_time: Option<Time>,
    /// The tokens of the requests handled.
    #[serde(default)]
    pub handled_requests: PlanHandledRequests,
    /// Succeeded: True when the last run finished, False when it stopped at a failed step,
    /// Unknown while it runs (`kubectl wait --for=condition=Succeeded rplan/NAME`). A list-map
    /// keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
