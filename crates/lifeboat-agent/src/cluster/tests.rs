//! The agent's calls, checked against a mocked API server (kube-rs's `tower-test` verifier
//! pattern): each test drives the agent and answers its requests in order, asserting the
//! method, the path, the query (field manager, force) and the body of each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::watcher;
use lifeboat_api::contract::{self, AGENT_FIELD_MANAGER};
use lifeboat_api::protected_vm::AgentReport;
use lifeboat_api::{ProtectedVM, ReplicationJob, ReplicationPolicy};
use lifeboat_control::mapping::api_time;
use serde_json::{Value, json};
use tower_test::mock;

use super::vm::VmTask;
use super::*;
use crate::stores::SecretSource;

type Handle = mock::Handle<Request<Body>, Response<Body>>;
type Respond = mock::SendResponse<Response<Body>>;

const NODE: &str = "node-1";
const CLAIMER: &str = "node-1/lifeboat-agent-x7k2p";

/// The mocked API server's side of the conversation.
struct Verifier(Handle);

/// One request: method, path, query, content type, JSON body, and the way to answer it.
struct Call {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Value,
    respond: Respond,
}

impl Call {
    fn answer(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
            .unwrap_or_else(|e| panic!("{e}"));
        self.respond.send_response(response);
    }

    fn fail(self, code: u16, reason: &str) {
        self.answer(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": reason, "code": code, "message": reason}),
        );
    }

    fn assert_merge_patch_by_agent(&self) {
        assert_eq!(self.method, Method::PATCH);
        assert_eq!(self.content_type, "application/merge-patch+json");
        assert_eq!(
            self.query.get("fieldManager").map(String::as_str),
            Some(AGENT_FIELD_MANAGER)
        );
    }
}

impl Verifier {
    async fn next(&mut self) -> Call {
        let (request, respond) =
            tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request within 5 s"))
                .unwrap_or_else(|| panic!("the agent stopped calling"));
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%2F", "/")))
            .collect();
        let content_type = request
            .headers()
            .get(::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Call {
            method,
            path,
            query,
            content_type,
            body,
            respond,
        }
    }

    /// No call follows within a while.
    async fn done(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await
        {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    }
}

fn mocked() -> (Client, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), Verifier(handle))
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
}

fn merged(mut base: Value, overlay: &Value) -> Value {
    if let (Some(base), Some(overlay)) = (base.as_object_mut(), overlay.as_object()) {
        for (key, value) in overlay {
            match base.get_mut(key) {
                Some(existing) if existing.is_object() && value.is_object() => {
                    *existing = merged(existing.take(), value);
                }
                _ => {
                    base.insert(key.clone(), value.clone());
                }
            }
        }
        return Value::Object(base.clone());
    }
    overlay.clone()
}

fn job(overlay: Value) -> ReplicationJob {
    from_json(merged(
        json!({
            "apiVersion": "lifeboat.io/v1alpha1",
            "kind": "ReplicationJob",
            "metadata": {
                "name": "web-enable-1", "namespace": "ns", "uid": "uid-job-1",
                "resourceVersion": "42", "creationTimestamp": "2025-06-15T15:00:00Z"
            },
            "spec": {"vmRef": {"name": "web"}, "nodeName": NODE, "type": "EnableProtection"}
        }),
        &overlay,
    ))
}

/// A VM on `node-1` whose hypervisor this agent cannot drive on Linux (Hyper-V), so that its
/// engine never opens: its jobs fail without touching a disk.
fn hyperv_vm() -> ProtectedVM {
    from_json(json!({
        "apiVersion": "lifeboat.io/v1alpha1",
        "kind": "ProtectedVM",
        "metadata": {"name": "web", "namespace": "ns", "uid": "uid-web", "resourceVersion": "7", "generation": 1},
        "spec": {
            "vmName": "web", "nodeName": NODE,
            "hypervisor": {"hyperv": {}},
            "disks": [{"name": "os", "path": "C:\\VMs\\web.vhdx"}],
            "policyRef": {"name": "gold"}
        }
    }))
}

fn policy(target: Value) -> ReplicationPolicy {
    from_json(json!({
        "apiVersion": "lifeboat.io/v1alpha1",
        "kind": "ReplicationPolicy",
        "metadata": {"name": "gold", "namespace": "ns", "generation": 2, "resourceVersion": "3"},
        "spec": {"copyFrequency": "5m", "target": target}
    }))
}

