//! The VM a (test) failover brings up on the disks it wrote (`spec.recoveredVm`), and its
//! removal at the cleanup of a test failover or at a failback: one code path for the operator
//! and the standalone daemon, over a [`RecoveryDriver`] (the Kubernetes API and Jobs; files
//! and processes).
//!
//! ```text
//!  (test) failover job done, status.testFailover / failover without recoveredVm
//!     └─ BringUp: render the template ─> place it ─> hook ─> recoveredVm {definition, succeeded}
//!  cleanup requested, recoveredVm not removed
//!     └─ TakeDown: hook (CleanupTestFailover) ─> remove the definition ─> recoveredVm.removed
//!                  then the cleanup job removes the disks
//!  planned failback done (FailedBack or later: the recovered VM was stopped, its last writes
//!  are on the original disks), the failover's recoveredVm kept in the failback's result
//!  (failover.failback), not removed
//!     └─ TakeDown: hook (Failback) ─> remove the definition ─> recoveredVm.removed
//!                  (nothing brings it up again, or runs it beside the VM back at the primary;
//!                  an unplanned failback leaves it: its site may be lost, or it may still run;
//!                  one whose hook or removal failed is taken down again on a new retry token)
//! ```
//!
//! What was done is recorded in the VM's status before anything else happens to it, so that a
//! restart neither brings a VM up twice nor skips its removal. A VM's request is handled for a
//! waiter (the CLI, a plan) only once its recovered VM is recorded ([`crate::requests::wait`]).

use std::time::SystemTime;

use async_trait::async_trait;
use kube::ResourceExt;
use lifeboat_api::plan::{PlanAction, PlanHook};
use lifeboat_api::protected_vm::{
    FailoverResult, FailoverType, MaterialisedDisk, ProtectionPhase, RecoveredVm,
};
use lifeboat_api::recovered::{self, Rendered};
use lifeboat_api::{ProtectedVM, ProtectedVMStatus};
use lifeboat_core::vm::{Notice, reasons};

use crate::mapping::api_time;
use crate::plan::env_name;

/// What a VM's recovered VM needs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Bring it up on the disks of the test failover (`test`) or of the failover.
    BringUp {
        /// A test failover's.
        test: bool,
    },
    /// Take the VM down: the test failover's (`test`) when its cleanup is asked for, before
    /// the disks go; the failover's once a planned failback (which stopped it) is done.
    TakeDown {
        /// The test failover's.
        test: bool,
    },
}

/// What a recovered VM's hook runs for (its `LIFEBOAT_ACTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// A plan's action: the (test) failover that brings the VM up, the cleanup that takes a
    /// test failover's down.
    Plan(PlanAction),
    /// The failback that takes the failover's VM down (`Failback`).
    Failback,
}

/// Carries the work out where the VM lives.
#[async_trait]
pub trait RecoveryDriver: Send + Sync {
    /// Place the rendered definition (apply the object, write the file); where it went.
    async fn place(
        &self,
        vm: &ProtectedVM,
        result: &FailoverResult,
        rendered: &Rendered,
    ) -> Result<String, String>;
    /// Remove what [`RecoveryDriver::place`] placed at `definition`; gone already is not an
    /// error.
    async fn remove(&self, vm: &ProtectedVM, definition: &str) -> Result<(), String>;
    /// Run the VM's hook with `env` added to its environment, to its end.
    async fn hook(
        &self,
        vm: &ProtectedVM,
        hook: &PlanHook,
        env: &[(String, String)],
    ) -> Result<(), String>;
}

/// What the VM needs now, if anything: a result without its recovered VM brings it up, and
/// so does a new `retry` token for one that did not come up; a failback's result takes the
/// failover's down.
pub fn pending(vm: &ProtectedVM) -> Option<Work> {
    vm.spec.recovered_vm.as_ref()?;
    let status = vm.status.as_ref()?;
    let failback = status.failover.as_ref().filter(|f| f.failback);
    // NB: once the failback is done (a Failback job that failed leaves the phase FailingBack:
    // the VM may still have to go on at the recovery site), and only a planned one, which
    // stopped the recovered VM.
    let requests = vm.spec.requests.clone().unwrap_or_default();
    // NB: a take-down that went wrong (its hook failed, or the definition could not be
    // removed: the recovered VM could be started again beside the VM) is tried again on a
    // new `retry` token, not at every pass.
    let take_down_again = |down: &RecoveredVm| {
        down.removed
            && down.message.is_some()
            && requests.retry.is_some()
            && requests.retry != down.retry_token
    };
    if let Some(failback) = failback
        && status.phase != ProtectionPhase::FailingBack
        && failover_action(vm) == PlanAction::PlannedFailover
        && failback
            .recovered_vm
            .as_ref()
            .is_some_and(|up| !up.removed || take_down_again(up))
    {
        return Some(Work::TakeDown { test: false });
    }
    let cleanup_asked = requests
        .cleanup_test_failover
        .as_ref()
        .is_some_and(|t| Some(t) != status.handled_requests.cleanup_test_failover.as_ref());
    let needed = |result: &FailoverResult| match &result.recovered_vm {
        None => true,
        Some(up) => {
            !up.succeeded
                && !up.removed
                && requests.retry.is_some()
                && requests.retry != up.retry_token
        }
    };
    if let Some(test) = &status.test_failover {
        match &test.recovered_vm {
            Some(up) if cleanup_asked && !up.removed => return Some(Work::TakeDown { test: true }),
            _ if !cleanup_asked && needed(test) => return Some(Work::BringUp { test: true }),
            _ => {}
        }
    }
    let failed_over = matches!(
        status.phase,
        ProtectionPhase::FailedOver | ProtectionPhase::FailoverCommitted
    );
    (failed_over && failback.is_none() && status.failover.as_ref().is_some_and(needed))
        .then_some(Work::BringUp { test: false })
}

