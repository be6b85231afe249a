//! The ReplicationPolicy controller: checks what the schema could not, probes a remote
//! target, counts the VMs that use the policy, and holds the policy back from deletion while
//! any does (finalizer `lifeboat.io/policy-in-use`, condition `DeletionBlocked`).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use lifeboat_api::contract::{OPERATOR_FIELD_MANAGER, POLICY_FINALIZER};
use lifeboat_api::{ProtectedVM, ReplicationPolicy};
use lifeboat_core::policy::{PROBE_INTERVAL, PolicyInput, decide_policy};
use lifeboat_core::vm::Notice;
use serde_json::json;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::events::{self, policy_reasons};
use crate::finalizer;
use crate::vm::{RETRY_NON_RECOVERABLE, RETRY_RECOVERABLE};
use lifeboat_control::mapping::{self, whole_seconds};

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "ReplicationPolicy";

/// Whether `vm` counts as using the policy `name` in `ns`: a VM on its way out (being deleted
/// and holding no finalizer any more) does not.
pub fn uses(vm: &ProtectedVM, ns: &str, name: &str) -> bool {
    vm.spec.policy_ref.name == name
        && vm.namespace().as_deref() == Some(ns)
        && !(vm.metadata.deletion_timestamp.is_some() && vm.finalizers().is_empty())
}

/// Reconcile one ReplicationPolicy.
///
/// # Errors
///
/// The first API call that failed.
pub async fn reconcile(policy: Arc<ReplicationPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let name = policy.name_any();
    let ns = policy.namespace().ok_or_else(|| Error::MissingNamespace {
        kind: CONTROLLER,
        name: name.clone(),
    })?;
    let qualified = format!("{ns}/{name}");
    let api: Api<ReplicationPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = policy.metadata.deletion_timestamp.is_some();
    let held = finalizer::ensure(&api, policy.as_ref(), POLICY_FINALIZER)
        .await
        .map_err(Error::patch_finalizers(CONTROLLER, &qualified))?;
    if !held {
        return Ok(Action::await_change());
    }

    let now = whole_seconds(ctx.clock.now());
    let spec = mapping::cluster_policy_spec(&policy);
    let mut users: Vec<String> = ctx
        .stores
        .vms
        .state()
        .iter()
        .filter(|vm| uses(vm, &ns, &name))
        .map(|vm| vm.name_any())
        .collect();
    users.sort();
    let reachable = match &spec.account_url {
        None => None,
        Some(url) => Some(match ctx.cached_probe(url, now, PROBE_INTERVAL) {
            Some(result) => result,
            None => {
                let result = ctx.probe.probe(url).await;
                ctx.remember_probe(url, now, result.clone());
                result
            }
        }),
    };
    let state = mapping::policy_state(&policy);
    let decision = decide_policy(&PolicyInput {
        now,
        spec: &spec,
        deleting,
        state: &state,
        reachable,
        users: &users,
    });
    if decision.deletion_blocked {
        let note = decision
            .state
            .conditions
            .iter()
            .find(|c| c.type_ == lifeboat_core::conditions::types::DELETION_BLOCKED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let notice = Notice {
            warning: true,
            reason: policy_reasons::DELETION_BLOCKED,
            note,
        };
        events::publish(&ctx, policy.as_ref(), &[notice], None).await;
    }
    if decision.changed {
        let body = json!({
            "apiVersion": ReplicationPolicy::api_version(&()),
            "kind": ReplicationPolicy::kind(&()),
            "status": mapping::policy_status(&decision.state),
        });
        api.patch_status(
            &name,
            &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::ApplyStatus {
            kind: CONTROLLER,
            name: qualified.clone(),
            source,
        })?;
        ctx.metrics.status_written(CONTROLLER);
    }
    if decision.release_finalizer {
        finalizer::remove(&api, policy.as_ref(), POLICY_FINALIZER)
            .await
            .map_err(Error::patch_finalizers(CONTROLLER, &qualified))?;
    }
    Ok(Action::requeue(
        decision.requeue_after.max(Duration::from_secs(1)),
    ))
}

/// Count the error and look again later.
pub fn error_policy(policy: Arc<ReplicationPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(policy = %policy.name_any(), error = %error.report(), "reconcile failed");
    Action::requeue(if error.is_recoverable() {
        RETRY_RECOVERABLE
    } else {
        RETRY_NON_RECOVERABLE
    })
}
