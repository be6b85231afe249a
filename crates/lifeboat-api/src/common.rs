//! Types shared by the three resources: health, error reporting, recovery point choices and
//! object references.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Health of a protected VM, as ASR reports it.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum Health {
    /// Replicating within the policy's targets.
    #[default]
    Normal,
    /// Replicating, but cycles are being missed, the RPO is over its threshold, or the agent
    /// has gone quiet.
    Warning,
    /// Not replicating until someone acts: a non-recoverable error, or a resync that is
    /// required and cannot run.
    Critical,
}

/// Whether an error clears by itself, following ASR's two classes.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Network, store unreachable, low disk space, low memory: retried with backoff
    /// (1, 2, 4, 8, 10 minutes after the replication interval, then every 30 minutes).
    Recoverable,
    /// Broken disk chain, invalid replica state, authentication or authorization failure,
    /// VM not found: no retry until the resource changes or an operator asks.
    NonRecoverable,
}

/// The last error seen while protecting a VM or running a job.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorStatus {
    /// Recoverable or NonRecoverable.
    pub class: ErrorClass,
    /// A stable CamelCase word that alerting can match, e.g. `StoreUnreachable`, `VmNotFound`.
    pub reason: String,
    /// What happened, for a human. Never holds a credential.
    pub message: String,
    /// How many times in a row the failed step has been retried.
    #[serde(default)]
    pub retry_count: u32,
    /// When the next retry is due (recoverable errors only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<Time>,
    /// When the error was first seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen_time: Option<Time>,
}

/// Which recovery point a failover materialises.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum RecoveryPointKind {
    /// The newest durable point, of any consistency.
    #[default]
    Latest,
    /// The newest point whose logs have all been applied to the replica (the same as `Latest`
    /// in Lifeboat, which applies before it cuts; kept for ASR parity).
    LatestProcessed,
    /// The newest application-consistent point.
    LatestAppConsistent,
    /// The point named in `name`.
    Named,
    /// The newest point cut at or before `time`.
    NotAfter,
}

/// A choice of recovery point.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.kind == 'Named' ? has(self.name) : !has(self.name)",
     "message": "name is required when kind is Named, and only then"},
    {"rule": "self.kind == 'NotAfter' ? has(self.time) : !has(self.time)",
     "message": "time is required when kind is NotAfter, and only then"}
]))]
pub struct RecoveryPointSelector {
    /// Latest, LatestProcessed, LatestAppConsistent, Named or NotAfter.
    #[serde(default)]
    pub kind: RecoveryPointKind,
    /// The point's name, as `lifeboat points` and `status.recoveryPoints` show it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub name: Option<String>,
    /// With NotAfter: the newest point cut at or before this time (RFC 3339) is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// A reference to an object of a known kind in the same namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// The object's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A reference to one key of a Secret in the same namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// An opaque request token: the user sets a new value to ask for an action, and status echoes
/// it back once the action was handled, so that GitOps can see it was done.
pub type RequestToken = String;
