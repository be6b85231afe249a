//! The ReplicationJob controller: keeps finished jobs for the retention period, so that
//! `kubectl get rjob` reads like ASR's jobs list, then deletes them. Running jobs belong to
//! the ProtectedVM controller, which follows them through its `owns` relation.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use lifeboat_api::ReplicationJob;
use lifeboat_core::job::{JobFate, job_fate, retention_of};
use lifeboat_core::vm::MAX_REQUEUE;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::vm::{RETRY_NON_RECOVERABLE, RETRY_RECOVERABLE};
use lifeboat_control::mapping::{self, whole_seconds};

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "ReplicationJob";

/// How soon to look again at a job past its retention whose VM has not taken its end in.
const AWAIT_VM: std::time::Duration = std::time::Duration::from_secs(5);

/// Reconcile one ReplicationJob.
///
/// # Errors
///
/// `DeleteJob` when an expired job could not be deleted.
pub async fn reconcile(job: Arc<ReplicationJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let now = whole_seconds(ctx.clock.now());
    let status = job.status.clone().unwrap_or_default();
    let created = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, mapping::system_time);
    let ns = job.namespace().unwrap_or_default();
    let vm = ctx
        .stores
        .vms
        .get(&ObjectRef::new(&job.spec.vm_ref.name).within(&ns));
    let vm_follows = vm
        .as_ref()
        .and_then(|vm| vm.status.as_ref()?.current_job.as_ref())
        .is_some_and(|current| {
            current.name == job.name_any() && !mapping::job_state(current.phase).is_finished()
        });
    let state = mapping::job_state(status.phase);
    let fate = job_fate(
        state,
        status.completion_time.as_ref().map(mapping::system_time),
        created,
        now,
        retention_of(
            mapping::job_kind(job.spec.job_type),
            &mapping::params(&job.spec.parameters),
            state,
            ctx.settings.job_retention,
        ),
        vm_follows,
    );
    match fate {
        JobFate::Active => Ok(Action::requeue(MAX_REQUEUE)),
        JobFate::AwaitVm => Ok(Action::requeue(AWAIT_VM)),
        JobFate::KeepUntil(until) => Ok(Action::requeue(
            until
                .duration_since(now)
                .unwrap_or_default()
                .min(MAX_REQUEUE * 6),
        )),
        JobFate::Delete => {
            let api: Api<ReplicationJob> = Api::namespaced(ctx.client.clone(), &ns);
            match api
                .delete(&job.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(source) => {
                    return Err(Error::DeleteJob {
                        name: format!("{ns}/{}", job.name_any()),
                        source,
                    });
                }
            }
            tracing::debug!(job = %job.name_any(), "deleted a finished job past its retention");
            Ok(Action::await_change())
        }
    }
}

/// Count the error and look again later.
pub fn error_policy(job: Arc<ReplicationJob>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(job = %job.name_any(), error = %error.report(), "reconcile failed");
    Action::requeue(if error.is_recoverable() {
        RETRY_RECOVERABLE
    } else {
        RETRY_NON_RECOVERABLE
    })
}
