//! A small Kubernetes API server for tests: a TEST FIXTURE, never shipped, and not a
//! Kubernetes. It serves the few resources Lifeboat uses (its four custom resources, Leases,
//! Events, Jobs) over plain HTTP on a loopback port, with the semantics the controllers depend on:
//!
//! | request | semantics kept |
//! |---|---|
//! | list, get | label selectors (`=`, `!=`, exists), field selectors (`metadata.name`, `spec.nodeName`, ...), list resourceVersion |
//! | watch | from a resourceVersion (replayed from an event log, `410 Expired` when too old), or from now with the current objects as ADDED; `timeoutSeconds` |
//! | create | `AlreadyExists`, uid, creationTimestamp, generation 1, status dropped where a status subresource exists |
//! | put, merge patch, JSON patch | resourceVersion preconditions (409 `Conflict`), generation bumped on spec changes only |
//! | server-side apply | per field manager ownership: fields a manager stops applying are removed, conflicts without `force` are 409 |
//! | status subresource | `/status` writes change status only; the main endpoint ignores status |
//! | delete | finalizers hold an object with a deletionTimestamp; owner references cascade; DeleteOptions' `preconditions.resourceVersion` (409 `Conflict`) |
//!
//! What it leaves out: authentication, admission and schema validation (the CRD schema is
//! checked offline by `lifeboat validate` and the manifest tests), strategic merge (treated as
//! a merge patch), list pagination (everything comes in one page, which clients accept),
//! bookmarks, and a list-map merge of lists under server-side apply (lists are atomic).
//!
//! ```text
//!  kube::Client ──HTTP──> route ──> State (objects, managers, rv counter, event log)
//!                                        └── broadcast ──> watch streams (one per request)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

/// A resource the server knows.
#[derive(Clone, Copy, Debug)]
struct Kind {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    status_subresource: bool,
}

const KINDS: [Kind; 12] = [
    Kind {
        group: "lifeboat.io",
        version: "v1alpha1",
        plural: "protectedvms",
        kind: "ProtectedVM",
        status_subresource: true,
    },
    Kind {
        group: "lifeboat.io",
        version: "v1alpha1",
        plural: "replicationpolicies",
        kind: "ReplicationPolicy",
        status_subresource: true,
    },
    Kind {
        group: "lifeboat.io",
        version: "v1alpha1",
        plural: "replicationjobs",
        kind: "ReplicationJob",
        status_subresource: true,
    },
    Kind {
        group: "lifeboat.io",
        version: "v1alpha1",
        plural: "recoveryplans",
        kind: "RecoveryPlan",
        status_subresource: true,
    },
    Kind {
        group: "batch",
        version: "v1",
        plural: "jobs",
        kind: "Job",
        status_subresource: true,
    },
    Kind {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        status_subresource: false,
    },
    Kind {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        status_subresource: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        status_subresource: false,
    },
    // A recovered VM's definition applied from a template (examples/recovered-vm-kubevirt.yaml).
    Kind {
        group: "kubevirt.io",
        version: "v1",
        plural: "virtualmachines",
        kind: "VirtualMachine",
        status_subresource: true,
    },
];

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// A field path: object keys from the root.
type Path = Vec<String>;

/// What one field manager owns in one object.
#[derive(Clone, Debug)]
struct Manager {
    name: String,
    /// `Some("status")` for writes through the status subresource.
    subresource: Option<String>,
    /// Server-side apply (true) or another write (an "Update").
    apply: bool,
    fields: BTreeSet<Path>,
}

#[derive(Clone, Debug)]
struct Stored {
    object: Value,
    managers: Vec<Manager>,
}

/// A watch event, serialized once for every watcher.
#[derive(Debug)]
struct WatchEvent {
    rv: u64,
    plural: &'static str,
    namespace: String,
    object: Value,
    line: Bytes,
}

/// Writes counted by resource, subresource and field manager.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteKey {
    /// The resource's plural.
    pub plural: String,
    /// `status` or empty.
    pub subresource: String,
    /// The field manager (`unknown` when none was given).
    pub manager: String,
}

