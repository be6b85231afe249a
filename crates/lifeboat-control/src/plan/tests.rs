//! The run's order, gates, failures and retries, over `RecordingDriver`: a test double of the
//! VMs and hooks (no daemon, no processes) that records what it was asked, and when.

use std::sync::Mutex;
use std::time::Instant;

use lifeboat_api::plan::{PlanGate, PlanRequests, PlanTestFailoverRequest};
use lifeboat_api::protected_vm::{FailoverResult, MaterialisedDisk};

use super::*;

/// A test double of a plan's world: each VM request takes `VM_DELAY`, the hooks and VMs
/// named in `failing` fail, and every call is recorded with its start and end.
#[derive(Default)]
struct RecordingDriver {
    calls: Mutex<Vec<(String, Instant, Instant)>>,
    failing: Mutex<Vec<String>>,
    spec: Mutex<RecoveryPlanSpec>,
    saved: Mutex<Vec<RecoveryPlanStatus>>,
    hook_env: Mutex<Vec<Vec<(String, String)>>>,
    unverified: Mutex<Vec<String>>,
}

const VM_DELAY: Duration = Duration::from_millis(100);

#[async_trait]
impl PlanDriver for RecordingDriver {
    async fn vm(&self, name: &str, request: &VmRequest) -> Result<ProtectedVMStatus, String> {
        let start = Instant::now();
        tokio::time::sleep(VM_DELAY).await;
        let failing = self.failing.lock().unwrap().contains(&name.to_owned());
        self.calls
            .lock()
            .unwrap()
            .push((format!("vm {name}"), start, Instant::now()));
        if failing {
            return Err("the job failed: no point".into());
        }
        let result = FailoverResult {
            disks: vec![MaterialisedDisk {
                name: "root".into(),
                location: format!("/failover/{name}-root.img"),
            }],
            verified: !self.unverified.lock().unwrap().contains(&name.to_owned()),
            // db-01 has a recoveredVm; the others none.
            recovered_vm: (name == "db-01").then(|| lifeboat_api::protected_vm::RecoveredVm {
                name: "db-01-test".into(),
                definition: Some("/failover/db-01-test.xml".into()),
                succeeded: true,
                ..Default::default()
            }),
            ..FailoverResult::default()
        };
        Ok(ProtectedVMStatus {
            test_failover: matches!(request, VmRequest::TestFailover(_)).then_some(result),
            ..ProtectedVMStatus::default()
        })
    }

    async fn hook(&self, hook: &PlanHook, env: &[(String, String)]) -> Result<(), String> {
        let start = Instant::now();
        self.hook_env.lock().unwrap().push(env.to_vec());
        self.calls
            .lock()
            .unwrap()
            .push((format!("hook {}", hook.name), start, Instant::now()));
        if self.failing.lock().unwrap().contains(&hook.name) {
            return Err("exited with status 3".into());
        }
        Ok(())
    }

    async fn spec(&self) -> RecoveryPlanSpec {
        self.spec.lock().unwrap().clone()
    }

    async fn save(&self, status: &RecoveryPlanStatus) -> Result<(), String> {
        self.saved.lock().unwrap().push(status.clone());
        Ok(())
    }
}

impl RecordingDriver {
    fn names(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.0.clone())
            .collect()
    }

    fn span(&self, name: &str) -> (Instant, Instant) {
        let calls = self.calls.lock().unwrap();
        let call = calls.iter().rev().find(|c| c.0 == name).unwrap();
        (call.1, call.2)
    }
}

fn hook(name: &str) -> PlanHook {
    PlanHook {
        name: name.into(),
        command: vec!["true".into()],
        timeout_seconds: 600,
        job: None,
    }
}

fn three_groups() -> RecoveryPlanSpec {
    RecoveryPlanSpec {
        groups: vec![
            PlanGroup {
                name: "db".into(),
                vms: vec!["db-01".into()],
                after: vec![hook("check-db")],
                ..PlanGroup::default()
            },
            PlanGroup {
                name: "app".into(),
                vms: vec!["app-01".into(), "app-02".into()],
                before: vec![hook("migrate")],
                ..PlanGroup::default()
            },
            PlanGroup {
                name: "web".into(),
                vms: vec!["web-01".into(), "web-02".into()],
                ..PlanGroup::default()
            },
        ],
        drill: None,
        requests: None,
    }
}

