//! A recovered VM on a cluster, end to end: the real operator and the real cluster agent
//! against the test API server, the example examples/recovered-vm-kubevirt.yaml (its disks
//! pointed at a real qemu-storage-daemon VM, a hook Job added) protected and test-failed over.
//!
//! The test failover's request is handled once its VirtualMachine `app-01-test` is applied:
//! the object names every failed-over disk as a hostDisk, the node that holds them and the
//! isolated network, and is owned by the ProtectedVM. The hook Job (the example
//! serve-with-qemu.sh) serves each disk, read back here over NBD: each equals its source.
//! The cleanup deletes the VirtualMachine and stops the servers before the disks go; an
//! unplanned failover then applies `app-01` on the production network, not owned by the
//! ProtectedVM (it outlives it).
//!
//! No Job controller, kubelet or KubeVirt can run here: `LocalJobRunner`
//! (tests/support/jobs.rs) is a TEST DOUBLE of the first two, running hook Jobs as local
//! processes; the VirtualMachine is an object the test API server keeps, as the API server
//! keeps a custom resource.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use lifeboat_api::protected_vm::FailoverResult;
use lifeboat_api::{ProtectedVM, ProtectionPhase};
use lifeboat_control::requests::{self, Action, NoProgress};
use lifeboat_operator::plan::{ApiResources, ask_vm};
use lifeboat_qemu::testing::{Qsd, assert_served};
use lifeboat_tests::apiserver::TestApiServer;
use lifeboat_tests::jobs::LocalJobRunner;
use lifeboat_tests::site::{Site, local_policy};
use lifeboat_tests::workspace_root;
use serde_json::{Value, json};

/// The example's namespace and node.
const NS: &str = "lifeboat";
const NODE: &str = "kvm-node-3";
const MIB: u64 = 1024 * 1024;

/// Ask `action` of app-01 and wait until it is handled (its recovered VM up).
async fn ask(client: &Client, action: Action) -> ProtectedVM {
    let token = ask_vm(client, NS, "app-01", &action).await.unwrap();
    requests::wait(
        &ApiResources(client.clone()),
        NS,
        "app-01",
        &action,
        &token,
        Duration::from_secs(120),
        &mut NoProgress,
    )
    .await
    .unwrap_or_else(|e| panic!("{action}: {e}"))
}

fn virtual_machines(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine");
    Api::namespaced_with(client.clone(), NS, &ApiResource::from_gvk(&gvk))
}