#[derive(Debug)]
struct Inner {
    events: broadcast::Sender<Arc<WatchEvent>>,
    rv: u64,
    uid: u64,
    objects: BTreeMap<(&'static str, String, String), Stored>,
    log: VecDeque<Arc<WatchEvent>>,
    writes: HashMap<WriteKey, u64>,
}

/// How many watch events are kept for watches that resume from a resourceVersion.
const LOG_CAPACITY: usize = 200_000;

#[derive(Debug)]
struct State {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// Every request received, in the authorizer's terms (see [`crate::requests`]).
    requests: Mutex<Vec<crate::requests::ApiRequest>>,
}

/// The running fixture. Dropping it stops it.
#[derive(Debug)]
pub struct TestApiServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(full(serde_json::to_vec(body).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn failure(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(
        status,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": status.as_u16(),
        }),
    )
}

fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", now).unwrap_or_default()
}

// ---- field paths ----

/// Paths the API server owns: never part of a manager's fields.
fn is_server_field(path: &[String]) -> bool {
    matches!(
        path.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["apiVersion"]
            | ["kind"]
            | ["metadata", "name"]
            | ["metadata", "namespace"]
            | ["metadata", "resourceVersion"]
            | ["metadata", "uid"]
            | ["metadata", "creationTimestamp"]
            | ["metadata", "generation"]
            | ["metadata", "managedFields"]
            | ["metadata", "deletionTimestamp"]
    )
}

fn leaves(value: &Value, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                prefix.push(key.clone());
                leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            if !prefix.is_empty() && !is_server_field(prefix) {
                out.insert(prefix.clone());
            }
        }
    }
}

fn leaf_paths(value: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    leaves(value, &mut Vec::new(), &mut out);
    out
}

fn get_path<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn set_path(value: &mut Value, path: &[String], new: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = value;
    for key in parents {
        if !at.get(key).is_some_and(Value::is_object)
            && let Some(map) = at.as_object_mut()
        {
            map.insert(key.clone(), Value::Object(Map::new()));
        }
        let Some(next) = at.get_mut(key) else {
            return;
        };
        at = next;
    }
    if let Some(map) = at.as_object_mut() {
        map.insert(last.clone(), new);
    }
}

fn remove_path(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = value;
    for key in parents {
        let Some(next) = at.get_mut(key) else {
            return;
        };
        at = next;
    }
    if let Some(map) = at.as_object_mut() {
        map.remove(last);
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The paths whose value differs between `old` and `new` (added, changed or removed leaves).
fn changed_paths(old: &Value, new: &Value) -> BTreeSet<Path> {
    let (a, b) = (leaf_paths(old), leaf_paths(new));
    a.union(&b)
        .filter(|p| get_path(old, p) != get_path(new, p))
        .cloned()
        .collect()
}

fn fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Value::Object(Map::new());
    for path in paths {
        let keyed: Vec<String> = path.iter().map(|k| format!("f:{k}")).collect();
        set_path(&mut root, &keyed, json!({}));
    }
    root
}

// ---- selectors ----

fn label_selector_matches(selector: &str, object: &Value) -> bool {
    let labels = object.pointer("/metadata/labels");
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(term.trim()).is_some()
        }
    })
}

fn field_selector_matches(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (path, want, equal) = match term.split_once("!=") {
            Some((p, v)) => (p, v, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((p, v)) => (p, v, true),
                None => return false,
            },
        };
        let pointer = format!("/{}", path.trim().replace('.', "/"));
        let value = object
            .pointer(&pointer)
            .and_then(Value::as_str)
            .unwrap_or_default();
        (value == want.trim()) == equal
    })
}

// ---- requests ----

