//! The calls the VM reconciler makes, checked against a mocked API server (kube-rs's
//! `tower-test` verifier pattern, as in `controller-rs`): each test runs one reconcile and
//! answers its requests in order, asserting on each.

use super::*;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use lifeboat_api::{ReplicationPolicy, contract};
use lifeboat_core::ManualClock;
use serde_json::{Value, json};
use std::time::SystemTime;
use tower_test::mock;

use crate::context::{Settings, Stores};
use crate::metrics::Metrics;
use crate::probe::TcpProbe;

type Handle = mock::Handle<Request<Body>, Response<Body>>;
type Respond = mock::SendResponse<Response<Body>>;

const NOW: u64 = 1_750_000_000;

/// The mocked API server's side of the conversation.
struct Verifier(Handle);

/// One request: method, path and query, JSON body, and the way to answer it.
struct Call {
    method: Method,
    uri: String,
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

    fn not_found(self, kind: &str) {
        self.answer(
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": format!("{kind} not found")}),
        );
    }
}

impl Verifier {
    /// The next call that is not an Event (Events are answered as created and counted).
    async fn next(&mut self, events: &mut Vec<String>) -> Call {
        loop {
            let (request, respond) =
                tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
                    .await
                    .unwrap_or_else(|_| panic!("no request within 5 s"))
                    .unwrap_or_else(|| panic!("the reconciler stopped calling"));
            let method = request.method().clone();
            let uri = request.uri().to_string();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let call = Call {
                method,
                uri,
                body,
                respond,
            };
            if call.uri.contains("/events") {
                events.push(call.body["reason"].as_str().unwrap_or_default().to_owned());
                let body = call.body.clone();
                call.answer(StatusCode::CREATED, &body);
                continue;
            }
            return call;
        }
    }

    /// No call (but Events) follows.
    async fn done(&mut self, events: &mut Vec<String>) {
        while let Ok(Some((request, respond))) =
            tokio::time::timeout(Duration::from_millis(200), self.0.next_request()).await
        {
            let uri = request.uri().to_string();
            assert!(
                uri.contains("/events"),
                "unexpected call {} {uri}",
                request.method()
            );
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            events.push(body["reason"].as_str().unwrap_or_default().to_owned());
            let response = Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::from(bytes.to_vec()))
                .unwrap_or_else(|e| panic!("{e}"));
            respond.send_response(response);
        }
    }
}

fn vm(value: Value) -> ProtectedVM {
    let mut base = json!({
        "apiVersion": "lifeboat.io/v1alpha1",
        "kind": "ProtectedVM",
        "metadata": {
            "name": "web", "namespace": "ns", "uid": "uid-web", "resourceVersion": "7",
            "generation": 1, "creationTimestamp": "2025-06-15T15:00:00Z",
            "finalizers": [contract::VM_FINALIZER]
        },
        "spec": {
            "vmName": "web", "nodeName": "node-1",
            "hypervisor": {"qemu": {"qmpSocket": "/run/web.qmp"}},
            "disks": [{"name": "os", "path": "/vm/web.qcow2", "blockNode": "os0"}],
            "policyRef": {"name": "gold"}
        }
    });
    json_patch::merge(&mut base, &value);
    serde_json::from_value(base).unwrap_or_else(|e| panic!("{e}"))
}

fn policy() -> ReplicationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1",
        "kind": "ReplicationPolicy",
        "metadata": {"name": "gold", "namespace": "ns", "generation": 2, "resourceVersion": "3"},
        "spec": {"copyFrequency": "5m", "target": {"local": {"path": "/replicas", "shared": true}}}
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn put<K>(writer: &mut Writer<K>, obj: K)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Apply(obj));
}

/// A context over the mocked API server, with a policy in the cache and the agent on
/// `node-1` heartbeating.
fn context(jobs: Vec<ReplicationJob>) -> (Arc<Context>, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (vms, _) = reflector::store::<ProtectedVM>();
    let (job_store, mut job_writer) = reflector::store::<ReplicationJob>();
    for job in jobs {
        put(&mut job_writer, job);
    }
    let (policies, mut policy_writer) = reflector::store::<ReplicationPolicy>();
    put(&mut policy_writer, policy());
    let (leases, mut lease_writer) = reflector::store::<Lease>();
    put(
        &mut lease_writer,
        serde_json::from_value(json!({
            "metadata": {"name": "lifeboat-agent-node-1", "namespace": "lifeboat-system"},
            "spec": {"holderIdentity": "node-1", "renewTime": "2025-06-15T15:06:30.000000Z"}
        }))
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW));
    let ctx = Context::new(
        client,
        Stores {
            vms,
            jobs: job_store,
            policies,
            leases,
            nodes: reflector::store().0,
        },
        Arc::new(Metrics::new()),
        Arc::new(clock),
        Arc::new(TcpProbe::default()),
        Settings {
            heartbeat_namespace: "lifeboat-system".into(),
            job_retention: Duration::from_secs(3600),
        },
    );
    (Arc::new(ctx), Verifier(handle))
}

