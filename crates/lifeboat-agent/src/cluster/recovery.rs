//! Jobs this agent runs for VMs of other nodes: the operator sends a store-only job (a test
//! failover, an unplanned failover) to a VM's recovery node when the VM's own agent is lost.
//! They need nothing but the replica store: the VM's ProtectedVM is read once (this agent
//! watches only its own node's VMs), the store opened from its policy's target and Secrets,
//! and the job run by `lifeboat_engine::run_store_job` (a failover fences the lost agent).
//!
//! ```text
//!  every tick: Pending jobs on this node whose VM lives elsewhere
//!    ──claim (rv-guarded)──> GET ProtectedVM, policy (cache), Secrets ──> store
//!    ──run_store_job──> job status (steps, result naming this node's folder, or the error)
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use lifeboat_api::contract::is_claimable;
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_control::mapping::whole_seconds;
use lifeboat_engine::{EngineError, JobDirs, JobResult, run_store_job};
use lifeboat_store::VmKey;

use super::api::Claim;
use super::{Shared, Stop};
use crate::jobs;

fn now() -> SystemTime {
    whole_seconds(SystemTime::now())
}

/// Run the other nodes' VMs' jobs sent here, one at a time, until the stop.
pub(crate) async fn run(shared: Arc<Shared>, stop: Stop) {
    let mut done: HashSet<String> = HashSet::new();
    while !stop.is_set() {
        let jobs: Vec<Arc<ReplicationJob>> = shared
            .jobs
            .state()
            .into_iter()
            .filter(|j| is_claimable(j, &shared.node))
            .filter(|j| !done.contains(&j.name_any()))
            .filter(|j| {
                let key = ObjectRef::<ProtectedVM>::new(&j.spec.vm_ref.name)
                    .within(&j.namespace().unwrap_or_default());
                // NB: a VM hosted here runs its jobs in its own task; one whose recovered VM
                // runs here leaves its store-only jobs to this runner.
                shared.vms.get(&key).is_none()
                    && (shared.recovered.get(&key).is_none() || super::vm::store_only_job(j))
            })
            .collect();
        for job in jobs {
            done.insert(job.name_any());
            run_one(&shared, &job, &stop).await;
        }
        tokio::select! {
            () = stop.wait() => break,
            () = tokio::time::sleep(shared.timing.tick) => {}
        }
    }
}

async fn run_one(shared: &Shared, job: &ReplicationJob, stop: &Stop) {
    let name = job.name_any();
    let namespace = job.namespace().unwrap_or_default();
    let claimed = match shared.api.claim_job(job, &shared.claimer, now()).await {
        Ok(Claim::Won(claimed)) => claimed,
        Ok(Claim::Lost) => return,
        Err(error) => {
            shared.metrics.api_error(error.metric_label());
            tracing::warn!(job = %name, %error, "claim a recovery job");
            return;
        }
    };
    shared.metrics.claim("won");
    let started = jobs::started(&claimed, &shared.claimer, now());
    tracing::info!(job = %name, vm = %job.spec.vm_ref.name, "recovery job started: the VM's own agent is lost");
    let outcome = tokio::select! {
        outcome = run_from_store(shared, &claimed) => outcome,
        () = stop.after(shared.timing.shutdown_grace) => Err(EngineError::NotReady {
            what: format!("the agent on node {} stopped while the job ran", shared.node),
        }),
    };
    match &outcome {
        Ok(_) => tracing::info!(job = %name, "recovery job succeeded"),
        Err(error) => tracing::warn!(job = %name, %error, "recovery job failed"),
    }
    let kind = serde_json::to_value(job.spec.job_type)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    shared.metrics.job(
        &kind,
        if outcome.is_ok() {
            "succeeded"
        } else {
            "failed"
        },
    );
    let finished = jobs::finished(started, &outcome, now());
    if let Err(error) = shared
        .api
        .write_job_status(&namespace, &name, &finished, None)
        .await
    {
        shared.metrics.api_error(error.metric_label());
        tracing::error!(job = %name, %error, "write the recovery job's end");
    }
}

/// The job's VM read from the API, its store opened from its policy, the job run on it.
async fn run_from_store(shared: &Shared, job: &ReplicationJob) -> Result<JobResult, EngineError> {
    let namespace = job.namespace().unwrap_or_default();
    let not_ready = |what: String| EngineError::NotReady { what };
    let vm = shared
        .api
        .get_vm(&namespace, &job.spec.vm_ref.name)
        .await
        .map_err(|e| not_ready(e.to_string()))?;
    let policy = shared
        .policies
        .get(&ObjectRef::new(&vm.spec.policy_ref.name).within(&namespace))
        .ok_or_else(|| {
            not_ready(format!(
                "ReplicationPolicy {namespace}/{} not found",
                vm.spec.policy_ref.name
            ))
        })?;
    let secrets = shared
        .api
        .secrets_for(&namespace, &policy.spec.target)
        .await
        .map_err(|e| not_ready(e.to_string()))?;
    let concurrency = usize::try_from(policy.spec.upload_concurrency).unwrap_or(4);
    let store = shared
        .stores
        .store(
            &namespace,
            &policy.spec.target,
            concurrency.max(1),
            &secrets,
        )
        .map_err(EngineError::Store)?;
    let key = VmKey::new(&namespace, &vm.name_any()).map_err(EngineError::Store)?;
    let (kind, params) = jobs::job_kind_params(job);
    let dirs = JobDirs {
        failover_dir: shared.failover_dir.clone(),
        original_disks: Vec::new(),
        failover_format: crate::config::failover_format(&vm),
        seed_dir: None,
    };
    run_store_job(
        store.as_ref(),
        &key,
        kind,
        &params,
        &dirs,
        &format!("node {}", shared.node),
        SystemTime::now(),
        &|_| {},
    )
    .await
}
