//! The day a VM's node is lost, on the test API server (`lifeboat-tests`' fixture) with the
//! real operator (in this process) and two real agents (`lifeboat agent`, processes of their
//! own, killed with SIGKILL): node-1 hosts the VM (a real `qemu-storage-daemon`), node-2 is
//! its recovery node. The replica store is a local folder both agents mount (as an NFS share
//! would be).
//!
//! ```text
//!  operator ──> TestApiServer <── agent node-1 (SIGKILL'd, later back) ──QMP/NBD──> qsd
//!                    ^                         │ (fenced: writes nothing)
//!                    └──── agent node-2 ───────┴──> shared replica folder
//! ```
//!
//! What a crash test may claim: SIGKILL keeps every write the kernel accepted (the page
//! cache), so this is a process crash, not a power cut.
//!
//! Time is not waited out: the dead agent's heartbeat Lease is written back by ten minutes
//! (what its silence would show after ten minutes), as the only stand-in here.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_api::job::{JobPhase, JobType};
use lifeboat_api::{ProtectedVM, ProtectionPhase, ReplicationJob, ReplicationPolicy};
use lifeboat_qemu::testing::Qsd;
use lifeboat_tests::apiserver::TestApiServer;
use lifeboat_tests::eventually;
use serde_json::json;

const LIFEBOAT: &str = env!("CARGO_BIN_EXE_lifeboat");
const NS: &str = "dr";
const LEASES: &str = "lifeboat-system";

/// A `lifeboat agent` process for `node`, killed (SIGKILL) when dropped.
struct AgentProcess(Child);

impl AgentProcess {
    fn start(node: &str, work: &Path, kubeconfig: &Path) -> AgentProcess {
        let dir = work.join(node);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(LIFEBOAT)
            .args(["agent", "--node-name", node, "--pod-name", "agent"])
            .args(["--namespace", NS, "--lease-namespace", LEASES])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--failover-dir")
            .arg(dir.join("failover"))
            .args(["--health-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", work)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProcess(child)
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every file under `dir` (but lock files) and its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut all = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_none_or(|e| e != "lock") {
                all.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    all
}

async fn vm_until(
    vms: &Api<ProtectedVM>,
    seconds: u64,
    what: &str,
    check: impl Fn(&ProtectedVM) -> bool,
) -> ProtectedVM {
    let check = &check;
    eventually(seconds, what, || async move {
        vms.get_opt("web")
            .await
            .ok()
            .flatten()
            .filter(|vm| check(vm))
    })
    .await
}

fn condition(vm: &ProtectedVM, type_: &str) -> Option<(String, String)> {
    vm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn setup(client: &Client, qsd: &Qsd, replicas: &Path) {
    let policy: ReplicationPolicy = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold"},
        "spec": {"copyFrequency": "30s",
                 "target": {"local": {"path": replicas.display().to_string()}}}
    }))
    .unwrap();
    Api::<ReplicationPolicy>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let vm: ProtectedVM = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
        "metadata": {"name": "web"},
        "spec": {
            "vmName": "web", "nodeName": "node-1", "recoveryNodeNames": ["node-2"],
            "hypervisor": {"qemu": {"qmpSocket": qsd.qmp.display().to_string()}},
            "disks": [{"name": "os", "path": qsd.dir.join("os.qcow2").display().to_string(), "blockNode": "os"}],
            "policyRef": {"name": "gold"}
        }
    }))
    .unwrap();
    Api::<ProtectedVM>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &vm)
        .await
        .unwrap();
}