/// A parsed URL path.
#[derive(Debug)]
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return None,
    };
    let kind = KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)?;
    Some(Target {
        kind: *kind,
        namespace,
        name,
        subresource,
    })
}

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| {
            let decoded = percent_decode(v);
            (k.to_owned(), decoded)
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Store `object` (or delete it, when `None`) under a new resourceVersion and tell the
    /// watchers.
    fn commit(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        kind: Kind,
        key: (&'static str, String, String),
        stored: Option<Stored>,
        event_type: &str,
    ) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let mut object = match &stored {
            Some(s) => s.object.clone(),
            None => self
                .objects
                .get(&key)
                .map(|s| s.object.clone())
                .unwrap_or(Value::Null),
        };
        set_path(
            &mut object,
            &["metadata".into(), "resourceVersion".into()],
            json!(rv.to_string()),
        );
        let mut with_fields = object.clone();
        match stored {
            Some(mut s) => {
                s.object = object.clone();
                let managed: Vec<Value> = s
                    .managers
                    .iter()
                    .filter(|m| !m.fields.is_empty())
                    .map(|m| {
                        let mut entry = json!({
                            "manager": m.name,
                            "operation": if m.apply { "Apply" } else { "Update" },
                            "apiVersion": kind.api_version(),
                            "time": now_rfc3339(),
                            "fieldsType": "FieldsV1",
                            "fieldsV1": fields_v1(&m.fields),
                        });
                        if let Some(sub) = &m.subresource {
                            entry["subresource"] = json!(sub);
                        }
                        entry
                    })
                    .collect();
                set_path(
                    &mut with_fields,
                    &["metadata".into(), "managedFields".into()],
                    Value::Array(managed),
                );
                s.object = with_fields.clone();
                self.objects.insert(key.clone(), s);
            }
            None => {
                self.objects.remove(&key);
            }
        }
        let line = serde_json::to_vec(&json!({"type": event_type, "object": with_fields}))
            .map(|mut v| {
                v.push(b'\n');
                Bytes::from(v)
            })
            .unwrap_or_default();
        let event = Arc::new(WatchEvent {
            rv,
            plural: kind.plural,
            namespace: key.1.clone(),
            object: with_fields.clone(),
            line,
        });
        self.log.push_back(Arc::clone(&event));
        if self.log.len() > LOG_CAPACITY {
            self.log.pop_front();
        }
        let _ = events.send(event);
        with_fields
    }

    fn count_write(&mut self, kind: Kind, subresource: Option<&str>, manager: &str) {
        *self
            .writes
            .entry(WriteKey {
                plural: kind.plural.into(),
                subresource: subresource.unwrap_or_default().into(),
                manager: manager.into(),
            })
            .or_default() += 1;
    }
}

/// The generation after a change from `old` to `new`: bumped when anything but metadata (and
/// status, where a status subresource exists) changed.
fn next_generation(kind: Kind, old: &Value, new: &Value) -> i64 {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("metadata");
            if kind.status_subresource {
                map.remove("status");
            }
        }
        v
    };
    let generation = old
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    if strip(old) != strip(new) {
        generation + 1
    } else {
        generation
    }
}

