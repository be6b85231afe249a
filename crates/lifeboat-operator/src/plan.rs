//! The RecoveryPlan controller: it runs the request a plan has pending as a task of its own
//! (a run waits at gates and on hooks for as long as they take; the other controllers go
//! on), over `KubeDriver`: a VM is asked through its `spec.requests` and waited on as
//! `lifeboat failover --cluster` does, a hook is a Kubernetes Job made from the hook's
//! JobSpec with the plan's environment added to its containers, status is applied on the
//! plan's status subresource.
//!
//! ```text
//!  RecoveryPlan ──watch──> reconcile ──pending request, no run──> task: plan::run(KubeDriver)
//!                              └──run going──> its spec sent to it (a gate's `proceed`)
//!  KubeDriver: ProtectedVM spec.requests (merge patch) ──> wait for status.handledRequests
//!              batch/v1 Job (owned by the plan) ──> wait for Complete or Failed
//! ```
//!
//! A run found running when the operator starts (a restart, a new leader) resumes at its
//! steps done; a hook's Job is named after its step and token, so that a resumed run waits on
//! the Job it made before instead of making another.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use lifeboat_api::contract::OPERATOR_FIELD_MANAGER;
use lifeboat_api::plan::{PlanHook, RecoveryPlan, RecoveryPlanSpec, RecoveryPlanStatus};
use lifeboat_api::protected_vm::{ProtectedVMStatus, Requests};
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_control::mapping::system_time;
use lifeboat_control::plan::{self, PlanDriver, VmRequest};
use lifeboat_control::requests::{self, Resources};
use serde_json::json;
use tokio::sync::watch;

use crate::Error;
use crate::hook::{self, HookJob};

/// The controller's name, in logs.
pub const CONTROLLER: &str = "RecoveryPlan";

/// The label naming the plan on its hooks' Jobs.
pub const PLAN_LABEL: &str = "lifeboat.io/plan";

/// What the plan controller's reconciles share: the client and the runs going on (aborted
/// when the controller stops, at shutdown or when leadership is lost; each resumes under the
/// next leader).
pub struct PlanContext {
    client: Client,
    runs: Mutex<plan::Runs>,
}

impl std::fmt::Debug for PlanContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanContext")
            .field("runs", &self.runs)
            .finish_non_exhaustive()
    }
}

impl PlanContext {
    /// The context of the plan controller.
    pub fn new(client: Client) -> PlanContext {
        PlanContext {
            client,
            runs: Mutex::default(),
        }
    }
}

/// Start the run a plan asks for, or tell the one going on its spec.
///
/// # Errors
///
/// None today: a run's failures are the plan's status.
pub async fn reconcile(plan: Arc<RecoveryPlan>, ctx: Arc<PlanContext>) -> Result<Action, Error> {
    let namespace = plan.namespace().unwrap_or_default();
    let name = plan.name_any();
    let key = (namespace.clone(), name.clone());
    let mut runs = ctx.runs.lock().unwrap_or_else(PoisonError::into_inner);
    if plan.meta().deletion_timestamp.is_some() {
        runs.stop(&key);
        return Ok(Action::await_change());
    }
    if runs.tell(&key, &plan.spec) {
        // NB: looked at again after the run, in case a request came while it ended.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let now = SystemTime::now();
    let created = plan
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or(now, system_time);
    let Some(run) = plan::pending(&plan.spec, plan.status.as_ref(), created, now) else {
        // NB: back when the next drill is due (or in an hour, whichever comes first).
        return Ok(
            match plan::next_drill(&plan.spec, plan.status.as_ref(), created) {
                Some(due) => Action::requeue(
                    due.duration_since(now)
                        .unwrap_or_default()
                        .clamp(Duration::from_secs(1), Duration::from_secs(3600)),
                ),
                None => Action::await_change(),
            },
        );
    };
    let (client, object) = (ctx.client.clone(), plan.as_ref().clone());
    runs.start(key, plan.spec.clone(), plan.status.clone(), run, |spec| {
        KubeDriver {
            client,
            plan: object,
            spec,
        }
    });
    Ok(Action::requeue(Duration::from_secs(5)))
}

/// Look again in a minute.
pub fn error_policy(_: Arc<RecoveryPlan>, error: &Error, _: Arc<PlanContext>) -> Action {
    tracing::warn!(%error, "recovery plan reconcile failed");
    Action::requeue(Duration::from_secs(60))
}

/// The cluster's [`PlanDriver`].
struct KubeDriver {
    client: Client,
    plan: RecoveryPlan,
    spec: watch::Receiver<RecoveryPlanSpec>,
}

/// The API server as the [`Resources`] a VM's request is waited on in (by the plans' runs
/// and by `lifeboat failover --cluster` and friends).
#[derive(Clone)]
pub struct ApiResources(pub Client);

impl std::fmt::Debug for ApiResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiResources").finish_non_exhaustive()
    }
}