fn test_failover(token: &str) -> Run {
    Run {
        request: VmRequest::TestFailover(RecoveryPointSelector::default()),
        token: token.into(),
        retry: None,
        drill: false,
    }
}

#[tokio::test]
async fn groups_run_in_order_and_the_vms_of_a_group_together() {
    let driver = RecordingDriver::default();
    let spec = three_groups();
    let status = run(&driver, "ns", "plan", &spec, None, test_failover("t1")).await;
    assert_eq!(status.phase, PlanPhase::Succeeded, "{status:#?}");
    assert_eq!(status.handled_requests.test_failover.as_deref(), Some("t1"));
    let succeeded = |s: &RecoveryPlanStatus| {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Succeeded")
            .unwrap();
        (c.status.clone(), c.reason.clone())
    };
    assert_eq!(succeeded(&status), ("True".into(), "Succeeded".into()));
    let names = driver.names();
    let at = |n: &str| names.iter().position(|c| c == n).unwrap();
    assert!(at("vm db-01") < at("hook check-db"));
    assert!(at("hook check-db") < at("hook migrate"));
    assert!(at("hook migrate") < at("vm app-01").min(at("vm app-02")));
    assert!(at("vm app-01").max(at("vm app-02")) < at("vm web-01").min(at("vm web-02")));
    // Together: each of a group's VMs starts before the other ends.
    let (a1, a1_end) = driver.span("vm app-01");
    let (a2, a2_end) = driver.span("vm app-02");
    assert!(
        a1 < a2_end && a2 < a1_end,
        "app-01 and app-02 ran one after the other"
    );
    let (w1, _) = driver.span("vm web-01");
    assert!(w1 >= a1_end.max(a2_end));
    // The VMs' times are kept in status, and their disks.
    let vm = |n: &str| status.vms.iter().find(|v| v.name == n).unwrap().clone();
    assert_eq!(vm("web-02").outcome, VmOutcome::Succeeded);
    assert_eq!(vm("web-02").disks[0].location, "/failover/web-02-root.img");
    assert!(vm("app-01").start_time.is_some() && vm("app-01").completion_time.is_some());
    assert!(status.recovery_time_seconds.unwrap() >= 3.0 * VM_DELAY.as_secs_f64());
}

#[tokio::test]
async fn a_hook_sees_the_disks_of_the_vms_recovered_before_it() {
    let driver = RecordingDriver::default();
    run(
        &driver,
        "ns",
        "plan",
        &three_groups(),
        None,
        test_failover("t1"),
    )
    .await;
    let envs = driver.hook_env.lock().unwrap().clone();
    let migrate = envs
        .iter()
        .find(|e| e.contains(&("LIFEBOAT_STAGE".into(), "before".into())))
        .unwrap();
    let get = |k: &str| migrate.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("LIFEBOAT_GROUP").as_deref(), Some("app"));
    assert_eq!(get("LIFEBOAT_VMS").as_deref(), Some("app-01 app-02"));
    assert_eq!(get("LIFEBOAT_ACTION").as_deref(), Some("TestFailover"));
    assert_eq!(
        get("LIFEBOAT_DISK_DB_01_ROOT").as_deref(),
        Some("/failover/db-01-root.img")
    );
    assert_eq!(
        get("LIFEBOAT_DISKS_DB_01").as_deref(),
        Some("root=/failover/db-01-root.img")
    );
    assert_eq!(
        get("LIFEBOAT_DISK_APP_01_ROOT"),
        None,
        "app-01 is not recovered yet"
    );
    assert_eq!(
        get("LIFEBOAT_RECOVERED_DB_01").as_deref(),
        Some("/failover/db-01-test.xml")
    );
}

