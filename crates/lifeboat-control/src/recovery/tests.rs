//! The recovered VM's life over a driver that records what it is asked (a test double: the
//! real drivers are the operator's, over an API server, and the daemon's, over files and
//! processes; both run in the end-to-end tests).

use std::sync::Mutex;

use lifeboat_api::manifest::{Resource, parse};
use lifeboat_api::protected_vm::{HandledRequests, MaterialisedDisk, TestFailoverRequest};

use super::*;

/// Records every call; fails the hook when asked to.
#[derive(Default)]
struct RecordingDriver {
    calls: Mutex<Vec<String>>,
    envs: Mutex<Vec<Vec<(String, String)>>>,
    failing_hook: bool,
    /// Whether `remove` fails (an API server that refuses, a file that cannot be deleted).
    failing_remove: Mutex<bool>,
}

#[async_trait]
impl RecoveryDriver for RecordingDriver {
    async fn place(
        &self,
        _vm: &ProtectedVM,
        _result: &FailoverResult,
        rendered: &Rendered,
    ) -> Result<String, String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("place {}", rendered.text));
        Ok(format!("/failover/{}.xml", rendered.name))
    }

    async fn remove(&self, _vm: &ProtectedVM, definition: &str) -> Result<(), String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("remove {definition}"));
        if *self.failing_remove.lock().unwrap() {
            Err("forbidden".into())
        } else {
            Ok(())
        }
    }

    async fn hook(
        &self,
        _vm: &ProtectedVM,
        hook: &PlanHook,
        env: &[(String, String)],
    ) -> Result<(), String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("hook {}", hook.name));
        self.envs.lock().unwrap().push(env.to_vec());
        if self.failing_hook {
            Err("exit status: 3".into())
        } else {
            Ok(())
        }
    }
}

fn vm(recovered: &str) -> ProtectedVM {
    let manifest = format!(
        "apiVersion: lifeboat.io/v1alpha1\nkind: ProtectedVM\nmetadata: {{name: db-01, namespace: shop}}\n\
         spec:\n  vmName: db-01\n  nodeName: node-a\n  hypervisor: {{qemu: {{qmpSocket: /q}}}}\n  \
         disks: [{{name: root, path: /r, blockNode: root}}]\n  policyRef: {{name: p}}\n  recoveredVm: {recovered}\n"
    );
    match parse("vm.yaml", &manifest).unwrap().pop() {
        Some(Resource::Vm(vm)) => vm,
        other => panic!("not a VM: {other:?}"),
    }
}

fn test_failed_over(mut vm: ProtectedVM) -> ProtectedVM {
    vm.spec.requests = Some(lifeboat_api::protected_vm::Requests {
        test_failover: Some(TestFailoverRequest {
            token: "t1".into(),
            ..TestFailoverRequest::default()
        }),
        ..Default::default()
    });
    vm.status = Some(ProtectedVMStatus {
        phase: ProtectionPhase::Protected,
        handled_requests: HandledRequests {
            test_failover: Some("t1".into()),
            ..HandledRequests::default()
        },
        test_failover: Some(FailoverResult {
            disks: vec![MaterialisedDisk {
                name: "root".into(),
                location: "/failover/shop/db-01/t1/root.img".into(),
            }],
            node: Some("node-b".into()),
            ..FailoverResult::default()
        }),
        ..ProtectedVMStatus::default()
    });
    vm
}

/// Carry `work` out for `vm`: the recovered VM it is about, as recorded.
async fn carry(driver: &RecordingDriver, vm: &ProtectedVM, work: Work) -> RecoveredVm {
    carry_out(driver, vm, work, SystemTime::UNIX_EPOCH)
        .await
        .unwrap()
}

const BOTH: &str = r#"{name: db, testNetwork: lab, template: "<domain>{{ name }} {{ network }} {{ disk.root.location }}</domain>", hook: {name: serve, command: [serve.sh]}}"#;

