//! Standalone mode end to end, as a user runs it: the `lifeboat` binary as a separate process
//! on a real qemu-storage-daemon disk and the local folder store. Protect, write, cycle,
//! resync on request, kill the daemon with SIGKILL and start it again (nothing lost, same
//! state), test failover and cleanup, planned failover (the source stopped first), commit. A storage account key
//! rotated while the daemon runs, against a real Azurite. And the site lost for good: the VM
//! recovered by `lifeboat recover` from the replica store alone, local and on Azurite.

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

/// Azurite with the container `replicas` (the administrator's, as on Azure).
fn azurite_with_container() -> Azurite {
    let azurite = Azurite::start();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(shared_key_store(&azurite, "replicas", test_options(1)));
    azurite
}

/// [`write_manifests`] with the policy's target the container `replicas` on `azurite`, its
/// account key in the Secret `storage` (see [`write_storage_secret`]).
fn write_azure_manifests(work: &Path, qsd: &Qsd, azurite: &Azurite) {
    write_manifests(work, qsd);
    std::fs::write(
        work.join("manifests").join("policy.yaml"),
        format!(
            "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: fast}}\nspec:\n  copyFrequency: 30s\n  target:\n    azureBlob:\n      accountUrl: {}\n      container: replicas\n      credentials:\n        accountKeySecretRef: {{name: storage, key: accountKey}}\n",
            azurite.account_url()
        ),
    )
    .unwrap();
}

/// The Secret manifest `storage` with `key` as its `accountKey`.
fn write_storage_secret(work: &Path, key: &str) {
    std::fs::write(
        work.join("manifests").join("secret.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: storage}}\nstringData: {{accountKey: \"{key}\"}}\n"
        ),
    )
    .unwrap();
}

fn failover_image(work: &Path, label: &str) -> PathBuf {
    work.join("failover")
        .join(format!("web-01-{label}-root.img"))
}

/// The daemon answers at once, not at its next tick: a job that ends wakes it (the next job
/// of protection is decided then), and so does the doorbell the command line rings after it
/// writes a request. With a tick of ten minutes, protection and a test failover asked on the
/// command line (which gives up after 60 s) both end within the test's bounds only if they
/// do.
#[test]
fn the_daemon_answers_a_request_without_waiting_for_its_tick() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let qsd = Qsd::start(work, &[("root", 8 * MIB)]);
    qsd.guest_write("root", 0, MIB, 0x61);
    write_manifests(work, &qsd);
    let _daemon = Daemon::start_with(work, &["--tick-seconds", "600"]);
    wait_for(work, "protection", 60, |s| phase(s) == "Protected");
    let out = lifeboat(
        work,
        &["failover", "web-01", "--test", "--timeout-seconds", "60"],
    );
    assert!(out.contains("phase Protected"), "{out}");
    assert_same(
        "the test failover",
        &std::fs::read(failover_image(work, "test")).unwrap(),
        &qsd.read_disk("root"),
    );
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
            && out.contains("/web-01 is done (phase Protected, direction Forward, health ")
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
    let want = qsd.read_disk("root");
    lifeboat(work, &["failover", "web-01", "--planned"]);
    let s = wait_for(work, "failed over", 30, |s| phase(s) == "FailedOver");
    assert_same(
        "failover disk",
        &std::fs::read(failover_image(work, "failover")).unwrap(),
        &want,
    );
    // The source was stopped first: its guest's export is gone.
    assert!(
        !Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &format!("nbd+unix:///root?socket={}", qsd.nbd.display())
            ])
            .args(["-c", "write -P 0x65 0 4096"])
            .output()
            .unwrap()
            .status
            .success()
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
    let azurite = azurite_with_container();
    write_azure_manifests(work, &qsd, &azurite);
    let secret = |key: &str| write_storage_secret(work, key);
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

