//! The ProtectedVM controller: read the VM, its policy, its current job and its agent's
//! heartbeat from the caches, let `lifeboat_core::vm::decide_vm` decide, then carry the
//! decision out in a fixed order.
//!
//! ```text
//!  finalizer? ──no──> add it (the patch comes back as a watch event)
//!     │yes
//!  recovered VM to bring up or take down? ──> lifeboat_control::recovery over KubeRecovery
//!     │no                                      (applied object, hook Job), status, requeue
//!  lifeboat_control::reconcile_vm over KubeWriter (the same pass the standalone daemon runs):
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

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use lifeboat_api::contract::{OPERATOR_FIELD_MANAGER, VM_FINALIZER};
use lifeboat_api::job::ReplicationJobStatus;
use lifeboat_api::{ProtectedVM, ProtectedVMStatus, ReplicationJob};
use lifeboat_control::mapping::whole_seconds;
use lifeboat_control::recovery;
use lifeboat_control::{Created, JobNameTaken, VmPass, VmWriter, reconcile_vm};
use lifeboat_core::vm::Notice;
use serde_json::json;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::recovered::KubeRecovery;
use crate::{events, finalizer};

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "ProtectedVM";
/// Requeue after an error that may clear by itself.
pub const RETRY_RECOVERABLE: Duration = Duration::from_secs(10);
/// Requeue after an error that needs someone to act (in case someone did).
pub const RETRY_NON_RECOVERABLE: Duration = Duration::from_secs(300);

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

/// The operator's [`VmWriter`]: the Kubernetes API, with the caches for reads.
struct KubeWriter<'a> {
    ctx: &'a Context,
    ns: &'a str,
    jobs: Api<ReplicationJob>,
    vms: Api<ProtectedVM>,
}

impl KubeWriter<'_> {
    fn qualified(&self, name: &str) -> String {
        format!("{}/{name}", self.ns)
    }
}

