//! One pass over one ProtectedVM, the same for the operator (over the Kubernetes API) and the
//! standalone daemon (over its embedded store): read the job the VM's status names, let
//! `lifeboat_core::vm::decide_vm` decide, and carry the decision out through a [`VmWriter`]
//! in a fixed order.
//!
//! ```text
//!  vm, policy, heartbeat, now ──> job (VmWriter::get_job) ──> decide_vm
//!     │
//!  withdraw a job ─> create a job ─> publish notices ─> status (when it changed) ─> release
//! ```
//!
//! # Guarantees
//!
//! - The job is created before the status that names it, under a deterministic name, so that
//!   a pass cut short between the two finds and adopts the same job the next time.
//! - A name taken by another VM's job (a cut, hashed long name that collided) moves on to the
//!   next sequence, at most [`MAX_NAME_TRIES`] times.
//! - Status is written only when the operator's fields of it change; `status.agent` is never
//!   part of what is compared or written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use lifeboat_api::common::LocalObjectReference;
use lifeboat_api::contract::{LABEL_JOB_TYPE, LABEL_VM, is_label_value};
use lifeboat_api::job::{ReplicationJobSpec, ReplicationJobStatus};
use lifeboat_api::protected_vm::FailoverResult;
use lifeboat_api::{ProtectedVM, ProtectedVMStatus, ReplicationJob, ReplicationPolicy};
use lifeboat_core::Materialised;
use lifeboat_core::policy::check_policy;
use lifeboat_core::vm::{JobObservation, NewJob, Notice, VmDecision, VmInput, decide_vm, job_name};

use crate::mapping::{self, Results};

/// How many job names to try past one taken by another VM's job.
pub const MAX_NAME_TRIES: u32 = 20;

/// What creating a job found.
#[derive(Debug)]
pub enum Created {
    /// The job was created.
    New,
    /// A job of that name exists already (ours from a pass cut short, or another VM's).
    Exists(Arc<ReplicationJob>),
}

/// Every name tried for a new job belongs to another VM's job.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("every job name tried for {vm} is taken by another VM's job (the last: {last})")]
pub struct JobNameTaken {
    /// The VM, `namespace/name`.
    pub vm: String,
    /// The last name tried.
    pub last: String,
}

/// Where a pass reads the VM's job and writes what it decided: the Kubernetes API for the
/// operator, the embedded store for the standalone daemon. Every method acts on the VM's
/// namespace.
#[async_trait]
pub trait VmWriter: Send + Sync {
    /// The writer's error; a name collision that cannot be resolved becomes one of them.
    type Error: From<JobNameTaken> + Send;

    /// The job of this name, if it exists.
    async fn get_job(
        &self,
        vm: &ProtectedVM,
        name: &str,
    ) -> Result<Option<Arc<ReplicationJob>>, Self::Error>;

    /// Create `job` (its creation time is the writer's to set); a name taken is not an error.
    async fn create_job(
        &self,
        vm: &ProtectedVM,
        job: &ReplicationJob,
    ) -> Result<Created, Self::Error>;

    /// Delete the job of this name (an unclaimed one withdrawn); a job gone already is not an
    /// error. With `version`, only over that resourceVersion: an agent that claimed the job
    /// since keeps it, and the write fails (the next pass decides again).
    async fn delete_job(
        &self,
        vm: &ProtectedVM,
        name: &str,
        version: Option<&str>,
    ) -> Result<(), Self::Error>;

    /// Mark the job Failed with `status` (the operator takes it from a lost agent); a job gone
    /// already is not an error. With `version`, only over that resourceVersion: a job its
    /// agent ended since keeps its end.
    async fn fail_job(
        &self,
        vm: &ProtectedVM,
        name: &str,
        version: Option<&str>,
        status: &ReplicationJobStatus,
    ) -> Result<(), Self::Error>;

    /// Tell people what happened (best effort: never fails the pass), with the VM's current
    /// job, if any, as the related object.
    async fn publish(&self, vm: &ProtectedVM, notices: &[Notice], job: Option<&str>);

    /// Write the operator's fields of the VM's status (never `status.agent`).
    async fn write_status(
        &self,
        vm: &ProtectedVM,
        status: &ProtectedVMStatus,
    ) -> Result<(), Self::Error>;

    /// Protection is disabled and the VM is being deleted: let it go.
    async fn release(&self, vm: &ProtectedVM) -> Result<(), Self::Error>;
}

