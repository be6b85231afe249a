//! `ReplicationPolicy` (short name `rpol`): how often, how long, where, how fast.
//!
//! A policy is shared by many `ProtectedVM`s. Its settings follow ASR's replication policy for
//! Hyper-V: copy frequency, recovery point retention, app-consistent snapshot frequency,
//! initial replication start time, resynchronization, bandwidth by work and off hours, upload
//! concurrency per VM, and the target the replicas go to.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::{LocalObjectReference, SecretKeyReference};

/// How often changes are shipped: ASR's three copy frequencies.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum CopyFrequency {
    /// Every 30 seconds.
    #[serde(rename = "30s")]
    Seconds30,
    /// Every 5 minutes (ASR's default).
    #[default]
    #[serde(rename = "5m")]
    Minutes5,
    /// Every 15 minutes.
    #[serde(rename = "15m")]
    Minutes15,
}

impl CopyFrequency {
    /// The copy interval.
    pub fn interval(self) -> Duration {
        match self {
            Self::Seconds30 => Duration::from_secs(30),
            Self::Minutes5 => Duration::from_secs(5 * 60),
            Self::Minutes15 => Duration::from_secs(15 * 60),
        }
    }
}

/// The desired state of a replication policy.
// NB: each `printcolumn(...)` repeats the same keys, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "lifeboat.io",
    version = "v1alpha1",
    kind = "ReplicationPolicy",
    namespaced,
    status = "ReplicationPolicyStatus",
    shortname = "rpol",
    category = "lifeboat",
    derive = "PartialEq",
    cel,
    doc = "How often, how long, where and how fast the ProtectedVMs that use this policy replicate.",
    printcolumn(
        name = "Frequency",
        type_ = "string",
        json_path = ".spec.copyFrequency",
        description = "How often changes are shipped"
    ),
    printcolumn(
        name = "Retention",
        type_ = "integer",
        json_path = ".spec.recoveryPointRetentionHours",
        description = "Hours of recovery points kept"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the policy is valid and its target reachable"
    ),
    printcolumn(
        name = "VMs",
        type_ = "integer",
        json_path = ".status.protectedVMs",
        description = "ProtectedVMs using this policy"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationPolicySpec {
    /// How often changes are shipped: 30s, 5m or 15m.
    #[serde(default)]
    pub copy_frequency: CopyFrequency,
    /// How many hours of recovery points to keep (0 keeps only the latest), at most 15 days.
    #[serde(default = "default_retention_hours")]
    #[schemars(range(min = 0, max = 360))]
    pub recovery_point_retention_hours: u32,
    /// How often, in hours, to take an application-consistent point (1-12). Absent: only
    /// crash-consistent points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 12))]
    pub app_consistent_frequency_hours: Option<u32>,
    /// When initial replication starts. Absent: as soon as the VM is protected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_replication: Option<InitialReplication>,
    /// When and how resynchronization runs.
    #[serde(default)]
    pub resync: ResyncSettings,
    /// Upload bandwidth limits for work and off hours. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Upload requests in flight per VM (ASR's upload threads per VM).
    #[serde(default = "default_upload_concurrency")]
    #[schemars(range(min = 1, max = 32))]
    pub upload_concurrency: u32,
    /// Health turns Warning when the RPO exceeds this many minutes.
    #[serde(default = "default_rpo_threshold_minutes")]
    #[schemars(range(min = 1, max = 1440))]
    pub rpo_threshold_minutes: u32,
    /// Where the replicas go.
    pub target: ReplicaTarget,
    /// Where the store-only jobs of the policy's VMs run when a VM's own agent is lost, after
    /// the VM's own `recoveryNodeNames` and `recoveryNodeSelector`.
    #[serde(default, skip_serializing_if = "RecoveryNodes::is_empty")]
    pub recovery_nodes: RecoveryNodes,
}

/// Nodes that may run a VM's store-only jobs (failover, test failover, commit, cleanup) when
/// the agent of the VM's node is lost: these names in order, then the nodes that carry every
/// label of the selector, by name.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryNodes {
    /// Node names, in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub names: Vec<String>,
    /// Labels a node must all carry (a `matchLabels`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub selector: BTreeMap<String, String>,
}

impl RecoveryNodes {
    /// Neither names nor a selector.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.selector.is_empty()
    }
}

fn default_retention_hours() -> u32 {
    24
}
fn default_upload_concurrency() -> u32 {
    4
}
fn default_rpo_threshold_minutes() -> u32 {
    30
}

/// When initial replication starts.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InitialReplication {
    /// Start at this time (RFC 3339) instead of at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
}

/// Automatic or manual resynchronization.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum ResyncMode {
    /// Start a required resync inside the window by itself.
    #[default]
    Automatic,
    /// Wait for a request (`spec.requests.resync` on the ProtectedVM).
    Manual,
}