/// Ask `action` of the ProtectedVM `namespace/name`: its `spec.requests` field set with a
/// fresh token by merge patch, as a GitOps change would; the token.
///
/// # Errors
///
/// The API server refused the patch.
pub async fn ask_vm(
    client: &Client,
    namespace: &str,
    name: &str,
    action: &requests::Action,
) -> Result<String, kube::Error> {
    let token = requests::new_token();
    let mut asked = Requests::default();
    requests::apply_request(&mut asked, action, &token);
    let patch = json!({ "spec": { "requests": asked } });
    Api::<ProtectedVM>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(token)
}

#[async_trait]
impl Resources for ApiResources {
    async fn vm(&self, namespace: &str, name: &str) -> Result<Option<ProtectedVM>, String> {
        Api::<ProtectedVM>::namespaced(self.0.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| format!("get ProtectedVM {namespace}/{name}: {e}"))
    }

    async fn job(&self, namespace: &str, name: &str) -> Result<Option<ReplicationJob>, String> {
        Api::<ReplicationJob>::namespaced(self.0.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| format!("get ReplicationJob {namespace}/{name}: {e}"))
    }
}

impl KubeDriver {
    fn namespace(&self) -> String {
        self.plan.namespace().unwrap_or_default()
    }

    /// Where a hook's Job goes: named after the plan, the run's token and the hook's step
    /// (the same for a resumed run, new for the next run), owned by the plan.
    fn hook_job(&self, hook: &PlanHook, env: &[(String, String)]) -> Result<HookJob, String> {
        let value = |key: &str| hook::env_value(env, key);
        let what = (
            value("LIFEBOAT_TOKEN"),
            value("LIFEBOAT_ACTION"),
            value("LIFEBOAT_GROUP"),
            value("LIFEBOAT_STAGE"),
            &hook.name,
        );
        Ok(HookJob {
            namespace: self.namespace(),
            name: hook::job_name(&self.plan.name_any(), what),
            owner: self
                .plan
                .controller_owner_ref(&())
                .ok_or("the plan has no uid")?,
            labels: [(PLAN_LABEL.to_owned(), self.plan.name_any())].into(),
        })
    }
}

#[async_trait]
impl PlanDriver for KubeDriver {
    async fn vm(&self, name: &str, request: &VmRequest) -> Result<ProtectedVMStatus, String> {
        let namespace = self.namespace();
        let api: Api<ProtectedVM> = Api::namespaced(self.client.clone(), &namespace);
        let action = request.action();
        let vm = api
            .get_opt(name)
            .await
            .map_err(|e| format!("get ProtectedVM {namespace}/{name}: {e}"))?
            .ok_or_else(|| format!("no ProtectedVM {namespace}/{name}"))?;
        requests::check_action(&vm, &action)?;
        let token = ask_vm(&self.client, &namespace, name, &action)
            .await
            .map_err(|e| format!("set spec.requests of ProtectedVM {namespace}/{name}: {e}"))?;
        plan::wait_for_vm(
            &ApiResources(self.client.clone()),
            &namespace,
            name,
            &action,
            &token,
        )
        .await
    }

    async fn hook(&self, hook: &PlanHook, env: &[(String, String)]) -> Result<(), String> {
        hook::run(&self.client, &self.hook_job(hook, env)?, hook, env).await
    }

    async fn spec(&self) -> RecoveryPlanSpec {
        self.spec.borrow().clone()
    }

    async fn save(&self, status: &RecoveryPlanStatus) -> Result<(), String> {
        let namespace = self.namespace();
        let name = self.plan.name_any();
        let api: Api<RecoveryPlan> = Api::namespaced(self.client.clone(), &namespace);
        let body = json!({
            "apiVersion": RecoveryPlan::api_version(&()),
            "kind": RecoveryPlan::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
        api.patch_status(&name, &params, &Patch::Apply(&body))
            .await
            .map(|_| ())
            .map_err(|e| format!("apply the status of RecoveryPlan {namespace}/{name}: {e}"))
    }
}