#[tokio::test]
async fn a_test_failover_places_the_definition_then_runs_the_hook_with_the_disks() {
    let vm = test_failed_over(vm(BOTH));
    assert_eq!(pending(&vm), Some(Work::BringUp { test: true }));
    let driver = RecordingDriver::default();
    let up = carry(&driver, &vm, Work::BringUp { test: true }).await;
    assert_eq!(
        *driver.calls.lock().unwrap(),
        [
            "place <domain>db-test lab /failover/shop/db-01/t1/root.img</domain>",
            "hook serve"
        ]
    );
    assert!(up.succeeded, "{up:?}");
    assert_eq!(up.name, "db-test");
    let told = notice(Work::BringUp { test: true }, &up);
    assert_eq!(
        (told.reason, told.warning),
        (reasons::RECOVERED_VM_UP, false)
    );
    assert_eq!(
        told.note,
        "recovered VM db-test (/failover/db-test.xml) is up"
    );
    assert_eq!(up.definition.as_deref(), Some("/failover/db-test.xml"));
    let env = driver.envs.lock().unwrap()[0].clone();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("LIFEBOAT_ACTION"), Some("TestFailover"));
    assert_eq!(get("LIFEBOAT_TOKEN"), Some("t1"));
    assert_eq!(get("LIFEBOAT_VMS"), Some("db-01"));
    assert_eq!(get("LIFEBOAT_NETWORK"), Some("lab"));
    assert_eq!(get("LIFEBOAT_DEFINITION"), Some("/failover/db-test.xml"));
    assert_eq!(get("LIFEBOAT_NODE"), Some("node-b"));
    assert_eq!(
        get("LIFEBOAT_DISKS_DB_01"),
        Some("root=/failover/shop/db-01/t1/root.img")
    );
    assert_eq!(
        get("LIFEBOAT_DISK_DB_01_ROOT"),
        Some("/failover/shop/db-01/t1/root.img")
    );

    // Recorded: nothing more to do until the cleanup is asked for.
    let mut vm = vm;
    let status = vm.status.as_mut().unwrap();
    record(status, Work::BringUp { test: true }, up);
    assert_eq!(pending(&vm), None);
    vm.spec.requests.as_mut().unwrap().cleanup_test_failover = Some("c1".into());
    assert_eq!(pending(&vm), Some(Work::TakeDown { test: true }));
    let down = carry(&driver, &vm, Work::TakeDown { test: true }).await;
    assert!(down.removed && down.message.is_none(), "{down:?}");
    assert_eq!(
        driver.calls.lock().unwrap()[2..],
        ["hook serve", "remove /failover/db-test.xml"]
    );
    let env = driver.envs.lock().unwrap()[1].clone();
    assert!(env.contains(&("LIFEBOAT_ACTION".into(), "CleanupTestFailover".into())));
    assert!(env.contains(&("LIFEBOAT_TOKEN".into(), "c1".into())));
    record(
        vm.status.as_mut().unwrap(),
        Work::TakeDown { test: true },
        down,
    );
    assert_eq!(pending(&vm), None);
}

