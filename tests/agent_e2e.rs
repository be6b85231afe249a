//! End to end: the real cluster agent and the real operator against the test API server
//! (`lifeboat-tests`' fixture), protecting a VM whose block layer is a real
//! `qemu-storage-daemon`, replicating to the local folder store. Nothing is scripted: the
//! operator creates the jobs, the agent claims and runs them on the engine, and the VM ends
//! Protected with a recovery point. One test replicates to a real Azurite instead, with a
//! storage key from a Secret that is rotated while the agent runs. One runs the recovery life
//! cycle on two nodes' agents and Azurite: failover, re-protect in reverse, failback,
//! re-protect forward.
//!
//! ```text
//!  test ──create policy, VM──> TestApiServer <──watch, claim, status, SSA, Lease── agent ──QMP/NBD──> qsd
//!                                   ^                                               └──> local store
//!                                   └──────── operator (jobs, phase, health) ───────┘
//! ```

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_agent::cluster::Metrics;
use lifeboat_agent::cluster::{Agent, AgentOptions, Timing};
use lifeboat_api::job::JobPhase;
use lifeboat_api::{ProtectedVM, ProtectionPhase, ReplicationJob, ReplicationPolicy};
use lifeboat_operator::{Config, Operator};
use lifeboat_qemu::testing::Qsd;
use lifeboat_store::testing::{Azurite, DEV_KEY, shared_key_store, test_options};
use lifeboat_tests::apiserver::TestApiServer;
use lifeboat_tests::eventually;
use serde_json::json;

const NS: &str = "e2e";
const LEASES: &str = "lifeboat-system";
const NODE: &str = "node-1";

type Stopper = tokio::sync::oneshot::Sender<()>;
type OperatorTask = tokio::task::JoinHandle<lifeboat_operator::Result<()>>;
type AgentTask = tokio::task::JoinHandle<Result<(), lifeboat_agent::cluster::ClusterError>>;

fn run_operator(client: &Client) -> (Stopper, OperatorTask) {
    run_operator_on(client, Arc::new(lifeboat_core::SystemClock))
}

/// The operator, reading the time from `clock`.
fn run_operator_on(
    client: &Client,
    clock: Arc<dyn lifeboat_core::Clock>,
) -> (Stopper, OperatorTask) {
    let config = Config {
        namespace: Some(NS.into()),
        lease_namespace: LEASES.into(),
        ..Config::default()
    };
    let operator = Operator::new(client.clone(), config).with_clock(clock);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// The agent of `node-1`, its state under `dir`, running until the sender is used.
fn run_agent(client: &Client, dir: &Path, timing: Timing) -> (Arc<Metrics>, Stopper, AgentTask) {
    run_agent_on(client, NODE, dir, timing)
}

/// The agent of `node`, its state under `dir`.
fn run_agent_on(
    client: &Client,
    node: &str,
    dir: &Path,
    timing: Timing,
) -> (Arc<Metrics>, Stopper, AgentTask) {
    let mut options = AgentOptions::new(node);
    options.pod_name = "lifeboat-agent-e2e".into();
    options.namespace = Some(NS.into());
    options.lease_namespace = LEASES.into();
    options.state_dir = dir.join("state");
    options.failover_dir = dir.join("failover");
    options.health_addr = None;
    options.timing = timing;
    let agent = Agent::new(client.clone(), options).unwrap();
    let metrics = agent.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));
    (metrics, stop, task)
}

/// Stop the agent as SIGTERM does and wait up to `seconds` for it to end by itself, without
/// an error.
async fn stop_agent_cleanly(stop: Stopper, agent: AgentTask, seconds: u64) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(seconds), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Stop the operator and give it 10 s to end.
async fn stop_operator_within_10s(stop: Stopper, operator: OperatorTask) {
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
}

