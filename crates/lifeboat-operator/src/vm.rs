//! The ProtectedVM controller: read the VM, its policy, its current job and its agent's
//! heartbeat from the caches, let `lifeboat_core::vm::decide_vm` decide, then carry the
//! decision out in a fixed order.
//!
//! ```text
//!  finalizer? ──no──> add it (the patch comes back as a watch event)
//!     │yes
//!  decide(spec, status, policy, job, agent report, heartbeat, now)
//!     │
//!  withdraw a job ─> create a job ─> events ─> status (server-side apply) ─> release finalizer
//! ```
//!
//! # Guarantees
//!
//! - The job is created before the status that names it, under a deterministic name, so that
//!   a reconcile cut short between the two finds and adopts the same job.
//! - Status is written only when it changes, by server-side apply under the operator's field
//!   manager, never touching `status.agent`.
//! - A reconcile that sees its own fields of status other than it last wrote them (the cache
//!   has not caught up with the write yet) does nothing: the write's own watch event follows.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use lifeboat_api::common::LocalObjectReference;
use lifeboat_api::contract::{
    LABEL_JOB_TYPE, LABEL_VM, OPERATOR_FIELD_MANAGER, VM_FINALIZER, is_label_value,
};
use lifeboat_api::job::ReplicationJobSpec;
use lifeboat_api::{ProtectedVM, ProtectedVMStatus, ReplicationJob};
use lifeboat_core::policy::check_policy;
use lifeboat_core::vm::{JobObservation, NewJob, VmInput, decide_vm, job_name};
use serde_json::json;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::mapping::{self, Results, whole_seconds};
use crate::{events, finalizer};

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "ProtectedVM";
/// Requeue after an error that may clear by itself.
pub const RETRY_RECOVERABLE: Duration = Duration::from_secs(10);
/// Requeue after an error that needs someone to act (in case someone did).
pub const RETRY_NON_RECOVERABLE: Duration = Duration::from_secs(300);
/// How many job names to try past one taken by another VM's job.
const MAX_NAME_TRIES: u32 = 20;

/// What the operator last wrote to each VM's status (a hash of it), for a short while: a
/// reconcile that sees anything else of its own fields is looking at a cache that has not
/// caught up with that write yet, and waits for the write's own watch event.
///
/// NB: by content, not by resourceVersion: versions are opaque (not ordered), and only the
/// operator writes these fields, so a cached status that differs from the last write is
/// older than it. The entry expires, so that a status edited by hand is taken as it is.
#[derive(Debug, Default)]
pub struct LastWrites(Mutex<HashMap<ObjectRef<ProtectedVM>, (u64, Instant)>>);

/// How long a write's own watch event may take to come back.
const WRITE_ECHO_WAIT: Duration = Duration::from_secs(10);

fn status_hash(status: &ProtectedVMStatus) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    serde_json::to_vec(status)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

impl LastWrites {
    /// Whether `vm`'s cached status is older than the last write to it.
    fn is_stale(&self, key: &ObjectRef<ProtectedVM>, vm: &ProtectedVM) -> bool {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((written, at)) = map.get(key).copied() else {
            return false;
        };
        let cached = ProtectedVMStatus {
            agent: None,
            ..vm.status.clone().unwrap_or_default()
        };
        if status_hash(&cached) == written || at.elapsed() > WRITE_ECHO_WAIT {
            map.remove(key);
            return false;
        }
        true
    }

    fn remember(&self, key: ObjectRef<ProtectedVM>, status: &ProtectedVMStatus) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(key, (status_hash(status), Instant::now()));
    }
}

fn namespace_of(vm: &ProtectedVM) -> Result<String> {
    vm.namespace().ok_or_else(|| Error::MissingNamespace {
        kind: CONTROLLER,
        name: vm.name_any(),
    })
}