/// Answer a status write with the VM carrying that status.
fn answer_with_vm(call: Call) {
    let mut answered = serde_json::to_value(vm(json!({}))).unwrap_or_default();
    answered["status"] = call.body["status"].clone();
    call.answer(StatusCode::OK, &answered);
}

fn path(uri: &str) -> &str {
    uri.split('?').next().unwrap_or(uri)
}

#[tokio::test]
async fn a_new_vm_gets_its_finalizer_first_guarded_by_its_version() {
    let (ctx, mut api) = context(vec![]);
    let fresh = vm(json!({"metadata": {"finalizers": null}}));
    let run = tokio::spawn(reconcile(Arc::new(fresh.clone()), Arc::clone(&ctx)));
    let mut events = Vec::new();
    let call = api.next(&mut events).await;
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(
        path(&call.uri),
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/protectedvms/web"
    );
    assert_eq!(
        call.body,
        json!({"metadata": {"finalizers": [contract::VM_FINALIZER], "resourceVersion": "7"}})
    );
    let patched = serde_json::to_value(vm(json!({}))).unwrap_or_default();
    call.answer(StatusCode::OK, &patched);
    let action = run.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(action.ok(), Some(Action::await_change()));
    api.done(&mut events).await;
}

/// Reconcile a VM with no status: returns the status the operator applied.
async fn enable(ctx: &Arc<Context>, api: &mut Verifier, events: &mut Vec<String>) -> Value {
    enable_with_job(ctx, api, events).await.0
}

/// [`enable`], with the job it created as the API server stored it.
async fn enable_with_job(
    ctx: &Arc<Context>,
    api: &mut Verifier,
    events: &mut Vec<String>,
) -> (Value, Value) {
    let run = tokio::spawn(reconcile(Arc::new(vm(json!({}))), Arc::clone(ctx)));
    let create = api.next(events).await;
    assert_eq!(create.method, Method::POST);
    assert_eq!(
        path(&create.uri),
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/replicationjobs"
    );
    assert!(
        create.uri.contains("fieldManager=lifeboat-operator"),
        "{}",
        create.uri
    );
    let job = create.body.clone();
    assert_eq!(job["metadata"]["name"], "web-enable-1");
    assert_eq!(job["metadata"]["labels"]["lifeboat.io/vm"], "web");
    assert_eq!(
        job["metadata"]["labels"]["lifeboat.io/job-type"],
        "EnableProtection"
    );
    assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "uid-web");
    assert_eq!(job["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(job["spec"]["nodeName"], "node-1");
    assert_eq!(job["spec"]["type"], "EnableProtection");
    create.answer(StatusCode::CREATED, &job);

    let status = api.next(events).await;
    assert_eq!(status.method, Method::PATCH);
    assert_eq!(
        path(&status.uri),
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/protectedvms/web/status"
    );
    assert!(status.uri.contains("fieldManager=lifeboat-operator"));
    assert!(status.uri.contains("force=true"));
    let body = status.body.clone();
    assert_eq!(body["apiVersion"], "lifeboat.io/v1alpha1");
    assert_eq!(body["kind"], "ProtectedVM");
    let mut answered = serde_json::to_value(vm(json!({}))).unwrap_or_default();
    answered["status"] = body["status"].clone();
    answered["metadata"]["resourceVersion"] = json!("8");
    status.answer(StatusCode::OK, &answered);
    let action = run
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        action != Action::await_change(),
        "a protected VM is looked at again"
    );
    (body["status"].clone(), job)
}