/// The node's heartbeat Lease, renewed ten minutes ago as far as anyone reading it can tell.
async fn age_lease(client: &Client, node: &str) {
    let then = SystemTime::now() - Duration::from_secs(600);
    let stamp = MicroTime(k8s_openapi::jiff::Timestamp::try_from(then).unwrap());
    Api::<Lease>::namespaced(client.clone(), LEASES)
        .patch(
            &format!("lifeboat-agent-{node}"),
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"renewTime": stamp, "acquireTime": stamp}})),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vms_node_is_lost_its_recovery_node_fails_it_over_and_the_old_agent_is_fenced() {
    lifeboat_http::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    std::fs::create_dir_all(work.join("vm")).unwrap();
    let qsd = Qsd::start(&work.join("vm"), &[("os", 8 << 20)]);
    qsd.guest_write("os", 0, 1 << 20, 0xab);
    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let kubeconfig = work.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    let operator = lifeboat_operator::Operator::new(
        client.clone(),
        lifeboat_operator::Config {
            namespace: Some(NS.into()),
            lease_namespace: LEASES.into(),
            ..lifeboat_operator::Config::default()
        },
    );
    let (stop_operator, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));
    let mut node1 = AgentProcess::start("node-1", work, &kubeconfig);
    let _node2 = AgentProcess::start("node-2", work, &kubeconfig);
    let replicas = work.join("shared replicas");
    setup(&client, &qsd, &replicas).await;
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    let jobs: Api<ReplicationJob> = Api::namespaced(client.clone(), NS);

    // Protected; then the guest writes and a cycle ships it.
    vm_until(&vms, 120, "web Protected with a point", |vm| {
        vm.status.as_ref().is_some_and(|s| {
            s.phase == ProtectionPhase::Protected
                && s.agent
                    .as_ref()
                    .is_some_and(|a| a.recovery_points.count >= 1)
        })
    })
    .await;
    let written = SystemTime::now();
    qsd.guest_write("os", 3 << 20, 256 << 10, 0x5e);
    vm_until(&vms, 120, "a point after the write", |vm| {
        let latest = vm
            .status
            .as_ref()
            .and_then(|s| s.agent.as_ref())
            .and_then(|a| a.recovery_points.latest.as_ref())
            .map(|p| lifeboat_control::mapping::system_time(&p.time));
        latest.is_some_and(|t| t > written)
    })
    .await;
    let source = qsd.read_disk("os");

    // Node-1's agent dies (SIGKILL); its VM keeps running (a partition: the agent comes
    // back later). A resync asked for then goes to node-1 and is marked claimed by the dead
    // agent: the test's stand-in for a job it claimed just before it died (a real claim
    // cannot be timed against a SIGKILL). Its silence is then ten minutes old.
    node1.kill9();
    vms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"requests": {"resync": "before-the-loss"}}})),
    )
    .await
    .unwrap();
    let held = eventually(30, "the resync job", || {
        let jobs = jobs.clone();
        async move {
            jobs.list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|j| j.spec.job_type == JobType::Resynchronize)
        }
    })
    .await
    .name_any();
    jobs.patch_status(
        &held,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"phase": "Running", "claimedBy": "node-1/agent"}})),
    )
    .await
    .unwrap();
    vm_until(&vms, 30, "the resync Running", |vm| {
        vm.status
            .as_ref()
            .and_then(|s| s.current_job.as_ref())
            .is_some_and(|j| j.name == held && j.phase == JobPhase::Running)
    })
    .await;
    age_lease(&client, "node-1").await;

    // The unplanned failover runs on node-2 and does not wait behind the held job.
    vms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"requests": {"failover": {
            "token": "site-lost", "type": "Unplanned"}}}})),
    )
    .await
    .unwrap();
    let failed_over = vm_until(&vms, 120, "web FailedOver", |vm| {
        vm.status
            .as_ref()
            .is_some_and(|s| s.phase == ProtectionPhase::FailedOver)
    })
    .await;
    let status = failed_over.status.as_ref().unwrap();
    let result = status.failover.as_ref().unwrap();
    assert_eq!(result.node.as_deref(), Some("node-2"), "{result:#?}");
    assert!(result.verified);
    let disk = result.disks.first().unwrap();
    assert!(
        disk.location
            .starts_with(&work.join("node-2").display().to_string()),
        "{disk:?}"
    );
    assert!(
        std::fs::read(&disk.location).unwrap() == source,
        "the failed-over disk equals the source at the latest point"
    );
    let held = jobs.get(&held).await.unwrap();
    let held = held.status.unwrap();
    assert_eq!(held.phase, JobPhase::Failed);
    assert_eq!(
        held.error.as_ref().map(|e| e.reason.as_str()),
        Some("AgentLost")
    );
    let failover = jobs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|j| j.spec.job_type == JobType::Failover)
        .unwrap();
    assert_eq!(failover.spec.node_name, "node-2", "{}", failover.name_any());

    // The replica moved to epoch 1, taken by node-2.
    let vm_dir = replicas.join(NS).join("web");
    let epoch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir.join("epoch.json")).unwrap()).unwrap();
    assert_eq!(epoch["number"], 1);
    assert_eq!(epoch["holder"], "node node-2");

    // Node-1's agent comes back, its VM still writing: it is fenced, and not one byte of
    // the replica, its points or its manifest changes.
    let before = files(&vm_dir);
    qsd.guest_write("os", 5 << 20, 64 << 10, 0x77);
    let _node1 = AgentProcess::start("node-1", work, &kubeconfig);
    let fenced = vm_until(&vms, 120, "web Fenced", |vm| {
        condition(vm, "Fenced").is_some_and(|(s, _)| s == "True")
    })
    .await;
    assert_eq!(
        fenced.status.as_ref().unwrap().phase,
        ProtectionPhase::FailedOver
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = files(&vm_dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &before {
        assert!(after[path] == *bytes, "{} changed", path.display());
    }

    let _ = stop_operator.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
}
