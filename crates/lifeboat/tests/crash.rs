//! SIGKILL at the worst moments: the standalone daemon (the engine, the decisions and the
//! store in one process) is killed while it copies a disk for the first time, and again while
//! it resynchronizes; started again on the same folders, it resumes and the replica ends equal
//! to the source.
//!
//! NB: this simulates a crash of the process, not a power cut. SIGKILL keeps the page cache
//! and every write the kernel accepted, so these tests say nothing about what a power cut
//! (which keeps only what was flushed) leaves behind. And a newcomer's mistake: a QMP socket that does not
//! exist leaves that VM Critical with a reason naming the socket, without holding up another.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, lifeboat};
use lifeboat_qemu::testing::{Qsd, assert_same};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;
fn vm(work: &Path, name: &str) -> Value {
    let all: Value = serde_json::from_str(&lifeboat(work, &["status", "--json"])).unwrap();
    all.as_array()
        .and_then(|vms| {
            vms.iter()
                .find(|v| v.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
        })
        .cloned()
        .unwrap_or(Value::Null)
}

/// The current job of `name`, from the embedded store.
fn job(work: &Path, name: &str) -> Value {
    let Some(job) = vm(work, name)
        .pointer("/status/currentJob/name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Value::Null;
    };
    let path = work
        .join("state/db/ReplicationJob/default")
        .join(format!("{job}.json"));
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn wait_until(work: &Path, what: &str, seconds: u64, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(work.join("daemon.log")).unwrap_or_default();
            let requests = std::fs::read_to_string(work.join("state/requests/default/web.json"));
            let alive = std::process::Command::new("pgrep")
                .args(["-f", "lifeboat standalone"])
                .output();
            panic!(
                "timed out waiting for {what}\nVM status: {}\njob: {}\nrequests: {requests:?}\ndaemons: {alive:?}\nlog tail:\n{}",
                vm(work, "web")
                    .pointer("/status")
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                job(work, "web")
                    .pointer("/status")
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                log.lines().rev().take(12).collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn running_with_progress(work: &Path, job_type: &str) -> bool {
    let j = job(work, "web");
    j.pointer("/spec/type").and_then(Value::as_str) == Some(job_type)
        && j.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
        && j.pointer("/status/progress/bytesDone")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            > 0
}

/// SIGKILL `daemon` in the middle of `what`, start it again, wait until the interrupted job
/// shows as failed (recoverable), and ask for the retry now rather than in 16 minutes.
fn kill_restart_and_retry(mut daemon: Daemon, work: &Path, what: &str) -> Daemon {
    daemon.kill9();
    let daemon = Daemon::start(work);
    wait_until(
        work,
        &format!("the interrupted {what} to be seen as failed"),
        30,
        || interrupted(work),
    );
    lifeboat(work, &["retry", "web", "--no-wait"]);
    daemon
}

/// The VM's status shows its job ended by the kill (failed, recoverable, to be retried).
fn interrupted(work: &Path) -> bool {
    let v = vm(work, "web");
    v.pointer("/status/currentJob/phase")
        .and_then(Value::as_str)
        == Some("Failed")
        && v.pointer("/status/currentJob/lastError/reason")
            .and_then(Value::as_str)
            == Some("AgentRestarted")
}

fn latest_point(work: &Path) -> String {
    vm(work, "web")
        .pointer("/status/recoveryPoints/latest/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn killed_during_the_copy_and_the_resync_it_resumes_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();

    let qsd = Qsd::start(work, &[("root", 512 * MIB)]);
    let writes: Vec<(u64, u64, u8)> = (0..12)
        .map(|i| (i * 40 * MIB, 16 * MIB, 0x10 + i as u8))
        .collect();
    qsd.guest_writes("root", &writes);
    std::fs::create_dir_all(work.join("manifests")).unwrap();
    // NB: 400 Mbit/s (50 MB/s) keeps the copy going long enough to be killed in the middle.
    std::fs::write(
        work.join("manifests/all.yaml"),
        format!(
            "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: p}}\nspec:\n  copyFrequency: 15m\n  bandwidth: {{offHoursMbps: 400}}\n  target: {{local: {{path: {replicas}}}}}\n---\napiVersion: lifeboat.io/v1alpha1\nkind: ProtectedVM\nmetadata: {{name: web}}\nspec:\n  vmName: web\n  nodeName: here\n  hypervisor: {{qemu: {{qmpSocket: {qmp}}}}}\n  disks: [{{name: root, path: {disk}, blockNode: root}}]\n  policyRef: {{name: p}}\n---\napiVersion: lifeboat.io/v1alpha1\nkind: ProtectedVM\nmetadata: {{name: ghost}}\nspec:\n  vmName: ghost\n  nodeName: here\n  hypervisor: {{qemu: {{qmpSocket: /nonexistent/ghost-qmp.sock}}}}\n  disks: [{{name: root, path: /nonexistent/ghost.qcow2, blockNode: root}}]\n  policyRef: {{name: p}}\n",
            replicas = work.join("replicas").display(),
            qmp = qsd.qmp.display(),
            disk = work.join("root.qcow2").display(),
        ),
    )
    .unwrap();

    // Killed in the middle of the initial copy.
    let daemon = Daemon::start(work);
    wait_until(work, "the initial copy to be under way", 60, || {
        running_with_progress(work, "EnableProtection")
    });
    let mut daemon = kill_restart_and_retry(daemon, work, "copy");
    wait_until(work, "protection after the restart", 180, || {
        !latest_point(work).is_empty()
    });
    let point = latest_point(work);
    let replica = std::fs::read(work.join("replicas/default/web/disks/root.img")).unwrap();
    assert_same(
        "the replica after a kill during the copy",
        &replica,
        &qsd.read_disk("root"),
    );

    // The VM whose QMP socket does not exist is Critical, and says why.
    wait_until(work, "the ghost VM's verdict", 30, || {
        vm(work, "ghost")
            .pointer("/status/health")
            .and_then(Value::as_str)
            == Some("Critical")
    });
    let ghost = vm(work, "ghost");
    let error = ghost
        .pointer("/status/lastError")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(
        error.pointer("/reason").and_then(Value::as_str),
        Some("VmNotFound"),
        "{ghost:#}"
    );
    assert!(
        error
            .pointer("/message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .contains("/nonexistent/ghost-qmp.sock"),
        "{error:#}"
    );

    // The daemon is down while the guest rewrites a third of the disk; a resync is asked for
    // and killed in the middle; the restarted daemon finishes it.
    daemon.kill9();
    let rewrites: Vec<(u64, u64, u8)> = (0..10)
        .map(|i| (i * 48 * MIB + 8 * MIB, 16 * MIB, 0xA0 + i as u8))
        .collect();
    qsd.guest_writes("root", &rewrites);
    let daemon = Daemon::start(work);
    lifeboat(work, &["resync", "web", "--no-wait"]);
    wait_until(work, "the resync to be under way", 120, || {
        running_with_progress(work, "Resynchronize")
    });
    let mut daemon = kill_restart_and_retry(daemon, work, "resync");
    wait_until(work, "the resync after the restart", 240, || {
        let v = vm(work, "web");
        v.pointer("/status/handledRequests/resync").is_some()
            && v.pointer("/status/phase").and_then(Value::as_str) == Some("Protected")
            && latest_point(work) != point
    });
    let replica = std::fs::read(work.join("replicas/default/web/disks/root.img")).unwrap();
    assert_same(
        "the replica after a kill during the resync",
        &replica,
        &qsd.read_disk("root"),
    );
    daemon.kill9();
}
