//! The day a VM's node is lost, on the test API server (`lifeboat-tests`' fixture) with the
//! real operator (in this process) and two real agents (`lifeboat agent`, processes of their
//! own): node-1 hosts the VM (a real `qemu-storage-daemon`), node-2 is its recovery node. The
//! replica store is a local folder both agents mount (as an NFS share would be), or a real
//! Azurite. Node-1's agent dies (SIGKILL, then a new process) or is partitioned (SIGSTOP,
//! then SIGCONT).
//!
//! ```text
//!  operator ──> TestApiServer <── agent node-1 (SIGKILL'd, later back) ──QMP/NBD──> qsd
//!                    ^                         │ (fenced: writes nothing)
//!                    └──── agent node-2 ───────┴──> shared replica folder
//! ```
//!
//! What a crash test may claim: SIGKILL keeps every write the kernel accepted (the page
//! cache), so this is a process crash, not a power cut. SIGSTOP freezes the agent wherever it
//! is (mid-cycle, a request in flight): what a partition or a long GC pause does to it.
//!
//! Time is not waited out: the operator's clock jumps ten minutes forward (the one stand-in
//! here); the live agent's next heartbeat is seen at the new time, the lost one's last ages.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lifeboat_api::job::{JobPhase, JobType};
use lifeboat_api::{ProtectedVM, ProtectionPhase, ReplicationJob, ReplicationPolicy};
use lifeboat_qemu::testing::Qsd;
use lifeboat_store::VmKey;
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

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }
}

/// How node-1's agent goes away, and comes back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// SIGKILL; a new process later, with the same state folder.
    Crash,
    /// SIGSTOP; SIGCONT later, the same process going on where it stopped.
    Partition,
}

/// Where the replica lives, and what of it the test compares.
enum Replica {
    /// A folder both agents mount.
    Folder(PathBuf),
    /// An Azurite container (`replicas`), read through the store's own client.
    Azure(lifeboat_store::testing::Azurite),
}

impl Replica {
    fn target(&self) -> serde_json::Value {
        match self {
            Replica::Folder(path) => {
                json!({"local": {"path": path.display().to_string(), "shared": true}})
            }
            Replica::Azure(azurite) => json!({"azureBlob": {
                "accountUrl": azurite.account_url(), "container": "replicas",
                "credentials": {"accountKeySecretRef": {"name": "storage", "key": "accountKey"}}}}),
        }
    }

    fn store(&self) -> std::sync::Arc<dyn lifeboat_store::ReplicaStore> {
        match self {
            Replica::Folder(path) => std::sync::Arc::new(
                lifeboat_store::local::LocalStore::open_read_only(path).unwrap(),
            ),
            Replica::Azure(azurite) => std::sync::Arc::new(
                lifeboat_store::azure::AzureStore::new(
                    &azurite.account_url(),
                    "replicas",
                    lifeboat_store::azure::Credentials::AccountKey {
                        account: lifeboat_store::testing::DEV_ACCOUNT.into(),
                        key: lifeboat_store::testing::DEV_KEY.into(),
                    },
                    lifeboat_store::testing::test_options(2),
                )
                .unwrap(),
            ),
        }
    }