fn put<K>(writer: &mut Writer<K>, obj: K)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Apply(obj));
}

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
}

#[tokio::test]
async fn a_claim_that_wins_is_the_contract_patch_on_the_status() {
    let (client, mut server) = mocked();
    let api = NodeApi::new(client);
    let pending = job(json!({}));
    let claim = tokio::spawn({
        let pending = pending.clone();
        async move { api.claim_job(&pending, CLAIMER, at(1_750_000_000)).await }
    });
    let call = server.next().await;
    call.assert_merge_patch_by_agent();
    assert_eq!(
        call.path,
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/replicationjobs/web-enable-1/status"
    );
    let expected = contract::claim_job_patch(&pending, CLAIMER, &api_time(at(1_750_000_000)));
    assert_eq!(Some(&call.body), expected.as_ref());
    assert_eq!(call.body["metadata"]["resourceVersion"], "42");
    assert_eq!(call.body["status"]["claimedBy"], CLAIMER);
    let answered = job(json!({
        "metadata": {"resourceVersion": "43"},
        "status": {"phase": "Running", "claimedBy": CLAIMER}
    }));
    call.answer(
        StatusCode::OK,
        &serde_json::to_value(&answered).unwrap_or_default(),
    );
    let outcome = claim.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.ok(), Some(Claim::Won(Box::new(answered))));
}

#[tokio::test]
async fn a_claim_answered_409_is_lost_and_other_errors_are_errors() {
    let (client, mut server) = mocked();
    let api = NodeApi::new(client);
    let pending = job(json!({}));
    let claim = tokio::spawn({
        let (api, pending) = (api.clone(), pending.clone());
        async move { api.claim_job(&pending, CLAIMER, at(1)).await }
    });
    server.next().await.fail(409, "Conflict");
    let outcome = claim.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.ok(), Some(Claim::Lost));

    let claim = tokio::spawn(async move { api.claim_job(&pending, CLAIMER, at(1)).await });
    server.next().await.fail(503, "ServiceUnavailable");
    let outcome = claim.await.unwrap_or_else(|e| panic!("{e}"));
    let error = outcome.err().unwrap_or_else(|| panic!("a 503 is an error"));
    assert_eq!(error.metric_label(), "claim_job");
    assert!(error.is_recoverable());
}