/// The applied VirtualMachine of `result`: it names each disk as a hostDisk, the node and the
/// network.
async fn applied(client: &Client, result: &FailoverResult, name: &str, network: &str) -> Value {
    let up = result.recovered_vm.clone().unwrap();
    assert!(up.succeeded, "{up:?}");
    assert_eq!(
        up.definition.as_deref(),
        Some(format!("kubevirt.io/v1 VirtualMachine {NS}/{name}").as_str())
    );
    let object = virtual_machines(client).get(name).await.unwrap();
    let object = serde_json::to_value(object).unwrap();
    let spec = &object["spec"]["template"]["spec"];
    assert_eq!(spec["nodeSelector"]["kubernetes.io/hostname"], NODE);
    assert_eq!(spec["networks"][0]["multus"]["networkName"], network);
    for (i, disk) in result.disks.iter().enumerate() {
        assert_eq!(spec["volumes"][i]["name"], disk.name.as_str());
        assert_eq!(
            spec["volumes"][i]["hostDisk"]["path"],
            disk.location.as_str()
        );
        assert_eq!(
            spec["domain"]["devices"]["disks"][i]["name"],
            disk.name.as_str()
        );
    }
    object
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_failover_applies_the_kubevirt_example_and_its_cleanup_deletes_it() {
    lifeboat_http::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let served = work.join("served");
    let at = work.join("vm");
    std::fs::create_dir_all(&at).unwrap();
    let qsd = Qsd::start(&at, &[("root", 8 * MIB), ("data", 4 * MIB)]);
    qsd.guest_write("root", 0, 2 * MIB, 0x41);
    qsd.guest_write("data", MIB, MIB, 0x42);

    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let _site = Site::start(&client, NS, NODE, work);
    let hooks_dir = work.join("hooks");
    std::fs::create_dir_all(&hooks_dir).unwrap();
    let runner = LocalJobRunner::start(client.clone(), NS, hooks_dir);

    local_policy(&client, NS, "local-5m", &work.join("replicas")).await;
    let example =
        std::fs::read_to_string(workspace_root().join("examples/recovered-vm-kubevirt.yaml"))
            .unwrap()
            .replace("/var/lib/lifeboat/vms/app-01", &at.display().to_string());
    let mut manifest: Value = serde_saphyr::from_str(&example).unwrap();
    let hook: PathBuf = workspace_root().join("examples/hooks/serve-with-qemu.sh");
    manifest["spec"]["recoveredVm"]["hook"] = json!({"name": "serve", "job": {"template": {"spec": {
        "restartPolicy": "Never",
        "containers": [{"name": "hook", "image": "registry.example/lifeboat-hooks:1",
                        "command": [hook, served]}]
    }}}});
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    vms.create(
        &PostParams::default(),
        &serde_json::from_value(manifest).unwrap(),
    )
    .await
    .unwrap();
    for attempt in 0.. {
        let vm = vms.get("app-01").await.unwrap();
        let protected = vm.status.as_ref().is_some_and(|s| {
            s.phase == ProtectionPhase::Protected
                && s.agent
                    .as_ref()
                    .is_some_and(|a| a.recovery_points.count >= 1)
        });
        if protected {
            break;
        }
        assert!(attempt < 900, "not protected: {:?}", vm.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sources: Vec<Vec<u8>> = ["root", "data"].map(|d| qsd.read_disk(d)).to_vec();

    // The test failover: the VirtualMachine applied, owned by the ProtectedVM; the hook Job
    // serves the disks.
    let vm = ask(&client, Action::TestFailover(None)).await;
    let test = vm.status.unwrap().test_failover.unwrap();
    let object = applied(&client, &test, "app-01-test", "lifeboat/isolated").await;
    assert_eq!(object["metadata"]["ownerReferences"][0]["name"], "app-01");
    assert_eq!(object["metadata"]["labels"]["lifeboat.io/vm"], "app-01");
    assert_eq!(
        object["metadata"]["labels"]["lifeboat.io/action"],
        "TestFailover"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
    let told: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("app-01"))
        .filter_map(|e| {
            e.note
                .filter(|_| e.reason.as_deref() == Some("RecoveredVmUp"))
        })
        .collect();
    assert_eq!(
        told,
        ["recovered VM app-01-test (kubevirt.io/v1 VirtualMachine lifeboat/app-01-test) is up"]
    );
    assert_eq!(runner.ran().len(), 1, "{:?}", runner.ran());
    assert!(
        runner.ran()[0].starts_with("app-01-hook-"),
        "{:?}",
        runner.ran()
    );
    for (disk, want) in test.disks.iter().zip(&sources) {
        let socket = served.join(format!("app-01-{}.sock", disk.name));
        let scratch = work.join(format!("{}.read", disk.name));
        let what = format!("disk {} served by the hook Job", disk.name);
        assert_served(&what, &socket, &disk.name, want, &scratch);
    }

    // The cleanup: the VirtualMachine deleted and the servers stopped, then the disks gone.
    ask(&client, Action::Cleanup).await;
    assert!(
        virtual_machines(&client)
            .get_opt("app-01-test")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(runner.ran().len(), 2, "{:?}", runner.ran());
    for disk in &test.disks {
        assert!(
            !Path::new(&disk.location).exists(),
            "{} is left",
            disk.location
        );
        assert!(!served.join(format!("app-01-{}.sock", disk.name)).exists());
    }

    // An unplanned failover: `app-01` on the production network, kept after the ProtectedVM.
    let vm = ask(
        &client,
        Action::Failover {
            planned: false,
            point: None,
        },
    )
    .await;
    let failover = vm.status.unwrap().failover.unwrap();
    let object = applied(&client, &failover, "app-01", "lifeboat/production").await;
    assert!(
        object["metadata"].get("ownerReferences").is_none(),
        "{object}"
    );
    let all = virtual_machines(&client)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        all.items
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>(),
        ["app-01"]
    );
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for p in '{}'/*.pid; do kill $(cat \"$p\"); done",
            served.display()
        ))
        .status();
}