/// Policy `gold` with `spec`, and VM `web` on `node-1` with its `os` disk in `qsd`.
async fn create_policy_and_vm(client: &Client, qsd: &Qsd, spec: serde_json::Value) -> ProtectedVM {
    let policies: Api<ReplicationPolicy> = Api::namespaced(client.clone(), NS);
    let policy: ReplicationPolicy = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold"},
        "spec": spec
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    let vm: ProtectedVM = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
        "metadata": {"name": "web"},
        "spec": {
            "vmName": "web", "nodeName": NODE,
            "hypervisor": {"qemu": {"qmpSocket": qsd.qmp.display().to_string()}},
            "disks": [{"name": "os", "path": qsd.dir.join("os.qcow2").display().to_string(), "blockNode": "os"}],
            "policyRef": {"name": "gold"}
        }
    }))
    .unwrap();
    vms.create(&PostParams::default(), &vm).await.unwrap()
}

fn protected_with_a_point(vm: &ProtectedVM) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        s.phase == ProtectionPhase::Protected
            && s.agent
                .as_ref()
                .is_some_and(|a| a.recovery_points.count >= 1)
    })
}

/// The status and reason of the condition `type_`, as `kubectl wait --for=condition=...` reads it.
fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(&'a str, &'a str)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

fn ready(vm: &ProtectedVM) -> bool {
    vm.status
        .as_ref()
        .is_some_and(|s| condition(&s.conditions, "Ready").is_some_and(|(s, _)| s == "True"))
}

