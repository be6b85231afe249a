//! A hook as a Kubernetes Job: a plan's before and after hooks, and a ProtectedVM's
//! recovered-VM hook. The Job is made from the hook's JobSpec with the environment added to
//! every container, bounded by the hook's timeout, owned by the resource it runs for, and
//! waited on until it completes or fails.
//!
//! A Job's name says what it is for (its step and request token), so that a run resumed
//! after a restart waits on the Job it made before instead of making another; a Job of that
//! name that failed before is a retry's to replace.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use lifeboat_api::plan::PlanHook;
use serde_json::{Value, json};

/// How often a hook's Job is looked at.
const JOB_POLL: Duration = Duration::from_secs(1);

/// Where a hook's Job goes and whose it is.
#[derive(Clone, Debug)]
pub struct HookJob {
    /// Its namespace.
    pub namespace: String,
    /// Its name (see [`job_name`]).
    pub name: String,
    /// The resource it runs for, as its controller (deleted with it).
    pub owner: OwnerReference,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// A Job's name: the first 40 characters of `prefix`, `-hook-`, and a hash of `what` (the
/// same for a resumed run, new for the next request).
pub fn job_name(prefix: &str, what: impl Hash) -> String {
    let mut hasher = DefaultHasher::new();
    what.hash(&mut hasher);
    let prefix: String = prefix.chars().take(40).collect();
    format!(
        "{}-hook-{:012x}",
        prefix.trim_end_matches('-'),
        hasher.finish() & 0xffff_ffff_ffff
    )
}

/// The value of `key` in a hook's environment (empty when it has none).
pub fn env_value<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// The hook's Job: its JobSpec with `env` added to every container.
fn job_object(at: &HookJob, hook: &PlanHook, env: &[(String, String)]) -> Result<Job, String> {
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
    let mut labels = at.labels.clone();
    labels.insert("app.kubernetes.io/managed-by".into(), "lifeboat".into());
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": at.name,
            "namespace": at.namespace,
            "labels": labels,
            "ownerReferences": [at.owner],
        },
        "spec": spec,
    });
    serde_json::from_value(job).map_err(|e| format!("its job is not a valid JobSpec: {e}"))
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

/// Run `hook` as the Job `at` with `env`, to its end.
///
/// # Errors
///
/// The hook has no job, the Job failed or outlived the hook's timeout (it is deleted then),
/// or the API server refused a call; each says which Job.
pub async fn run(
    client: &Client,
    at: &HookJob,
    hook: &PlanHook,
    env: &[(String, String)],
) -> Result<(), String> {
    if hook.job.is_none() {
        return Err(
            "it has no job: on a cluster a hook runs as a Kubernetes Job (its command is for standalone mode)"
                .into(),
        );
    }
    let (namespace, name) = (&at.namespace, &at.name);
    let api: Api<Job> = Api::namespaced(client.clone(), namespace);
    // NB: a Job of this step that failed before is a retry's to replace; one going on or done
    // is a resumed run's to wait on.
    if let Some(old) = api.get_opt(name).await.map_err(|e| e.to_string())?
        && matches!(job_outcome(&old), Some(Err(_)))
    {
        api.delete(name, &DeleteParams::background())
            .await
            .map_err(|e| format!("delete the failed Job {namespace}/{name}: {e}"))?;
        while api
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            tokio::time::sleep(JOB_POLL).await;
        }
    }
    let job = job_object(at, hook, env)?;
    match api.create(&PostParams::default(), &job).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(format!("create the Job {namespace}/{name}: {e}")),
    }
    let limit = Duration::from_secs(u64::from(hook.timeout_seconds));
    let started = Instant::now();
    loop {
        let job = api
            .get_opt(name)
            .await
            .map_err(|e| format!("get the Job {namespace}/{name}: {e}"))?
            .ok_or_else(|| format!("the Job {namespace}/{name} was deleted"))?;
        match job_outcome(&job) {
            Some(Ok(())) => return Ok(()),
            Some(Err(why)) => return Err(format!("the Job {namespace}/{name} failed: {why}")),
            None => {}
        }
        if started.elapsed() > limit {
            let _ = api.delete(name, &DeleteParams::background()).await;
            return Err(format!(
                "the Job {namespace}/{name} did not finish within its timeout of {}s",
                hook.timeout_seconds
            ));
        }
        tokio::time::sleep(JOB_POLL).await;
    }
}