/// What a pass starts from.
#[derive(Clone, Copy)]
pub struct VmPass<'a> {
    /// The VM as last read.
    pub vm: &'a ProtectedVM,
    /// Its policy, if it exists.
    pub policy: Option<&'a ReplicationPolicy>,
    /// The last heartbeat of the agent on a node, if it ever had one.
    pub heartbeat: &'a (dyn Fn(&str) -> Option<SystemTime> + Send + Sync),
    /// The nodes that carry every label of a selector, by name (none off a cluster).
    pub nodes_labelled: &'a (dyn Fn(&BTreeMap<String, String>) -> Vec<String> + Send + Sync),
    /// The time of the decision, in whole seconds.
    pub now: SystemTime,
    /// On a cluster (the operator): a local target must be marked shared.
    pub cluster: bool,
}

impl std::fmt::Debug for VmPass<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPass")
            .field("vm", &self.vm.name_any())
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// What a pass did.
#[derive(Debug)]
pub struct Carried {
    /// The decision, with the name and sequence the new job (if any) really got.
    pub decision: VmDecision,
    /// The operator's fields of status after the pass (`agent` is `None`).
    pub status: ProtectedVMStatus,
    /// Whether `status` was written (it changed).
    pub status_written: bool,
}

/// Decide one VM and carry the decision out through `writer`.
///
/// # Errors
///
/// The first write that failed; nothing after it was attempted, and the next pass decides
/// again from scratch.
pub async fn reconcile_vm<W: VmWriter>(writer: &W, pass: VmPass<'_>) -> Result<Carried, W::Error> {
    let vm = pass.vm;
    let spec = mapping::vm_spec(vm);
    let state = mapping::vm_state(vm.status.as_ref());
    let report = vm.status.as_ref().and_then(|s| s.agent.as_ref());
    let agent = report.map(mapping::agent_facts);
    let policy = pass.policy.map(|p| {
        let spec = if pass.cluster {
            mapping::cluster_policy_spec(p)
        } else {
            mapping::policy_spec(p)
        };
        check_policy(&spec).0
    });
    let (job, observation) = match state.job.as_ref().filter(|j| !j.state.is_finished()) {
        None => (None, JobObservation::NotLookedUp),
        Some(record) => match writer.get_job(vm, &record.name).await? {
            Some(job) => {
                let facts = mapping::job_facts(&job);
                (Some(job), JobObservation::Found(facts))
            }
            None => (None, JobObservation::Missing),
        },
    };
    let recovery: Vec<(String, Option<SystemTime>)> =
        recovery_nodes(vm, pass.policy, pass.nodes_labelled)
            .into_iter()
            .map(|node| {
                let beat = (pass.heartbeat)(&node);
                (node, beat)
            })
            .collect();
    let materialised = |result: Option<&FailoverResult>| {
        let result = result?;
        let node = result.node.clone().filter(|n| *n != vm.spec.node_name);
        Some(Materialised {
            heartbeat: (pass.heartbeat)(node.as_deref().unwrap_or(&vm.spec.node_name)),
            node,
            point: result.recovery_point.as_ref().map(|p| p.name.clone()),
        })
    };
    let status = vm.status.as_ref();
    let failover = materialised(status.and_then(|s| s.failover.as_ref()));
    let test_failover = materialised(status.and_then(|s| s.test_failover.as_ref()));
    let mut decision = decide_vm(&VmInput {
        now: pass.now,
        spec: &spec,
        state: &state,
        policy: policy.as_ref(),
        agent: agent.as_ref(),
        job: &observation,
        // NB: the agent that replicates the VM: the recovery site's in reverse.
        heartbeat: (pass.heartbeat)(vm.active_node()),
        primary_heartbeat: (pass.heartbeat)(&vm.spec.node_name),
        job_heartbeat: job
            .as_ref()
            .and_then(|j| (pass.heartbeat)(&j.spec.node_name)),
        recovery: &recovery,
        failover: failover.as_ref(),
        test_failover: test_failover.as_ref(),
    });

    if let (Some((name, error)), Some(held)) = (&decision.fail_job, job.as_deref())
        && held.name_any() == *name
    {
        writer
            .fail_job(
                vm,
                name,
                held.resource_version().as_deref(),
                &taken_from_lost_agent(held, error, pass.now),
            )
            .await?;
    }
    if let Some(withdrawn) = &decision.delete_job {
        // NB: over the version the decision saw the job Pending in.
        let seen = job
            .as_deref()
            .filter(|j| j.name_any() == *withdrawn)
            .and_then(ResourceExt::resource_version);
        writer.delete_job(vm, withdrawn, seen.as_deref()).await?;
    }
    if let Some(new) = &decision.create_job {
        let (name, sequence) = create_job(writer, vm, new).await?;
        if let Some(record) = decision.state.job.as_mut() {
            record.name = name;
            record.sequence = sequence;
        }
    }
    let current = decision.state.job.as_ref().map(|j| j.name.as_str());
    writer.publish(vm, &decision.notices, current).await;

    let old = ProtectedVMStatus {
        agent: None,
        ..vm.status.clone().unwrap_or_default()
    };
    let results = Results::after(decision.results, job.as_deref(), &old);
    let status = mapping::vm_status(&decision.state, report, results);
    let status_written = status != old;
    if status_written {
        writer.write_status(vm, &status).await?;
    }
    if decision.release_finalizer {
        writer.release(vm).await?;
    }
    Ok(Carried {
        decision,
        status,
        status_written,
    })
}

