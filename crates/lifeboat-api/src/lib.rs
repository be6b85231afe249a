//! Lifeboat's Kubernetes API: the `ReplicationPolicy`, `ProtectedVM`, `ReplicationJob` and
//! `RecoveryPlan` custom resources (group `lifeboat.io`, version `v1alpha1`), their generated
//! CustomResourceDefinitions, and the checks that a manifest must pass before it is applied.
//!
//! ```text
//!  ReplicationPolicy (rpol) <--policyRef--  ProtectedVM (pvm)  <--vmRef--  ReplicationJob (rjob)
//!     how often, where, how fast             one VM, its disks,             one operation, run by
//!                                            requests, status               the agent on one node
//!                                                  ^
//!                                    RecoveryPlan (rplan): groups of VMs by name, in order,
//!                                    hooks and gates between them
//! ```
//!
//! Validation lives in the CRD schema (enums, ranges, required fields, CEL rules), so that
//! `kubectl apply` rejects a bad manifest with a message naming the field; [`manifest`]
//! applies the same schema offline, for standalone mode, `lifeboat validate` and the tests.

pub mod common;
pub mod contract;
pub mod job;
pub mod manifest;
pub mod plan;
pub mod policy;
pub mod protected_vm;
pub mod recovered;
pub mod schema_check;

pub use common::{ErrorClass, ErrorStatus, Health, RecoveryPointKind, RecoveryPointSelector};
pub use job::{JobPhase, JobType, ReplicationJob, ReplicationJobSpec, ReplicationJobStatus};
pub use plan::{RecoveryPlan, RecoveryPlanSpec, RecoveryPlanStatus};
pub use policy::{
    CopyFrequency, RecoveryNodes, ReplicationPolicy, ReplicationPolicySpec, ReplicationPolicyStatus,
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
        RecoveryPlan::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every `conditions` list under `schema`, with its path.
    fn condition_lists<'a>(schema: &'a Value, path: &str, found: &mut Vec<(String, &'a Value)>) {
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                let path = format!("{path}.{name}");
                if name == "conditions" {
                    found.push((path.clone(), property));
                }
                condition_lists(property, &path, found);
            }
        }
        if let Some(items) = schema.get("items") {
            condition_lists(items, &format!("{path}[]"), found);
        }
    }

    #[test]
    fn every_conditions_list_is_a_map_keyed_by_type() {
        for crd in super::crds() {
            let kind = crd.spec.names.kind.clone();
            for version in &crd.spec.versions {
                let schema = serde_json::to_value(
                    version
                        .schema
                        .as_ref()
                        .and_then(|s| s.open_api_v3_schema.as_ref()),
                )
                .unwrap_or_default();
                let mut found = Vec::new();
                condition_lists(&schema, "", &mut found);
                assert_eq!(
                    found.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
                    [".status.conditions"],
                    "{kind}"
                );
                for (path, list) in found {
                    assert_eq!(list["type"], "array", "{kind} {path}");
                    assert_eq!(list["x-kubernetes-list-type"], "map", "{kind} {path}");
                    assert_eq!(
                        list["x-kubernetes-list-map-keys"],
                        serde_json::json!(["type"]),
                        "{kind} {path}"
                    );
                    let required = list["items"]["required"].as_array();
                    assert!(
                        required.is_some_and(|r| r.iter().any(|k| k == "type")),
                        "{kind} {path}: a map key must be required: {list:#}"
                    );
                }
            }
        }
    }
}