#[tokio::test]
async fn a_template_that_names_a_missing_disk_fails_before_anything_is_placed() {
    let vm = test_failed_over(vm(
        r#"{template: "{{ disk.data.location }}", hook: {name: serve, command: [serve.sh]}}"#,
    ));
    let driver = RecordingDriver::default();
    let up = carry(&driver, &vm, Work::BringUp { test: true }).await;
    assert!(!up.succeeded);
    let message = up.message.unwrap_or_default();
    assert!(
        message.starts_with("spec.recoveredVm.template, line 1"),
        "{message}"
    );
    assert!(driver.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_hook_is_the_recovered_vms_failure_and_the_cleanup_still_goes_on() {
    let vm = test_failed_over(vm(BOTH));
    let driver = RecordingDriver {
        failing_hook: true,
        ..RecordingDriver::default()
    };
    let up = carry(&driver, &vm, Work::BringUp { test: true }).await;
    assert!(!up.succeeded);
    assert_eq!(up.message.as_deref(), Some("hook serve: exit status: 3"));
    let told = notice(Work::BringUp { test: true }, &up);
    assert_eq!(
        (told.reason, told.warning),
        (reasons::RECOVERED_VM_FAILED, true)
    );
    assert!(told.note.contains("exit status: 3"), "{}", told.note);
    // Recorded, it waits: for a new retry token, and only once per token.
    let mut retried = vm.clone();
    record(
        retried.status.as_mut().unwrap(),
        Work::BringUp { test: true },
        up.clone(),
    );
    assert_eq!(pending(&retried), None);
    retried.spec.requests.as_mut().unwrap().retry = Some("r1".into());
    assert_eq!(pending(&retried), Some(Work::BringUp { test: true }));
    let again = carry(&driver, &retried, Work::BringUp { test: true }).await;
    assert_eq!(again.retry_token.as_deref(), Some("r1"));
    record(
        retried.status.as_mut().unwrap(),
        Work::BringUp { test: true },
        again,
    );
    assert_eq!(
        pending(&retried),
        None,
        "the same token does not bring it up twice"
    );
    // The definition it placed is still removed at the cleanup.
    let mut vm = vm;
    record(
        vm.status.as_mut().unwrap(),
        Work::BringUp { test: true },
        up,
    );
    vm.spec.requests.as_mut().unwrap().cleanup_test_failover = Some("c1".into());
    let down = carry(&driver, &vm, Work::TakeDown { test: true }).await;
    assert!(down.removed);
    assert_eq!(
        down.message.as_deref(),
        Some("at cleanup: hook serve: exit status: 3")
    );
    assert_eq!(
        driver.calls.lock().unwrap().last().map(String::as_str),
        Some("remove /failover/db-test.xml")
    );
}

#[test]
fn a_failover_brings_up_the_vm_once_and_a_cleanup_before_it_came_up_skips_it() {
    let mut vm = test_failed_over(vm(BOTH));
    // Cleanup asked before the test failover's VM was brought up: nothing to take down.
    vm.spec.requests.as_mut().unwrap().cleanup_test_failover = Some("c1".into());
    assert_eq!(pending(&vm), None);
    let status = vm.status.as_mut().unwrap();
    status.test_failover = None;
    status.phase = ProtectionPhase::FailedOver;
    status.failover = Some(FailoverResult::default());
    assert_eq!(pending(&vm), Some(Work::BringUp { test: false }));
    record(
        status_of(&mut vm),
        Work::BringUp { test: false },
        RecoveredVm::default(),
    );
    assert_eq!(pending(&vm), None);
    // No recoveredVm in the spec: nothing, ever.
    let mut plain = test_failed_over(vm.clone());
    plain.spec.recovered_vm = None;
    assert_eq!(pending(&plain), None);
}

fn status_of(vm: &mut ProtectedVM) -> &mut ProtectedVMStatus {
    vm.status.as_mut().unwrap()
}

/// The round trip of a recovered VM: a planned failover brings it up; while it is protected
/// in reverse nothing touches it; the failback's results keep the record (as the status
/// mapping writes them); once the planned failback is done, that takes it down once, with
/// the `Failback` action and the node it was brought up for, and brings nothing up. An
/// unplanned failback leaves it.
#[tokio::test]
async fn a_failback_takes_the_failovers_vm_down_once_and_brings_nothing_up() {
    let driver = RecordingDriver::default();
    let mut vm = vm(BOTH);
    vm.spec.requests = Some(lifeboat_api::protected_vm::Requests {
        failover: Some(lifeboat_api::protected_vm::FailoverRequest {
            token: "f1".into(),
            failover_type: FailoverType::Planned,
            recovery_point: None,
        }),
        ..Default::default()
    });
    vm.status = Some(ProtectedVMStatus {
        phase: ProtectionPhase::FailedOver,
        failover: Some(FailoverResult {
            disks: vec![MaterialisedDisk {
                name: "root".into(),
                location: "/failover/shop/db-01/root.img".into(),
            }],
            node: Some("node-b".into()),
            ..FailoverResult::default()
        }),
        ..ProtectedVMStatus::default()
    });
    assert_eq!(pending(&vm), Some(Work::BringUp { test: false }));
    let up = carry(&driver, &vm, Work::BringUp { test: false }).await;
    assert!(up.succeeded, "{up:?}");
    record(
        status_of(&mut vm),
        Work::BringUp { test: false },
        up.clone(),
    );
    for phase in [ProtectionPhase::Reprotecting, ProtectionPhase::Protected] {
        status_of(&mut vm).phase = phase;
        assert_eq!(
            pending(&vm),
            None,
            "{phase:?}: the recovered VM is the VM now"
        );
    }

    // The failback's Failover job stopped it and shipped its last writes; the Failback job
    // writes the original disks on node-a.
    status_of(&mut vm).phase = ProtectionPhase::FailingBack;
    status_of(&mut vm).failover = Some(FailoverResult {
        node: Some("node-b".into()),
        failback: true,
        recovered_vm: Some(up.clone()),
        ..FailoverResult::default()
    });
    assert_eq!(pending(&vm), None, "not before the failback is done");
    status_of(&mut vm).phase = ProtectionPhase::FailedBack;
    status_of(&mut vm).failover = Some(FailoverResult {
        disks: vec![MaterialisedDisk {
            name: "root".into(),
            location: "/vms/db-01/root.img".into(),
        }],
        node: Some("node-a".into()),
        failback: true,
        recovered_vm: Some(up.clone()),
        ..FailoverResult::default()
    });
    let mut unplanned = vm.clone();
    if let Some(f) = unplanned
        .spec
        .requests
        .as_mut()
        .and_then(|r| r.failover.as_mut())
    {
        f.failover_type = FailoverType::Unplanned;
    }
    assert_eq!(pending(&unplanned), None, "an unplanned failback leaves it");
    assert_eq!(pending(&vm), Some(Work::TakeDown { test: false }));
    let calls_before = driver.calls.lock().unwrap().len();
    let down = carry(&driver, &vm, Work::TakeDown { test: false }).await;
    assert!(down.removed && down.message.is_none(), "{down:?}");
    assert_eq!(
        driver.calls.lock().unwrap()[calls_before..],
        [
            "hook serve".to_owned(),
            "remove /failover/db.xml".to_owned()
        ]
    );
    let env = driver.envs.lock().unwrap().last().cloned().unwrap();
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(var("LIFEBOAT_ACTION"), "Failback");
    assert_eq!(var("LIFEBOAT_RECOVERED_NAME"), "db");
    assert_eq!(var("LIFEBOAT_DEFINITION"), "/failover/db.xml");
    assert_eq!(var("LIFEBOAT_TOKEN"), "f1");
    assert_eq!(var("LIFEBOAT_NODE"), "node-b", "where it was brought up");
    assert!(
        !env.iter().any(|(k, _)| k.starts_with("LIFEBOAT_DISK")),
        "the original disks are not the recovered VM's: {env:?}"
    );
    let said = notice(Work::TakeDown { test: false }, &down);
    assert!(
        !said.warning && said.note.contains("taken down (the VM failed back)"),
        "{}",
        said.note
    );
    record(status_of(&mut vm), Work::TakeDown { test: false }, down);
    assert!(
        status_of(&mut vm)
            .failover
            .as_ref()
            .and_then(|f| f.recovered_vm.as_ref())
            .is_some_and(|r| r.removed)
    );
    for phase in [ProtectionPhase::FailedBack, ProtectionPhase::Protected] {
        status_of(&mut vm).phase = phase;
        assert_eq!(pending(&vm), None, "{phase:?}: taken down once");
    }
}

/// A failback whose take-down could not remove the recovered VM's definition says so and
/// tries again on a new `retry` token, not at every pass.
#[tokio::test]
async fn a_failed_take_down_at_failback_is_tried_again_on_a_new_retry_token() {
    let driver = RecordingDriver::default();
    let mut vm = vm(BOTH);
    vm.spec.requests = Some(lifeboat_api::protected_vm::Requests {
        failover: Some(lifeboat_api::protected_vm::FailoverRequest {
            token: "f2".into(),
            failover_type: FailoverType::Planned,
            recovery_point: None,
        }),
        ..Default::default()
    });
    let up = RecoveredVm {
        name: "db".into(),
        definition: Some("/failover/db.xml".into()),
        succeeded: true,
        ..RecoveredVm::default()
    };
    vm.status = Some(ProtectedVMStatus {
        phase: ProtectionPhase::FailedBack,
        failover: Some(FailoverResult {
            node: Some("node-a".into()),
            failback: true,
            recovered_vm: Some(up),
            ..FailoverResult::default()
        }),
        ..ProtectedVMStatus::default()
    });
    *driver.failing_remove.lock().unwrap() = true;
    assert_eq!(pending(&vm), Some(Work::TakeDown { test: false }));
    let down = carry(&driver, &vm, Work::TakeDown { test: false }).await;
    assert_eq!(
        down.message.as_deref(),
        Some("at failback: remove /failover/db.xml: forbidden")
    );
    let said = notice(Work::TakeDown { test: false }, &down);
    assert!(
        said.warning && said.note.contains("a new retry token tries again"),
        "{}",
        said.note
    );
    record(status_of(&mut vm), Work::TakeDown { test: false }, down);
    assert_eq!(pending(&vm), None, "not at every pass");

    // The administrator fixes the permission and asks for a retry: taken down, once.
    *driver.failing_remove.lock().unwrap() = false;
    if let Some(requests) = vm.spec.requests.as_mut() {
        requests.retry = Some("r1".into());
    }
    assert_eq!(pending(&vm), Some(Work::TakeDown { test: false }));
    let down = carry(&driver, &vm, Work::TakeDown { test: false }).await;
    assert!(down.removed && down.message.is_none(), "{down:?}");
    record(status_of(&mut vm), Work::TakeDown { test: false }, down);
    assert_eq!(pending(&vm), None);
    assert_eq!(
        driver
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("remove"))
            .count(),
        2
    );
}

/// A failback's result, its recovered VM taken down, does not keep the next test failover's
/// VM from coming up (nor is anything brought up for the failback itself).
#[test]
fn after_a_failback_a_test_failover_brings_its_vm_up() {
    let mut vm = test_failed_over(vm(BOTH));
    status_of(&mut vm).failover = Some(FailoverResult {
        failback: true,
        recovered_vm: Some(RecoveredVm {
            name: "db".into(),
            removed: true,
            ..RecoveredVm::default()
        }),
        ..FailoverResult::default()
    });
    assert_eq!(pending(&vm), Some(Work::BringUp { test: true }));
    status_of(&mut vm).test_failover = None;
    status_of(&mut vm).phase = ProtectionPhase::FailedBack;
    assert_eq!(pending(&vm), None);
}