/// The environment of the VM's hook for `action`: a plan hook's for this one VM
/// (`LIFEBOAT_VMS`, `LIFEBOAT_DISKS_<VM>`, `LIFEBOAT_DISK_<VM>_<DISK>`, ...) and the recovered
/// VM's settings (a test failover's network for a test failover and its cleanup).
pub fn hook_env(
    vm: &ProtectedVM,
    result: &FailoverResult,
    action: HookAction,
    recovered: &RecoveredVm,
) -> Vec<(String, String)> {
    let name = vm.name_any();
    let requests = vm.spec.requests.clone().unwrap_or_default();
    let (token, test) = match action {
        HookAction::Plan(PlanAction::CleanupTestFailover) => (requests.cleanup_test_failover, true),
        HookAction::Plan(PlanAction::TestFailover) => {
            (requests.test_failover.map(|r| r.token), true)
        }
        _ => (requests.failover.map(|r| r.token), false),
    };
    let action_name = match action {
        HookAction::Plan(action) => format!("{action:?}"),
        HookAction::Failback => "Failback".to_owned(),
    };
    let mut env = vec![
        (
            "LIFEBOAT_NAMESPACE".to_owned(),
            vm.namespace().unwrap_or_default(),
        ),
        ("LIFEBOAT_VM".to_owned(), name.clone()),
        ("LIFEBOAT_VMS".to_owned(), name.clone()),
        ("LIFEBOAT_ACTION".to_owned(), action_name),
        ("LIFEBOAT_TOKEN".to_owned(), token.unwrap_or_default()),
        ("LIFEBOAT_RECOVERED_NAME".to_owned(), recovered.name.clone()),
        (
            "LIFEBOAT_NETWORK".to_owned(),
            recovered::recovered_network(vm, test).unwrap_or_default(),
        ),
        (
            "LIFEBOAT_DEFINITION".to_owned(),
            recovered.definition.clone().unwrap_or_default(),
        ),
        (
            "LIFEBOAT_NODE".to_owned(),
            recovered
                .node
                .clone()
                .or_else(|| result.node.clone())
                .unwrap_or_else(|| vm.spec.node_name.clone()),
        ),
    ];
    // NB: a failback's result names the original disks, not the recovered VM's.
    if action != HookAction::Failback {
        env.extend(disk_env(&name, &result.disks));
    }
    env
}

/// `LIFEBOAT_DISKS_<VM>` (one `disk=location` line per disk) and `LIFEBOAT_DISK_<VM>_<DISK>`
/// (one disk's location), names upper-cased with `_` for other characters.
pub fn disk_env(vm: &str, disks: &[MaterialisedDisk]) -> Vec<(String, String)> {
    if disks.is_empty() {
        return Vec::new();
    }
    let lines: Vec<String> = disks
        .iter()
        .map(|d| format!("{}={}", d.name, d.location))
        .collect();
    let mut env = vec![(format!("LIFEBOAT_DISKS_{}", env_name(vm)), lines.join("\n"))];
    env.extend(disks.iter().map(|disk| {
        (
            format!("LIFEBOAT_DISK_{}_{}", env_name(vm), env_name(&disk.name)),
            disk.location.clone(),
        )
    }));
    env
}

/// The action, in a plan's words, of the failover that made `vm`'s result.
fn failover_action(vm: &ProtectedVM) -> PlanAction {
    let planned = vm
        .spec
        .requests
        .as_ref()
        .and_then(|r| r.failover.as_ref())
        .is_some_and(|f| f.failover_type == FailoverType::Planned);
    if planned {
        PlanAction::PlannedFailover
    } else {
        PlanAction::UnplannedFailover
    }
}

