//! `ReplicationJob` (short name `rjob`): one operation on one VM, run by the agent on one node,
//! like an entry of ASR's Jobs tab.
//!
//! The operator creates a job; the agent on `spec.nodeName` claims it with an atomic status
//! update (`status.claimedBy`, guarded by the resourceVersion) so that two agents never run it
//! both, then reports progress and steps until the job ends. A job's spec never changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ErrorStatus, LocalObjectReference, RecoveryPointSelector, RequestToken};
use crate::protected_vm::{FailoverResult, FailoverType};

/// One operation on one VM.
// NB: each `printcolumn(...)` repeats the same keys, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "lifeboat.io",
    version = "v1alpha1",
    kind = "ReplicationJob",
    namespaced,
    status = "ReplicationJobStatus",
    shortname = "rjob",
    category = "lifeboat",
    derive = "PartialEq",
    cel,
    doc = "One operation on one protected VM (enable, finalize, resync, failover, ...), run by the agent on the VM's node.",
    selectable = ".spec.nodeName",
    printcolumn(
        name = "VM",
        type_ = "string",
        json_path = ".spec.vmRef.name",
        description = "The ProtectedVM"
    ),
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.type",
        description = "The operation"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Running, Succeeded, Failed or WaitingForInput"
    ),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "Percent done"
    ),
    printcolumn(
        name = "Started",
        type_ = "date",
        json_path = ".status.startTime",
        description = "When the agent started the job"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.nodeName",
        priority = 1,
        description = "The node whose agent runs the job"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a job's spec is immutable"}
]))]
pub struct ReplicationJobSpec {
    /// The ProtectedVM the job works on.
    pub vm_ref: LocalObjectReference,
    /// The node whose agent runs the job.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// The operation.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The operation's parameters.
    #[serde(default)]
    pub parameters: JobParameters,
}

/// The operations, named as ASR's jobs are.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum JobType {
    /// Check prerequisites, create the replica disks, copy the disks.
    EnableProtection,
    /// Ship the changes made during the copy, cut the first recovery point.
    FinalizeProtection,
    /// Compare block checksums and send the blocks that differ.
    Resynchronize,
    /// Materialise a recovery point as a separately named disk set.
    TestFailover,
    /// Remove the disks of a test failover.
    CleanupTestFailover,
    /// Fail over to a recovery point.
    Failover,
    /// After a failover, drop the other recovery points.
    Commit,
    /// After a failover (or a failback), protect the VM where it runs now, sending only the
    /// blocks that differ from the point it started from.
    Reprotect,
    /// Bring the primary site's original disks to the point a failback cut, writing only the
    /// blocks that differ.
    Failback,
    /// Stop tracking, remove the bitmaps and, if asked, the replica.
    DisableProtection,
}

/// Why a resync runs.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum ResyncReason {
    /// The pending logs reached the policy's threshold.
    LogThresholdReached,
    /// Change tracking was lost (a bitmap left inconsistent by a crash, a disk modified while
    /// tracking was off).
    TrackingLost,
    /// A change log failed its checksums.
    CorruptLog,
    /// Someone asked.
    Requested,
}

/// Parameters of a job; which ones apply depends on its type.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobParameters {
    /// The request token the job answers, if a request started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_token: Option<RequestToken>,
    /// Failover: Planned or Unplanned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_type: Option<FailoverType>,
    /// (Test) failover: which point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<RecoveryPointSelector>,
    /// Resynchronize: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_reason: Option<ResyncReason>,
    /// DisableProtection: delete the replica too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete_replica: bool,
    /// Failover: the first half of a failback (stop, ship, cut the point; the Failback job
    /// writes the original disks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub to_primary: bool,
    /// A planned failback's first steps, run while the recovered VM still runs: a Failover
    /// job (with `toPrimary`) ships its changes and cuts a fresh point without stopping it; a
    /// Failback job brings the original disks to the newest point. Once the VM is stopped,
    /// only its last changes are shipped and written. `failoverType` and `recoveryPoint`
    /// carry the request's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub presync: bool,
}

/// Where a job is.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum JobPhase {
    /// Created, not claimed by an agent yet.
    #[default]
    Pending,
    /// Claimed and running.
    Running,
    /// Done.
    Succeeded,
    /// Ended with an error (see `status.error`).
    Failed,
    /// Waiting for something outside Lifeboat (e.g. the policy's resync window, or the
    /// initial replication start time).
    WaitingForInput,
}

/// Progress of a job.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobProgress {
    /// Percent done, 0-100.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub percent: u8,
    /// Bytes done.
    #[serde(default)]
    pub bytes_done: u64,
    /// Bytes in all.
    #[serde(default)]
    pub bytes_total: u64,
    /// What is happening now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// State of one step of a job.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum StepState {
    #[default]
    NotStarted,
    InProgress,
    Succeeded,
    Failed,
    Skipped,
}

/// One step of a job (ASR lists them under a job: "Prerequisites check", ...).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobStep {
    /// The step's name.
    pub name: String,
    /// Where it is.
    #[serde(default)]
    pub state: StepState,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// A detail, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What happened to a job.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationJobStatus {
    /// Pending, Running, Succeeded, Failed or WaitingForInput.
    #[serde(default)]
    pub phase: JobPhase,
    /// The agent (node and pod) that claimed the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// When the agent started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// How far it is.
    #[serde(default)]
    pub progress: JobProgress,
    /// Its steps, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<JobStep>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorStatus>,
    /// What a (test) failover materialised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<FailoverResult>,
    /// As a Kubernetes Job's: none while the job runs, then `Complete=True` when it succeeded
    /// or `Failed=True` (reason: the error's) when it failed. A list-map keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