#[tokio::test]
async fn an_unclaimed_job_is_withdrawn_over_the_version_it_was_seen_in() {
    let (ctx, mut api) = context(vec![]);
    let mut events = Vec::new();
    let (status, mut job) = enable_with_job(&ctx, &mut api, &mut events).await;
    job["metadata"]["resourceVersion"] = json!("5");
    let job: ReplicationJob = serde_json::from_value(job).unwrap_or_else(|e| panic!("{e}"));
    let (ctx, mut api) = context(vec![job]);
    // Protection disabled while the job waits, unclaimed: it is withdrawn, but only as it
    // was seen (an agent that claimed it since keeps it: the delete is refused).
    let disabled = vm(json!({"status": status, "spec": {"protection": "Disabled"},
                             "metadata": {"resourceVersion": "8"}}));
    let run = tokio::spawn(reconcile(Arc::new(disabled), Arc::clone(&ctx)));
    let delete = api.next(&mut events).await;
    assert_eq!(delete.method, Method::DELETE);
    assert_eq!(
        path(&delete.uri),
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/replicationjobs/web-enable-1"
    );
    assert_eq!(delete.body["preconditions"]["resourceVersion"], "5");
    delete.answer(
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Conflict", "code": 409, "message": "Precondition failed"}),
    );
    assert!(
        run.await.is_ok_and(|r| r.is_err()),
        "the pass fails and writes nothing more; the next one decides again"
    );
    api.done(&mut events).await;
}

#[tokio::test]
async fn protection_starts_with_a_job_then_a_status_applied_as_the_operator() {
    let (ctx, mut api) = context(vec![]);
    let mut events = Vec::new();
    let status = enable(&ctx, &mut api, &mut events).await;
    assert_eq!(status["phase"], "EnablingProtection");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["policyGeneration"], 2);
    assert_eq!(status["health"], "Normal");
    assert_eq!(status["healthReason"], "Healthy");
    assert_eq!(status["currentJob"]["name"], "web-enable-1");
    assert_eq!(status["currentJob"]["phase"], "Pending");
    assert!(
        status.get("agent").is_none(),
        "the agent's field is left alone"
    );
    let conditions: Vec<&str> = status["conditions"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        conditions,
        [
            "Protected",
            "InitialReplicationComplete",
            "Replicating",
            "ResyncRequired",
            "Resynchronizing",
            "TestFailoverSucceeded",
            "FailedOver",
            "Ready",
            "Fenced"
        ]
    );
    api.done(&mut events).await;
    assert_eq!(events, ["JobCreated"]);
    assert_eq!(ctx.metrics.status_writes(CONTROLLER), 1);
}

#[tokio::test]
async fn a_reconcile_from_the_status_it_wrote_writes_nothing() {
    let (ctx, mut api) = context(vec![]);
    let mut events = Vec::new();
    let status = enable(&ctx, &mut api, &mut events).await;
    // The job as created, now in the cache; the VM as the write left it.
    let (ctx, mut api) = context(vec![
        serde_json::from_value(json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationJob",
            "metadata": {"name": "web-enable-1", "namespace": "ns"},
            "spec": {"vmRef": {"name": "web"}, "nodeName": "node-1", "type": "EnableProtection"}
        }))
        .unwrap_or_else(|e| panic!("{e}")),
    ]);
    let written = vm(json!({"status": status, "metadata": {"resourceVersion": "8"}}));
    let action = reconcile(Arc::new(written), Arc::clone(&ctx)).await;
    assert!(action.is_ok());
    api.done(&mut events).await;
    assert_eq!(ctx.metrics.status_writes(CONTROLLER), 0);
}

#[tokio::test]
async fn a_job_missing_from_the_cache_is_asked_for_then_taken_as_deleted() {
    let (ctx, mut api) = context(vec![]);
    let mut events = Vec::new();
    let status = enable(&ctx, &mut api, &mut events).await;
    let (ctx, mut api) = context(vec![]);
    let written = vm(json!({"status": status, "metadata": {"resourceVersion": "8"}}));
    let run = tokio::spawn(reconcile(Arc::new(written), Arc::clone(&ctx)));
    let get = api.next(&mut events).await;
    assert_eq!(get.method, Method::GET);
    assert_eq!(
        path(&get.uri),
        "/apis/lifeboat.io/v1alpha1/namespaces/ns/replicationjobs/web-enable-1"
    );
    get.not_found("replicationjobs");
    let apply = api.next(&mut events).await;
    assert_eq!(apply.body["status"]["lastError"]["reason"], "JobDeleted");
    assert_eq!(apply.body["status"]["currentJob"]["phase"], "Failed");
    answer_with_vm(apply);
    assert!(run.await.is_ok_and(|r| r.is_ok()));
    api.done(&mut events).await;
    assert!(events.contains(&"JobFailed".to_owned()), "{events:?}");
}

