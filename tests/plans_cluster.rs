//! Recovery plans on a cluster, end to end: the real operator and the real cluster agent
//! against the test API server, five VMs on real qemu-storage-daemons in three groups.
//!
//! A test failover asked in the plan's `spec.requests` waits at the app group's gate until a
//! `proceed` token, stops at the web group's failing hook Job with its reason, and a `retry`
//! token resumes it there without redoing the groups done. Every recovered disk equals its
//! VM; the groups ran in order and the VMs of a group together; the hooks' Jobs carry the
//! plan's environment, and the example hook (examples/hooks/serve-with-qemu.sh), run as a
//! Job, served the recovered disks, read back here over NBD. The cleanup removes the disks
//! and stops what the hook started.
//!
//! No Job controller or kubelet can run here: `LocalJobRunner` (tests/support/jobs.rs) is a
//! TEST DOUBLE of them, which runs a Job's first container's command as a local process with
//! the Job's environment and writes the Job's Complete or Failed condition, as the Job
//! controller would.
//!
//! ```text
//!  test ──plan, VMs, requests──> TestApiServer <── operator (plan runs, VM jobs, hook Jobs)
//!                                     ^    ^──── agent ──QMP/NBD──> 5 x qsd, local store
//!                                     └──── LocalJobRunner (double): runs hook Jobs here
//! ```

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use lifeboat_api::plan::{PlanPhase, RecoveryPlan, RecoveryPlanStatus, VmOutcome};
use lifeboat_api::{ProtectedVM, ProtectionPhase};
use lifeboat_qemu::testing::{Qsd, assert_same, read_export};
use lifeboat_tests::apiserver::TestApiServer;
use lifeboat_tests::jobs::LocalJobRunner;
use lifeboat_tests::site::{Site, local_policy};
use serde_json::{Value, json};

const NS: &str = "plans";
const NODE: &str = "node-1";
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
        .join("../examples/hooks/serve-with-qemu.sh")
        .canonicalize()
        .unwrap()
}

/// A hook's JobSpec running `command` (the image is the cluster's business; the double
/// ignores it).
fn job(command: Value) -> Value {
    json!({"template": {"spec": {
        "restartPolicy": "Never",
        "containers": [{"name": "hook", "image": "registry.example/lifeboat-hooks:1", "command": command}]
    }}})
}

