//! The RecoveryPlan controller: it runs the request a plan has pending as a task of its own
//! (a run waits at gates and on hooks for as long as they take; the other controllers go
//! on), over [`KubeDriver`]: a VM is asked through its `spec.requests` and waited on as
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

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use lifeboat_api::contract::OPERATOR_FIELD_MANAGER;
use lifeboat_api::plan::{PlanHook, RecoveryPlan, RecoveryPlanSpec, RecoveryPlanStatus};
use lifeboat_api::protected_vm::{ProtectedVMStatus, Requests};
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_control::mapping::system_time;
use lifeboat_control::plan::{self, PlanDriver, VmRequest};
use lifeboat_control::requests::{self, Resources};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::Error;

/// The controller's name, in logs.
pub const CONTROLLER: &str = "RecoveryPlan";

/// How often a hook's Job is looked at.
const JOB_POLL: Duration = Duration::from_secs(1);

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

    /// The name of a hook's Job: the plan's, then a hash of the hook's step and the run's
    /// token (the same for a resumed run, new for the next run).
    fn job_name(&self, hook: &PlanHook, env: &[(String, String)]) -> String {
        let value = |key: &str| {
            env.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .unwrap_or_default()
        };
        let mut hasher = DefaultHasher::new();
        (
            value("LIFEBOAT_TOKEN"),
            value("LIFEBOAT_ACTION"),
            value("LIFEBOAT_GROUP"),
            value("LIFEBOAT_STAGE"),
            &hook.name,
        )
            .hash(&mut hasher);
        let plan = self.plan.name_any();
        let prefix: String = plan.chars().take(40).collect();
        format!(
            "{}-hook-{:012x}",
            prefix.trim_end_matches('-'),
            hasher.finish() & 0xffff_ffff_ffff
        )
    }

    /// The hook's Job: its JobSpec with the environment added to every container, owned by
    /// the plan, bounded by the hook's timeout.
    fn job(&self, hook: &PlanHook, name: &str, env: &[(String, String)]) -> Result<Job, String> {
        let mut spec = hook.job.clone().unwrap_or(Value::Null);
        let Some(object) = spec.as_object_mut() else {
            return Err("its job is not a JobSpec object".into());
        };
        object
            .entry("activeDeadlineSeconds")
            .or_insert(json!(hook.timeout_seconds));
        object.entry("backoffLimit").or_insert(json!(0));
        let containers = spec
            .pointer_mut("/template/spec/containers")
            .and_then(Value::as_array_mut)
            .ok_or("its job has no template.spec.containers")?;
        let vars: Vec<Value> = env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        for container in containers {
            let Some(container) = container.as_object_mut() else {
                continue;
            };
            let list = container.entry("env").or_insert(json!([]));
            if let Some(list) = list.as_array_mut() {
                list.extend(vars.iter().cloned());
            }
        }
        let owner = self
            .plan
            .controller_owner_ref(&())
            .ok_or("the plan has no uid")?;
        let job = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": self.namespace(),
                "labels": {
                    PLAN_LABEL: self.plan.name_any(),
                    "app.kubernetes.io/managed-by": "lifeboat",
                },
                "ownerReferences": [owner],
            },
            "spec": spec,
        });
        serde_json::from_value(job).map_err(|e| format!("its job is not a valid JobSpec: {e}"))
    }
}

/// A finished Job's outcome: `Some(Ok)` complete, `Some(Err)` failed (its reason).
fn job_outcome(job: &Job) -> Option<Result<(), String>> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let done = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    if done("Complete").is_some() {
        return Some(Ok(()));
    }
    done("Failed").map(|c| {
        Err(format!(
            "{}: {}",
            c.reason.as_deref().unwrap_or("Failed"),
            c.message.as_deref().unwrap_or("no message")
        ))
    })
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
        if hook.job.is_none() {
            return Err(
                "it has no job: on a cluster a hook runs as a Kubernetes Job (its command is for standalone mode)"
                    .into(),
            );
        }
        let namespace = self.namespace();
        let api: Api<Job> = Api::namespaced(self.client.clone(), &namespace);
        let name = self.job_name(hook, env);
        // NB: a Job of this step that failed before is a retry's to replace; one going on or
        // done is a resumed run's to wait on.
        if let Some(old) = api.get_opt(&name).await.map_err(|e| e.to_string())?
            && matches!(job_outcome(&old), Some(Err(_)))
        {
            let background = DeleteParams::background();
            api.delete(&name, &background)
                .await
                .map_err(|e| format!("delete the failed Job {namespace}/{name}: {e}"))?;
            while api
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                tokio::time::sleep(JOB_POLL).await;
            }
        }
        let job = self.job(hook, &name, env)?;
        match api.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("create the Job {namespace}/{name}: {e}")),
        }
        let limit = Duration::from_secs(u64::from(hook.timeout_seconds));
        let started = Instant::now();
        loop {
            let job = api
                .get_opt(&name)
                .await
                .map_err(|e| format!("get the Job {namespace}/{name}: {e}"))?
                .ok_or_else(|| format!("the Job {namespace}/{name} was deleted"))?;
            match job_outcome(&job) {
                Some(Ok(())) => return Ok(()),
                Some(Err(why)) => return Err(format!("the Job {namespace}/{name} failed: {why}")),
                None => {}
            }
            if started.elapsed() > limit {
                let _ = api.delete(&name, &DeleteParams::background()).await;
                return Err(format!(
                    "the Job {namespace}/{name} did not finish within its timeout of {}s",
                    hook.timeout_seconds
                ));
            }
            tokio::time::sleep(JOB_POLL).await;
        }
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
