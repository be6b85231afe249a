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
        Ok(())
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

/// Bring up a test failover's VM.
async fn bring_up(driver: &RecordingDriver, vm: &ProtectedVM) -> RecoveredVm {
    carry_out(
        driver,
        vm,
        Work::BringUp { test: true },
        SystemTime::UNIX_EPOCH,
    )
    .await
    .unwrap()
}

const BOTH: &str = r#"{name: db, testNetwork: lab, template: "<domain>{{ name }} {{ network }} {{ disk.root.location }}</domain>", hook: {name: serve, command: [serve.sh]}}"#;

#[tokio::test]
async fn a_test_failover_places_the_definition_then_runs_the_hook_with_the_disks() {
    let vm = test_failed_over(vm(BOTH));
    assert_eq!(pending(&vm), Some(Work::BringUp { test: true }));
    let driver = RecordingDriver::default();
    let up = bring_up(&driver, &vm).await;
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
    assert_eq!(pending(&vm), Some(Work::TakeDown));
    let down = carry_out(&driver, &vm, Work::TakeDown, SystemTime::UNIX_EPOCH)
        .await
        .unwrap();
    assert!(down.removed && down.message.is_none(), "{down:?}");
    assert_eq!(
        driver.calls.lock().unwrap()[2..],
        ["hook serve", "remove /failover/db-test.xml"]
    );
    let env = driver.envs.lock().unwrap()[1].clone();
    assert!(env.contains(&("LIFEBOAT_ACTION".into(), "CleanupTestFailover".into())));
    assert!(env.contains(&("LIFEBOAT_TOKEN".into(), "c1".into())));
    record(vm.status.as_mut().unwrap(), Work::TakeDown, down);
    assert_eq!(pending(&vm), None);
}

#[tokio::test]
async fn a_template_that_names_a_missing_disk_fails_before_anything_is_placed() {
    let vm = test_failed_over(vm(
        r#"{template: "{{ disk.data.location }}", hook: {name: serve, command: [serve.sh]}}"#,
    ));
    let driver = RecordingDriver::default();
    let up = bring_up(&driver, &vm).await;
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
    let up = bring_up(&driver, &vm).await;
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
    let again = bring_up(&driver, &retried).await;
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
    let down = carry_out(&driver, &vm, Work::TakeDown, SystemTime::UNIX_EPOCH)
        .await
        .unwrap();
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
