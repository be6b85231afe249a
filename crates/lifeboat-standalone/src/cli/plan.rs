//! `lifeboat plan`: a recovery plan's requests (test failover, failover, cleanup, commit,
//! proceed past a gate, retry from the failed step), written for the daemon and waited on,
//! telling the caller each change of the run; and the plans' tables.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use lifeboat_api::plan::{
    PlanFailoverRequest, PlanPhase, PlanRequests, PlanTestFailoverRequest, RecoveryPlan,
};
use lifeboat_api::protected_vm::FailoverType;
use lifeboat_control::mapping::system_time;
use lifeboat_core::{PointChoice, format_duration};

use super::{WaitError, age, new_token, render, selector, words};
use crate::db::Db;
use crate::plans::PLAN_KIND;
use crate::requests;

/// What is asked of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanAsk {
    /// Test failover of every VM, to a point rule.
    TestFailover(Option<String>),
    /// Failover of every VM, planned or not.
    Failover {
        /// Planned: each source ships what is pending and stops.
        planned: bool,
        /// The point rule (unplanned).
        point: Option<String>,
    },
    /// Remove the test failovers.
    Cleanup,
    /// Commit the failovers.
    Commit,
    /// Let the run go past the gate it waits at.
    Proceed,
    /// Run the failed run again from its failed step.
    Retry,
}

impl std::fmt::Display for PlanAsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let to = |point: &Option<String>| {
            point
                .as_deref()
                .map_or(PointChoice::Latest, |p| {
                    p.parse().unwrap_or(PointChoice::Latest)
                })
                .to_string()
        };
        match self {
            PlanAsk::TestFailover(point) => write!(f, "test failover to {}", to(point)),
            PlanAsk::Failover { planned: true, .. } => f.write_str("planned failover"),
            PlanAsk::Failover { point, .. } => write!(f, "unplanned failover to {}", to(point)),
            PlanAsk::Cleanup => f.write_str("test failover cleanup"),
            PlanAsk::Commit => f.write_str("failover commit"),
            PlanAsk::Proceed => f.write_str("proceed past the gate"),
            PlanAsk::Retry => f.write_str("retry from the failed step"),
        }
    }
}

/// The plans the daemon knows.
///
/// # Errors
///
/// The embedded store cannot be read.
pub fn plans(state_dir: &Path) -> Result<Vec<RecoveryPlan>, String> {
    Db::new(state_dir)
        .list(PLAN_KIND)
        .map_err(|e| e.to_string())
}

/// One plan the daemon knows.
///
/// # Errors
///
/// The store cannot be read, or the daemon does not know the plan (the message names the
/// plans it knows).
pub fn plan(state_dir: &Path, namespace: &str, name: &str) -> Result<RecoveryPlan, String> {
    let db = Db::new(state_dir);
    if let Some(plan) = db
        .get::<RecoveryPlan>(PLAN_KIND, namespace, name)
        .map_err(|e| e.to_string())?
    {
        return Ok(plan);
    }
    let known: Vec<String> = plans(state_dir)?
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            )
        })
        .collect();
    Err(format!(
        "no RecoveryPlan {namespace}/{name} is known to the daemon using {} (is `lifeboat standalone` running, with the plan's manifest in its folder?); known: {}",
        state_dir.display(),
        if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }
    ))
}

/// Why `ask` cannot be asked of `plan` as it is now.
///
/// # Errors
///
/// The reason, naming the plan.
pub fn check(plan: &RecoveryPlan, ask: &PlanAsk) -> Result<(), String> {
    let status = plan.status.clone().unwrap_or_default();
    let who = format!(
        "RecoveryPlan {}",
        plan.metadata.name.as_deref().unwrap_or_default()
    );
    let point = match ask {
        PlanAsk::TestFailover(point) | PlanAsk::Failover { point, .. } => point.as_deref(),
        _ => None,
    };
    if let Some(point) = point
        && matches!(point.parse(), Ok(PointChoice::Named(_)) | Err(_))
    {
        return Err(format!(
            "{who}: the point {point:?} is not a rule (latest, latest-app-consistent, not-after:TIME): a point's name belongs to one VM"
        ));
    }
    match ask {
        PlanAsk::Proceed if status.phase != PlanPhase::WaitingForGate => Err(format!(
            "{who} is not waiting at a gate (it is {})",
            words(&status.phase)
        )),
        PlanAsk::Retry if status.phase != PlanPhase::Failed => Err(format!(
            "{who} has no failed run to retry (it is {})",
            words(&status.phase)
        )),
        _ => Ok(()),
    }
}