/// Reconcile one ProtectedVM.
///
/// # Errors
///
/// The first API call that failed; nothing after it was attempted, and the decision is
/// made again from scratch on the retry.
pub async fn reconcile(vm: Arc<ProtectedVM>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = namespace_of(&vm)?;
    let name = vm.name_any();
    let qualified = format!("{ns}/{name}");
    let vms: Api<ProtectedVM> = Api::namespaced(ctx.client.clone(), &ns);
    let held = finalizer::ensure(&vms, vm.as_ref(), VM_FINALIZER)
        .await
        .map_err(Error::patch_finalizers(CONTROLLER, &qualified))?;
    if !held {
        return Ok(Action::await_change());
    }
    let key = ObjectRef::from_obj(vm.as_ref());
    if ctx.last_writes.is_stale(&key, &vm) {
        tracing::debug!(vm = %qualified, "the cache has not caught up with the last status write");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }

    let now = whole_seconds(ctx.clock.now());
    let spec = mapping::vm_spec(&vm);
    let state = mapping::vm_state(vm.status.as_ref());
    let report = vm.status.as_ref().and_then(|s| s.agent.as_ref());
    let agent = report.map(mapping::agent_facts);
    let policy = ctx
        .stores
        .policies
        .get(&ObjectRef::new(&vm.spec.policy_ref.name).within(&ns))
        .map(|p| check_policy(&mapping::policy_spec(&p)).0);
    let jobs: Api<ReplicationJob> = Api::namespaced(ctx.client.clone(), &ns);
    let (job, observation) = current_job(&ctx, &jobs, &ns, &state).await?;
    let mut decision = decide_vm(&VmInput {
        now,
        spec: &spec,
        state: &state,
        policy: policy.as_ref(),
        agent: agent.as_ref(),
        job: &observation,
        heartbeat: ctx.heartbeat(&vm.spec.node_name),
    });

    if let Some(withdrawn) = &decision.delete_job {
        delete_job(&jobs, &ns, withdrawn).await?;
    }
    if let Some(new) = &decision.create_job {
        let (job_name, sequence) = create_job(&jobs, &vm, new).await?;
        ctx.metrics.job_created(new.kind.as_str());
        if let Some(record) = decision.state.job.as_mut() {
            record.name = job_name;
            record.sequence = sequence;
        }
    }
    let related = decision.state.job.as_ref().map(|j| ObjectReference {
        api_version: Some(ReplicationJob::api_version(&()).into_owned()),
        kind: Some(ReplicationJob::kind(&()).into_owned()),
        name: Some(j.name.clone()),
        namespace: Some(ns.clone()),
        ..ObjectReference::default()
    });
    events::publish(&ctx, vm.as_ref(), &decision.notices, related).await;
    if let Some(finished) = decision.finished_job {
        ctx.metrics.job_finished(
            finished.kind.as_str(),
            finished.succeeded,
            finished.duration,
        );
    }
    ctx.metrics
        .set_cycles_missed(&ns, &name, decision.cycles_missed_last_hour);

    let old = vm.status.clone().unwrap_or_default();
    let results = Results::after(decision.results, job.as_deref(), &old);
    let status = mapping::vm_status(&decision.state, report, results);
    if status != (ProtectedVMStatus { agent: None, ..old }) {
        apply_status(&vms, &qualified, &name, &status).await?;
        ctx.metrics.status_written(CONTROLLER);
        ctx.last_writes.remember(key, &status);
    }
    if decision.release_finalizer {
        finalizer::remove(&vms, vm.as_ref(), VM_FINALIZER)
            .await
            .map_err(Error::patch_finalizers(CONTROLLER, &qualified))?;
        tracing::info!(vm = %qualified, "protection disabled; the VM can go");
    }
    Ok(Action::requeue(decision.requeue_after))
}

