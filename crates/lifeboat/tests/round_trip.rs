//! The recovery life cycle in standalone mode, as a user runs it: the `lifeboat` binary (the
//! daemon and the tools) on two real qemu-storage-daemon VMs and the local folder store.
//! Protect A, planned failover (A stopped first: every write made before it is in the failed-over
//! disk), run the recovered VM B on that disk, `lifeboat reprotect` (B replicates in reverse),
//! A's original disk kept in step with B's points while B runs, `lifeboat failback` (B
//! stopped and A's disk brought to B's last point: no fresh point first), `lifeboat
//! reprotect` again (A replicates forward). The failover brings the recovered VM's definition
//! up beside its disk (`spec.recoveredVm`); the failback takes it down once B is stopped. The
//! daemon is killed with SIGKILL (a crash of the
//! process: the kernel keeps the page cache and every write it accepted) at a random moment of
//! the re-protect and of the failback; each resumes, and the round trip still ends with every
//! copy equal to its source byte for byte.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{Daemon, lifeboat};
use lifeboat_qemu::testing::{DiskSpec, Qsd, assert_same, wait_stamp_used};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 16 * MIB;

fn status(work: &Path) -> Value {
    let vms: Value = serde_json::from_str(&lifeboat(work, &["status", "--json"])).unwrap();
    vms.as_array()
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or(Value::Null)
}