async fn vm_until(
    server: &TestApiServer,
    vms: &Api<ProtectedVM>,
    jobs: &Api<ReplicationJob>,
    what: &str,
    check: impl Fn(&ProtectedVM) -> bool,
) -> ProtectedVM {
    let wait = eventually(60, what, || {
        let vms = vms.clone();
        let check = &check;
        async move {
            vms.get_opt("web")
                .await
                .ok()
                .flatten()
                .filter(|vm| check(vm))
        }
    });
    match tokio::time::timeout(Duration::from_secs(60), wait).await {
        Ok(vm) => vm,
        Err(_) => {
            let vm = server.object("protectedvms", NS, "web");
            let jobs = jobs.list(&ListParams::default()).await.map(|l| {
                l.items
                    .iter()
                    .map(|j| (j.name_any(), j.status.clone()))
                    .collect::<Vec<_>>()
            });
            panic!("timed out waiting for {what}\nVM: {vm:#?}\njobs: {jobs:#?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_protects_a_qemu_vm_with_the_operator_and_stops_cleanly() {
    lifeboat_http::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &[("os", 8 << 20)]);
    qsd.guest_write("os", 0, 1 << 20, 0xab);
    qsd.guest_write("os", 5 << 20, 64 << 10, 0xcd);

    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let (stop_operator, operator) = run_operator(&client);

    let (agent_metrics, stop_agent, agent) = run_agent(
        &client,
        dir.path(),
        Timing {
            tick: Duration::from_millis(100),
            ..Timing::default()
        },
    );
    let vm = create_policy_and_vm(
        &client,
        &qsd,
        json!({"copyFrequency": "30s",
               "target": {"local": {"path": dir.path().join("replicas").display().to_string(), "shared": true}}}),
    )
    .await;
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    // A VM of another node: this agent never touches it (nor would it find its socket).
    let mut other = vm.clone();
    other.metadata.name = Some("db".into());
    other.spec.node_name = "node-2".into();
    vms.create(&PostParams::default(), &other).await.unwrap();

    let jobs: Api<ReplicationJob> = Api::namespaced(client.clone(), NS);
    let protected = vm_until(
        &server,
        &vms,
        &jobs,
        "web Protected with a point",
        protected_with_a_point,
    )
    .await;
    let agent_report = protected
        .status
        .as_ref()
        .and_then(|s| s.agent.clone())
        .unwrap();
    assert_eq!(
        agent_report.disks.first().map(|d| d.size_bytes),
        Some(8 << 20)
    );
    assert!(agent_report.recovery_points.latest.is_some());

    // `kubectl wait --for=condition=Ready pvm/web`: Ready turns True once Protected and Normal.
    let ready_vm = vm_until(&server, &vms, &jobs, "web Ready", ready).await;
    let status = ready_vm.status.as_ref().unwrap();
    assert_eq!(status.phase, ProtectionPhase::Protected);
    assert_eq!(status.health, lifeboat_api::Health::Normal);
    assert_eq!(
        condition(&status.conditions, "Ready"),
        Some(("True", "Protected"))
    );

    // Every job of web ran here, claimed under this agent's name, and succeeded.
    let all = jobs.list(&ListParams::default()).await.unwrap().items;
    let web: Vec<&ReplicationJob> = all.iter().filter(|j| j.spec.vm_ref.name == "web").collect();
    assert!(web.len() >= 2, "enable and finalize: {web:#?}");
    for job in &web {
        let status = job.status.as_ref().unwrap();
        assert_eq!(status.phase, JobPhase::Succeeded, "{}", job.name_any());
        assert_eq!(
            status.claimed_by.as_deref(),
            Some("node-1/lifeboat-agent-e2e")
        );
        assert_eq!(status.progress.percent, 100);
        // `kubectl wait --for=condition=Complete rjob/...`.
        assert_eq!(
            condition(&status.conditions, "Complete"),
            Some(("True", "Succeeded")),
            "{}: {:#?}",
            job.name_any(),
            status.conditions
        );
        assert_eq!(condition(&status.conditions, "Failed"), None);
    }
    // The other node's VM and jobs are untouched by this agent.
    let db = server.object("protectedvms", NS, "db").unwrap();
    assert!(db.pointer("/status/agent").is_none(), "{db:#}");
    for job in all.iter().filter(|j| j.spec.vm_ref.name == "db") {
        assert!(job.status.as_ref().is_none_or(|s| s.claimed_by.is_none()));
    }

    // The heartbeat Lease names the node.
    let lease = server
        .object("leases", LEASES, "lifeboat-agent-node-1")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], NODE);
    assert_eq!(
        lease["metadata"]["labels"]["lifeboat.io/heartbeat"],
        "agent"
    );

    // Reports are throttled: a handful of writes, not one per tick (100 ms here).
    let reports = server.writes_by("protectedvms", "status", "lifeboat-agent");
    assert!((1..=8).contains(&reports), "{reports} report writes");
    let metrics = agent_metrics.encode().unwrap();
    assert!(
        metrics.contains("lifeboat_agent_claims_total{outcome=\"won\"}"),
        "{metrics}"
    );

    // SIGTERM's path: the agent stops by itself, with nothing running.
    stop_agent_cleanly(stop_agent, agent, 30).await;
    stop_operator_within_10s(stop_operator, operator).await;
    drop(qsd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cut_short_by_sigterm_fails_as_recoverable() {
    lifeboat_http::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &[("os", 8 << 20)]);
    // 4 MiB of data at 1 Mbit/s: the copy would take about 30 s.
    qsd.guest_write("os", 0, 4 << 20, 0x5a);

    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let (stop_operator, operator) = run_operator(&client);
    let (_, stop_agent, agent) = run_agent(
        &client,
        dir.path(),
        Timing {
            tick: Duration::from_millis(100),
            shutdown_grace: Duration::from_millis(300),
            ..Timing::default()
        },
    );
    create_policy_and_vm(
        &client,
        &qsd,
        json!({"copyFrequency": "30s", "bandwidth": {"offHoursMbps": 1},
               "target": {"local": {"path": dir.path().join("replicas").display().to_string(), "shared": true}}}),
    )
    .await;

    // The copy is under way, then SIGTERM.
    let jobs: Api<ReplicationJob> = Api::namespaced(client.clone(), NS);
    let running = eventually(30, "the enable job running", || {
        let jobs = jobs.clone();
        async move {
            jobs.list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|j| {
                    j.status
                        .as_ref()
                        .is_some_and(|s| s.phase == JobPhase::Running && !s.steps.is_empty())
                })
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_agent_cleanly(stop_agent, agent, 10).await;

    // The claim is not lost silently: the job failed as recoverable, so the operator retries.
    let job = jobs.get(&running.name_any()).await.unwrap();
    let status = job.status.unwrap();
    assert_eq!(status.phase, JobPhase::Failed);
    let error = status.error.unwrap();
    assert_eq!(error.class, lifeboat_api::common::ErrorClass::Recoverable);
    assert_eq!(error.reason, "AgentStopped");
    assert_eq!(
        condition(&status.conditions, "Failed"),
        Some(("True", "AgentStopped"))
    );
    assert_eq!(condition(&status.conditions, "Complete"), None);
    assert!(
        status
            .steps
            .iter()
            .any(|s| s.state == lifeboat_api::job::StepState::Failed),
        "{:#?}",
        status.steps
    );
    stop_operator_within_10s(stop_operator, operator).await;
    drop(qsd);
}

/// The store refuses the key in the Secret; an administrator puts the right key in the
/// Secret and asks for a retry (`spec.requests.retry`): the agent reads the Secret again,
/// opens its store with the new key, and protection completes, with no agent restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_storage_key_is_taken_on_retry_without_a_restart() {
    lifeboat_http::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &[("os", 8 << 20)]);
    qsd.guest_write("os", 0, 1 << 20, 0x3c);
    let azurite = Azurite::start();
    // The container is the administrator's, as on Azure.
    shared_key_store(&azurite, "replicas", test_options(1)).await;

    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = |key: &str| Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("storage".into()),
            ..Default::default()
        },
        data: Some([("accountKey".to_owned(), ByteString(key.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    // A well-formed key that is not the account's.
    secrets
        .create(
            &PostParams::default(),
            &secret("bm90LXRoZS1hY2NvdW50LWtleS1ub3QtdGhlLWFjY291bnQta2V5LW5vdC10aGUta2V5"),
        )
        .await
        .unwrap();
    let (stop_operator, operator) = run_operator(&client);
    let (_, stop_agent, agent) = run_agent(
        &client,
        dir.path(),
        Timing {
            tick: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..Timing::default()
        },
    );
    create_policy_and_vm(
        &client,
        &qsd,
        json!({"copyFrequency": "30s",
               "target": {"azureBlob": {
                   "accountUrl": azurite.account_url(), "container": "replicas",
                   "credentials": {"accountKeySecretRef": {"name": "storage", "key": "accountKey"}}}}}),
    )
    .await;
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    let jobs: Api<ReplicationJob> = Api::namespaced(client.clone(), NS);
    vm_until(&server, &vms, &jobs, "the store to refuse the key", |vm| {
        vm.status
            .as_ref()
            .and_then(|s| s.last_error.as_ref())
            .is_some_and(|e| e.reason == "StoreAccessDenied")
    })
    .await;

    // The rotation: the Secret gets the account's key, then a retry is asked for.
    let mut rotated = secrets.get("storage").await.unwrap();
    rotated.data = secret(DEV_KEY).data;
    secrets
        .replace("storage", &PostParams::default(), &rotated)
        .await
        .unwrap();
    vms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"requests": {"retry": "key-rotated"}}})),
    )
    .await
    .unwrap();
    vm_until(
        &server,
        &vms,
        &jobs,
        "web Protected with a point, on the new key",
        protected_with_a_point,
    )
    .await;

    stop_agent_cleanly(stop_agent, agent, 30).await;
    stop_operator_within_10s(stop_operator, operator).await;
    drop(qsd);
}

