//! Recovery plans in standalone mode, end to end, as a user runs them: five VMs on real
//! qemu-storage-daemons in three groups, the `lifeboat` binary as separate processes.
//!
//! A test failover of the plan to "not newer than T" waits at the app group's gate until
//! `lifeboat plan proceed`, stops at the web group's failing hook with its reason, and a
//! `lifeboat plan retry` resumes it there without redoing the groups done. Every recovered
//! disk equals its VM at T (two VMs have newer points that must not be taken); the groups ran
//! in order and the VMs of a group together (their times in status); the hooks saw the
//! plan's environment, and the example hook (examples/hooks/serve-with-qemu.sh) served every
//! recovered disk with qemu-storage-daemon, read back here over NBD. The cleanup removes it
//! all: the disks, and the servers the hook started. Then a drill schedule: a day later (the
//! plan's stored record made older while the daemon is down) the drill runs by itself, past
//! the gate, verifies every VM and cleans up.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{Daemon, LIFEBOAT, lifeboat, wait_until};
use lifeboat_api::plan::{PlanPhase, RecoveryPlan, VmOutcome};
use lifeboat_qemu::testing::{Qsd, assert_same, read_export};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;

/// (group, VM).
const VMS: [(&str, &str); 5] = [
    ("db", "db-01"),
    ("app", "app-01"),
    ("app", "app-02"),
    ("web", "web-01"),
    ("web", "web-02"),
];

fn example_hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/hooks/serve-with-qemu.sh")
        .canonicalize()
        .unwrap()
}

fn write_manifests(work: &Path, qsds: &[Qsd], served: &Path) {
    let manifests = work.join("manifests");
    std::fs::create_dir_all(manifests.join("hooks")).unwrap();
    let mut text = format!(
        "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {{name: fast}}\nspec:\n  copyFrequency: 30s\n  target:\n    local: {{path: '{}'}}\n",
        work.join("replicas").display()
    );
    for ((_, vm), qsd) in VMS.iter().zip(qsds) {
        text += &format!(
            "---\napiVersion: lifeboat.io/v1alpha1\nkind: ProtectedVM\nmetadata: {{name: {vm}}}\nspec:\n  vmName: {vm}\n  nodeName: here\n  hypervisor:\n    qemu: {{qmpSocket: '{}'}}\n  disks:\n    - {{name: root, path: '{}', blockNode: root}}\n  policyRef: {{name: fast}}\n",
            qsd.qmp.display(),
            qsd.image("root").display()
        );
    }
    std::fs::write(manifests.join("protected.yaml"), text).unwrap();
    let record = "env | grep ^LIFEBOAT_ | sort > \"hooks/$LIFEBOAT_ACTION-$LIFEBOAT_GROUP-$LIFEBOAT_STAGE.env\"; echo ran >> \"hooks/$LIFEBOAT_GROUP-$LIFEBOAT_STAGE.count\"";
    let serve = format!(
        "{{name: serve, command: ['{}', '{}']}}",
        example_hook().display(),
        served.display()
    );
    let plan = format!(
        r#"apiVersion: lifeboat.io/v1alpha1
kind: RecoveryPlan
metadata: {{name: three-tier}}
spec:
  groups:
    - name: db
      vms: [db-01]
      after:
        - {{name: record, command: [sh, -c, '{record}']}}
        - {serve}
    - name: app
      vms: [app-01, app-02]
      gate: {{message: check the database}}
      before:
        - {{name: record, command: [sh, -c, '{record}']}}
      after:
        - {serve}
    - name: web
      vms: [web-01, web-02]
      before:
        - name: allowed
          command: [sh, -c, 'test -e allow-web || {{ echo "the web tier is not allowed yet" >&2; exit 3; }}']
      after:
        - {serve}
"#
    );
    std::fs::write(manifests.join("plan.yaml"), plan).unwrap();
}

fn vms(work: &Path) -> Vec<Value> {
    serde_json::from_str(&lifeboat(work, &["status", "--json"])).unwrap()
}