/// Set the request for `ask` with `token` in a plan's requests.
pub fn apply(requests: &mut PlanRequests, ask: &PlanAsk, token: &str) {
    let token = token.to_owned();
    match ask {
        PlanAsk::TestFailover(point) => {
            requests.test_failover = Some(PlanTestFailoverRequest {
                token,
                recovery_point: selector(point),
            });
        }
        PlanAsk::Failover { planned, point } => {
            requests.failover = Some(PlanFailoverRequest {
                token,
                failover_type: if *planned {
                    FailoverType::Planned
                } else {
                    FailoverType::Unplanned
                },
                recovery_point: (!*planned).then(|| selector(point)),
            });
        }
        PlanAsk::Cleanup => requests.cleanup_test_failover = Some(token),
        PlanAsk::Commit => requests.commit = Some(token),
        PlanAsk::Proceed => requests.proceed = Some(token),
        PlanAsk::Retry => requests.retry = Some(token),
    }
}

/// Write the request for `ask` on a plan for the daemon using `state_dir`; returns its token.
///
/// # Errors
///
/// The plan is unknown to the daemon, cannot be asked that now, or the request cannot be
/// written.
pub fn request(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    ask: &PlanAsk,
) -> Result<String, String> {
    check(&plan(state_dir, namespace, name)?, ask)?;
    let token = new_token();
    requests::write(state_dir, namespace, name, |r: &mut PlanRequests| {
        apply(r, ask, &token)
    })?;
    Ok(token)
}

/// Whether the plan is done with the request `token` for `ask`: `Some(Ok)` handled,
/// `Some(Err)` stopped at a failed step, `None` still going.
pub fn outcome(plan: &RecoveryPlan, ask: &PlanAsk, token: &str) -> Option<Result<(), String>> {
    let status = plan.status.clone().unwrap_or_default();
    let h = &status.handled_requests;
    let handled = match ask {
        PlanAsk::TestFailover(_) => &h.test_failover,
        PlanAsk::Failover { .. } => &h.failover,
        PlanAsk::Cleanup => &h.cleanup_test_failover,
        PlanAsk::Commit => &h.commit,
        PlanAsk::Proceed => &h.proceed,
        PlanAsk::Retry => &h.retry,
    };
    let ours = match ask {
        // NB: a retry goes on under its run's token; it is ours once it took the retry's.
        PlanAsk::Retry | PlanAsk::Proceed => handled.as_deref() == Some(token),
        _ => status.token.as_deref() == Some(token),
    };
    if *ask == PlanAsk::Proceed {
        return ours.then_some(Ok(()));
    }
    let failed = || {
        status
            .failure
            .as_ref()
            .map(|f| format!("stopped at {}: {}", f.step, f.message))
            .unwrap_or_else(|| "stopped".into())
    };
    match status.phase {
        PlanPhase::Failed if ours => Some(Err(failed())),
        PlanPhase::Succeeded if ours && *ask == PlanAsk::Retry => Some(Ok(())),
        _ if *ask != PlanAsk::Retry && handled.as_deref() == Some(token) => Some(Ok(())),
        _ => None,
    }
}

/// Where [`wait`] reads the plan from: the embedded store, or the API server.
#[async_trait::async_trait]
pub trait PlanSource: Send + Sync {
    /// The plan (an error when there is none).
    async fn plan(&self, namespace: &str, name: &str) -> Result<RecoveryPlan, String>;
}

/// The standalone daemon's state folder as a [`PlanSource`].
#[derive(Debug)]
pub struct StateFolder(pub std::path::PathBuf);

#[async_trait::async_trait]
impl PlanSource for StateFolder {
    async fn plan(&self, namespace: &str, name: &str) -> Result<RecoveryPlan, String> {
        plan(&self.0, namespace, name)
    }
}

