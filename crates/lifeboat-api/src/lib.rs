//! Lifeboat's Kubernetes API: the `ReplicationPolicy`, `ProtectedVM` and `ReplicationJob`
//! custom resources (group `lifeboat.io`, version `v1alpha1`), their generated
//! CustomResourceDefinitions, and the checks that a manifest must pass before it is applied.
//!
//! ```text
//!  ReplicationPolicy (rpol) <--policyRef--  ProtectedVM (pvm)  <--vmRef--  ReplicationJob (rjob)
//!     how often, where, how fast             one VM, its disks,             one operation, run by
//!                                            requests, status               the agent on one node
//! ```
//!
//! Validation lives in the CRD schema (enums, ranges, required fields, CEL rules), so that
//! `kubectl apply` rejects a bad manifest with a message naming the field; [`manifest`]
//! applies the same schema offline, for standalone mode, `lifeboat validate` and the tests.

pub mod common;
pub mod contract;
pub mod job;
pub mod manifest;
pub mod policy;
pub mod protected_vm;
pub mod schema_check;

pub use common::{ErrorClass, ErrorStatus, Health, RecoveryPointKind, RecoveryPointSelector};
pub use job::{JobPhase, JobType, ReplicationJob, ReplicationJobSpec, ReplicationJobStatus};
pub use policy::{
    CopyFrequency, ReplicationPolicy, ReplicationPolicySpec, ReplicationPolicyStatus,
};
pub use protected_vm::{
    AgentReport, JobReference, ProtectedVM, ProtectedVMSpec, ProtectedVMStatus, ProtectionPhase,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Lifeboat resource.
pub const GROUP: &str = "lifeboat.io";
/// The API version of every Lifeboat resource.
pub const VERSION: &str = "v1alpha1";

/// The CustomResourceDefinitions of every Lifeboat resource, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        ReplicationPolicy::crd(),
        ProtectedVM::crd(),
        ReplicationJob::crd(),
    ]
}
