//! The recovery time of a plan against its VMs' single failovers, through the commands users
//! run: a `lifeboat standalone` daemon (the local store) protecting five VMs on
//! qemu-storage-daemons; per run, the five VMs' test failovers one after the other
//! (`lifeboat failover VM --test`, then `lifeboat cleanup VM`), then the plan's
//! (`lifeboat plan test-failover three-tier`: groups db [1 VM], app [2], web [2], a hook after
//! the last group; then `lifeboat plan cleanup`). Each is timed from the command's start to
//! its return (request to the last hook, for the plan); the plan's own measure
//! (`status.recoveryTimeSeconds`, from its run's start inside the daemon) is printed too.
//!
//! ```text
//! cargo bench -p lifeboat --bench plan -- --bench [--disk-mib 1024] [--data-mib 512] [--runs 3]
//! ```
//!
//! Without `--bench` (as `cargo test --all-targets` runs it): one run on small disks, a smoke
//! test of the same path.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_qemu::testing::Qsd;

const LIFEBOAT: &str = env!("CARGO_BIN_EXE_lifeboat");
const MIB: u64 = 1024 * 1024;
const VMS: [(&str, &str); 5] = [
    ("db", "db-01"),
    ("app", "app-01"),
    ("app", "app-02"),
    ("web", "web-01"),
    ("web", "web-02"),
];

struct Config {
    disk_mib: u64,
    data_mib: u64,
    runs: usize,
}

fn config() -> Config {
    let mut args = std::env::args().skip(1);
    let bench = std::env::args().any(|a| a == "--bench");
    let mut config = if bench {
        Config {
            disk_mib: 1024,
            data_mib: 512,
            runs: 3,
        }
    } else {
        Config {
            disk_mib: 8,
            data_mib: 2,
            runs: 1,
        }
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap().parse().unwrap();
        match arg.as_str() {
            "--disk-mib" => config.disk_mib = value(),
            "--data-mib" => config.data_mib = value(),
            "--runs" => config.runs = value() as usize,
            _ => {}
        }
    }
    config
}

fn lifeboat(state: &Path, args: &[&str]) -> String {
    let out = Command::new(LIFEBOAT)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lifeboat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn timed(state: &Path, args: &[&str]) -> f64 {
    let started = Instant::now();
    lifeboat(state, args);
    started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn write_manifests(work: &Path, qsds: &[Qsd]) {
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let mut text = format!(
        "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: fast}}\nspec:\n  copyFrequency: 5m\n  target:\n    local: {{path: '{}'}}\n",
        work.join("replicas").display()
    );
    for ((_, vm), qsd) in VMS.iter().zip(qsds) {
        text += &format!(
            "---\napiVersion: lifeboat.io/v1alpha1\nkind: ProtectedVM\nmetadata: {{name: {vm}}}\nspec:\n  vmName: {vm}\n  nodeName: here\n  hypervisor:\n    qemu: {{qmpSocket: '{}'}}\n  disks:\n    - {{name: root, path: '{}', blockNode: root}}\n  policyRef: {{name: fast}}\n",
            qsd.qmp.display(),
            qsd.image("root").display()
        );
    }
    text += "---\napiVersion: lifeboat.io/v1alpha1\nkind: RecoveryPlan\nmetadata: {name: three-tier}\nspec:\n  groups:\n    - {name: db, vms: [db-01]}\n    - {name: app, vms: [app-01, app-02]}\n    - name: web\n      vms: [web-01, web-02]\n      after:\n        - {name: last, command: ['true']}\n";
    std::fs::write(manifests.join("all.yaml"), text).unwrap();
}

fn main() {
    let config = config();
    let dir = tempfile::Builder::new()
        .prefix("lifeboat-plan-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let work = dir.path();
    let qsds: Vec<Qsd> = VMS
        .iter()
        .enumerate()
        .map(|(i, (_, vm))| {
            let at = work.join("vms").join(vm);
            std::fs::create_dir_all(&at).unwrap();
            let qsd = Qsd::start(&at, &[("root", config.disk_mib * MIB)]);
            qsd.guest_write("root", 0, config.data_mib * MIB, 0x30 + i as u8);
            qsd
        })
        .collect();
    write_manifests(work, &qsds);
    let state: PathBuf = work.join("state");
    let mut daemon = Command::new(LIFEBOAT)
        .args(["standalone", "--manifests"])
        .arg(work.join("manifests"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--failover-dir")
        .arg(work.join("failover"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let vms: serde_json::Value = Command::new(LIFEBOAT)
            .args(["status", "--json", "--state-dir"])
            .arg(&state)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default();
        let protected = vms.as_array().map_or(0, |vms| {
            vms.iter()
                .filter(|v| {
                    v.pointer("/status/recoveryPoints/count")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0)
                        >= 1
                })
                .count()
        });
        if protected == VMS.len() {
            break;
        }
        assert!(Instant::now() < deadline, "the VMs were not protected");
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "{} VMs of {} MiB ({} MiB written), {} run(s); nproc {}",
        VMS.len(),
        config.disk_mib,
        config.data_mib,
        config.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (mut sums, mut plans, mut measured) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=config.runs {
        let mut sum = 0.0;
        for (_, vm) in VMS {
            sum += timed(&state, &["failover", vm, "--test"]);
            lifeboat(&state, &["cleanup", vm]);
        }
        let plan = timed(&state, &["plan", "test-failover", "three-tier"]);
        let status: serde_json::Value = serde_json::from_str(&lifeboat(
            &state,
            &["plan", "status", "three-tier", "-o", "json"],
        ))
        .unwrap();
        let inside = status
            .pointer("/status/recoveryTimeSeconds")
            .and_then(serde_json::Value::as_f64)
            .unwrap();
        lifeboat(&state, &["plan", "cleanup", "three-tier"]);
        println!(
            "run {run}: single failovers one after the other {sum:.2} s; the plan {plan:.2} s (its status: {inside:.2} s)"
        );
        sums.push(sum);
        plans.push(plan);
        measured.push(inside);
    }
    let (sum, plan) = (median(sums), median(plans));
    println!(
        "median: single failovers {sum:.2} s, plan {plan:.2} s (status {:.2} s), plan/singles {:.3}",
        median(measured),
        plan / sum
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}