#[tokio::test]
async fn the_report_is_applied_server_side_as_the_agent_forced() {
    let (client, mut server) = mocked();
    let api = NodeApi::new(client);
    let vm = hyperv_vm();
    let report = AgentReport {
        report_time: Some(api_time(at(1_750_000_000))),
        policy_generation: Some(2),
        pending_log_bytes: 4096,
        ..AgentReport::default()
    };
    let apply = tokio::spawn({
        let (vm, report) = (vm.clone(), report.clone());
        async move { api.apply_report(&vm, &report).await }
    });
    let call = server.next().await;
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(
        call.path,
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/protectedvms/web/status"
    );
    assert_eq!(call.content_type, "application/apply-patch+yaml");
    assert_eq!(
        call.query.get("fieldManager").map(String::as_str),
        Some(AGENT_FIELD_MANAGER)
    );
    assert_eq!(call.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(call.body, contract::agent_report_apply(&vm, &report));
    assert_eq!(
        call.body
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec![
            "apiVersion".to_owned(),
            "kind".to_owned(),
            "metadata".to_owned(),
            "status".to_owned()
        ])
    );
    assert_eq!(
        call.body["status"].as_object().map(|o| o.len()),
        Some(1),
        "only status.agent"
    );
    assert_eq!(call.body["status"]["agent"]["pendingLogBytes"], 4096);
    let answered = serde_json::to_value(&vm).unwrap_or_default();
    call.answer(StatusCode::OK, &answered);
    apply
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn the_heartbeat_lease_is_created_then_renewed() {
    let (client, mut server) = mocked();
    let mut heartbeat = Heartbeat::new(client, "lifeboat-system", NODE);
    let path = "/apis/coordination.k8s.io/v1/namespaces/lifeboat-system/leases";
    let beat = tokio::spawn(async move {
        heartbeat
            .beat(at(1_750_000_000))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        heartbeat
    });
    let call = server.next().await;
    assert_eq!(call.method, Method::GET);
    assert_eq!(call.path, format!("{path}/lifeboat-agent-node-1"));
    call.fail(404, "NotFound");
    let call = server.next().await;
    assert_eq!(call.method, Method::POST);
    assert_eq!(call.path, path);
    assert_eq!(
        call.query.get("fieldManager").map(String::as_str),
        Some(AGENT_FIELD_MANAGER)
    );
    assert_eq!(call.body["metadata"]["name"], "lifeboat-agent-node-1");
    assert_eq!(
        call.body["metadata"]["labels"][contract::HEARTBEAT_LABEL],
        contract::HEARTBEAT_LABEL_VALUE
    );
    assert_eq!(call.body["spec"]["holderIdentity"], NODE);
    assert_eq!(
        call.body["spec"]["renewTime"],
        "2025-06-15T15:06:40.000000Z"
    );
    let mut created = call.body.clone();
    created["metadata"]["resourceVersion"] = json!("100");
    created["metadata"]["managedFields"] = json!([{"manager": "lifeboat-agent"}]);
    call.answer(StatusCode::CREATED, &created);
    let mut heartbeat = beat.await.unwrap_or_else(|e| panic!("{e}"));

    let beat = tokio::spawn(async move {
        heartbeat
            .beat(at(1_750_000_010))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    });
    let call = server.next().await;
    assert_eq!(call.method, Method::PUT, "a renewal reads nothing first");
    assert_eq!(call.path, format!("{path}/lifeboat-agent-node-1"));
    assert_eq!(call.body["metadata"]["resourceVersion"], "100");
    assert!(call.body["metadata"].get("managedFields").is_none());
    assert_eq!(call.body["spec"]["holderIdentity"], NODE);
    assert_eq!(
        call.body["spec"]["renewTime"],
        "2025-06-15T15:06:50.000000Z"
    );
    assert_eq!(
        call.body["spec"]["acquireTime"],
        "2025-06-15T15:06:40.000000Z"
    );
    let mut renewed = call.body.clone();
    renewed["metadata"]["resourceVersion"] = json!("101");
    call.answer(StatusCode::OK, &renewed);
    beat.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_lease_renewal_that_conflicts_reads_the_lease_again() {
    let (client, mut server) = mocked();
    let mut heartbeat = Heartbeat::new(client, "lifeboat-system", NODE);
    let existing = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "lifeboat-agent-node-1", "namespace": "lifeboat-system", "resourceVersion": "5"},
        "spec": {"holderIdentity": NODE, "renewTime": "2025-06-15T15:00:00.000000Z"}
    });
    let beat = tokio::spawn(async move {
        let first = heartbeat.beat(at(1_750_000_000)).await;
        let second = heartbeat.beat(at(1_750_000_010)).await;
        (first.is_ok(), second.is_ok())
    });
    let call = server.next().await;
    assert_eq!(call.method, Method::GET);
    call.answer(StatusCode::OK, &existing);
    let call = server.next().await;
    assert_eq!(call.method, Method::PUT);
    assert_eq!(call.body["metadata"]["resourceVersion"], "5");
    assert_eq!(
        call.body["metadata"]["labels"][contract::HEARTBEAT_LABEL],
        contract::HEARTBEAT_LABEL_VALUE,
        "the label is put back on a Lease that lacks it"
    );
    call.fail(409, "Conflict");
    let call = server.next().await;
    assert_eq!(
        call.method,
        Method::GET,
        "the next beat reads the Lease again"
    );
    call.answer(StatusCode::OK, &existing);
    let call = server.next().await;
    assert_eq!(call.method, Method::PUT);
    let body = call.body.clone();
    call.answer(StatusCode::OK, &body);
    assert_eq!(beat.await.unwrap_or_else(|e| panic!("{e}")), (false, true));
}

