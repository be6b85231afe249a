//! The README's first command, run as a newcomer would: `examples/quickstart/quickstart.sh`
//! with the binary this build made. It must succeed, say what it did, and leave a replica
//! equal to the source disk, also when its folder's path has a space and a non-ASCII letter
//! (the VM's sockets then live under such a path, as many users' do).

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn the_quickstart_protects_a_disk_and_its_test_failover_equals_the_source() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("Quick start é");
    std::fs::create_dir(&dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new("bash")
        .arg(root.join("examples/quickstart/quickstart.sh"))
        .env("LIFEBOAT", env!("CARGO_BIN_EXE_lifeboat"))
        .env("LIFEBOAT_QUICKSTART_DIR", &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the quickstart failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "is valid",
        "initial replication done, first recovery point cut",
        "Protected",
        "POINT",
        "the test failover disk equals the source, byte for byte",
        "== done.",
    ] {
        assert!(
            stdout.contains(expected),
            "the quickstart did not say {expected:?}:\n{stdout}"
        );
    }
    // The live replica equals the source disk (qemu-storage-daemon has stopped: read the qcow2).
    let source = dir.join("source-check.raw");
    let convert = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(dir.join("web-01-root.qcow2"))
        .arg(&source)
        .status()
        .unwrap();
    assert!(convert.success());
    let replica = std::fs::read(dir.join("replicas/default/web-01/disks/root.img")).unwrap();
    assert!(
        replica == std::fs::read(&source).unwrap(),
        "the replica differs from the source"
    );
}