fn field<'a>(s: &'a Value, pointer: &str) -> &'a str {
    s.pointer(pointer).and_then(Value::as_str).unwrap_or("")
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
                log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn write_manifests(work: &Path) {
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("policy.yaml"),
        format!(
            "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: fast}}\nspec:\n  copyFrequency: 30s\n  target:\n    local: {{path: \"{}\"}}\n",
            work.join("replicas").display()
        ),
    )
    .unwrap();
    let (a, b) = (work.join("site-a"), work.join("site-b"));
    std::fs::write(
        manifests.join("vm.yaml"),
        format!(
            "apiVersion: lifeboat.io/v1alpha1
kind: ProtectedVM
metadata: {{name: web-01}}
spec:
  vmName: web-01
  nodeName: site-a
  hypervisor:
    qemu: {{qmpSocket: \"{}\"}}
  disks:
    - {{name: root, path: \"{}\", blockNode: root}}
  policyRef: {{name: fast}}
  recoverySite:
    nodeName: site-b
    hypervisor:
      qemu: {{qmpSocket: \"{}\"}}
    disks:
      - {{name: root, path: \"{}\", blockNode: root}}
  recoveredVm:
    name: web-01-dr
    template: \"<domain><name>{{{{ name }}}}</name><disk>{{{{ disk.root.location }}}}</disk></domain>\"
",
            a.join("qmp.sock").display(),
            a.join("root.img").display(),
            b.join("qmp.sock").display(),
            failover_image(work).display(),
        ),
    )
    .unwrap();
}

/// Where the failover writes the recovered VM's disk, and B runs on it.
fn failover_image(work: &Path) -> std::path::PathBuf {
    work.join("failover").join("web-01-failover-root.img")
}

/// Wait until the daemon has used the stamp beside the raw image `image` and says it armed
/// the seed bitmap of the VM that started on it (the file unwritten since the failover or
/// failback left it): one more such line in its log than `armed_before`.
fn wait_armed(work: &Path, image: &Path, armed_before: usize) {
    wait_stamp_used(image, 30);
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_count(work, "the VM's writes since its disks' point are recorded") <= armed_before {
        assert!(
            Instant::now() < deadline,
            "the stamp beside {} is gone, and the daemon never said it armed the VM's disk",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many lines of the daemon's log contain `text`.
fn log_count(work: &Path, text: &str) -> usize {
    let log = std::fs::read_to_string(work.join("daemon.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains(text)).count()
}

/// A pseudo-random delay of up to `max_ms`, printed so that a failure can be replayed by hand.
fn random_delay(what: &str, max_ms: u64) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let ms = u64::from(nanos) % max_ms;
    eprintln!("SIGKILL of the daemon {ms} ms into the {what}");
    Duration::from_millis(ms)
}

/// Ask for `action` without waiting, kill the daemon at a random moment of it, start a new
/// one: the job resumes (or runs again) and the request is handled.
fn crash_during(work: &Path, daemon: &mut Daemon, action: &str, max_ms: u64) -> Daemon {
    lifeboat(work, &[action, "web-01", "--no-wait"]);
    std::thread::sleep(random_delay(action, max_ms));
    daemon.kill9();
    let daemon = Daemon::start(work);
    // NB: the interrupted job is retried on the ASR backoff; `retry` skips the wait (the
    // resumption is the same).
    lifeboat(work, &["retry", "web-01", "--no-wait"]);
    daemon
}

/// `at`, to the second, as status writes times.
fn whole_seconds(at: SystemTime) -> String {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    lifeboat_core::rpo::format_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The recovery points in the store, by name, oldest first.
fn store_points(work: &Path) -> Vec<String> {
    lifeboat(work, &["points", "web-01", "-o", "name"])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn read_image(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes.truncate(SIZE as usize);
    bytes
}

#[test]
fn a_round_trip_through_the_cli_survives_sigkill_of_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let (a_dir, b_dir) = (work.join("site-a"), work.join("site-b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut qsd_a = Qsd::start_with(&a_dir, &[DiskSpec::raw_file("root", SIZE)]);
    qsd_a.guest_write("root", 0, 4 * MIB, 0x61);
    write_manifests(work);
    let mut daemon = Daemon::start(work);
    wait_for(work, "protection", 120, |s| {
        field(s, "/status/phase") == "Protected"
    });

    // Planned failover: A stops first, so this write (no cycle has shipped it) is kept.
    qsd_a.guest_write("root", 6 * MIB, MIB, 0x62);
    let want = qsd_a.read_disk("root");
    let out = lifeboat(work, &["failover", "web-01", "--planned"]);
    assert!(out.contains("phase FailedOver, direction Forward"), "{out}");
    qsd_a.stop();
    let failed_over = failover_image(work);
    assert_same("failover disk", &read_image(&failed_over), &want);
    let s = status(work);
    let definition = std::path::PathBuf::from(field(&s, "/status/failover/recoveredVm/definition"));
    assert_eq!(
        definition,
        work.join("failover").join("web-01-dr.xml"),
        "{s:#}"
    );
    assert!(
        std::fs::read_to_string(&definition)
            .unwrap()
            .contains("<name>web-01-dr</name>")
    );

    // B runs on the failover's disk, where the failover wrote it; the daemon has QEMU record
    // its writes since the point before the guest writes; re-protect (killed once on the way).
    let qsd_b = Qsd::start_with(&b_dir, &[DiskSpec::raw_file_at("root", &failed_over)]);
    wait_armed(work, &failed_over, 0);
    qsd_b.guest_write("root", 2 * MIB, 512 * 1024, 0x71);
    let mut daemon = crash_during(work, &mut daemon, "reprotect", 1500);
    let s = wait_for(work, "re-protect in reverse", 120, |s| {
        field(s, "/status/phase") == "Protected" && field(s, "/status/direction") == "Reverse"
    });
    assert!(
        s.pointer("/status/handledRequests/reprotect").is_some(),
        "{s:#}"
    );
    let wide = lifeboat(work, &["status", "-o", "wide"]);
    assert!(
        wide.contains("DIRECTION") && wide.contains("Reverse") && wide.contains("site-b"),
        "{wide}"
    );
    // What the replica holds now is B: a test failover of it equals B's disk.
    lifeboat(work, &["failover", "web-01", "--test"]);
    assert_same(
        "test failover in reverse",
        &read_image(&work.join("failover").join("web-01-test-root.img")),
        &qsd_b.read_disk("root"),
    );
    lifeboat(work, &["cleanup", "web-01"]);

    // While B runs, A's disk is kept in step with B's points: once it holds a point captured
    // after this write, A's disk is B's, before any failback.
    qsd_b.guest_write("root", 10 * MIB, MIB, 0x72);
    let written = whole_seconds(SystemTime::now());
    let b_final = qsd_b.read_disk("root");
    let s = wait_for(work, "A's disk kept in step", 150, |s| {
        s.pointer("/status/originalDisksInStepTime")
            .and_then(Value::as_str)
            .is_some_and(|t| t > written.as_str())
    });
    assert_eq!(field(&s, "/status/phase"), "Protected", "{s:#}");
    let listed = lifeboat(work, &["jobs", "web-01"]);
    assert!(listed.contains("Failback (in step)"), "{listed}");
    let wide = lifeboat(work, &["status", "-o", "wide"]);
    let column = wide.lines().next().unwrap().find("IN STEP").unwrap();
    let row = wide.lines().find(|l| l.starts_with("web-01")).unwrap();
    assert!(
        row[column..].starts_with(|c: char| c.is_ascii_digit()),
        "the age of the point A's disk holds: {wide}"
    );
    assert_same(
        "A's disk kept in step while B runs",
        &read_image(&a_dir.join("root.img")),
        &b_final,
    );

    // Fail back (killed once on the way): B stops, A's disk becomes B's, write for write.
    assert!(
        definition.exists(),
        "the recovered VM runs until the failback"
    );
    let mut daemon = crash_during(work, &mut daemon, "failback", 1500);
    let s = wait_for(work, "the failback", 120, |s| {
        field(s, "/status/phase") == "FailedBack"
            && s.pointer("/status/failover/recoveredVm/removed") == Some(&Value::Bool(true))
    });
    assert_eq!(
        s.pointer("/status/failover/failback"),
        Some(&Value::Bool(true)),
        "{s:#}"
    );
    assert_eq!(
        field(&s, "/status/failover/recoveredVm/definition"),
        definition.display().to_string()
    );
    assert!(
        !definition.exists(),
        "the failback took the recovered VM's definition down"
    );
    assert_eq!(
        field(&s, "/status/failover/disks/0/location"),
        a_dir.join("root.img").display().to_string()
    );
    // A's disk being in step, the failback needed no fresh point while B ran: B stopped and
    // shipped, then A's disk brought to B's last point. Jobs with no request kept A in step.
    let jobs: Value = serde_json::from_str(&lifeboat(work, &["jobs", "web-01", "--json"])).unwrap();
    let jobs = jobs.as_array().unwrap();
    let flag = |j: &Value, flag: &str| {
        j.pointer(&format!("/spec/parameters/{flag}")) == Some(&Value::Bool(true))
    };
    let succeeded = |j: &Value, kind: &str| {
        field(j, "/spec/type") == kind && field(j, "/status/phase") == "Succeeded"
    };
    assert!(
        jobs.iter().any(|j| succeeded(j, "Failback")
            && flag(j, "presync")
            && j.pointer("/spec/parameters/requestToken").is_none()),
        "{jobs:#?}"
    );
    assert!(
        jobs.iter()
            .any(|j| succeeded(j, "Failover") && flag(j, "toPrimary") && !flag(j, "presync")),
        "{jobs:#?}"
    );
    assert!(
        !jobs
            .iter()
            .any(|j| field(j, "/spec/type") == "Failover" && flag(j, "presync")),
        "no fresh point: {jobs:#?}"
    );
    let mut qsd_b = qsd_b;
    qsd_b.stop();
    assert_same(
        "A's disk after the failback",
        &read_image(&a_dir.join("root.img")),
        &b_final,
    );

    // A runs again on its own disk (armed as B's was, and written); re-protect forward reads
    // only that write; a cycle ships A's next write.
    let armed = log_count(work, "the VM's writes since its disks' point are recorded");
    qsd_a.start_again();
    wait_armed(work, &a_dir.join("root.img"), armed);
    qsd_a.guest_write("root", 14 * MIB, 64 * 1024, 0x80);
    let seeded = "the disk's record of its writes since the point holds";
    let before = log_count(work, seeded);
    let out = lifeboat(work, &["reprotect", "web-01"]);
    assert!(out.contains("phase Protected, direction Forward"), "{out}");
    assert!(
        log_count(work, seeded) > before,
        "re-protect A compared only the blocks A wrote since the failback"
    );
    let before = store_points(work);
    qsd_a.guest_write("root", 12 * MIB, MIB, 0x81);
    let deadline = Instant::now() + Duration::from_secs(90);
    while store_points(work).last() == before.last() {
        assert!(
            Instant::now() < deadline,
            "no forward cycle after {before:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    lifeboat(work, &["failover", "web-01", "--test"]);
    assert_same(
        "test failover forward again",
        &read_image(&work.join("failover").join("web-01-test-root.img")),
        &qsd_a.read_disk("root"),
    );
    daemon.kill9();
}

#[test]
fn reprotect_and_failback_refuse_plainly_when_they_cannot_apply() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let a_dir = work.join("site-a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let _qsd = Qsd::start_with(&a_dir, &[DiskSpec::raw_file("root", SIZE)]);
    write_manifests(work);
    let mut daemon = Daemon::start(work);
    wait_for(work, "protection", 120, |s| {
        field(s, "/status/phase") == "Protected"
    });
    for (action, says) in [
        ("failback", "replicates forward"),
        ("reprotect", "only a VM that failed over or failed back"),
    ] {
        let out = std::process::Command::new(common::LIFEBOAT)
            .args([action, "web-01", "--state-dir"])
            .arg(work.join("state"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{action}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(says) && stderr.contains("web-01"),
            "{action}: {stderr}"
        );
    }
    daemon.kill9();
}