/// Wait for `what` on VM `web`, up to `seconds`.
async fn web_until(
    server: &TestApiServer,
    vms: &Api<ProtectedVM>,
    jobs: &Api<ReplicationJob>,
    what: &str,
    check: impl Fn(&ProtectedVM) -> bool,
) -> ProtectedVM {
    vm_until(server, vms, jobs, what, check).await
}

fn phase_is(phase: ProtectionPhase) -> impl Fn(&ProtectedVM) -> bool {
    move |vm| vm.status.as_ref().is_some_and(|s| s.phase == phase)
}

async fn ask(vms: &Api<ProtectedVM>, requests: serde_json::Value) {
    vms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"requests": requests}})),
    )
    .await
    .unwrap();
}

/// The VM's disk in the replica at its newest point, read from Azurite.
async fn newest_point_disk(azurite: &Azurite, size: u64) -> Vec<u8> {
    use lifeboat_store::{At, ReplicaStore, VmKey};
    let store = shared_key_store(azurite, "replicas", test_options(1)).await;
    let key = VmKey::new(NS, "web").unwrap();
    let manifest = store.manifest(&key).await.unwrap().unwrap();
    let point = manifest.latest().unwrap().id.clone();
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (4 << 20).min(size - offset);
        out.extend_from_slice(
            &store
                .read(&key, "os", &At::Point(point.clone()), offset, len)
                .await
                .unwrap(),
        );
        offset += len;
    }
    out
}