#[async_trait]
impl VmWriter for KubeWriter<'_> {
    type Error = Error;

    async fn get_job(&self, _vm: &ProtectedVM, name: &str) -> Result<Option<Arc<ReplicationJob>>> {
        if let Some(job) = self
            .ctx
            .stores
            .jobs
            .get(&ObjectRef::new(name).within(self.ns))
        {
            return Ok(Some(job));
        }
        // NB: missing from the cache may mean "just created": only the API server can say gone.
        self.jobs
            .get_opt(name)
            .await
            .map(|job| job.map(Arc::new))
            .map_err(|source| Error::GetJob {
                name: self.qualified(name),
                source,
            })
    }

    async fn create_job(&self, _vm: &ProtectedVM, job: &ReplicationJob) -> Result<Created> {
        let name = job.name_any();
        let params = PostParams {
            field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match self.jobs.create(&params, job).await {
            Ok(_) => Ok(Created::New),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                match self.jobs.get_opt(&name).await {
                    Ok(Some(existing)) => Ok(Created::Exists(Arc::new(existing))),
                    // NB: deleted in between: the name is free again, and the next pass takes it.
                    Ok(None) => Err(Error::CreateJob {
                        name: self.qualified(&name),
                        source: kube::Error::Api(status),
                    }),
                    Err(source) => Err(Error::GetJob {
                        name: self.qualified(&name),
                        source,
                    }),
                }
            }
            Err(source) => Err(Error::CreateJob {
                name: self.qualified(&name),
                source,
            }),
        }
    }

    async fn delete_job(&self, _vm: &ProtectedVM, name: &str, version: Option<&str>) -> Result<()> {
        let params = DeleteParams {
            preconditions: version.map(|v| kube::api::Preconditions {
                resource_version: Some(v.to_owned()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match self.jobs.delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(source) => Err(Error::DeleteJob {
                name: self.qualified(name),
                source,
            }),
        }
    }

    async fn fail_job(
        &self,
        _vm: &ProtectedVM,
        name: &str,
        version: Option<&str>,
        status: &ReplicationJobStatus,
    ) -> Result<()> {
        let body = match version {
            Some(version) => json!({ "metadata": {"resourceVersion": version}, "status": status }),
            None => json!({ "status": status }),
        };
        match self
            .jobs
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(source) => Err(Error::FailJob {
                name: self.qualified(name),
                source,
            }),
        }
    }

    async fn publish(&self, vm: &ProtectedVM, notices: &[Notice], job: Option<&str>) {
        let related = job.map(|name| ObjectReference {
            api_version: Some(ReplicationJob::api_version(&()).into_owned()),
            kind: Some(ReplicationJob::kind(&()).into_owned()),
            name: Some(name.to_owned()),
            namespace: Some(self.ns.to_owned()),
            ..ObjectReference::default()
        });
        events::publish(self.ctx, vm, notices, related).await;
    }

    async fn write_status(&self, vm: &ProtectedVM, status: &ProtectedVMStatus) -> Result<()> {
        let name = vm.name_any();
        let body = json!({
            "apiVersion": ProtectedVM::api_version(&()),
            "kind": ProtectedVM::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
        self.vms
            .patch_status(&name, &params, &Patch::Apply(&body))
            .await
            .map(|_| ())
            .map_err(|source| Error::ApplyStatus {
                kind: CONTROLLER,
                name: self.qualified(&name),
                source,
            })
    }

    async fn release(&self, vm: &ProtectedVM) -> Result<()> {
        let qualified = self.qualified(&vm.name_any());
        finalizer::remove(&self.vms, vm, VM_FINALIZER)
            .await
            .map_err(Error::patch_finalizers(CONTROLLER, &qualified))?;
        tracing::info!(vm = %qualified, "protection disabled; the VM can go");
        Ok(())
    }
}

/// Reconcile one ProtectedVM: hold the finalizer, wait for the cache to catch up with the
/// last status write, then one [`reconcile_vm`] pass through the Kubernetes API.
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

    let policy = ctx
        .stores
        .policies
        .get(&ObjectRef::new(&vm.spec.policy_ref.name).within(&ns));
    let writer = KubeWriter {
        ctx: &ctx,
        ns: &ns,
        jobs: Api::namespaced(ctx.client.clone(), &ns),
        vms,
    };
    if let Some(work) = recovery::pending(&vm) {
        // NB: before the pass, and the pass waits for it: a cleanup must not remove the disks
        // under the recovered VM, nor a new job change the result being brought up. A hook's
        // Job holds this VM's reconcile (not the others') for as long as it runs.
        let driver = KubeRecovery {
            client: ctx.client.clone(),
        };
        let now = whole_seconds(ctx.clock.now());
        if let Some(recovered) = recovery::carry_out(&driver, &vm, work, now).await {
            let mut status = ProtectedVMStatus {
                agent: None,
                ..vm.status.clone().unwrap_or_default()
            };
            let notice = recovery::notice(work, &recovered);
            recovery::record(&mut status, work, recovered);
            writer.write_status(&vm, &status).await?;
            writer.publish(&vm, &[notice], None).await;
            ctx.metrics.status_written(CONTROLLER);
            ctx.last_writes.remember(key, &status);
        }
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let carried = reconcile_vm(
        &writer,
        VmPass {
            vm: &vm,
            policy: policy.as_deref(),
            heartbeat: &|node: &str| ctx.heartbeat(node),
            nodes_labelled: &|selector| ctx.nodes_labelled(selector),
            cluster: true,
            now: whole_seconds(ctx.clock.now()),
        },
    )
    .await?;
    let decision = &carried.decision;
    if let Some(new) = &decision.create_job {
        ctx.metrics.job_created(new.kind.as_str());
    }
    if let Some(finished) = decision.finished_job {
        ctx.metrics.job_finished(
            finished.kind.as_str(),
            finished.succeeded,
            finished.duration,
        );
    }
    ctx.metrics
        .set_cycles_missed(&ns, &name, decision.cycles_missed_last_hour);
    if carried.status_written {
        ctx.metrics.status_written(CONTROLLER);
        ctx.last_writes.remember(key, &carried.status);
    }
    Ok(Action::requeue(decision.requeue_after))
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

impl From<JobNameTaken> for Error {
    fn from(taken: JobNameTaken) -> Self {
        Error::JobNameTaken {
            vm: taken.vm,
            last: taken.last,
        }
    }
}