/// The nodes that may run the VM's store-only jobs when its own agent is lost, in order of
/// preference: the VM's `recoveryNodeNames`, the nodes its `recoveryNodeSelector` matches,
/// then the policy's `recoveryNodes` (names, then selector), each once, never the VM's node.
pub fn recovery_nodes(
    vm: &ProtectedVM,
    policy: Option<&ReplicationPolicy>,
    labelled: &(dyn Fn(&BTreeMap<String, String>) -> Vec<String> + Send + Sync),
) -> Vec<String> {
    let select = |selector: &BTreeMap<String, String>| {
        if selector.is_empty() {
            Vec::new()
        } else {
            labelled(selector)
        }
    };
    let mut nodes = vm.spec.recovery_node_names.clone();
    nodes.extend(select(&vm.spec.recovery_node_selector));
    if let Some(policy) = policy {
        let from_policy = &policy.spec.recovery_nodes;
        nodes.extend(from_policy.names.iter().cloned());
        nodes.extend(select(&from_policy.selector));
    }
    let mut seen = std::collections::BTreeSet::new();
    nodes.retain(|n| *n != vm.spec.node_name && seen.insert(n.clone()));
    nodes
}

/// The status of a job taken from a lost agent: Failed, with the error and the `Failed`
/// condition a Kubernetes Job shows, its steps and progress as the agent last wrote them.
pub fn taken_from_lost_agent(
    job: &ReplicationJob,
    error: &lifeboat_core::ErrorReport,
    now: SystemTime,
) -> ReplicationJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    status.phase = lifeboat_api::job::JobPhase::Failed;
    status.completion_time = Some(mapping::api_time(now));
    status.error = Some(mapping::error_status(error));
    mapping::set_job_conditions(&mut status, now);
    status
}

/// The ReplicationJob object for a new job of `vm`, owned by the VM.
pub fn job_object(vm: &ProtectedVM, new: &NewJob, name: &str) -> ReplicationJob {
    let mut labels = BTreeMap::new();
    let vm_name = vm.name_any();
    if is_label_value(&vm_name) {
        labels.insert(LABEL_VM.to_owned(), vm_name.clone());
    }
    labels.insert(LABEL_JOB_TYPE.to_owned(), new.kind.as_str().to_owned());
    ReplicationJob {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: vm.namespace(),
            labels: Some(labels),
            owner_references: vm.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: ReplicationJobSpec {
            vm_ref: LocalObjectReference { name: vm_name },
            node_name: new
                .node
                .clone()
                .unwrap_or_else(|| vm.spec.node_name.clone()),
            job_type: mapping::api_job_type(new.kind),
            parameters: mapping::api_params(&new.params),
        },
        status: None,
    }
}

/// Whether `job` is the VM's own: a job of that name and owner can only be the one for that
/// sequence (names end with it, and sequences only grow).
fn is_ours(job: &ReplicationJob, vm: &ProtectedVM) -> bool {
    job.owner_references()
        .iter()
        .any(|o| Some(&o.uid) == vm.metadata.uid.as_ref())
}

/// Create the job; returns the name and sequence it got.
async fn create_job<W: VmWriter>(
    writer: &W,
    vm: &ProtectedVM,
    new: &NewJob,
) -> Result<(String, u32), W::Error> {
    let mut last = new.name.clone();
    for bump in 0..MAX_NAME_TRIES {
        let sequence = new.sequence + bump;
        let name = if bump == 0 {
            new.name.clone()
        } else {
            job_name(&vm.name_any(), new.kind, sequence)
        };
        match writer.create_job(vm, &job_object(vm, new, &name)).await? {
            Created::New => return Ok((name, sequence)),
            // NB: a pass that created this job and then did not get to write the status
            // naming it: adopt it, finished or not. Another VM's job means the next name.
            Created::Exists(existing) if is_ours(&existing, vm) => return Ok((name, sequence)),
            Created::Exists(_) => last = name,
        }
    }
    Err(JobNameTaken {
        vm: format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()),
        last,
    }
    .into())
}