/// Re-protect `web` forward (request `r2`), A's VM in `qsd_a` running again: wait for it,
/// and check the replica's newest point is A's disk.
async fn reprotect_forward(
    server: &TestApiServer,
    vms: &Api<ProtectedVM>,
    jobs: &Api<ReplicationJob>,
    azurite: &Azurite,
    qsd_a: &Qsd,
) {
    use lifeboat_api::protected_vm::ReplicationDirection;
    ask(vms, json!({"reprotect": "r2"})).await;
    web_until(server, vms, jobs, "Protected forward", |vm| {
        vm.status.as_ref().is_some_and(|s| {
            s.phase == ProtectionPhase::Protected
                && s.direction == ReplicationDirection::Forward
                && s.handled_requests.reprotect.as_deref() == Some("r2")
        })
    })
    .await;
    lifeboat_qemu::testing::assert_same(
        "the replica forward again",
        &newest_point_disk(azurite, SIZE).await,
        &qsd_a.read_disk("os"),
    );
}

/// The size of the two-node tests' disk.
const SIZE: u64 = 8 << 20;

/// Two nodes' agents, the operator and Azurite, and VM `web` protected in reverse: failed
/// over (planned) from node-1 (A), its recovered VM B running on node-2 on the failover's
/// disk and re-protected there. Every hop so far is checked on the way.
struct InReverse {
    dir: tempfile::TempDir,
    qsd_a: Qsd,
    qsd_b: Qsd,
    azurite: Azurite,
    server: TestApiServer,
    client: Client,
    vms: Api<ProtectedVM>,
    jobs: Api<ReplicationJob>,
    operator: (Stopper, OperatorTask),
    agent_a: (Stopper, AgentTask),
    agent_b: (Stopper, AgentTask),
}