    /// Everything the store holds of the VM, byte for byte: the folder's files (but lock
    /// files), or the manifest, definition, block maps, live disks and every point's data.
    async fn contents(&self) -> BTreeMap<String, Vec<u8>> {
        let vm = VmKey::new(NS, "web").unwrap();
        match self {
            Replica::Folder(root) => files(&root.join(NS).join("web"))
                .into_iter()
                .map(|(p, b)| (p.display().to_string(), b))
                .collect(),
            Replica::Azure(_) => {
                let store = self.store();
                let mut all = BTreeMap::new();
                let manifest = store.manifest(&vm).await.unwrap().unwrap();
                all.insert("manifest".into(), serde_json::to_vec(&manifest).unwrap());
                let definition = store.definition(&vm).await.unwrap();
                all.insert("definition".into(), definition.unwrap_or_default().to_vec());
                for disk in &manifest.disks {
                    let map = store.block_map(&vm, &disk.name).await.unwrap();
                    all.insert(
                        format!("map {}", disk.name),
                        map.unwrap_or_default().to_vec(),
                    );
                    let mut ats = vec![lifeboat_store::At::Live];
                    ats.extend(
                        manifest
                            .points
                            .iter()
                            .map(|p| lifeboat_store::At::Point(p.id.clone())),
                    );
                    for at in ats {
                        let data = store
                            .read(&vm, &disk.name, &at, 0, disk.size_bytes)
                            .await
                            .unwrap();
                        all.insert(format!("{} {at:?}", disk.name), data.to_vec());
                    }
                }
                all
            }
        }
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

/// How the VM names its recovery node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// `spec.recoveryNodeNames: [node-2]` on the VM.
    ByName,
    /// The policy's `recoveryNodes.selector`, matched against the Nodes' labels (node-2 is
    /// the only node in zone b).
    ByLabel,
}

async fn setup(client: &Client, qsd: &Qsd, target: serde_json::Value, recovery: Recovery) {
    for (node, zone) in [("node-1", "a"), ("node-2", "b")] {
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": zone}}
        }))
        .unwrap();
        Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }
    let (names, selector) = match recovery {
        Recovery::ByName => (json!(["node-2"]), json!({})),
        Recovery::ByLabel => (json!([]), json!({"topology.kubernetes.io/zone": "b"})),
    };
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "storage"},
        "stringData": {"accountKey": lifeboat_store::testing::DEV_KEY}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let policy: ReplicationPolicy = serde_json::from_value(json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold"},
        "spec": {"copyFrequency": "30s", "target": target,
                 "recoveryNodes": {"selector": selector}}
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
            "vmName": "web", "nodeName": "node-1", "recoveryNodeNames": names,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vms_node_is_lost_its_recovery_node_fails_it_over_and_the_old_agent_is_fenced() {
    let tmp = tempfile::tempdir().unwrap();
    let replica = Replica::Folder(tmp.path().join("shared replicas"));
    site_loss(tmp.path(), &replica, Loss::Crash, Recovery::ByName).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_agent_wakes_after_the_failover_on_azure_and_is_fenced() {
    let tmp = tempfile::tempdir().unwrap();
    let azurite = lifeboat_store::testing::Azurite::start();
    // NB: creates the container.
    lifeboat_store::testing::shared_key_store(
        &azurite,
        "replicas",
        lifeboat_store::testing::test_options(2),
    )
    .await;
    let replica = Replica::Azure(azurite);
    site_loss(tmp.path(), &replica, Loss::Partition, Recovery::ByLabel).await;
}

async fn site_loss(work: &Path, replica: &Replica, loss: Loss, recovery: Recovery) {
    lifeboat_http::install_crypto_provider();
    std::fs::create_dir_all(work.join("vm")).unwrap();
    let qsd = Qsd::start(&work.join("vm"), &[("os", 8 << 20)]);
    qsd.guest_write("os", 0, 1 << 20, 0xab);
    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let kubeconfig = work.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    // NB: a jump stands for time going by: the agents that beat go on beating (the operator
    // sees their new records at the new time), a dead one's last record ages by the jump.
    let clock = lifeboat_core::JumpingClock::default();
    let operator = lifeboat_operator::Operator::new(
        client.clone(),
        lifeboat_operator::Config {
            namespace: Some(NS.into()),
            lease_namespace: LEASES.into(),
            ..lifeboat_operator::Config::default()
        },
    )
    .with_clock(std::sync::Arc::new(clock.clone()));
    let (stop_operator, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));
    let mut node1 = AgentProcess::start("node-1", work, &kubeconfig);
    let _node2 = AgentProcess::start("node-2", work, &kubeconfig);
    setup(&client, &qsd, replica.target(), recovery).await;
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

    // Node-1's agent dies (SIGKILL) or is cut off (SIGSTOP); its VM keeps running. A resync
    // asked for then goes to node-1 and is marked claimed by node-1's agent: the test's
    // stand-in for a job it claimed just before it went (a real claim cannot be timed
    // against a signal). Then ten minutes go by (the operator's clock jumps).
    match loss {
        Loss::Crash => node1.kill9(),
        Loss::Partition => node1.signal("-STOP"),
    }
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
    clock.jump(Duration::from_secs(600));
    // NB: node-2 beats again (every 10 s) and is seen alive at the new time.
    tokio::time::sleep(Duration::from_secs(11)).await;

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

    // `lifeboat points --cluster` reads every point from the store the policy names (the
    // share is mounted here; Azure: the key in this shell's environment), with who wrote it
    // and each disk's digest.
    let points = Command::new(LIFEBOAT)
        .args(["points", "web", "--cluster", "-n", NS])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", work)
        .env("AZURE_STORAGE_KEY", lifeboat_store::testing::DEV_KEY)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&points.stdout);
    assert!(
        points.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&points.stderr)
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("WRITTEN BY"), "{table}");
    assert!(lines.len() >= 3, "every point, not a summary:\n{table}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.contains("node node-1") && l.contains("os=8.0 MiB xxh3")),
        "{table}"
    );

    // The replica moved to epoch 1, taken by node-2.
    let vm = VmKey::new(NS, "web").unwrap();
    let epoch = replica.store().epoch(&vm).await.unwrap();
    assert_eq!((epoch.number, epoch.holder.as_str()), (1, "node node-2"));

    // Node-1's agent comes back, its VM still writing: it is fenced, and not one byte of
    // the replica, its points or its manifest changes.
    let before = replica.contents().await;
    qsd.guest_write("os", 5 << 20, 64 << 10, 0x77);
    let _node1 = match loss {
        Loss::Crash => Some(AgentProcess::start("node-1", work, &kubeconfig)),
        Loss::Partition => {
            node1.signal("-CONT");
            None
        }
    };
    let fenced = vm_until(&vms, 120, "web Fenced", |vm| {
        condition(vm, "Fenced").is_some_and(|(s, _)| s == "True")
    })
    .await;
    assert_eq!(
        fenced.status.as_ref().unwrap().phase,
        ProtectionPhase::FailedOver
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = replica.contents().await;
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (what, bytes) in &before {
        assert!(after[what] == *bytes, "{what} changed");
    }

    // The commit follows the failover's disks to node-2 (node-1's agent, alive again, is
    // fenced), and keeps the failover's point alone.
    vms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"requests": {"commit": "keep-it"}}})),
    )
    .await
    .unwrap();
    vm_until(&vms, 120, "web FailoverCommitted", |vm| {
        vm.status
            .as_ref()
            .is_some_and(|s| s.phase == ProtectionPhase::FailoverCommitted)
    })
    .await;
    let commit = jobs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|j| j.spec.job_type == JobType::Commit)
        .unwrap();
    assert_eq!(commit.spec.node_name, "node-2", "{}", commit.name_any());
    let kept = result.recovery_point.as_ref().unwrap().name.clone();
    let manifest = replica.store().manifest(&vm).await.unwrap().unwrap();
    let points: Vec<&str> = manifest.points.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(points, [kept.as_str()]);

    let _ = stop_operator.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
}