/// Keep what a write may change: only status through `/status`; everything but status
/// through the main endpoint of a kind with a status subresource.
fn scope_write(kind: Kind, subresource: Option<&str>, old: &Value, new: &mut Value) {
    let keep = |from: &Value, into: &mut Value, key: &str| {
        if let Some(map) = into.as_object_mut() {
            match from.get(key) {
                Some(v) => {
                    map.insert(key.into(), v.clone());
                }
                None => {
                    map.remove(key);
                }
            }
        }
    };
    match subresource {
        Some("status") => {
            for key in ["spec", "metadata"] {
                keep(old, new, key);
            }
            // Everything at the top level but status comes from the old object.
            if let (Some(old_map), Some(new_map)) = (old.as_object(), new.as_object_mut()) {
                new_map.retain(|k, _| k == "status" || old_map.contains_key(k));
                for (k, v) in old_map {
                    if k != "status" {
                        new_map.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ if kind.status_subresource => keep(old, new, "status"),
        _ => {}
    }
    // The server's own metadata always survives a write.
    for field in [
        "uid",
        "creationTimestamp",
        "generation",
        "deletionTimestamp",
        "name",
        "namespace",
    ] {
        match old.pointer(&format!("/metadata/{field}")) {
            Some(v) => set_path(new, &["metadata".into(), field.into()], v.clone()),
            None => remove_path(new, &["metadata".into(), field.into()]),
        }
    }
}

fn in_scope(subresource: Option<&str>, kind: Kind, path: &[String]) -> bool {
    match subresource {
        Some("status") => path.first().is_some_and(|k| k == "status"),
        _ if kind.status_subresource => path.first().is_none_or(|k| k != "status"),
        _ => true,
    }
}

enum Outcome {
    Ok(Value),
    Created(Value),
    Fail(StatusCode, &'static str, String),
}

impl TestApiServer {
    /// Start on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the test API server: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("test API server address: {e}"));
        let (events, _) = broadcast::channel(65_536);
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                events: events.clone(),
                rv: 0,
                uid: 0,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                writes: HashMap::new(),
            }),
            events,
            requests: Mutex::new(Vec::new()),
        });
        let serving = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for it, with `namespace` as the default namespace.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let url = self.url().parse().unwrap_or_else(|e| panic!("{e}"));
        let mut config = kube::Config::new(url);
        config.default_namespace = namespace.to_owned();
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"))
    }

    /// A kubeconfig file that points at the server, for a process of its own.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\nusers:\n- name: test\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// Writes so far, by resource, subresource and field manager.
    pub fn writes(&self) -> BTreeMap<WriteKey, u64> {
        self.state
            .lock()
            .writes
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Every request so far, in the authorizer's terms: who (`Impersonate-User`, else
    /// `User-Agent`), verb, resource, subresource, namespace, name. Requests for resources the
    /// server does not serve (ConfigMaps, say) are recorded too, then answered 404.
    pub fn requests(&self) -> Vec<crate::requests::ApiRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Writes so far of `plural`'s `subresource` (empty: the main resource) by `manager`.
    pub fn writes_by(&self, plural: &str, subresource: &str, manager: &str) -> u64 {
        let key = WriteKey {
            plural: plural.into(),
            subresource: subresource.into(),
            manager: manager.into(),
        };
        self.state.lock().writes.get(&key).copied().unwrap_or(0)
    }

    /// The stored object, as a client would get it.
    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.state.lock();
        inner
            .objects
            .iter()
            .find(|((p, ns, n), _)| *p == plural && ns == namespace && n == name)
            .map(|(_, s)| s.object.clone())
    }

    /// How many objects of `plural` exist.
    pub fn count(&self, plural: &str) -> usize {
        self.state
            .lock()
            .objects
            .keys()
            .filter(|(p, _, _)| *p == plural)
            .count()
    }
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let params = query(&uri);
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Some(seen) = crate::requests::api_request(&method, &uri, request.headers()) {
        state
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(seen);
    }
    let Some(target) = parse_target(uri.path()) else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no such path {}", uri.path()),
        );
    };
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let parsed: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("body is not JSON: {e}"),
                );
            }
        }
    };
    let manager = params
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let outcome = match (&method, &target.name) {
        (&Method::GET, None) if params.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            return watch(state, &target, &params);
        }
        (&Method::GET, None) => Outcome::Ok(list(state, &target, &params)),
        (&Method::GET, Some(name)) => get(state, &target, name),
        (&Method::POST, None) => create(state, &target, parsed.unwrap_or(Value::Null), &manager),
        (&Method::PUT, Some(name)) => update(state, &target, name, &manager, |_, _| {
            parsed
                .clone()
                .ok_or((StatusCode::BAD_REQUEST, "BadRequest", "no body".into()))
        }),
        (&Method::PATCH, Some(name)) => {
            let patch = parsed.unwrap_or(Value::Null);
            if content_type.starts_with("application/apply-patch") {
                let force = params.get("force").is_some_and(|f| f == "true");
                apply(state, &target, name, &manager, patch, force)
            } else if content_type.starts_with("application/json-patch") {
                update(state, &target, name, &manager, |old, _| {
                    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                        .map_err(|e| (StatusCode::BAD_REQUEST, "BadRequest", e.to_string()))?;
                    let mut new = old.clone();
                    json_patch::patch(&mut new, &ops).map_err(|e| {
                        (StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string())
                    })?;
                    Ok(new)
                })
            } else {
                update(state, &target, name, &manager, |old, _| {
                    let mut new = old.clone();
                    json_patch::merge(&mut new, &patch);
                    // A merge patch may name the resourceVersion it was made from.
                    if let Some(rv) = patch.pointer("/metadata/resourceVersion") {
                        set_path(
                            &mut new,
                            &["metadata".into(), "resourceVersion".into()],
                            rv.clone(),
                        );
                    } else {
                        let current = old
                            .pointer("/metadata/resourceVersion")
                            .cloned()
                            .unwrap_or(Value::Null);
                        set_path(
                            &mut new,
                            &["metadata".into(), "resourceVersion".into()],
                            current,
                        );
                    }
                    Ok(new)
                })
            }
        }
        (&Method::DELETE, Some(name)) => delete(state, &target, name, parsed.as_ref()),
        _ => Outcome::Fail(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {}", uri.path()),
        ),
    };
    match outcome {
        Outcome::Ok(v) => respond(StatusCode::OK, &v),
        Outcome::Created(v) => respond(StatusCode::CREATED, &v),
        Outcome::Fail(status, reason, message) => failure(status, reason, &message),
    }
}