async fn plan_until(
    plans: &Api<RecoveryPlan>,
    what: &str,
    check: impl Fn(&RecoveryPlanStatus) -> bool,
) -> RecoveryPlanStatus {
    for _ in 0..600 {
        let status = plans.get("three-tier").await.unwrap().status;
        if let Some(status) = status.filter(|s| check(s)) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = plans
        .get("three-tier")
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    let vms: Vec<_> = s
        .vms
        .iter()
        .map(|v| (&v.name, v.outcome, &v.message))
        .collect();
    panic!(
        "timed out waiting for {what}: {:?} at {:?}, failure {:?}, VMs {vms:?}",
        s.phase, s.progression, s.failure
    );
}

async fn ask(plans: &Api<RecoveryPlan>, requests: Value) {
    plans
        .patch(
            "three-tier",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requests": requests}})),
        )
        .await
        .unwrap();
}

fn vm_of(status: &RecoveryPlanStatus, vm: &str) -> lifeboat_api::plan::PlanVmStatus {
    status.vms.iter().find(|v| v.name == vm).unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_a_plan_of_three_groups_with_hook_jobs_a_gate_and_a_retry() {
    lifeboat_http::install_crypto_provider();
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
            qsd.guest_write("root", 0, 2 * MIB, 0x20 + i as u8);
            qsd
        })
        .collect();

    let server = TestApiServer::start().await;
    let client = server.client(NS);
    let _site = Site::start(&client, NS, NODE, work);
    let hooks_dir = work.join("hooks");
    std::fs::create_dir_all(&hooks_dir).unwrap();
    let runner = LocalJobRunner::start(client.clone(), NS, hooks_dir.clone());

    local_policy(&client, NS, "fast", &work.join("replicas")).await;
    let vms: Api<ProtectedVM> = Api::namespaced(client.clone(), NS);
    for ((_, vm), qsd) in VMS.iter().zip(&qsds) {
        let manifest = json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ProtectedVM",
            "metadata": {"name": vm},
            "spec": {
                "vmName": vm, "nodeName": NODE,
                "hypervisor": {"qemu": {"qmpSocket": qsd.qmp.display().to_string()}},
                "disks": [{"name": "root", "path": qsd.image("root").display().to_string(), "blockNode": "root"}],
                "policyRef": {"name": "fast"}
            }
        });
        vms.create(
            &PostParams::default(),
            &serde_json::from_value(manifest).unwrap(),
        )
        .await
        .unwrap();
    }
    let serve = json!({"name": "serve", "job": job(json!([example_hook(), served]))});
    let record = json!({"name": "record", "job": job(json!(["sh", "-c", "echo ran >> \"$LIFEBOAT_GROUP-$LIFEBOAT_STAGE.count\""]))});
    let plan = json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": "three-tier"},
        "spec": {"groups": [
            {"name": "db", "vms": ["db-01"], "after": [record, serve]},
            {"name": "app", "vms": ["app-01", "app-02"], "gate": {"message": "check the database"},
             "before": [record], "after": [serve]},
            {"name": "web", "vms": ["web-01", "web-02"],
             "before": [{"name": "allowed", "job": job(json!(["sh", "-c",
                 "test -e allow-web || { echo 'the web tier is not allowed yet' >&2; exit 3; }"]))}],
             "after": [serve]}
        ]}
    });
    let plans: Api<RecoveryPlan> = Api::namespaced(client.clone(), NS);
    plans
        .create(
            &PostParams::default(),
            &serde_json::from_value(plan).unwrap(),
        )
        .await
        .unwrap();

    for attempt in 0.. {
        let all = vms.list(&ListParams::default()).await.unwrap().items;
        if attempt == 900 {
            let phases: Vec<_> = all
                .iter()
                .map(|vm| {
                    (
                        vm.name_any(),
                        vm.status.as_ref().map(|s| (s.phase, s.last_error.clone())),
                    )
                })
                .collect();
            panic!("the VMs were not all protected: {phases:?}");
        }
        let protected = all.iter().filter(|vm| {
            vm.status.as_ref().is_some_and(|s| {
                s.phase == ProtectionPhase::Protected
                    && s.agent
                        .as_ref()
                        .is_some_and(|a| a.recovery_points.count >= 1)
            })
        });
        if protected.count() == VMS.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sources: Vec<Vec<u8>> = qsds.iter().map(|q| q.read_disk("root")).collect();

    // The test failover waits at the app group's gate.
    ask(&plans, json!({"testFailover": {"token": "t1"}})).await;
    let waiting = plan_until(&plans, "the gate", |s| s.phase == PlanPhase::WaitingForGate).await;
    assert_eq!(vm_of(&waiting, "db-01").outcome, VmOutcome::Succeeded);
    assert_eq!(vm_of(&waiting, "app-01").outcome, VmOutcome::Pending);
    let condition = waiting
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("Unknown", "WaitingForGate")
    );
    // The db group's hook Job carries the plan's environment.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let db_jobs = jobs
        .list(&ListParams::default().labels("lifeboat.io/plan=three-tier"))
        .await
        .unwrap();
    let env = json!(db_jobs.items[0].spec.as_ref().unwrap().template).to_string();
    let db_disk = vm_of(&waiting, "db-01").disks[0].location.clone();
    assert!(
        env.contains(&format!("\"root={db_disk}\"")) && env.contains("LIFEBOAT_DISKS_DB_01"),
        "{env}"
    );

    // Past the gate, it stops at the web group's hook, with the Job's words.
    ask(&plans, json!({"proceed": "p1"})).await;
    let failed = plan_until(&plans, "the failed hook", |s| s.phase == PlanPhase::Failed).await;
    let failure = failed.failure.unwrap();
    assert_eq!(failure.step, "web/before/allowed");
    assert!(
        failure.message.contains("the web tier is not allowed yet"),
        "{failure:?}"
    );
    assert_eq!(failed.handled_requests.proceed.as_deref(), Some("p1"));

    // Fixed and retried: it resumes at the web group.
    std::fs::write(hooks_dir.join("allow-web"), "").unwrap();
    ask(&plans, json!({"retry": "r1"})).await;
    let done = plan_until(&plans, "the retried run", |s| {
        s.phase == PlanPhase::Succeeded && s.handled_requests.test_failover.as_deref() == Some("t1")
    })
    .await;
    for count in ["db-after", "app-before"] {
        let ran = std::fs::read_to_string(hooks_dir.join(format!("{count}.count"))).unwrap();
        assert_eq!(ran.lines().count(), 1, "{count} ran again");
    }
    assert_eq!(
        runner.ran().len(),
        // record and serve (db), record and serve (app), allowed twice and serve (web)
        7,
        "{:?}",
        runner.ran()
    );
    for (i, (_, vm)) in VMS.iter().enumerate() {
        let result = vm_of(&done, vm);
        let disk = std::fs::read(&result.disks[0].location).unwrap();
        assert_same(&format!("{vm} recovered"), &disk, &sources[i]);
        let socket = served.join(format!("{vm}-root.sock"));
        let read = read_export(&socket, "root", &work.join(format!("{vm}.read")));
        assert_same(&format!("{vm} served by the hook"), &read, &sources[i]);
    }
    lifeboat_tests::assert_groups_in_order_and_together(
        &done,
        &[&["db-01"], &["app-01", "app-02"], &["web-01", "web-02"]],
    );

    // The cleanup removes the disks and stops the hook's servers.
    ask(&plans, json!({"cleanupTestFailover": "c1"})).await;
    plan_until(&plans, "the cleanup", |s| {
        s.handled_requests.cleanup_test_failover.as_deref() == Some("c1")
    })
    .await;
    for (_, vm) in VMS {
        let location = vm_of(&done, vm).disks[0].location.clone();
        assert!(!Path::new(&location).exists(), "{location} is left");
        assert!(
            !served.join(format!("{vm}-root.sock")).exists(),
            "{vm}'s server is left"
        );
    }
}