/// When and how resynchronization runs.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResyncSettings {
    /// Automatic or Manual.
    #[serde(default)]
    pub mode: ResyncMode,
    /// The hours automatic resyncs may run in (ASR schedules them outside business hours).
    /// Absent: any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<TimeWindow>,
    /// Resynchronize when the logs awaiting shipment reach this percent of the disk's size.
    #[serde(default = "default_log_threshold_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub log_size_threshold_percent: u32,
    /// Size of the blocks compared during a resync: a multiple of 4 KiB, 4 KiB to 4 MiB.
    #[serde(default = "default_resync_block_size_bytes")]
    #[schemars(range(min = 4096, max = 4194304), extend("multipleOf" = 4096))]
    pub block_size_bytes: u32,
}

impl Default for ResyncSettings {
    fn default() -> Self {
        Self {
            mode: ResyncMode::default(),
            window: None,
            log_size_threshold_percent: default_log_threshold_percent(),
            block_size_bytes: default_resync_block_size_bytes(),
        }
    }
}

fn default_log_threshold_percent() -> u32 {
    50
}
fn default_resync_block_size_bytes() -> u32 {
    65536
}

/// A day of the week.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Weekday {
    Monday,
    Tuesday,
    Wednesday,
    Thursday,
    Friday,
    Saturday,
    Sunday,
}

/// A daily window of wall-clock time, on some days of the week.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.start != self.end", "message": "start and end must differ"}
]))]
pub struct TimeWindow {
    /// Start, as HH:MM (24-hour clock).
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), length(max = 5))]
    pub start: String,
    /// End, as HH:MM; an end before the start spans midnight.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), length(max = 5))]
    pub end: String,
    /// The days the window applies to. Absent: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub days: Vec<Weekday>,
    /// The IANA time zone the times are in. Absent: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
}

/// Upload bandwidth limits, in megabits per second, for work and off hours.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    /// The work hours. Absent: every hour is an off hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_hours: Option<TimeWindow>,
    /// Limit during work hours. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub work_hours_mbps: Option<u32>,
    /// Limit outside work hours. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub off_hours_mbps: Option<u32>,
}

/// Where replicas go: exactly one of `azureBlob` and `local`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.azureBlob) != has(self.local)",
     "message": "exactly one of azureBlob and local must be set"},
    {"rule": "has(self.azureBlob) == has(oldSelf.azureBlob)",
     "message": "the kind of target cannot change once the policy exists"}
]))]
pub struct ReplicaTarget {
    /// Azure Blob Storage: one page blob per replica disk, recovery points as blob snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_blob: Option<AzureBlobTarget>,
    /// A folder on the node (or the standalone machine): the embedded default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalTarget>,
}

/// An Azure Blob Storage container.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AzureBlobTarget {
    /// The account's blob endpoint, e.g. `https://myaccount.blob.core.windows.net`.
    #[schemars(
        regex(pattern = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"),
        length(max = 512)
    )]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "accountUrl is immutable"}
    ]))]
    pub account_url: String,
    /// The container (3-63 lowercase letters, digits and single hyphens).
    #[schemars(
        regex(pattern = r"^[a-z0-9](?:[a-z0-9]|-[a-z0-9]){2,62}$"),
        length(min = 3, max = 63)
    )]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "container is immutable"}
    ]))]
    pub container: String,
    /// How the agent authenticates: exactly one way.
    pub credentials: AzureCredentials,
}

/// How to authenticate to Azure Storage: exactly one of the fields. Credentials never appear
/// in a resource: only a reference to where they are.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.accountKeySecretRef) ? 1 : 0) + (has(self.sasSecretRef) ? 1 : 0) + (has(self.workloadIdentity) ? 1 : 0) == 1",
     "message": "exactly one of accountKeySecretRef, sasSecretRef and workloadIdentity must be set"}
]))]
pub struct AzureCredentials {
    /// A Secret key holding the storage account key (shared-key signing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_key_secret_ref: Option<SecretKeyReference>,
    /// A Secret key holding a SAS token for the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_secret_ref: Option<SecretKeyReference>,
    /// Entra workload identity (or the node's managed identity): no secret at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,
}

/// Entra workload identity or managed identity.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    /// The client id of a user-assigned identity. Absent: the one the agent's service account
    /// is federated with, or the system-assigned managed identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"))]
    pub client_id: Option<String>,
}

/// A local folder target.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalTarget {
    /// An absolute path (`/var/lib/lifeboat/replicas`, or `D:\Replicas` on Windows).
    #[schemars(
        regex(pattern = r"^(/|[A-Za-z]:[\\/]|\\\\)"),
        length(min = 1, max = 4096)
    )]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "path is immutable"}
    ]))]
    pub path: String,
    /// The path is a share every node mounts at the same place (NFS, CephFS): the replica
    /// survives the loss of the VM's node, and a recovery node reads it. On a cluster a
    /// policy with a local target that is not marked shared is refused (a replica on the
    /// VM's own node is lost with it); standalone mode takes any folder.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// What the operator observed of a policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationPolicyStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, with a reason naming a bad field or an unreachable target, and
    /// `DeletionBlocked`. A list-map keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// How many ProtectedVMs use this policy.
    #[serde(default, rename = "protectedVMs")]
    pub protected_vms: u32,
}

/// A policy reference held by a ProtectedVM.
pub type PolicyReference = LocalObjectReference;
