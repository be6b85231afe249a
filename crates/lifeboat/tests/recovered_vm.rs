//! A recovered VM in standalone mode, end to end, as a user runs it: the example
//! examples/recovered-vm-qemu.yaml (its paths pointed at this test's folder) on a real
//! qemu-storage-daemon VM with two disks, the `lifeboat` binary as separate processes.
//!
//! A test failover writes the disks, renders the example's libvirt domain beside them (a
//! well-formed XML naming each failed-over disk, its format, the `-test` name and the
//! isolated network) and runs the example hook, which serves each disk with
//! qemu-storage-daemon: read back here over NBD, each equals its source. The cleanup stops
//! the servers and removes the domain before the disks. An unplanned failover then brings the
//! VM up under its own name on the production network.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Daemon, lifeboat, wait_until};
use lifeboat_api::ProtectedVM;
use lifeboat_api::protected_vm::FailoverResult;
use lifeboat_qemu::testing::{Qsd, assert_served};

const MIB: u64 = 1024 * 1024;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The example, pointed at this test's VM, hook and folders; a policy shipping every 30 s.
fn write_manifests(work: &Path, qsd: &Qsd, served: &Path) {
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let example =
        std::fs::read_to_string(workspace().join("examples/recovered-vm-qemu.yaml")).unwrap();
    let hook = workspace().join("examples/hooks/serve-with-qemu.sh");
    let vm = example
        .replace(
            "/var/lib/lifeboat/vms/shop-01",
            &qsd.dir.display().to_string(),
        )
        .replace(
            "/etc/lifeboat/hooks/serve-with-qemu.sh",
            &hook.display().to_string(),
        )
        .replace("/run/lifeboat/served", &served.display().to_string());
    let policy = format!(
        "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: local-5m, namespace: lifeboat}}\nspec:\n  copyFrequency: 30s\n  target:\n    local: {{path: '{}'}}\n",
        work.join("replicas").display()
    );
    std::fs::write(manifests.join("policy.yaml"), policy).unwrap();
    std::fs::write(manifests.join("vm.yaml"), vm).unwrap();
}

/// The VM, once the daemon has read it.
fn try_vm(work: &Path) -> Option<ProtectedVM> {
    let list: serde_json::Value =
        serde_json::from_str(&lifeboat(work, &["status", "-n", "lifeboat", "--json"])).unwrap();
    list.get(0)
        .map(|vm| serde_json::from_value(vm.clone()).unwrap())
}

fn vm(work: &Path) -> ProtectedVM {
    try_vm(work).unwrap()
}

/// The rendered domain: well-formed XML (Python's parser says so), its text.
fn domain(result: &FailoverResult) -> (PathBuf, String) {
    let up = result.recovered_vm.clone().unwrap();
    assert!(up.succeeded, "{up:?}");
    let path = PathBuf::from(up.definition.unwrap());
    let parsed = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as t; t.parse(sys.argv[1])",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{} is not well-formed XML: {}",
        path.display(),
        String::from_utf8_lossy(&parsed.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

#[test]
fn a_test_failover_brings_up_the_example_vm_and_its_cleanup_takes_it_down() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let served = work.join("served");
    let at = work.join("vm");
    std::fs::create_dir_all(&at).unwrap();
    let qsd = Qsd::start(&at, &[("root", 8 * MIB), ("data", 4 * MIB)]);
    qsd.guest_write("root", 0, 2 * MIB, 0x31);
    qsd.guest_write("data", MIB, MIB, 0x32);
    write_manifests(work, &qsd, &served);
    let _daemon = Daemon::start(work);
    wait_until(work, "a recovery point", 180, || {
        try_vm(work)
            .and_then(|vm| vm.status)
            .is_some_and(|s| s.recovery_points.count >= 1)
    });
    let source: Vec<Vec<u8>> = ["root", "data"].map(|d| qsd.read_disk(d)).to_vec();

    // The test failover returns once the recovered VM is up.
    let out = lifeboat(work, &["failover", "--test", "-n", "lifeboat", "shop-01"]);
    let status = vm(work).status.unwrap();
    let test = status.test_failover.clone().unwrap();
    let (path, text) = domain(&test);
    assert!(
        out.contains("shop-01-test"),
        "the CLI names the recovered VM: {out}"
    );
    assert_eq!(path.parent(), Path::new(&test.disks[0].location).parent());
    assert!(text.contains("<name>shop-01-test</name>"), "{text}");
    assert!(text.contains("<source network='isolated'/>"), "{text}");
    assert!(text.contains("action='TestFailover'"), "{text}");
    for (disk, want) in test.disks.iter().zip(&source) {
        assert!(
            text.contains(&format!(
                "<lifeboat:disk name='{}' location='{}' format='raw'/>",
                disk.name, disk.location
            )),
            "{text}"
        );
        let socket = served.join(format!("shop-01-{}.sock", disk.name));
        assert!(
            text.contains(&format!("socket='{}'", socket.display())),
            "{text}"
        );
        let scratch = work.join(format!("{}.read", disk.name));
        let what = format!("disk {} served by the hook", disk.name);
        assert_served(&what, &socket, &disk.name, want, &scratch);
    }

    // The cleanup stops the servers and removes the domain with the disks.
    lifeboat(work, &["cleanup", "-n", "lifeboat", "shop-01"]);
    assert!(!path.exists(), "{} is left", path.display());
    for disk in &test.disks {
        assert!(
            !Path::new(&disk.location).exists(),
            "{} is left",
            disk.location
        );
        assert!(!served.join(format!("shop-01-{}.sock", disk.name)).exists());
    }
    assert!(vm(work).status.unwrap().test_failover.is_none());

    // An unplanned failover brings it up under its own name, on the production network.
    lifeboat(
        work,
        &[
            "failover",
            "--unplanned",
            "--yes",
            "-n",
            "lifeboat",
            "shop-01",
        ],
    );
    let failover = vm(work).status.unwrap().failover.unwrap();
    let (_, text) = domain(&failover);
    assert!(text.contains("<name>shop-01</name>"), "{text}");
    assert!(text.contains("<source network='production'/>"), "{text}");
    assert!(text.contains("action='Failover'"), "{text}");
    for (disk, want) in failover.disks.iter().zip(&source) {
        let socket = served.join(format!("shop-01-{}.sock", disk.name));
        let scratch = work.join(format!("{}.failover", disk.name));
        let what = format!("failed-over disk {}", disk.name);
        assert_served(&what, &socket, &disk.name, want, &scratch);
    }
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for p in '{}'/*.pid; do kill $(cat \"$p\"); done",
            served.display()
        ))
        .status();
}