#[tokio::test]
async fn secrets_are_read_by_name_and_never_shown() {
    let (client, mut server) = mocked();
    let api = NodeApi::new(client);
    let target: lifeboat_api::policy::ReplicaTarget = from_json(json!({
        "azureBlob": {
            "accountUrl": "https://acct.blob.core.windows.net", "container": "replicas",
            "credentials": {"accountKeySecretRef": {"name": "acct", "key": "key"}}
        }
    }));
    let fetch = tokio::spawn(async move { api.secrets_for("ns", &target).await });
    let call = server.next().await;
    assert_eq!(call.method, Method::GET);
    assert_eq!(call.path, "/api/v1/namespaces/ns/secrets/acct");
    // "c2VjcmV0LWtleQ==" is "secret-key".
    call.answer(
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "acct", "namespace": "ns"},
                "data": {"key": "c2VjcmV0LWtleQ=="}}),
    );
    let fetched = fetch
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let reference = lifeboat_api::common::SecretKeyReference {
        name: "acct".into(),
        key: "key".into(),
    };
    assert_eq!(
        fetched.secret_value("ns", &reference),
        Ok("secret-key".to_owned())
    );
    assert!(!format!("{fetched:?}").contains("secret-key"));
}

#[tokio::test]
async fn a_missing_secret_is_a_message_not_an_error() {
    let (client, mut server) = mocked();
    let api = NodeApi::new(client);
    let target: lifeboat_api::policy::ReplicaTarget = from_json(json!({
        "azureBlob": {
            "accountUrl": "https://acct.blob.core.windows.net", "container": "replicas",
            "credentials": {"sasSecretRef": {"name": "sas", "key": "token"}}
        }
    }));
    let fetch = tokio::spawn(async move { api.secrets_for("ns", &target).await });
    server.next().await.fail(404, "NotFound");
    let fetched = fetch
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let reference = lifeboat_api::common::SecretKeyReference {
        name: "sas".into(),
        key: "token".into(),
    };
    assert_eq!(
        fetched.secret_value("ns", &reference),
        Err("Secret ns/sas not found".to_owned())
    );
}