fn key_of(target: &Target, name: &str) -> (&'static str, String, String) {
    (
        target.kind.plural,
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    )
}

fn matches_request(
    target: &Target,
    params: &HashMap<String, String>,
    namespace: &str,
    object: &Value,
) -> bool {
    target.namespace.as_deref().is_none_or(|ns| ns == namespace)
        && params
            .get("labelSelector")
            .is_none_or(|s| label_selector_matches(s, object))
        && params
            .get("fieldSelector")
            .is_none_or(|s| field_selector_matches(s, object))
}

fn list(state: &State, target: &Target, params: &HashMap<String, String>) -> Value {
    let inner = state.lock();
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((plural, ns, _), s)| {
            *plural == target.kind.plural && matches_request(target, params, ns, &s.object)
        })
        .map(|(_, s)| s.object.clone())
        .collect();
    json!({
        "apiVersion": target.kind.api_version(),
        "kind": format!("{}List", target.kind.kind),
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    })
}

fn get(state: &State, target: &Target, name: &str) -> Outcome {
    match state.lock().objects.get(&key_of(target, name)) {
        Some(s) => Outcome::Ok(s.object.clone()),
        None => not_found(target, name),
    }
}

fn not_found(target: &Target, name: &str) -> Outcome {
    Outcome::Fail(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "{}.{} \"{name}\" not found",
            target.kind.plural, target.kind.group
        ),
    )
}

fn create(state: &State, target: &Target, mut object: Value, manager: &str) -> Outcome {
    let namespace = target.namespace.clone().unwrap_or_default();
    let mut inner = state.lock();
    let name = match object.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) => name.to_owned(),
        None => match object
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
        {
            Some(prefix) => format!("{prefix}{:05x}", inner.rv + 1),
            None => {
                return Outcome::Fail(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value".into(),
                );
            }
        },
    };
    let key = key_of(target, &name);
    if inner.objects.contains_key(&key) {
        return Outcome::Fail(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!(
                "{}.{} \"{name}\" already exists",
                target.kind.plural, target.kind.group
            ),
        );
    }
    inner.uid += 1;
    let uid = format!("00000000-0000-4000-8000-{:012x}", inner.uid);
    if target.kind.status_subresource
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    for (field, value) in [
        ("name", json!(name)),
        ("namespace", json!(namespace)),
        ("uid", json!(uid)),
        ("creationTimestamp", json!(now_rfc3339())),
        ("generation", json!(1)),
    ] {
        set_path(&mut object, &["metadata".into(), field.into()], value);
    }
    object["apiVersion"] = json!(target.kind.api_version());
    object["kind"] = json!(target.kind.kind);
    let fields = leaf_paths(&object);
    inner.count_write(target.kind, None, manager);
    let stored = Stored {
        object,
        managers: vec![Manager {
            name: manager.to_owned(),
            subresource: None,
            apply: false,
            fields,
        }],
    };
    let events = state.events.clone();
    Outcome::Created(inner.commit(&events, target.kind, key, Some(stored), "ADDED"))
}

