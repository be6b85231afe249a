//! Standalone mode end to end, as a user runs it: the `lifeboat` binary as a separate process
//! on a real qemu-storage-daemon disk and the local folder store. Protect, write, cycle,
//! resync on request, kill the daemon with SIGKILL and start it again (nothing lost, same
//! state), test failover and cleanup, planned failover, commit. And a storage account key
//! rotated while the daemon runs, against a real Azurite.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, LIFEBOAT, lifeboat};
use lifeboat_qemu::testing::{Qsd, assert_same};
use lifeboat_store::testing::{Azurite, DEV_KEY, shared_key_store, test_options};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;
fn status(work: &Path) -> Value {
    let vms: Value = serde_json::from_str(&lifeboat(work, &["status", "--json"])).unwrap();
    vms.as_array()
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_for(work: &Path, what: &str, seconds: u64, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let s = status(work);
        if check(&s) {
            return s;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(work.join("daemon.log")).unwrap_or_default();
            panic!(
                "timed out waiting for {what}; status: {s:#}\nlog tail:\n{}",
                log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn points(s: &Value) -> u64 {
    s.pointer("/status/recoveryPoints/count")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn phase(s: &Value) -> &str {
    s.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn write_manifests(work: &Path, qsd: &Qsd) {
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("policy.yaml"),
        format!(
            "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: fast}}\nspec:\n  copyFrequency: 30s\n  target:\n    local: {{path: {}}}\n",
            work.join("replicas").display()
        ),
    )
    .unwrap();
    std::fs::write(
        manifests.join("vm.yaml"),
        format!(
            "apiVersion: lifeboat.io/v1alpha1\nkind: ProtectedVM\nmetadata: {{name: web-01}}\nspec:\n  vmName: web-01\n  nodeName: here\n  hypervisor:\n    qemu: {{qmpSocket: {}}}\n  disks:\n    - {{name: root, path: {}, blockNode: root}}\n  policyRef: {{name: fast}}\n",
            qsd.qmp.display(),
            qsd.dir.join("root.qcow2").display()
        ),
    )
    .unwrap();
}

fn failover_image(work: &Path, label: &str) -> PathBuf {
    work.join("failover")
        .join(format!("web-01-{label}-root.img"))
}

#[test]
fn protect_cycle_resync_restart_failover_commit() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let qsd = Qsd::start(work, &[("root", 32 * MIB)]);
    qsd.guest_write("root", 0, 4 * MIB, 0x61);
    write_manifests(work, &qsd);
    let mut daemon = Daemon::start(work);

    let s = wait_for(work, "protection", 120, |s| {
        phase(s) == "Protected" && points(s) >= 1
    });
    assert_eq!(
        s.pointer("/status/health").and_then(Value::as_str),
        Some("Normal"),
        "{s:#}"
    );

    // A second daemon on the same state folder is refused, naming the first.
    let second = Command::new(LIFEBOAT)
        .args(["standalone", "--manifests"])
        .arg(work.join("manifests"))
        .arg("--state-dir")
        .arg(work.join("state"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another lifeboat standalone"),
        "{second:?}"
    );

    // Write as the guest; a cycle ships it.
    let before = points(&s);
    qsd.guest_write("root", 8 * MIB, MIB, 0x62);
    wait_for(work, "a delta cycle", 90, |s| points(s) > before);

    // Resync on request.
    let out = lifeboat(work, &["resync", "web-01"]);
    assert!(out.contains("done"), "{out}");

    // The daemon dies (SIGKILL) with a write not yet shipped; a new one picks up.
    qsd.guest_write("root", 12 * MIB, MIB, 0x63);
    let before_kill = status(work);
    daemon.kill9();
    let mut daemon = Daemon::start(work);
    let after = wait_for(work, "the restarted daemon", 30, |s| {
        phase(s) == "Protected"
    });
    assert_eq!(
        points(&after),
        points(&before_kill),
        "no point lost or invented"
    );
    wait_for(work, "the cycle after the restart", 90, |s| {
        points(s) > points(&before_kill)
    });

    // Test failover: the disk equals the source now (nothing written since the last cycle).
    let out = lifeboat(work, &["failover", "web-01", "--test"]);
    assert!(out.contains("disk root"), "{out}");
    // In words, not Rust's Debug output.
    assert!(
        out.contains("the test failover to the latest point of ")
            && out.contains("/web-01 is done (phase Protected, health ")
            && !out.contains("Some("),
        "{out}"
    );
    assert_same(
        "test failover disk",
        &std::fs::read(failover_image(work, "test")).unwrap(),
        &qsd.read_disk("root"),
    );
    lifeboat(work, &["cleanup", "web-01"]);
    assert!(!failover_image(work, "test").exists());

    // Planned failover ships what is pending, then commit keeps only that point.
    qsd.guest_write("root", 20 * MIB, MIB, 0x64);
    lifeboat(work, &["failover", "web-01", "--planned"]);
    let s = wait_for(work, "failed over", 30, |s| phase(s) == "FailedOver");
    assert_same(
        "failover disk",
        &std::fs::read(failover_image(work, "failover")).unwrap(),
        &qsd.read_disk("root"),
    );
    assert!(points(&s) >= 3);
    lifeboat(work, &["commit", "web-01", "--yes"]);
    wait_for(work, "the commit", 30, |s| points(s) == 1);
    daemon.kill9();
}

/// A storage key that the store refuses, then the Secret manifest fixed while the daemon
/// runs: a retry protects the VM with the new key, without restarting the daemon (its store
/// was opened with the old key and is opened again).
#[test]
fn a_rotated_storage_key_is_taken_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let qsd = Qsd::start(work, &[("root", 8 * MIB)]);
    qsd.guest_write("root", 0, MIB, 0x62);
    let azurite = Azurite::start();
    // The container is the administrator's, as on Azure.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(shared_key_store(&azurite, "replicas", test_options(1)));
    write_manifests(work, &qsd);
    let manifests = work.join("manifests");
    std::fs::write(
        manifests.join("policy.yaml"),
        format!(
            "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: fast}}\nspec:\n  copyFrequency: 30s\n  target:\n    azureBlob:\n      accountUrl: {}\n      container: replicas\n      credentials:\n        accountKeySecretRef: {{name: storage, key: accountKey}}\n",
            azurite.account_url()
        ),
    )
    .unwrap();
    let secret = |key: &str| {
        std::fs::write(
            manifests.join("secret.yaml"),
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: storage}}\nstringData: {{accountKey: \"{key}\"}}\n"
            ),
        )
        .unwrap();
    };
    // A well-formed key that is not the account's.
    secret("bm90LXRoZS1hY2NvdW50LWtleS1ub3QtdGhlLWFjY291bnQta2V5LW5vdC10aGUta2V5");
    let _daemon = Daemon::start(work);

    let refused = wait_for(work, "the store to refuse the key", 60, |s| {
        [
            "/status/lastError/reason",
            "/status/currentJob/lastError/reason",
        ]
        .iter()
        .any(|p| s.pointer(p).and_then(Value::as_str) == Some("StoreAccessDenied"))
    });
    assert_eq!(points(&refused), 0, "{refused:#}");

    secret(DEV_KEY);
    // NB: the daemon reads the folder again when a file changes; a retry that lands before
    // that fails on the old key once more, so it is asked again until protection starts.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        lifeboat(work, &["retry", "web-01", "--no-wait"]);
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            let s = status(work);
            if phase(&s) == "Protected" && points(&s) >= 1 {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(
            Instant::now() < deadline,
            "not protected with the new key: {:#}\nlog:\n{}",
            status(work),
            std::fs::read_to_string(work.join("daemon.log")).unwrap_or_default()
        );
    }
}