/// [`InReverse`], the operator reading the time from `clock`, the agents renewing their
/// Leases every `heartbeat`.
async fn protected_in_reverse(
    clock: Arc<dyn lifeboat_core::Clock>,
    heartbeat: Duration,
) -> InReverse {
    use lifeboat_api::protected_vm::ReplicationDirection;
    use lifeboat_qemu::testing::{DiskSpec, assert_same};
    lifeboat_http::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("node-1"), dir.path().join("node-2"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut qsd_a = Qsd::start_with(&a_dir, &[DiskSpec::raw_file("os", SIZE)]);
    qsd_a.guest_write("os", 0, 2 << 20, 0x5a);
    let azurite = Azurite::start();
    shared_key_store(&azurite, "replicas", test_options(1)).await;

    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("storage".into()),
                    ..Default::default()
                },
                data: Some(
                    [(
                        "accountKey".to_owned(),
                        ByteString(DEV_KEY.as_bytes().to_vec()),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let operator = run_operator_on(&client, clock);
    let timing = || Timing {
        tick: Duration::from_millis(100),
        heartbeat,
        max_backoff: Duration::from_secs(1),
        ..Timing::default()
    };
    let (_, stop_a, agent_a) = run_agent_on(&client, "node-1", &a_dir, timing());
    let (_, stop_b, agent_b) = run_agent_on(&client, "node-2", &b_dir, timing());
    let policies: Api<ReplicationPolicy> = Api::namespaced(client.clone(), NS);
    let policy: ReplicationPolicy = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold"},
        "spec": {"copyFrequency": "30s",
                 "target": {"azureBlob": {
                     "accountUrl": azurite.account_url(), "container": "replicas",
                     "credentials": {"accountKeySecretRef": {"name": "storage", "key": "accountKey"}}}}}
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    let vm: ProtectedVM = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
        "metadata": {"name": "web"},
        "spec": {
            "vmName": "web", "nodeName": "node-1",
            "hypervisor": {"qemu": {"qmpSocket": qsd_a.qmp.display().to_string()}},
            "disks": [{"name": "os", "path": a_dir.join("os.img").display().to_string(), "blockNode": "os"}],
            "policyRef": {"name": "gold"},
            "recoverySite": {
                "nodeName": "node-2",
                "hypervisor": {"qemu": {"qmpSocket": b_dir.join("qmp.sock").display().to_string()}},
                "disks": [{"name": "os", "path": b_dir.join("os.img").display().to_string(), "blockNode": "os"}]
            },
            "recoveredVm": {"name": "web-dr", "template": "<domain>{{ name }} {{ disk.os.location }}</domain>"}
        }
    }))
    .unwrap();
    vms.create(&PostParams::default(), &vm).await.unwrap();
    let jobs: Api<ReplicationJob> = Api::namespaced(client.clone(), NS);
    web_until(
        &server,
        &vms,
        &jobs,
        "web Protected",
        protected_with_a_point,
    )
    .await;

    // Planned failover on node-1: the VM is stopped first, its last write kept.
    qsd_a.guest_write("os", 4 << 20, 1 << 20, 0x5b);
    let a_before = qsd_a.read_disk("os");
    ask(
        &vms,
        json!({"failover": {"token": "f1", "type": "Planned"}}),
    )
    .await;
    let failed_over = web_until(
        &server,
        &vms,
        &jobs,
        "FailedOver",
        phase_is(ProtectionPhase::FailedOver),
    )
    .await;
    let image = failed_over
        .status
        .as_ref()
        .unwrap()
        .failover
        .as_ref()
        .unwrap()
        .disks[0]
        .location
        .clone();
    qsd_a.stop();
    assert_same(
        "the failover's disk",
        &std::fs::read(&image).unwrap(),
        &a_before,
    );
    // Its recovered VM's definition: a text template, kept in a ConfigMap of its name.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let definition = eventually(30, "the recovered VM's definition", || async {
        config_maps.get_opt("web-dr").await.unwrap()
    })
    .await;
    assert!(
        definition
            .data
            .unwrap_or_default()
            .values()
            .any(|text| text.contains("<domain>web-dr ")),
        "the rendered template"
    );

    // The recovered VM on node-2, on the failover's disk; re-protect in reverse.
    std::fs::rename(&image, b_dir.join("os.img")).unwrap();
    let qsd_b = Qsd::start_with(&b_dir, &[DiskSpec::raw_file("os", SIZE)]);
    qsd_b.guest_write("os", 1 << 20, 256 << 10, 0x6a);
    ask(&vms, json!({"reprotect": "r1"})).await;
    let reverse = web_until(&server, &vms, &jobs, "Protected in reverse", |vm| {
        vm.status.as_ref().is_some_and(|s| {
            s.phase == ProtectionPhase::Protected
                && s.direction == ReplicationDirection::Reverse
                && s.handled_requests.reprotect.as_deref() == Some("r1")
        })
    })
    .await;
    assert_eq!(reverse.active_node(), "node-2");
    let all = jobs.list(&ListParams::default()).await.unwrap().items;
    let reprotect = all
        .iter()
        .find(|j| j.spec.job_type == lifeboat_api::job::JobType::Reprotect)
        .unwrap();
    assert_eq!(reprotect.spec.node_name, "node-2");
    assert_eq!(
        reprotect
            .status
            .as_ref()
            .and_then(|s| s.claimed_by.as_deref()),
        Some("node-2/lifeboat-agent-e2e")
    );
    assert_same(
        "the replica after re-protect",
        &newest_point_disk(&azurite, SIZE).await,
        &qsd_b.read_disk("os"),
    );
    InReverse {
        dir,
        qsd_a,
        qsd_b,
        azurite,
        server,
        client,
        vms,
        jobs,
        operator,
        agent_a: (stop_a, agent_a),
        agent_b: (stop_b, agent_b),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_reprotect_failback_reprotect_across_two_nodes_agents() {
    use lifeboat_control::mapping::system_time;
    use lifeboat_qemu::testing::assert_same;
    let InReverse {
        dir,
        mut qsd_a,
        mut qsd_b,
        azurite,
        server,
        client,
        vms,
        jobs,
        operator: (stop_operator, operator),
        agent_a: (stop_a, agent_a),
        agent_b: (stop_b, agent_b),
    } = protected_in_reverse(
        Arc::new(lifeboat_core::SystemClock),
        Duration::from_secs(10),
    )
    .await;
    let (a_dir, config_maps) = (
        dir.path().join("node-1"),
        Api::<ConfigMap>::namespaced(client.clone(), NS),
    );

    // While B runs, node-1 keeps A's disk in step with B's points: once it holds a point
    // captured after this write, A's disk is B's.
    qsd_b.guest_write("os", 6 << 20, 512 << 10, 0x6b);
    let written = std::time::SystemTime::now();
    let b_final = qsd_b.read_disk("os");
    let in_step = web_until(&server, &vms, &jobs, "A's disk kept in step", |vm| {
        vm.status
            .as_ref()
            .and_then(|s| s.original_disks_in_step_time.as_ref())
            .is_some_and(|t| system_time(t) > written)
    })
    .await;
    assert_eq!(in_step.status.unwrap().phase, ProtectionPhase::Protected);
    assert_same(
        "A's disk kept in step while B runs",
        &std::fs::read(a_dir.join("os.img")).unwrap(),
        &b_final,
    );

    // Fail back: A's disk being in step, no fresh point first: node-2 stops B and ships;
    // node-1 brings A's disk to that point.
    ask(
        &vms,
        json!({"failover": {"token": "f2", "type": "Planned"}}),
    )
    .await;
    let failed_back = web_until(
        &server,
        &vms,
        &jobs,
        "FailedBack, web-dr taken down",
        |vm| {
            vm.status.as_ref().is_some_and(|s| {
                s.phase == ProtectionPhase::FailedBack
                    && s.failover.as_ref().is_some_and(|f| {
                        f.failback && f.recovered_vm.as_ref().is_some_and(|r| r.removed)
                    })
            })
        },
    )
    .await;
    let recovered = failed_back
        .status
        .unwrap()
        .failover
        .unwrap()
        .recovered_vm
        .unwrap();
    assert_eq!(recovered.name, "web-dr");
    assert!(recovered.message.is_none(), "{recovered:?}");
    let all = jobs.list(&ListParams::default()).await.unwrap().items;
    let ran_on = |kind: lifeboat_api::job::JobType,
                  pick: fn(&lifeboat_api::job::JobParameters) -> bool| {
        all.iter()
            .find(|j| j.spec.job_type == kind && pick(&j.spec.parameters))
            .map(|j| j.spec.node_name.as_str())
    };
    use lifeboat_api::job::JobType;
    assert_eq!(
        ran_on(JobType::Failover, |p| p.to_primary && p.presync),
        None,
        "no fresh point: A's disk was in step"
    );
    assert_eq!(
        ran_on(JobType::Failback, |p| p.presync
            && p.request_token.is_none()),
        Some("node-1"),
        "A's disk kept in step on its node"
    );
    assert_eq!(
        ran_on(JobType::Failover, |p| p.to_primary && !p.presync),
        Some("node-2")
    );
    assert_eq!(ran_on(JobType::Failback, |p| !p.presync), Some("node-1"));
    assert!(
        config_maps.get_opt("web-dr").await.unwrap().is_none(),
        "the failback deleted the recovered VM's definition"
    );
    qsd_b.stop();
    assert_same(
        "A's disk after the failback",
        &std::fs::read(a_dir.join("os.img")).unwrap(),
        &b_final,
    );

    // A again: node-1's agent has QEMU record A's writes since the failback's point before
    // the guest writes (the stamp the failback kept beside A's raw disk, used: nothing wrote
    // the file, so it was not dropped as written); re-protect forward on node-1.
    qsd_a.start_again();
    let image = a_dir.join("os.img");
    tokio::task::spawn_blocking(move || lifeboat_qemu::testing::wait_stamp_used(&image, 30))
        .await
        .unwrap();
    qsd_a.guest_write("os", 2 << 20, 64 << 10, 0x6c);
    reprotect_forward(&server, &vms, &jobs, &azurite, &qsd_a).await;

    stop_agent_cleanly(stop_a, agent_a, 30).await;
    stop_agent_cleanly(stop_b, agent_b, 30).await;
    stop_operator_within_10s(stop_operator, operator).await;
}

/// The recovered VM's node is lost for good while the VM replicates in reverse. A planned
/// failback asked then waits for that node (it must stop the recovered VM there); an
/// unplanned one asked since withdraws it and runs at the primary site: node-1's agent
/// chooses the replica's newest point from the store and fences it, then brings A's disk to
/// that point, B's writes included (A's own engine, which failed over on the way out, would
/// have answered with that old point). Time is not waited out: the operator's clock jumps
/// ten minutes (the one stand-in), node-1's agent beats on and is seen at the new time,
/// node-2's last heartbeat ages. What the loss simulates: node-2's agent task is aborted (its
/// Lease is left as last renewed, as a dead node leaves it) and its VM's daemon killed with
/// SIGKILL; nothing of node-2 is read again, so the test claims nothing about what a crash
/// or a power cut keeps there, only that nothing it never shipped reaches A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_recovered_vms_node_lost_for_good_an_unplanned_failback_runs_at_the_primary_site()
{
    use lifeboat_api::job::JobType;
    use lifeboat_qemu::testing::assert_same;
    let clock = lifeboat_core::JumpingClock::default();
    let InReverse {
        dir,
        mut qsd_a,
        mut qsd_b,
        azurite,
        server,
        vms,
        jobs,
        operator: (stop_operator, operator),
        agent_a: (stop_a, agent_a),
        agent_b: (_stop_b, agent_b),
        ..
    } = protected_in_reverse(Arc::new(clock.clone()), Duration::from_secs(1)).await;

    // Node-2 is lost: its agent first (no cycle ships what B writes next), then B itself.
    let shipped = qsd_b.read_disk("os");
    agent_b.abort();
    let _ = agent_b.await;
    qsd_b.guest_write("os", 6 << 20, 512 << 10, 0x6c);
    qsd_b.kill();

    // A planned failback needs node-2 (to stop B): its first job waits there, unclaimed.
    ask(
        &vms,
        json!({"failover": {"token": "f2", "type": "Planned"}}),
    )
    .await;
    let stranded = eventually(30, "the planned failback's first job", || {
        let jobs = jobs.clone();
        async move {
            jobs.list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|j| j.spec.job_type == JobType::Failover && j.spec.parameters.to_primary)
        }
    })
    .await;
    assert_eq!(stranded.spec.node_name, "node-2");
    clock.jump(Duration::from_secs(600));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The unplanned failback: node-1 does it all.
    ask(
        &vms,
        json!({"failover": {"token": "f3", "type": "Unplanned"}}),
    )
    .await;
    let failed_back = web_until(&server, &vms, &jobs, "FailedBack by f3", |vm| {
        vm.status.as_ref().is_some_and(|s| {
            s.phase == ProtectionPhase::FailedBack
                && s.handled_requests.failover.as_deref() == Some("f3")
        })
    })
    .await;
    let status = failed_back.status.as_ref().unwrap();
    assert!(status.failover.as_ref().is_some_and(|f| f.failback));
    let all = jobs.list(&ListParams::default()).await.unwrap().items;
    assert!(
        all.iter().all(|j| j.name_any() != stranded.name_any()),
        "the planned failback's job was withdrawn"
    );
    let unplanned = all
        .iter()
        .find(|j| j.spec.job_type == JobType::Failover && j.spec.parameters.to_primary)
        .unwrap();
    assert_eq!(unplanned.spec.node_name, "node-1");
    let failback = all
        .iter()
        .find(|j| j.spec.job_type == JobType::Failback)
        .unwrap();
    assert_eq!(failback.spec.node_name, "node-1");
    let a_disk = std::fs::read(dir.path().join("node-1").join("os.img")).unwrap();
    assert_same("A's disk after the failback", &a_disk, &shipped);
    assert_same(
        "A's disk against the replica's newest point",
        &a_disk,
        &newest_point_disk(&azurite, SIZE).await,
    );
    let store = shared_key_store(&azurite, "replicas", test_options(1)).await;
    let epoch = lifeboat_store::ReplicaStore::epoch(
        &store,
        &lifeboat_store::VmKey::new(NS, "web").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(epoch.holder, "node node-1");

    // A again; re-protect forward on node-1.
    qsd_a.start_again();
    reprotect_forward(&server, &vms, &jobs, &azurite, &qsd_a).await;
    stop_agent_cleanly(stop_a, agent_a, 30).await;
    stop_operator_within_10s(stop_operator, operator).await;
}