/// Finish a write: precondition, scope, generation, ownership, deletion once the last
/// finalizer is gone.
fn finish_write(
    inner: &mut Inner,
    target: &Target,
    key: (&'static str, String, String),
    old: Stored,
    mut new: Value,
    manager: &str,
    apply_fields: Option<BTreeSet<Path>>,
) -> Outcome {
    let sub = target.subresource.as_deref();
    let current_rv = old.object.pointer("/metadata/resourceVersion").cloned();
    if let Some(rv) = new
        .pointer("/metadata/resourceVersion")
        .filter(|rv| !rv.is_null())
        && Some(rv) != current_rv.as_ref()
    {
        {
            return Outcome::Fail(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    target.kind.plural, target.kind.group, key.2
                ),
            );
        }
    }
    scope_write(target.kind, sub, &old.object, &mut new);
    let generation = next_generation(target.kind, &old.object, &new);
    set_path(
        &mut new,
        &["metadata".into(), "generation".into()],
        json!(generation),
    );
    if let Some(map) = new.pointer_mut("/metadata").and_then(Value::as_object_mut) {
        map.remove("managedFields");
    }
    let mut stored = old.clone();
    let changed: BTreeSet<Path> = changed_paths(&old.object, &new)
        .into_iter()
        .filter(|p| !is_server_field(p))
        .collect();
    let subresource = sub.map(str::to_owned);
    match apply_fields {
        Some(fields) => {
            // Server-side apply: this manager now owns exactly what it applied.
            for m in &mut stored.managers {
                if m.name != manager || m.subresource != subresource || !m.apply {
                    m.fields.retain(|f| {
                        !fields.iter().any(|p| {
                            overlaps(p, f) && get_path(&old.object, f) != get_path(&new, f)
                        })
                    });
                }
            }
            match stored
                .managers
                .iter_mut()
                .find(|m| m.name == manager && m.subresource == subresource && m.apply)
            {
                Some(m) => m.fields = fields,
                None => stored.managers.push(Manager {
                    name: manager.to_owned(),
                    subresource,
                    apply: true,
                    fields,
                }),
            }
        }
        None => {
            // Another write: the changed fields move to this manager.
            for m in &mut stored.managers {
                m.fields.retain(|f| !changed.iter().any(|p| overlaps(p, f)));
            }
            let leaves_now = leaf_paths(&new);
            let owned: BTreeSet<Path> = changed
                .into_iter()
                .filter(|p| leaves_now.contains(p))
                .collect();
            match stored
                .managers
                .iter_mut()
                .find(|m| m.name == manager && m.subresource == subresource && !m.apply)
            {
                Some(m) => m.fields.extend(owned),
                None => stored.managers.push(Manager {
                    name: manager.to_owned(),
                    subresource,
                    apply: false,
                    fields: owned,
                }),
            }
        }
    }
    stored.object = new;
    inner.count_write(target.kind, sub, manager);
    let events = inner.events.clone();
    let released = stored
        .object
        .pointer("/metadata/deletionTimestamp")
        .is_some()
        && stored
            .object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
    if released {
        let object = inner.commit(&events, target.kind, key.clone(), Some(stored), "MODIFIED");
        inner.commit(&events, target.kind, key.clone(), None, "DELETED");
        cascade(inner, &events, &object);
        return Outcome::Ok(object);
    }
    Outcome::Ok(inner.commit(&events, target.kind, key, Some(stored), "MODIFIED"))
}