fn points_of(work: &Path, name: &str) -> u64 {
    vms(work)
        .iter()
        .find(|v| v.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
        .and_then(|v| v.pointer("/status/recoveryPoints/count"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn plan(work: &Path) -> RecoveryPlan {
    serde_json::from_str(&lifeboat(
        work,
        &["plan", "status", "three-tier", "-o", "json"],
    ))
    .unwrap()
}

#[test]
fn a_plan_of_three_groups_tests_failover_in_order_with_gate_hooks_retry_and_drills() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let served = work.join("served");
    let qsds: Vec<Qsd> = VMS
        .iter()
        .enumerate()
        .map(|(i, (_, vm))| {
            let at = work.join("vms").join(vm);
            std::fs::create_dir_all(&at).unwrap();
            let qsd = Qsd::start(&at, &[("root", 8 * MIB)]);
            qsd.guest_write("root", 0, 2 * MIB, 0x10 + i as u8);
            qsd
        })
        .collect();
    write_manifests(work, &qsds, &served);
    let mut daemon = Daemon::start(work);
    wait_until(work, "every VM protected with a point", 180, || {
        VMS.iter().all(|(_, vm)| points_of(work, vm) >= 1)
    });

    // T: the VMs as they are; then db-01 and web-02 write on and get newer points.
    std::thread::sleep(Duration::from_millis(1100));
    let seconds = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t =
        lifeboat_core::rpo::format_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
    let at_t: Vec<Vec<u8>> = qsds.iter().map(|q| q.read_disk("root")).collect();
    std::thread::sleep(Duration::from_millis(1100));
    let before: Vec<u64> = [0, 4].iter().map(|&i| points_of(work, VMS[i].1)).collect();
    qsds[0].guest_write("root", 4 * MIB, MIB, 0x71);
    qsds[4].guest_write("root", 4 * MIB, MIB, 0x72);
    wait_until(work, "newer points of db-01 and web-02", 120, || {
        points_of(work, "db-01") > before[0] && points_of(work, "web-02") > before[1]
    });

    // The test failover to "not newer than T" waits at the app group's gate.
    let state = work.join("state");
    let run = Command::new(LIFEBOAT)
        .args(["plan", "test-failover", "three-tier", "--point"])
        .arg(format!("not-after:{t}"))
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(work, "the gate", 120, || {
        plan(work).status.unwrap_or_default().phase == PlanPhase::WaitingForGate
    });
    let waiting = plan(work).status.unwrap();
    let outcome = |s: &lifeboat_api::plan::RecoveryPlanStatus, vm: &str| {
        s.vms.iter().find(|v| v.name == vm).unwrap().clone()
    };
    assert_eq!(outcome(&waiting, "db-01").outcome, VmOutcome::Succeeded);
    assert_eq!(outcome(&waiting, "app-01").outcome, VmOutcome::Pending);
    let db_env =
        std::fs::read_to_string(work.join("manifests/hooks/TestFailover-db-after.env")).unwrap();
    let db_disk = outcome(&waiting, "db-01").disks[0].location.clone();
    assert!(
        db_env.contains(&format!("LIFEBOAT_DISKS_DB_01=root={db_disk}"))
            && db_env.contains("LIFEBOAT_PLAN=three-tier")
            && db_env.contains("LIFEBOAT_VMS=db-01"),
        "{db_env}"
    );
    let out = lifeboat(work, &["plan", "proceed", "three-tier"]);
    assert!(out.contains("went past its gate"), "{out}");

    // The web group's hook fails: the run stops there, with the hook's words.
    let failed = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("web/before/allowed") && stderr.contains("the web tier is not allowed yet"),
        "{stderr}"
    );
    assert!(
        stderr.contains("waiting at the gate: check the database"),
        "{stderr}"
    );
    let table = lifeboat(work, &["plan", "status", "three-tier"]);
    assert!(table.contains("stopped at web/before/allowed"), "{table}");
    let app_env =
        std::fs::read_to_string(work.join("manifests/hooks/TestFailover-app-before.env")).unwrap();
    assert!(app_env.contains("LIFEBOAT_VMS=app-01 app-02"), "{app_env}");

    // Fixed, and retried: it resumes at the web group, the groups done are not redone.
    std::fs::write(work.join("manifests/allow-web"), "").unwrap();
    let out = lifeboat(work, &["plan", "retry", "three-tier"]);
    assert!(out.contains("is done"), "{out}");
    for count in ["db-after", "app-before"] {
        let ran =
            std::fs::read_to_string(work.join(format!("manifests/hooks/{count}.count"))).unwrap();
        assert_eq!(ran.lines().count(), 1, "{count} hooks ran again");
    }
    let done = plan(work).status.unwrap();
    assert_eq!(done.phase, PlanPhase::Succeeded);
    assert!(done.recovery_time_seconds.unwrap() > 0.0);

    // Every disk is its VM at T, the two newer points left alone.
    for (i, (_, vm)) in VMS.iter().enumerate() {
        let result = outcome(&done, vm);
        assert_eq!(result.outcome, VmOutcome::Succeeded, "{vm}");
        let disk = std::fs::read(&result.disks[0].location).unwrap();
        assert_same(&format!("{vm} recovered at T"), &disk, &at_t[i]);
        // And the example hook serves it over NBD.
        let socket = served.join(format!("{vm}-root.sock"));
        let read = read_export(&socket, "root", &work.join(format!("{vm}.read")));
        assert_same(&format!("{vm} served by the hook"), &read, &at_t[i]);
    }

    // Groups in order; the VMs of a group together (each asked before the other was done).
    lifeboat_tests::assert_groups_in_order_and_together(
        &done,
        &[&["db-01"], &["app-01", "app-02"], &["web-01", "web-02"]],
    );

    // The cleanup removes what the test failover made: the disks, the hook's servers.
    let pids: Vec<String> = VMS
        .iter()
        .map(|(_, vm)| {
            std::fs::read_to_string(served.join(format!("{vm}-root.pid")))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    let out = lifeboat(work, &["plan", "cleanup", "three-tier"]);
    assert!(out.contains("is done"), "{out}");
    for (_, vm) in VMS {
        let location = &outcome(&done, vm).disks[0].location;
        assert!(!Path::new(location).exists(), "{location} is left");
        assert!(!served.join(format!("{vm}-root.sock")).exists());
    }
    // NB: a daemonized server is the init process's child: gone, or a zombie if nothing
    // reaps there (a container's init).
    let running = |pid: &String| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    wait_until(work, "the hook's servers to stop", 10, || {
        !pids.iter().any(running)
    });
    let table = lifeboat(work, &["plan", "status"]);
    assert!(
        table.contains("three-tier")
            && table.contains("Succeeded")
            && table.contains("CleanupTestFailover"),
        "{table}"
    );

    // A drill every 24 hours. A day passes: the daemon is killed (SIGKILL: not a crash test,
    // the page cache is kept), the plan's stored record is made a day and an hour old, the
    // daemon starts again. The drill runs by itself, past the gate: every VM recovered and
    // verified, the hooks run, then everything cleaned up.
    let manifest = work.join("manifests/plan.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(
            "spec:\n  groups:",
            "spec:\n  drill: {intervalHours: 24}\n  groups:",
        ),
    )
    .unwrap();
    wait_until(work, "the drill schedule read", 30, || {
        plan(work).spec.drill.is_some()
    });
    daemon.kill9();
    let record = state.join("db/RecoveryPlan/default/three-tier.json");
    let mut stored: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let day_ago = SystemTime::now() - Duration::from_secs(25 * 3600);
    stored["metadata"]["creationTimestamp"] = Value::String(lifeboat_core::rpo::format_rfc3339(
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                day_ago
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            ),
    ));
    std::fs::write(&record, serde_json::to_vec(&stored).unwrap()).unwrap();
    let _daemon = Daemon::start(work);
    wait_until(work, "the drill", 180, || {
        plan(work)
            .status
            .is_some_and(|s| s.last_drill.is_some() && s.phase != PlanPhase::Running)
    });
    let drilled = plan(work).status.unwrap();
    let last = drilled.last_drill.clone().unwrap();
    assert!(last.succeeded, "{last:?}");
    assert_eq!(drilled.action, Some(lifeboat_api::plan::PlanAction::Drill));
    assert!(
        drilled.vms.iter().all(|v| v.verified == Some(true)),
        "{:?}",
        drilled.vms
    );
    for (_, vm) in VMS {
        let location = &outcome(&drilled, vm).disks[0].location;
        assert!(!Path::new(location).exists(), "the drill left {location}");
        assert!(!served.join(format!("{vm}-root.sock")).exists());
    }
    let drill_env =
        std::fs::read_to_string(work.join("manifests/hooks/CleanupTestFailover-db-after.env"))
            .unwrap();
    assert!(drill_env.contains("LIFEBOAT_DRILL=1"), "{drill_env}");
    let wide = lifeboat(work, &["plan", "status", "three-tier"]);
    assert!(wide.contains("Drill"), "{wide}");
}