/// Carry `work` out; the result's new `recoveredVm`, for [`record`]. `None` when the result
/// it is about is gone.
pub async fn carry_out(
    driver: &dyn RecoveryDriver,
    vm: &ProtectedVM,
    work: Work,
    now: SystemTime,
) -> Option<RecoveredVm> {
    let status = vm.status.as_ref()?;
    let spec = vm.spec.recovered_vm.as_ref()?;
    let qualified = format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any());
    match work {
        Work::BringUp { test } => {
            let result = if test {
                status.test_failover.as_ref()?
            } else {
                status.failover.as_ref()?
            };
            let mut up = RecoveredVm {
                name: recovered::recovered_name(vm, test),
                time: Some(api_time(now)),
                retry_token: vm.spec.requests.as_ref().and_then(|r| r.retry.clone()),
                node: result.node.clone(),
                ..RecoveredVm::default()
            };
            let failed = |mut up: RecoveredVm, message: String| {
                tracing::warn!(vm = %qualified, recovered = %up.name, "the recovered VM did not come up: {message}");
                up.message = Some(message);
                up
            };
            if spec.template.is_some() {
                let rendered = match recovered::render(vm, result, test) {
                    Ok(rendered) => rendered,
                    Err(why) => return Some(failed(up, why)),
                };
                match driver.place(vm, result, &rendered).await {
                    Ok(at) => up.definition = Some(at),
                    Err(why) => {
                        return Some(failed(up, format!("place its definition: {why}")));
                    }
                }
            }
            if let Some(hook) = &spec.hook {
                let action = if test {
                    PlanAction::TestFailover
                } else {
                    failover_action(vm)
                };
                let env = hook_env(vm, result, HookAction::Plan(action), &up);
                if let Err(why) = driver.hook(vm, hook, &env).await {
                    return Some(failed(up, format!("hook {}: {why}", hook.name)));
                }
            }
            tracing::info!(vm = %qualified, recovered = %up.name, definition = ?up.definition, "the recovered VM is up");
            up.succeeded = true;
            Some(up)
        }
        Work::TakeDown { test } => {
            let (result, action, what) = if test {
                (
                    status.test_failover.as_ref()?,
                    HookAction::Plan(PlanAction::CleanupTestFailover),
                    "the test failover's VM",
                )
            } else {
                (
                    status.failover.as_ref()?,
                    HookAction::Failback,
                    "the failover's VM (the VM failed back)",
                )
            };
            let mut down = result.recovered_vm.clone()?;
            let mut problems = Vec::new();
            if let Some(hook) = &spec.hook {
                let env = hook_env(vm, result, action, &down);
                if let Err(why) = driver.hook(vm, hook, &env).await {
                    problems.push(format!("hook {}: {why}", hook.name));
                }
            }
            if let Some(definition) = &down.definition
                && let Err(why) = driver.remove(vm, definition).await
            {
                problems.push(format!("remove {definition}: {why}"));
            }
            // NB: the cleanup goes on whatever the undo said (a hook that cannot stop what
            // it started must not keep the test failover's disks forever, nor be run again
            // at every pass); what failed is said in the log, in the status and in a warning
            // Event, and a definition that could not be removed is left to the administrator.
            if problems.is_empty() {
                tracing::info!(vm = %qualified, recovered = %down.name, "{what} is taken down");
                down.message = None;
            } else {
                tracing::warn!(vm = %qualified, recovered = %down.name, "taking {what} down: {}", problems.join("; "));
                let when = if test { "at cleanup" } else { "at failback" };
                down.message = Some(format!("{when}: {}", problems.join("; ")));
            }
            down.removed = true;
            down.retry_token = vm.spec.requests.as_ref().and_then(|r| r.retry.clone());
            Some(down)
        }
    }
}

/// What people are told of what [`carry_out`] did (an Event on a cluster).
pub fn notice(work: Work, recovered: &RecoveredVm) -> Notice {
    let at = recovered
        .definition
        .as_deref()
        .map(|d| format!(" ({d})"))
        .unwrap_or_default();
    let (warning, reason, note) = match work {
        Work::TakeDown { test } => {
            let why = if test { "" } else { " (the VM failed back)" };
            (
                recovered.message.is_some(),
                reasons::RECOVERED_VM_REMOVED,
                match &recovered.message {
                    Some(problem) if test => format!(
                        "recovered VM {}{at} taken down{why}, {problem}",
                        recovered.name
                    ),
                    Some(problem) => format!(
                        "recovered VM {}{at} taken down{why}, {problem} (a new retry token tries again)",
                        recovered.name
                    ),
                    None => format!("recovered VM {}{at} taken down{why}", recovered.name),
                },
            )
        }
        Work::BringUp { .. } if recovered.succeeded => (
            false,
            reasons::RECOVERED_VM_UP,
            format!("recovered VM {}{at} is up", recovered.name),
        ),
        Work::BringUp { .. } => (
            true,
            reasons::RECOVERED_VM_FAILED,
            format!(
                "recovered VM {} did not come up: {} (a new retry token tries again)",
                recovered.name,
                recovered.message.as_deref().unwrap_or("no reason given")
            ),
        ),
    };
    Notice {
        warning,
        reason,
        note,
    }
}

/// Write what [`carry_out`] did into the VM's status (the result it was about).
pub fn record(status: &mut ProtectedVMStatus, work: Work, recovered: RecoveredVm) {
    let result = match work {
        Work::BringUp { test: false } | Work::TakeDown { test: false } => status.failover.as_mut(),
        Work::BringUp { test: true } | Work::TakeDown { test: true } => {
            status.test_failover.as_mut()
        }
    };
    if let Some(result) = result {
        result.recovered_vm = Some(recovered);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests;