/// `lifeboat recover ARGS` with `env` and no Azure credentials of the caller's: its standard
/// output, or its standard error when it fails.
fn recover<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new(LIFEBOAT)
        .arg("recover")
        .args(args)
        .env_remove("AZURE_STORAGE_KEY")
        .env_remove("AZURE_STORAGE_SAS_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Protect `web-01` until its first point, then lose the site for good: the daemon, its
/// state folder and the source VM. What the disk held is returned.
fn protect_then_lose_the_site(work: &Path, mut qsd: Qsd) -> Vec<u8> {
    let mut daemon = Daemon::start(work);
    wait_for(work, "protection", 120, |s| {
        phase(s) == "Protected" && points(s) >= 1
    });
    let source = qsd.read_disk("root");
    daemon.kill9();
    qsd.kill();
    std::fs::remove_dir_all(work.join("state")).unwrap();
    source
}

/// `lifeboat recover` on `store` (`--store PATH` or `--azure URL`): the VM is listed with its
/// disk and newest point, and fails over to that point, equal to what the source held.
fn recover_web_01(store: &[&str], env: &[(&str, &str)], to: &Path, source: &[u8]) {
    let with = |args: &[&str]| -> Vec<String> {
        args.iter().chain(store).map(|a| (*a).to_owned()).collect()
    };
    let list = recover(&with(&["list"]), env).unwrap();
    assert!(list.starts_with("NAMESPACE"), "{list}");
    let row = list
        .lines()
        .find(|l| l.contains("web-01"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.starts_with("default")
            && row.contains("qemu")
            && row.contains("here")
            && row.contains("root (8.0 MiB)"),
        "{row}"
    );
    // The VM's definition, as applied: manifests that validate against the CRDs.
    let definition = recover(&with(&["definition", "web-01"]), env).unwrap();
    assert!(
        definition.contains("kind: ProtectedVM")
            && definition.contains("kind: ReplicationPolicy")
            && definition.contains("vmName: web-01")
            && !definition.contains("status"),
        "{definition}"
    );
    let file = to.with_extension("yaml");
    std::fs::write(&file, &definition).unwrap();
    let validated = Command::new(LIFEBOAT)
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    assert!(validated.status.success(), "{validated:?}\n{definition}");
    let points = recover(&with(&["points", "web-01"]), env).unwrap();
    let newest = points
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(row.ends_with(newest), "{row}\n{points}");
    let out = recover(
        &with(&[
            "failover",
            "web-01",
            "--point",
            newest,
            "--to",
            to.to_str().unwrap(),
        ]),
        env,
    )
    .unwrap();
    assert!(
        out.contains("disk root") && out.contains("digest verified"),
        "{out}"
    );
    assert_same(
        "the recovered disk",
        &std::fs::read(to.join("web-01-recovered-root.img")).unwrap(),
        source,
    );
}

#[test]
fn the_site_is_lost_and_the_local_store_alone_recovers_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let qsd = Qsd::start(work, &[("root", 8 * MIB)]);
    qsd.guest_write("root", 0, MIB, 0x71);
    qsd.guest_write("root", 5 * MIB, MIB, 0x72);
    write_manifests(work, &qsd);
    let source = protect_then_lose_the_site(work, qsd);
    let replicas = work.join("replicas");
    let store = ["--store", replicas.to_str().unwrap()];
    let to = work.join("recovered");
    recover_web_01(&store, &[], &to, &source);

    // What is not there is refused, by name.
    let with = |args: &[&str]| -> Vec<String> {
        args.iter().chain(&store).map(|a| (*a).to_owned()).collect()
    };
    let err = recover(&with(&["points", "db-01"]), &[]).unwrap_err();
    assert!(err.contains("no VM default/db-01"), "{err}");
    let to_arg = to.to_str().unwrap();
    let err = recover(
        &with(&["failover", "web-01", "--point", "p-9", "--to", to_arg]),
        &[],
    )
    .unwrap_err();
    assert!(err.contains("has no point \"p-9\""), "{err}");
    // A point by time: the newest at or before it; none before the first; a bad time is
    // named with the argument.
    let err = recover(
        &with(&[
            "failover",
            "web-01",
            "--point",
            "not-after:1999-01-01T00:00:00Z",
            "--to",
            to_arg,
        ]),
        &[],
    )
    .unwrap_err();
    assert!(
        err.contains("has no point at or before 1999-01-01T00:00:00Z"),
        "{err}"
    );
    let err = recover(
        &with(&[
            "failover",
            "web-01",
            "--point",
            "not-after:soon",
            "--to",
            to_arg,
        ]),
        &[],
    )
    .unwrap_err();
    assert!(
        err.contains("--point") && err.contains("\"soon\" is not an RFC 3339 time"),
        "{err}"
    );
    let by_time = work.join("recovered by time");
    let out = recover(
        &with(&[
            "failover",
            "web-01",
            "--point",
            "not-after:2100-01-01T00:00:00Z",
            "--to",
            by_time.to_str().unwrap(),
        ]),
        &[],
    )
    .unwrap();
    assert!(out.contains("digest verified"), "{out}");
    assert_same(
        "the disk recovered by time",
        &std::fs::read(by_time.join("web-01-recovered-root.img")).unwrap(),
        &source,
    );

    // A replica damaged after the point: the failover refuses it and leaves no disk behind.
    let image = to.join("web-01-recovered-root.img");
    std::fs::remove_file(&image).unwrap();
    let live = replicas.join("default/web-01/disks/root.img");
    let file = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xEE; 4096], 5 * MIB).unwrap();
    let err = recover(&with(&["failover", "web-01", "--to", to_arg]), &[]).unwrap_err();
    assert!(err.contains("digest"), "{err}");
    assert!(
        !image.exists(),
        "a disk that failed its digest is left behind"
    );
}

#[test]
fn the_site_is_lost_and_the_azure_store_alone_recovers_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let qsd = Qsd::start(work, &[("root", 8 * MIB)]);
    qsd.guest_write("root", MIB, 2 * MIB, 0x73);
    let azurite = azurite_with_container();
    write_azure_manifests(work, &qsd, &azurite);
    write_storage_secret(work, DEV_KEY);
    let source = protect_then_lose_the_site(work, qsd);
    let url = format!("{}/replicas", azurite.account_url());
    let store = ["--azure", url.as_str()];
    let key = [("AZURE_STORAGE_KEY", DEV_KEY)];
    recover_web_01(&store, &key, &work.join("recovered"), &source);
    // Into new page blobs instead of a folder: server-side copies, printed by URL.
    let out = recover(
        &[
            &["failover", "web-01", "--into-blobs", "drill-1"][..],
            &store[..],
        ]
        .concat(),
        &key,
    )
    .unwrap();
    assert!(
        out.contains(&format!(
            "disk root: {url}/recovered/default/web-01/drill-1/root.vhd"
        )),
        "{out}"
    );
    let err = recover(
        &[
            &["failover", "web-01", "--into-blobs", "drill-1"][..],
            &["--store", "/tmp"][..],
        ]
        .concat(),
        &[],
    )
    .unwrap_err();
    assert!(err.contains("--azure"), "{err}");

    let err = recover(&[&["list"][..], &store[..]].concat(), &[]).unwrap_err();
    assert!(err.contains("AZURE_STORAGE_KEY"), "{err}");
}