/// The job the VM's status names, while it is not finished: from the cache, or from the API
/// server when the cache does not have it (yet).
async fn current_job(
    ctx: &Context,
    jobs: &Api<ReplicationJob>,
    ns: &str,
    state: &lifeboat_core::vm::VmState,
) -> Result<(Option<Arc<ReplicationJob>>, JobObservation)> {
    let Some(record) = state.job.as_ref().filter(|j| !j.state.is_finished()) else {
        return Ok((None, JobObservation::NotLookedUp));
    };
    if let Some(job) = ctx
        .stores
        .jobs
        .get(&ObjectRef::new(&record.name).within(ns))
    {
        let facts = mapping::job_facts(&job);
        return Ok((Some(job), JobObservation::Found(facts)));
    }
    // NB: missing from the cache may mean "just created": only the API server can say gone.
    match jobs.get_opt(&record.name).await {
        Ok(Some(job)) => {
            let facts = mapping::job_facts(&job);
            Ok((Some(Arc::new(job)), JobObservation::Found(facts)))
        }
        Ok(None) => Ok((None, JobObservation::Missing)),
        Err(source) => Err(Error::GetJob {
            name: format!("{ns}/{}", record.name),
            source,
        }),
    }
}

/// The ReplicationJob object for a new job of `vm`, owned by the VM.
pub fn job_object(vm: &ProtectedVM, new: &NewJob, name: &str) -> ReplicationJob {
    let mut labels = std::collections::BTreeMap::new();
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
            node_name: vm.spec.node_name.clone(),
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
///
/// # Errors
///
/// `CreateJob` for an API error, `JobNameTaken` when every name tried belongs to another job.
async fn create_job(
    jobs: &Api<ReplicationJob>,
    vm: &ProtectedVM,
    new: &NewJob,
) -> Result<(String, u32)> {
    let ns = vm.namespace().unwrap_or_default();
    let params = PostParams {
        field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let mut last = new.name.clone();
    for bump in 0..MAX_NAME_TRIES {
        let sequence = new.sequence + bump;
        let name = if bump == 0 {
            new.name.clone()
        } else {
            job_name(&vm.name_any(), new.kind, sequence)
        };
        match jobs.create(&params, &job_object(vm, new, &name)).await {
            Ok(_) => return Ok((name, sequence)),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let existing = jobs.get_opt(&name).await.map_err(|source| Error::GetJob {
                    name: format!("{ns}/{name}"),
                    source,
                })?;
                // NB: a reconcile that created this job and then did not get to write the
                // status naming it: adopt it, finished or not. Another VM's job (a cut, hashed
                // long name that collided) means the next name.
                if existing.is_some_and(|job| is_ours(&job, vm)) {
                    return Ok((name, sequence));
                }
                last = name;
            }
            Err(source) => {
                return Err(Error::CreateJob {
                    name: format!("{ns}/{name}"),
                    source,
                });
            }
        }
    }
    Err(Error::JobNameTaken {
        vm: format!("{ns}/{}", vm.name_any()),
        last,
    })
}

async fn delete_job(jobs: &Api<ReplicationJob>, ns: &str, name: &str) -> Result<()> {
    match jobs.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(source) => Err(Error::DeleteJob {
            name: format!("{ns}/{name}"),
            source,
        }),
    }
}

async fn apply_status(
    vms: &Api<ProtectedVM>,
    qualified: &str,
    name: &str,
    status: &ProtectedVMStatus,
) -> Result<()> {
    let body = json!({
        "apiVersion": ProtectedVM::api_version(&()),
        "kind": ProtectedVM::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
    vms.patch_status(name, &params, &Patch::Apply(&body))
        .await
        .map(|_| ())
        .map_err(|source| Error::ApplyStatus {
            kind: CONTROLLER,
            name: qualified.to_owned(),
            source,
        })
}

/// Count the error and look again later: soon when it may clear by itself, in five minutes
/// when someone has to act.
pub fn error_policy(vm: Arc<ProtectedVM>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(
        vm = %format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()),
        error = %error.report(),
        recoverable = error.is_recoverable(),
        "reconcile failed"
    );
    Action::requeue(if error.is_recoverable() {
        RETRY_RECOVERABLE
    } else {
        RETRY_NON_RECOVERABLE
    })
}

#[cfg(test)]
mod tests;