type WriteError = (StatusCode, &'static str, String);

fn update(
    state: &State,
    target: &Target,
    name: &str,
    manager: &str,
    make: impl FnOnce(&Value, &Target) -> Result<Value, WriteError>,
) -> Outcome {
    let key = key_of(target, name);
    let mut inner = state.lock();
    let Some(old) = inner.objects.get(&key).cloned() else {
        return not_found(target, name);
    };
    let new = match make(&old.object, target) {
        Ok(new) => new,
        Err((status, reason, message)) => return Outcome::Fail(status, reason, message),
    };
    finish_write(&mut inner, target, key, old, new, manager, None)
}

fn apply(
    state: &State,
    target: &Target,
    name: &str,
    manager: &str,
    applied: Value,
    force: bool,
) -> Outcome {
    if manager == "unknown" {
        return Outcome::Fail(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "fieldManager is required for apply".into(),
        );
    }
    let key = key_of(target, name);
    let sub = target.subresource.as_deref();
    let mut inner = state.lock();
    let Some(old) = inner.objects.get(&key).cloned() else {
        drop(inner);
        if sub.is_some() {
            return not_found(target, name);
        }
        return match create(state, target, applied, manager) {
            Outcome::Created(v) => Outcome::Created(v),
            other => other,
        };
    };
    let fields: BTreeSet<Path> = leaf_paths(&applied)
        .into_iter()
        .filter(|p| in_scope(sub, target.kind, p))
        .collect();
    let subresource = sub.map(str::to_owned);
    // Conflicts: another manager owns a field this apply would change.
    if !force {
        let conflicts: Vec<String> = old
            .managers
            .iter()
            .filter(|m| !(m.name == manager && m.subresource == subresource))
            .flat_map(|m| {
                m.fields
                    .iter()
                    .filter(|f| {
                        fields.iter().any(|p| {
                            overlaps(p, f) && get_path(&applied, p) != get_path(&old.object, p)
                        })
                    })
                    .map(move |f| format!("conflict with \"{}\": .{}", m.name, f.join(".")))
            })
            .collect();
        if !conflicts.is_empty() {
            return Outcome::Fail(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Apply failed with {} conflicts: {}",
                    conflicts.len(),
                    conflicts.join("; ")
                ),
            );
        }
    }
    let mut new = old.object.clone();
    // Fields this manager applied before and applies no more go, unless another owns them.
    if let Some(previous) = old
        .managers
        .iter()
        .find(|m| m.name == manager && m.subresource == subresource && m.apply)
    {
        for gone in previous.fields.difference(&fields) {
            let owned_elsewhere = old
                .managers
                .iter()
                .filter(|m| !(m.name == manager && m.subresource == subresource && m.apply))
                .any(|m| m.fields.iter().any(|f| overlaps(f, gone)));
            if !owned_elsewhere {
                remove_path(&mut new, gone);
                // A map left empty by the removal goes too (as the API server's does).
                let mut parent = gone.clone();
                while parent.pop().is_some() && !parent.is_empty() {
                    if get_path(&new, &parent)
                        .is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
                    {
                        remove_path(&mut new, &parent);
                    } else {
                        break;
                    }
                }
            }
        }
    }
    for path in &fields {
        if let Some(value) = get_path(&applied, path) {
            set_path(&mut new, path, value.clone());
        }
    }
    // The apply body's resourceVersion, if any, is a precondition.
    match applied.pointer("/metadata/resourceVersion") {
        Some(rv) => set_path(
            &mut new,
            &["metadata".into(), "resourceVersion".into()],
            rv.clone(),
        ),
        None => remove_path(&mut new, &["metadata".into(), "resourceVersion".into()]),
    }
    finish_write(&mut inner, target, key, old, new, manager, Some(fields))
}