/// A VM task over the mocked API server, with its caches filled by hand.
struct Fixture {
    task: VmTask,
    server: Verifier,
    jobs: Writer<ReplicationJob>,
    stop: Stop,
    _stop_tx: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn fixture(vm: ProtectedVM, jobs: Vec<ReplicationJob>) -> Fixture {
    let (client, server) = mocked();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (vms, mut vm_writer) = reflector::store::<ProtectedVM>();
    let (job_store, mut job_writer) = reflector::store::<ReplicationJob>();
    let (policies, mut policy_writer) = reflector::store::<ReplicationPolicy>();
    let key = ObjectRef::from_obj(&vm);
    put(&mut vm_writer, vm);
    for job in jobs {
        put(&mut job_writer, job);
    }
    let replicas = dir.path().join("replicas");
    put(
        &mut policy_writer,
        policy(json!({"local": {"path": replicas.display().to_string()}})),
    );
    let (recovered, _) = reflector::store::<ProtectedVM>();
    let shared = Arc::new(Shared {
        api: NodeApi::new(client),
        node: NODE.into(),
        claimer: CLAIMER.into(),
        vms,
        recovered,
        jobs: job_store,
        policies,
        stores: StoreCache::default(),
        state_dir: dir.path().join("state"),
        failover_dir: dir.path().join("failover"),
        timing: Timing::default(),
        metrics: Arc::new(Metrics::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    Fixture {
        task: VmTask::new(shared, key),
        server,
        jobs: job_writer,
        stop: Stop(stop_rx),
        _stop_tx: stop_tx,
        _dir: dir,
    }
}

/// One look at `vm`, in a task, while the test answers its calls.
fn look(mut task: VmTask, vm: ProtectedVM, stop: &Stop) -> tokio::task::JoinHandle<VmTask> {
    let stop = stop.clone();
    tokio::spawn(async move {
        task.step(&vm, &stop).await;
        task
    })
}

#[tokio::test]
async fn a_lost_claim_is_not_tried_again_until_the_job_changes_then_a_won_job_fails_when_the_engine_cannot_open()
 {
    let Fixture {
        task,
        mut server,
        mut jobs,
        stop,
        _stop_tx,
        _dir,
    } = fixture(hyperv_vm(), vec![job(json!({}))]);
    let step = look(task, hyperv_vm(), &stop);

    // The first look claims the job and loses the race.
    let call = server.next().await;
    call.assert_merge_patch_by_agent();
    assert_eq!(call.body["metadata"]["resourceVersion"], "42");
    call.fail(409, "Conflict");
    let task = step.await.unwrap_or_else(|e| panic!("{e}"));
    server.done().await;

    // The next look does not claim the same version again.
    let again = look(task, hyperv_vm(), &stop);
    server.done().await;
    let task = again.await.unwrap_or_else(|e| panic!("{e}"));

    // The job changed (say the other agent gave it back): it is claimed again, won, and,
    // as Hyper-V cannot run on this node, fails with a reason that names the cause.
    put(
        &mut jobs,
        job(json!({"metadata": {"resourceVersion": "50"}})),
    );
    let step = look(task, hyperv_vm(), &stop);
    let call = server.next().await;
    call.assert_merge_patch_by_agent();
    assert_eq!(call.body["metadata"]["resourceVersion"], "50");
    let won = job(json!({
        "metadata": {"resourceVersion": "51"},
        "status": {"phase": "Running", "claimedBy": CLAIMER, "startTime": "2025-06-15T15:00:00Z"}
    }));
    call.answer(
        StatusCode::OK,
        &serde_json::to_value(&won).unwrap_or_default(),
    );
    let call = server.next().await;
    call.assert_merge_patch_by_agent();
    assert!(
        call.body["metadata"].is_null(),
        "the claimed job's status is written unguarded"
    );
    assert_eq!(call.body["status"]["phase"], "Running");
    assert_eq!(
        call.body["status"]["steps"][0]["name"],
        contract::ENABLE_PROTECTION_STEPS[0]
    );
    call.answer(
        StatusCode::OK,
        &serde_json::to_value(&won).unwrap_or_default(),
    );
    let call = server.next().await;
    call.assert_merge_patch_by_agent();
    assert_eq!(call.body["status"]["phase"], "Failed");
    assert_eq!(call.body["status"]["error"]["class"], "NonRecoverable");
    assert_eq!(
        call.body["status"]["error"]["reason"],
        "InvalidConfiguration"
    );
    assert!(
        call.body["status"]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.hypervisor")),
        "{}",
        call.body
    );
    assert_eq!(call.body["status"]["steps"][0]["state"], "Failed");
    call.answer(
        StatusCode::OK,
        &serde_json::to_value(&won).unwrap_or_default(),
    );
    step.await.unwrap_or_else(|e| panic!("{e}"));
    server.done().await;
}

#[tokio::test]
async fn a_job_left_running_by_an_earlier_agent_fails_as_recoverable() {
    let left = job(json!({
        "metadata": {"resourceVersion": "60"},
        "status": {
            "phase": "Running", "claimedBy": "node-1/lifeboat-agent-old",
            "steps": [{"name": "PrerequisitesCheck", "state": "Succeeded"},
                      {"name": "CreateReplicaDisks", "state": "InProgress"}]
        }
    }));
    let elsewhere = job(json!({
        "metadata": {"name": "web-resync-2", "uid": "uid-job-2", "resourceVersion": "61"},
        "spec": {"nodeName": "node-2"},
        "status": {"phase": "Running", "claimedBy": "node-2/lifeboat-agent-y"}
    }));
    let Fixture {
        task,
        mut server,
        stop,
        _stop_tx,
        _dir,
        ..
    } = fixture(hyperv_vm(), vec![left, elsewhere]);
    let step = look(task, hyperv_vm(), &stop);
    let call = server.next().await;
    call.assert_merge_patch_by_agent();
    assert_eq!(
        call.path,
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/replicationjobs/web-enable-1/status"
    );
    assert_eq!(call.body["metadata"]["resourceVersion"], "60");
    assert_eq!(call.body["status"]["phase"], "Failed");
    assert_eq!(call.body["status"]["error"]["class"], "Recoverable");
    assert_eq!(call.body["status"]["error"]["reason"], "AgentRestarted");
    assert_eq!(call.body["status"]["steps"][0]["state"], "Succeeded");
    assert_eq!(call.body["status"]["steps"][1]["state"], "Failed");
    let body = call.body.clone();
    call.answer(StatusCode::OK, &body);
    step.await.unwrap_or_else(|e| panic!("{e}"));
    // The other node's job is never touched.
    server.done().await;
}