/// Wait until the daemon (or the operator) is done with `token` for `ask` on the plan,
/// calling `changed` with the plan each time its status changes. Returns the plan as it then
/// is.
///
/// # Errors
///
/// The run stopped at a failed step (the message names it), the wait timed out, or the plan
/// could not be read.
pub async fn wait(
    source: &dyn PlanSource,
    namespace: &str,
    name: &str,
    ask: &PlanAsk,
    token: &str,
    timeout: Duration,
    changed: &mut (dyn FnMut(&RecoveryPlan) + Send),
) -> Result<RecoveryPlan, WaitError> {
    let started = Instant::now();
    let mut last = None;
    loop {
        let plan = source
            .plan(namespace, name)
            .await
            .map_err(WaitError::Source)?;
        if last.as_ref() != Some(&plan.status) {
            changed(&plan);
            last = Some(plan.status.clone());
        }
        match outcome(&plan, ask, token) {
            Some(Ok(())) => return Ok(plan),
            Some(Err(why)) => return Err(WaitError::Failed(why)),
            None => {}
        }
        if started.elapsed() > timeout {
            return Err(WaitError::Timeout(format!(
                "the request was not handled within {}",
                format_duration(timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `lifeboat plan status` table of plans.
pub fn plans_table(plans: &[RecoveryPlan], now: SystemTime) -> String {
    let mut rows = vec![
        [
            "NAME",
            "PHASE",
            "ACTION",
            "VMS",
            "STEP",
            "RECOVERY TIME",
            "LAST RUN",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for plan in plans {
        let status = plan.status.clone().unwrap_or_default();
        let vms: usize = plan.spec.groups.iter().map(|g| g.vms.len()).sum();
        let done = status
            .vms
            .iter()
            .filter(|v| v.outcome == lifeboat_api::plan::VmOutcome::Succeeded)
            .count();
        rows.push(vec![
            plan.metadata.name.clone().unwrap_or_default(),
            words(&status.phase),
            status.action.as_ref().map_or("-".into(), words),
            if status.action.is_some() {
                format!("{done}/{vms}")
            } else {
                vms.to_string()
            },
            status.progression.clone().unwrap_or_else(|| "-".into()),
            status
                .recovery_time_seconds
                .map_or("-".into(), |s| format!("{s:.1}s")),
            age(status.start_time.as_ref().map(system_time), now),
        ]);
    }
    render(&rows)
}

/// One plan's VMs, group by group: outcome, when, how long, the point and the disks (or
/// why it failed).
pub fn vms_table(plan: &RecoveryPlan) -> String {
    let status = plan.status.clone().unwrap_or_default();
    let mut rows = vec![
        ["GROUP", "VM", "OUTCOME", "TOOK", "POINT", "DISKS"]
            .map(String::from)
            .to_vec(),
    ];
    for group in &plan.spec.groups {
        for name in &group.vms {
            let vm = status.vms.iter().find(|v| &v.name == name);
            let outcome = vm.map_or("-".into(), |v| words(&v.outcome));
            let took = vm
                .and_then(|v| Some((v.start_time.as_ref()?, v.completion_time.as_ref()?)))
                .map_or("-".into(), |(a, b)| {
                    let seconds = b.0.duration_since(a.0).as_secs_f64();
                    format!("{seconds:.1}s")
                });
            let point = vm
                .and_then(|v| v.recovery_point.clone())
                .unwrap_or_else(|| "-".into());
            let disks = match vm {
                Some(v) if v.message.is_some() => v.message.clone().unwrap_or_default(),
                Some(v) if !v.disks.is_empty() => v
                    .disks
                    .iter()
                    .map(|d| format!("{}={}", d.name, d.location))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => "-".into(),
            };
            rows.push(vec![
                group.name.clone(),
                name.clone(),
                outcome,
                took,
                point,
                disks,
            ]);
        }
    }
    render(&rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;
    use lifeboat_api::plan::{PlanHandledRequests, RecoveryPlanStatus};

    fn plan_with(status: RecoveryPlanStatus) -> RecoveryPlan {
        let mut plan = RecoveryPlan::new("p", Default::default());
        plan.status = Some(status);
        plan
    }

    #[test]
    fn a_request_is_done_when_echoed_and_failed_when_its_run_stopped() {
        let ask = PlanAsk::TestFailover(None);
        let running = plan_with(RecoveryPlanStatus {
            phase: PlanPhase::Running,
            token: Some("t1".into()),
            ..Default::default()
        });
        assert_eq!(outcome(&running, &ask, "t1"), None);
        let failed = plan_with(RecoveryPlanStatus {
            phase: PlanPhase::Failed,
            token: Some("t1".into()),
            failure: Some(lifeboat_api::plan::PlanFailure {
                step: "app/before/migrate".into(),
                message: "hook migrate: exit status: 3".into(),
            }),
            ..Default::default()
        });
        let Some(Err(why)) = outcome(&failed, &ask, "t1") else {
            panic!("not failed")
        };
        assert_eq!(
            why,
            "stopped at app/before/migrate: hook migrate: exit status: 3"
        );
        // A failure of an older run is not this request's.
        assert_eq!(outcome(&failed, &ask, "t2"), None);
        let done = plan_with(RecoveryPlanStatus {
            phase: PlanPhase::Succeeded,
            token: Some("t1".into()),
            handled_requests: PlanHandledRequests {
                test_failover: Some("t1".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        assert_eq!(outcome(&done, &ask, "t1"), Some(Ok(())));
        // A retry is done when its run ends after taking it.
        let retried = plan_with(RecoveryPlanStatus {
            handled_requests: PlanHandledRequests {
                retry: Some("r1".into()),
                ..Default::default()
            },
            ..done.status.clone().unwrap_or_default()
        });
        assert_eq!(outcome(&retried, &PlanAsk::Retry, "r1"), Some(Ok(())));
        assert_eq!(outcome(&done, &PlanAsk::Retry, "r1"), None);
    }

    #[test]
    fn a_named_point_or_a_bad_time_is_refused_for_a_plan() {
        let plan = plan_with(RecoveryPlanStatus::default());
        let named = PlanAsk::TestFailover(Some("20261206T200000.000Z-c7".into()));
        assert!(check(&plan, &named).unwrap_err().contains("not a rule"));
        let bad = PlanAsk::TestFailover(Some("not-after:yesterday".into()));
        assert!(check(&plan, &bad).is_err());
        let time = PlanAsk::TestFailover(Some("not-after:2026-12-06T20:00:00Z".into()));
        assert_eq!(check(&plan, &time), Ok(()));
        assert!(
            check(&plan, &PlanAsk::Proceed)
                .unwrap_err()
                .contains("not waiting")
        );
    }
}