#[tokio::test]
async fn a_job_that_exists_already_is_adopted_when_it_is_ours_even_finished() {
    let (ctx, mut api) = context(vec![]);
    let run = tokio::spawn(reconcile(Arc::new(vm(json!({}))), Arc::clone(&ctx)));
    let mut events = Vec::new();
    let create = api.next(&mut events).await;
    let mut job = create.body.clone();
    // Created by a reconcile that did not get to write status; the agent was quick.
    job["status"] = json!({"phase": "Succeeded"});
    create.answer(
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "AlreadyExists", "code": 409, "message": "exists"}),
    );
    let get = api.next(&mut events).await;
    assert_eq!(get.method, Method::GET);
    get.answer(StatusCode::OK, &job);
    let apply = api.next(&mut events).await;
    assert_eq!(apply.body["status"]["currentJob"]["name"], "web-enable-1");
    answer_with_vm(apply);
    assert!(run.await.is_ok_and(|r| r.is_ok()));
    api.done(&mut events).await;
}

#[tokio::test]
async fn another_vms_job_of_the_same_name_makes_the_next_name() {
    let (ctx, mut api) = context(vec![]);
    let run = tokio::spawn(reconcile(Arc::new(vm(json!({}))), Arc::clone(&ctx)));
    let mut events = Vec::new();
    let create = api.next(&mut events).await;
    let mut old = create.body.clone();
    old["metadata"]["ownerReferences"][0]["uid"] = json!("uid-of-another-web");
    create.answer(
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "AlreadyExists", "code": 409, "message": "exists"}),
    );
    let get = api.next(&mut events).await;
    get.answer(StatusCode::OK, &old);
    let second = api.next(&mut events).await;
    assert_eq!(second.method, Method::POST);
    assert_eq!(second.body["metadata"]["name"], "web-enable-2");
    let body = second.body.clone();
    second.answer(StatusCode::CREATED, &body);
    let apply = api.next(&mut events).await;
    assert_eq!(apply.body["status"]["currentJob"]["name"], "web-enable-2");
    assert_eq!(apply.body["status"]["currentJob"]["sequence"], 2);
    answer_with_vm(apply);
    assert!(run.await.is_ok_and(|r| r.is_ok()));
    api.done(&mut events).await;
}

#[tokio::test]
async fn a_deleted_vm_that_was_never_protected_lets_go_of_its_finalizer() {
    let (ctx, mut api) = context(vec![]);
    let deleting = vm(json!({"metadata": {"deletionTimestamp": "2025-06-15T15:06:00Z"}}));
    let run = tokio::spawn(reconcile(Arc::new(deleting), Arc::clone(&ctx)));
    let mut events = Vec::new();
    let apply = api.next(&mut events).await;
    assert_eq!(apply.body["status"]["phase"], "Disabled");
    answer_with_vm(apply);
    let release = api.next(&mut events).await;
    assert_eq!(release.method, Method::PATCH);
    assert_eq!(
        release.body,
        json!({"metadata": {"finalizers": [], "resourceVersion": "7"}})
    );
    let released =
        serde_json::to_value(vm(json!({"metadata": {"finalizers": null}}))).unwrap_or_default();
    release.answer(StatusCode::OK, &released);
    assert!(run.await.is_ok_and(|r| r.is_ok()));
    api.done(&mut events).await;
}

#[tokio::test]
async fn a_reconcile_from_a_cache_older_than_the_last_write_waits() {
    let (ctx, mut api) = context(vec![]);
    let mut events = Vec::new();
    enable(&ctx, &mut api, &mut events).await;
    // The same context, the VM as the cache still has it: without the status just written.
    let action = reconcile(Arc::new(vm(json!({}))), Arc::clone(&ctx)).await;
    assert_eq!(action.ok(), Some(Action::requeue(Duration::from_secs(1))));
    api.done(&mut events).await;
    assert_eq!(events, ["JobCreated"], "no second job, no second event");
}

#[tokio::test]
async fn a_failed_status_write_is_an_error_the_policy_retries() {
    let (ctx, mut api) = context(vec![]);
    let run = tokio::spawn(reconcile(Arc::new(vm(json!({}))), Arc::clone(&ctx)));
    let mut events = Vec::new();
    let create = api.next(&mut events).await;
    let job = create.body.clone();
    create.answer(StatusCode::CREATED, &job);
    let apply = api.next(&mut events).await;
    apply.answer(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "InternalError", "code": 500, "message": "etcd is slow"}),
    );
    let error = run
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .unwrap_or_else(|| panic!("expected an error"));
    assert_eq!(error.metric_label(), "apply_status");
    assert!(error.is_recoverable());
    let action = error_policy(Arc::new(vm(json!({}))), &error, Arc::clone(&ctx));
    assert_eq!(action, Action::requeue(RETRY_RECOVERABLE));
    let metrics = ctx.metrics.encode().unwrap_or_default();
    assert!(metrics.contains(
        "lifeboat_reconcile_errors_total{controller=\"ProtectedVM\",error=\"apply_status\"} 1"
    ));
    api.done(&mut events).await;
}