fn cascade(inner: &mut Inner, events: &broadcast::Sender<Arc<WatchEvent>>, owner: &Value) {
    let Some(uid) = owner.pointer("/metadata/uid").and_then(Value::as_str) else {
        return;
    };
    let dependents: Vec<_> = inner
        .objects
        .iter()
        .filter(|(_, s)| {
            s.object
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in dependents {
        let Some(kind) = KINDS.iter().find(|k| k.plural == key.0).copied() else {
            continue;
        };
        if let Some(removed) = inner.objects.get(&key).map(|s| s.object.clone()) {
            inner.commit(events, kind, key, None, "DELETED");
            cascade(inner, events, &removed);
        }
    }
}

fn delete(state: &State, target: &Target, name: &str, options: Option<&Value>) -> Outcome {
    let key = key_of(target, name);
    let mut inner = state.lock();
    let Some(mut stored) = inner.objects.get(&key).cloned() else {
        return not_found(target, name);
    };
    // DeleteOptions' preconditions: the object as it was at that resourceVersion only.
    let wanted = options.and_then(|o| o.pointer("/preconditions/resourceVersion"));
    if let Some(wanted) = wanted.filter(|v| !v.is_null())
        && stored.object.pointer("/metadata/resourceVersion") != Some(wanted)
    {
        return Outcome::Fail(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Precondition failed: resourceVersion {wanted} does not match"),
        );
    }
    let events = state.events.clone();
    let has_finalizers = stored
        .object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    inner.count_write(target.kind, None, "delete");
    if has_finalizers {
        if stored
            .object
            .pointer("/metadata/deletionTimestamp")
            .is_none()
        {
            set_path(
                &mut stored.object,
                &["metadata".into(), "deletionTimestamp".into()],
                json!(now_rfc3339()),
            );
            let generation = stored
                .object
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            set_path(
                &mut stored.object,
                &["metadata".into(), "generation".into()],
                json!(generation + 1),
            );
            return Outcome::Ok(inner.commit(&events, target.kind, key, Some(stored), "MODIFIED"));
        }
        return Outcome::Ok(stored.object);
    }
    let object = inner.commit(&events, target.kind, key, None, "DELETED");
    cascade(&mut inner, &events, &object);
    Outcome::Ok(object)
}

fn watch(state: &State, target: &Target, params: &HashMap<String, String>) -> Response<Body> {
    let mut live = state.events.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let from = params.get("resourceVersion").cloned().unwrap_or_default();
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let kind = target.kind;
    let namespace = target.namespace.clone();
    let filter_target = Target {
        kind,
        namespace: namespace.clone(),
        name: None,
        subresource: None,
    };
    let params = params.clone();
    let (backlog, mut sent_up_to, expired) = {
        let inner = state.lock();
        match from.parse::<u64>() {
            Ok(rv) if rv > 0 => {
                let oldest = inner.log.front().map_or(inner.rv + 1, |e| e.rv);
                if rv + 1 < oldest {
                    (Vec::new(), inner.rv, true)
                } else {
                    let backlog = inner
                        .log
                        .iter()
                        .filter(|e| e.rv > rv && e.plural == kind.plural)
                        .filter(|e| {
                            matches_request(&filter_target, &params, &e.namespace, &e.object)
                        })
                        .map(|e| e.line.clone())
                        .collect();
                    (backlog, inner.rv, false)
                }
            }
            _ => {
                let backlog = inner
                    .objects
                    .iter()
                    .filter(|((p, ns, _), s)| {
                        *p == kind.plural && matches_request(&filter_target, &params, ns, &s.object)
                    })
                    .map(|(_, s)| {
                        let mut line =
                            serde_json::to_vec(&json!({"type": "ADDED", "object": s.object}))
                                .unwrap_or_default();
                        line.push(b'\n');
                        Bytes::from(line)
                    })
                    .collect();
                (backlog, inner.rv, false)
            }
        }
    };
    tokio::spawn(async move {
        let expired_line = || {
            let mut line = serde_json::to_vec(&json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                "code": 410, "message": "too old resource version"}}))
            .unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        };
        if expired {
            let _ = tx.send(expired_line()).await;
            return;
        }
        for line in backlog {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return,
                event = live.recv() => match event {
                    Ok(event) => {
                        if event.rv <= sent_up_to || event.plural != kind.plural
                            || !matches_request(&filter_target, &params, &event.namespace, &event.object) {
                            continue;
                        }
                        sent_up_to = event.rv;
                        if tx.send(event.line.clone()).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(expired_line()).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream.boxed())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let object = json!({"metadata": {"name": "a", "labels": {"app": "x", "tier": "db"}}, "spec": {"nodeName": "n1"}});
        assert!(label_selector_matches("app=x", &object));
        assert!(label_selector_matches("app==x,tier", &object));
        assert!(!label_selector_matches("app!=x", &object));
        assert!(label_selector_matches("!missing", &object));
        assert!(field_selector_matches("spec.nodeName=n1", &object));
        assert!(field_selector_matches("metadata.name!=b", &object));
        assert!(!field_selector_matches("spec.nodeName=n2", &object));
    }

    #[test]
    fn paths_and_fields() {
        let parsed =
            parse_target("/apis/lifeboat.io/v1alpha1/namespaces/ns/protectedvms/web/status");
        assert!(parsed.is_some_and(
            |t| t.kind.kind == "ProtectedVM" && t.subresource.as_deref() == Some("status")
        ));
        assert!(
            parse_target("/apis/lifeboat.io/v1alpha1/protectedvms")
                .is_some_and(|t| t.namespace.is_none())
        );
        assert!(parse_target("/api/v1/namespaces/x").is_some_and(|t| t.kind.kind == "Namespace"));
        assert_eq!(percent_decode("a%3Db%2Cc"), "a=b,c");
        let v = json!({"status": {"a": 1, "b": {"c": 2}}, "metadata": {"name": "x"}});
        let fields = leaf_paths(&v);
        assert!(fields.contains(&vec!["status".to_owned(), "b".to_owned(), "c".to_owned()]));
        assert!(!fields.contains(&vec!["metadata".to_owned(), "name".to_owned()]));
    }
}
