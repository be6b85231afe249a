//! The contract between the operator and the node agents, as constants and patch builders.
//! The two never call each other: they meet in the API server, each writing only its own
//! fields (docs/agent-contract.md has the whole protocol).
//!
//! ```text
//!            operator (field manager lifeboat-operator)        agent on node N (lifeboat-agent)
//!  rjob      creates spec; deletes when old                     claims (rv-guarded), writes status
//!  pvm       status.* except status.agent (decisions)           status.agent (facts), by SSA
//!  Lease     reads                                              lifeboat-agent-N, renewed: heartbeat
//! ```
//!
//! The builders are pure: they return the JSON bodies that either side sends, so that the
//! operator, the agent and the tests agree on them byte for byte.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::job::JobPhase;
use crate::protected_vm::AgentReport;
use crate::{ProtectedVM, ReplicationJob};

/// The operator's field manager: it owns every field of a ProtectedVM's status but `agent`,
/// the status of policies, and the spec of jobs.
pub const OPERATOR_FIELD_MANAGER: &str = "lifeboat-operator";
/// The agents' field manager: `status.agent` of the VMs on their node, and the status of the
/// jobs they claimed.
pub const AGENT_FIELD_MANAGER: &str = "lifeboat-agent";

/// Held by every ProtectedVM until protection was disabled on its node.
pub const VM_FINALIZER: &str = "lifeboat.io/disable-protection";
/// Held by every ReplicationPolicy while ProtectedVMs use it.
pub const POLICY_FINALIZER: &str = "lifeboat.io/policy-in-use";

/// Label on a job: the name of its ProtectedVM (left out when the name is not a valid label
/// value, e.g. longer than 63 characters; `spec.vmRef` always has it).
pub const LABEL_VM: &str = "lifeboat.io/vm";
/// Label on a job: its type.
pub const LABEL_JOB_TYPE: &str = "lifeboat.io/job-type";
/// Label on an agent's heartbeat Lease, with the value [`HEARTBEAT_LABEL_VALUE`].
pub const HEARTBEAT_LABEL: &str = "lifeboat.io/heartbeat";
/// The value of [`HEARTBEAT_LABEL`].
pub const HEARTBEAT_LABEL_VALUE: &str = "agent";

/// The steps of an EnableProtection job, in order. The operator shows the VM's phase as
/// `InitialReplication` once the step of that name is in progress.
pub const ENABLE_PROTECTION_STEPS: [&str; 3] = [
    "PrerequisitesCheck",
    "CreateReplicaDisks",
    "InitialReplication",
];
/// The step of an EnableProtection job that copies the disks.
pub const INITIAL_REPLICATION_STEP: &str = "InitialReplication";

/// The name of the heartbeat Lease of the agent on `node`, in the operator's namespace. The
/// Lease's `spec.holderIdentity` is the node's name (names too long for a Lease name are cut
/// and end with a hash, so the holder identity is what identifies the node).
pub fn agent_lease_name(node: &str) -> String {
    const PREFIX: &str = "lifeboat-agent-";
    if PREFIX.len() + node.len() <= 253 {
        format!("{PREFIX}{node}")
    } else {
        let keep = 253 - PREFIX.len() - 9;
        let cut = node
            .get(..keep)
            .unwrap_or(node)
            .trim_end_matches(['-', '.']);
        format!("{PREFIX}{cut}-{:08x}", fnv1a(node.as_bytes()) as u32)
    }
}

/// Whether `value` can be a label value.
pub fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric())
}

/// A 64-bit FNV-1a hash: stable across builds and platforms, for names.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether the agent on `node` may claim `job`: it is for that node, Pending, and unclaimed.
pub fn is_claimable(job: &ReplicationJob, node: &str) -> bool {
    let status = job.status.as_ref();
    job.spec.node_name == node
        && job.metadata.deletion_timestamp.is_none()
        && status.is_none_or(|s| s.phase == JobPhase::Pending && s.claimed_by.is_none())
}

/// The merge patch (for the status subresource) by which an agent claims `job`: phase
/// Running, `claimedBy`, `startTime`, guarded by the resourceVersion the agent saw, so that of
/// two agents racing for the job the API server lets exactly one through (the other gets 409
/// Conflict). `None` when the job has no resourceVersion.
pub fn claim_job_patch(job: &ReplicationJob, claimer: &str, now: &Time) -> Option<Value> {
    let resource_version = job.resource_version()?;
    Some(json!({
        "metadata": { "resourceVersion": resource_version },
        "status": {
            "phase": JobPhase::Running,
            "claimedBy": claimer,
            "startTime": now,
        }
    }))
}

/// The server-side apply body by which an agent writes its report on `vm`: only
/// `status.agent`, so that it never touches (or takes) a field of the operator's.
pub fn agent_report_apply(vm: &ProtectedVM, report: &AgentReport) -> Value {
    json!({
        "apiVersion": ProtectedVM::api_version(&()),
        "kind": ProtectedVM::kind(&()),
        "metadata": { "name": vm.name_any() },
        "status": { "agent": report },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::LocalObjectReference;
    use crate::job::{JobType, ReplicationJobSpec, ReplicationJobStatus};

    fn job(node: &str) -> ReplicationJob {
        let mut job = ReplicationJob::new(
            "web-enable-1",
            ReplicationJobSpec {
                vm_ref: LocalObjectReference { name: "web".into() },
                node_name: node.into(),
                job_type: JobType::EnableProtection,
                parameters: Default::default(),
            },
        );
        job.metadata.resource_version = Some("42".into());
        job
    }

    #[test]
    fn only_the_node_claims_a_pending_unclaimed_job() {
        let mut j = job("n1");
        assert!(is_claimable(&j, "n1"));
        assert!(!is_claimable(&j, "n2"));
        j.status = Some(ReplicationJobStatus {
            phase: JobPhase::Running,
            claimed_by: Some("n1/agent-x".into()),
            ..Default::default()
        });
        assert!(!is_claimable(&j, "n1"));
    }

    #[test]
    fn a_claim_is_guarded_by_the_resource_version() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let patch = claim_job_patch(&job("n1"), "n1/agent-x", &now);
        assert_eq!(
            patch
                .as_ref()
                .and_then(|p| p.pointer("/metadata/resourceVersion")),
            Some(&json!("42"))
        );
        assert_eq!(
            patch.as_ref().and_then(|p| p.pointer("/status/phase")),
            Some(&json!("Running"))
        );
    }

    #[test]
    fn lease_names_fit_and_stay_distinct() {
        assert_eq!(agent_lease_name("node-1"), "lifeboat-agent-node-1");
        let long_a = format!("{}a", "n".repeat(260));
        let long_b = format!("{}b", "n".repeat(260));
        assert!(agent_lease_name(&long_a).len() <= 253);
        assert_ne!(agent_lease_name(&long_a), agent_lease_name(&long_b));
    }

    #[test]
    fn label_values() {
        assert!(is_label_value("web-01.prod"));
        assert!(is_label_value(""));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(!is_label_value("-web"));
    }
}