#[tokio::test]
async fn a_failing_hook_stops_the_run_and_a_retry_resumes_there() {
    let driver = RecordingDriver::default();
    driver.failing.lock().unwrap().push("migrate".into());
    let mut spec = three_groups();
    let failed = run(&driver, "ns", "plan", &spec, None, test_failover("t1")).await;
    assert_eq!(failed.phase, PlanPhase::Failed);
    let failure = failed.failure.clone().unwrap();
    assert_eq!(failure.step, "app/before/migrate");
    assert!(
        failure.message.contains("exited with status 3"),
        "{failure:?}"
    );
    assert!(!driver.names().iter().any(|n| n.starts_with("vm app")));
    assert_eq!(failed.handled_requests.test_failover, None);
    let condition = failed
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .unwrap();
    assert_eq!(condition.status, "False");
    assert!(
        condition
            .message
            .starts_with("app/before/migrate: hook migrate"),
        "{condition:?}"
    );

    // The failed run is not started again by its own token; a retry resumes it.
    spec.requests = Some(PlanRequests {
        test_failover: Some(PlanTestFailoverRequest {
            token: "t1".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        pending(&spec, Some(&failed), SystemTime::now(), SystemTime::now()),
        None
    );
    spec.requests.as_mut().unwrap().retry = Some("r1".into());
    let retry = pending(&spec, Some(&failed), SystemTime::now(), SystemTime::now()).unwrap();
    assert_eq!(
        (retry.token.as_str(), retry.retry.as_deref()),
        ("t1", Some("r1"))
    );

    driver.failing.lock().unwrap().clear();
    driver.calls.lock().unwrap().clear();
    let done = run(&driver, "ns", "plan", &spec, Some(failed), retry).await;
    assert_eq!(done.phase, PlanPhase::Succeeded, "{done:#?}");
    let names = driver.names();
    assert!(
        !names.contains(&"vm db-01".to_owned()),
        "db was redone: {names:?}"
    );
    assert!(!names.contains(&"hook check-db".to_owned()));
    assert_eq!(names[0], "hook migrate");
    assert_eq!(done.handled_requests.retry.as_deref(), Some("r1"));
    assert_eq!(done.handled_requests.test_failover.as_deref(), Some("t1"));
    assert_eq!(
        pending(&spec, Some(&done), SystemTime::now(), SystemTime::now()),
        None
    );
}

#[tokio::test]
async fn a_failed_vm_fails_the_group_after_its_siblings_end() {
    let driver = RecordingDriver::default();
    driver.failing.lock().unwrap().push("app-02".into());
    let status = run(
        &driver,
        "ns",
        "plan",
        &three_groups(),
        None,
        test_failover("t1"),
    )
    .await;
    assert_eq!(status.failure.unwrap().step, "app/vm/app-02");
    let vm = |n: &str| status.vms.iter().find(|v| v.name == n).unwrap().clone();
    assert_eq!(vm("app-01").outcome, VmOutcome::Succeeded);
    assert_eq!(vm("app-02").outcome, VmOutcome::Failed);
    assert_eq!(vm("web-01").outcome, VmOutcome::Pending);
    assert!(status.completed_steps.contains(&"app/vm/app-01".to_owned()));
}

#[tokio::test]
async fn a_gate_waits_for_a_proceed_token_it_has_not_seen() {
    let driver = std::sync::Arc::new(RecordingDriver::default());
    let mut spec = three_groups();
    spec.groups[1].gate = Some(PlanGate {
        message: "check the database".into(),
    });
    *driver.spec.lock().unwrap() = spec.clone();
    let task = {
        let driver = driver.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            run(
                driver.as_ref(),
                "ns",
                "plan",
                &spec,
                None,
                test_failover("t1"),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let waiting = driver.saved.lock().unwrap().last().cloned().unwrap();
    assert_eq!(waiting.phase, PlanPhase::WaitingForGate);
    assert!(waiting.progression.unwrap().contains("check the database"));
    assert_eq!(driver.names(), ["vm db-01", "hook check-db"]);
    spec.requests = Some(PlanRequests {
        proceed: Some("p1".into()),
        ..Default::default()
    });
    *driver.spec.lock().unwrap() = spec;
    let status = task.await.unwrap();
    assert_eq!(status.phase, PlanPhase::Succeeded);
    assert_eq!(status.handled_requests.proceed.as_deref(), Some("p1"));
}

#[tokio::test]
async fn cleanup_takes_the_groups_in_reverse_past_the_gates() {
    let driver = RecordingDriver::default();
    let cleanup = Run {
        request: VmRequest::Cleanup,
        token: "c1".into(),
        retry: None,
        drill: false,
    };
    let mut spec = three_groups();
    spec.groups[1].gate = Some(PlanGate {
        message: "never passed".into(),
    });
    let status = run(&driver, "ns", "plan", &spec, None, cleanup).await;
    assert_eq!(status.phase, PlanPhase::Succeeded);
    let names = driver.names();
    let at = |n: &str| names.iter().position(|c| c == n).unwrap();
    assert!(at("vm web-01") < at("hook migrate") && at("hook migrate") < at("vm app-01"));
    assert!(at("vm app-01") < at("vm db-01") && at("vm db-01") < at("hook check-db"));
    let envs = driver.hook_env.lock().unwrap().clone();
    assert!(
        envs[0].contains(&("LIFEBOAT_ACTION".into(), "CleanupTestFailover".into())),
        "{envs:?}"
    );
    assert_eq!(status.action, Some(PlanAction::CleanupTestFailover));
}

#[test]
fn env_names_are_upper_case_with_underscores() {
    assert_eq!(env_name("db-01.a"), "DB_01_A");
}

#[test]
fn a_plan_point_rule_becomes_the_vm_action_the_cli_asks() {
    use lifeboat_api::common::RecoveryPointKind;
    let latest_app = RecoveryPointSelector {
        kind: RecoveryPointKind::LatestAppConsistent,
        ..Default::default()
    };
    assert_eq!(
        VmRequest::TestFailover(latest_app.clone()).action(),
        Action::TestFailover(Some("latest-app-consistent".into()))
    );
    let not_after = RecoveryPointSelector {
        kind: RecoveryPointKind::NotAfter,
        time: Some(api_time(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_500_800),
        )),
        ..Default::default()
    };
    assert_eq!(
        VmRequest::TestFailover(not_after).action(),
        Action::TestFailover(Some("not-after:2026-12-05T20:00:00Z".into()))
    );
    let planned = VmRequest::Failover {
        planned: true,
        point: latest_app,
    };
    assert_eq!(
        planned.action(),
        Action::Failover {
            planned: true,
            point: None
        }
    );
}

fn drilled() -> RecoveryPlanSpec {
    let mut spec = three_groups();
    spec.drill = Some(lifeboat_api::plan::PlanDrill { interval_hours: 24 });
    spec.groups[1].gate = Some(PlanGate {
        message: "nobody is there at night".into(),
    });
    spec
}

#[test]
fn a_drill_is_due_one_interval_after_creation_then_after_the_last_one() {
    let spec = drilled();
    let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let hour = Duration::from_secs(3600);
    assert_eq!(pending(&spec, None, created, created + 23 * hour), None);
    let due = pending(&spec, None, created, created + 25 * hour).unwrap();
    assert!(due.drill && due.token.starts_with("drill-"), "{due:?}");
    let last = RecoveryPlanStatus {
        phase: PlanPhase::Succeeded,
        last_drill: Some(lifeboat_api::plan::DrillStatus {
            start_time: api_time(created + 25 * hour),
            completion_time: None,
            succeeded: true,
            recovery_time_seconds: Some(1.0),
            message: None,
        }),
        ..Default::default()
    };
    assert_eq!(
        pending(&spec, Some(&last), created, created + 48 * hour),
        None
    );
    assert!(pending(&spec, Some(&last), created, created + 50 * hour).is_some());
    // A request asked for comes before a drill that is due; none without a schedule.
    assert_eq!(
        pending(&three_groups(), None, created, created + 1000 * hour),
        None
    );
}

#[tokio::test]
async fn a_drill_tests_failover_past_the_gates_verifies_then_cleans_up() {
    let driver = RecordingDriver::default();
    let spec = drilled();
    let created = SystemTime::now() - Duration::from_secs(25 * 3600);
    let drill = pending(&spec, None, created, SystemTime::now()).unwrap();
    let status = run(&driver, "ns", "plan", &spec, None, drill).await;
    assert_eq!(status.phase, PlanPhase::Succeeded, "{status:#?}");
    assert_eq!(status.action, Some(PlanAction::Drill));
    let last = status.last_drill.clone().unwrap();
    assert!(
        last.succeeded && last.recovery_time_seconds.is_some(),
        "{last:?}"
    );
    let next = crate::mapping::system_time(status.next_drill_time.as_ref().unwrap());
    let start = crate::mapping::system_time(&last.start_time);
    assert_eq!(
        next.duration_since(start).unwrap(),
        Duration::from_secs(24 * 3600)
    );
    // Test failover in order, then the cleanup in reverse; the VMs' outcomes are the test's.
    let names = driver.names();
    let vm_calls: Vec<&String> = names.iter().filter(|n| n.starts_with("vm ")).collect();
    assert_eq!(vm_calls.len(), 10, "{names:?}");
    let at = |n: &str| names.iter().rposition(|c| c == n).unwrap();
    assert!(
        at("vm web-01") < at("vm db-01"),
        "the cleanup is not in reverse: {names:?}"
    );
    assert!(status.vms.iter().all(|v| v.verified == Some(true)));
    assert_eq!(status.handled_requests, Default::default());
    let envs = driver.hook_env.lock().unwrap().clone();
    let actions: Vec<String> = envs
        .iter()
        .map(|e| {
            e.iter()
                .find(|(k, _)| k == "LIFEBOAT_ACTION")
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert_eq!(
        actions,
        [
            "TestFailover",
            "TestFailover",
            "CleanupTestFailover",
            "CleanupTestFailover"
        ]
    );
    assert!(
        envs.iter()
            .all(|e| e.contains(&("LIFEBOAT_DRILL".into(), "1".into())))
    );
}

#[tokio::test]
async fn a_drill_that_is_not_verified_fails_and_still_cleans_up() {
    let driver = RecordingDriver::default();
    driver.unverified.lock().unwrap().push("app-02".into());
    let spec = drilled();
    let created = SystemTime::now() - Duration::from_secs(25 * 3600);
    let drill = pending(&spec, None, created, SystemTime::now()).unwrap();
    let status = run(&driver, "ns", "plan", &spec, None, drill).await;
    assert_eq!(status.phase, PlanPhase::Failed);
    let last = status.last_drill.unwrap();
    assert!(!last.succeeded);
    assert!(
        last.message
            .as_deref()
            .unwrap()
            .contains("app-02: its test failover was not verified"),
        "{last:?}"
    );
    let cleanups = driver
        .names()
        .iter()
        .filter(|n| n.starts_with("vm "))
        .count();
    assert_eq!(cleanups, 10, "every VM tested and cleaned up");
    assert!(status.next_drill_time.is_some());
}

#[tokio::test]
async fn a_failed_drill_retried_is_a_whole_new_drill() {
    let driver = RecordingDriver::default();
    driver.unverified.lock().unwrap().push("app-02".into());
    let mut spec = drilled();
    let created = SystemTime::now() - Duration::from_secs(25 * 3600);
    let drill = pending(&spec, None, created, SystemTime::now()).unwrap();
    let failed = run(&driver, "ns", "plan", &spec, None, drill).await;
    assert_eq!(failed.phase, PlanPhase::Failed);
    driver.unverified.lock().unwrap().clear();
    driver.calls.lock().unwrap().clear();
    spec.requests = Some(PlanRequests {
        retry: Some("r1".into()),
        ..Default::default()
    });
    let retry = pending(&spec, Some(&failed), created, SystemTime::now()).unwrap();
    assert!(retry.drill, "{retry:?}");
    let done = run(&driver, "ns", "plan", &spec, Some(failed), retry).await;
    assert_eq!(done.phase, PlanPhase::Succeeded, "{done:#?}");
    assert!(done.last_drill.as_ref().unwrap().succeeded);
    let vm_calls = driver
        .names()
        .iter()
        .filter(|n| n.starts_with("vm "))
        .count();
    assert_eq!(vm_calls, 10, "every VM tested and cleaned up again");
    assert_eq!(done.handled_requests.retry.as_deref(), Some("r1"));
    assert_eq!(
        pending(&spec, Some(&done), created, SystemTime::now()),
        None
    );
}
