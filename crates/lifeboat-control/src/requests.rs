//! Requests to a VM, said the same way by every tool: the action, the request it writes in
//! `spec.requests` (with a fresh token), what may not be asked of a VM as it is, and the wait
//! until the action is handled (its job followed, its failure reported). The command line
//! (standalone and on a cluster), the standalone daemon's recovery plans and the operator's
//! all ask VMs through these; only [`Resources`], where the VM and its jobs are read from,
//! differs.

use std::time::{Duration, Instant, SystemTime};

use lifeboat_api::common::RecoveryPointSelector;
use lifeboat_api::protected_vm::{FailoverRequest, FailoverType, Requests, TestFailoverRequest};
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_core::{PointChoice, format_duration};

/// An API enum as its manifests spell it (`Protected`, `CrashConsistent`), not Rust's Debug.
pub fn words<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(word)) => word,
        Ok(other) => other.to_string(),
        Err(_) => "unknown".into(),
    }
}

/// An action asked of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Resynchronize now.
    Resync,
    /// Test failover to a point.
    TestFailover(Option<String>),
    /// Failover, planned or not, to a point.
    Failover {
        /// Planned (ship what is pending first).
        planned: bool,
        /// A named point.
        point: Option<String>,
    },
    /// Remove the test failover's disks.
    Cleanup,
    /// Commit the failover.
    Commit,
    /// Re-protect after a failover (in reverse, from `spec.recoverySite`) or a failback.
    Reprotect,
    /// Fail back: a failover of a VM that replicates in reverse, onto the primary site's
    /// original disks; planned (the recovered VM stopped first, nothing lost), or not (its
    /// site lost: from a point of the replica, run at the primary site).
    Failback {
        /// Planned.
        planned: bool,
        /// A named point (unplanned only).
        point: Option<String>,
    },
    /// Retry what failed, now, instead of at the next retry time (or at all, after a
    /// non-recoverable error the administrator has fixed).
    Retry,
}

/// The action in words, as the tools print it ("test failover to the latest point").
impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let to = |point: &Option<String>| point_choice(point).to_string();
        match self {
            Action::Resync => f.write_str("resynchronization"),
            Action::TestFailover(point) => write!(f, "test failover to {}", to(point)),
            Action::Failover { planned, point } => write!(
                f,
                "{} failover to {}",
                if *planned { "planned" } else { "unplanned" },
                to(point)
            ),
            Action::Cleanup => f.write_str("test failover cleanup"),
            Action::Commit => f.write_str("failover commit"),
            Action::Reprotect => f.write_str("re-protect"),
            Action::Failback { planned: true, .. } => f.write_str("failback"),
            Action::Failback {
                planned: false,
                point,
            } => write!(f, "unplanned failback to {}", to(point)),
            Action::Retry => f.write_str("retry"),
        }
    }
}

/// Check a `--point` argument: `latest`, `latest-app-consistent`, `not-after:TIME` (RFC
/// 3339) or a point's name.
///
/// # Errors
///
/// An empty point, or a `not-after:` time that is not one.
pub fn point_arg(point: &str) -> Result<String, String> {
    point.parse::<PointChoice>().map(|_| point.to_owned())
}

/// The choice a `--point` argument (checked by [`point_arg`]) makes; none: the latest.
/// NB: one that does not parse is taken as a name, so that it fails by name, never as a
/// quiet fall back to the latest point.
pub fn point_choice(point: &Option<String>) -> PointChoice {
    match point.as_deref() {
        None => PointChoice::Latest,
        Some(p) => p
            .parse()
            .unwrap_or_else(|_| PointChoice::Named(p.to_owned())),
    }
}

/// The API's selector for a `--point` argument (see [`point_choice`]).
pub fn selector(point: &Option<String>) -> RecoveryPointSelector {
    crate::mapping::api_point(&point_choice(point))
}

/// A fresh request token.
pub fn new_token() -> String {
    format!(
        "cli-{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    )
}

/// Set the request for `action` with `token` in `requests` (the VM's `spec.requests`).
pub fn apply_request(requests: &mut Requests, action: &Action, token: &str) {
    let token = token.to_owned();
    match action {
        Action::Resync => requests.resync = Some(token),
        Action::TestFailover(point) => {
            requests.test_failover = Some(TestFailoverRequest {
                token,
                recovery_point: selector(point),
            });
        }
        // NB: a failback is a failover request of a VM that replicates in reverse.
        Action::Failover { planned, point } | Action::Failback { planned, point } => {
            requests.failover = Some(FailoverRequest {
                token,
                failover_type: if *planned {
                    FailoverType::Planned
                } else {
                    FailoverType::Unplanned
                },
                recovery_point: (!*planned).then(|| selector(point)),
            });
        }
        Action::Cleanup => requests.cleanup_test_failover = Some(token),
        Action::Commit => requests.commit = Some(token),
        Action::Reprotect => requests.reprotect = Some(token),
        Action::Retry => requests.retry = Some(token),
    }
}

/// Why `action` cannot be asked of `vm` as it is now, said before a request is written (the
/// operator would reject it, less plainly): a failback of a VM that does not replicate in
/// reverse, a re-protect of a VM that did not fail over or back.
///
/// # Errors
///
/// The reason, naming the VM, its phase and what to do instead.
pub fn check_action(vm: &ProtectedVM, action: &Action) -> Result<(), String> {
    use lifeboat_api::protected_vm::{ProtectionPhase as P, ReplicationDirection};
    let status = vm.status.clone().unwrap_or_default();
    let who = format!(
        "ProtectedVM {}/{}",
        vm.metadata.namespace.as_deref().unwrap_or("default"),
        vm.metadata.name.as_deref().unwrap_or_default()
    );
    let phase = words(&status.phase);
    match action {
        Action::Failback { .. } if status.direction != ReplicationDirection::Reverse => {
            Err(format!(
                "{who} replicates forward, from its primary site: a failback returns a VM that was failed over and re-protected in reverse (`lifeboat failover` fails it over)"
            ))
        }
        Action::Failback { planned: true, .. } if status.phase != P::Protected => Err(format!(
            "{who} is {phase}: a failback needs it protected in reverse"
        )),
        // NB: an unplanned one may also replace a planned one, or a re-protect, that cannot go
        // on (its job failed, or waits on the recovered VM's lost node).
        Action::Failback { planned: false, .. }
            if !matches!(
                status.phase,
                P::Protected | P::FailingBack | P::Reprotecting
            ) =>
        {
            Err(format!(
                "{who} is {phase}: an unplanned failback needs it protected in reverse, failing back, or re-protecting"
            ))
        }
        Action::Reprotect => match status.phase {
            P::FailedOver | P::FailoverCommitted if vm.spec.recovery_site.is_none() => {
                Err(format!(
                    "{who} has no spec.recoverySite: say where the recovered VM runs (its node, hypervisor and disks) before re-protecting it"
                ))
            }
            P::FailedOver | P::FailoverCommitted | P::FailedBack => Ok(()),
            _ => Err(format!(
                "{who} is {phase}: only a VM that failed over or failed back can be re-protected"
            )),
        },
        _ => Ok(()),
    }
}

/// Where `wait` reads the VM and its jobs from: the embedded store, or the API server.
#[async_trait::async_trait]
pub trait Resources: Send + Sync {
    /// A ProtectedVM.
    async fn vm(&self, namespace: &str, name: &str) -> Result<Option<ProtectedVM>, String>;
    /// A ReplicationJob.
    async fn job(&self, namespace: &str, name: &str) -> Result<Option<ReplicationJob>, String>;
}

/// The token `vm` echoes as handled for `action`.
pub fn handled(vm: &ProtectedVM, action: &Action) -> Option<String> {
    let h = vm
        .status
        .as_ref()
        .map(|s| s.handled_requests.clone())
        .unwrap_or_default();
    match action {
        Action::Resync => h.resync,
        Action::TestFailover(_) => h.test_failover,
        Action::Failover { .. } => h.failover,
        Action::Cleanup => h.cleanup_test_failover,
        Action::Commit => h.commit,
        Action::Reprotect => h.reprotect,
        Action::Failback { .. } => h.failover,
        Action::Retry => h.retry,
    }
}

/// Where the recovered VM (`spec.recoveredVm`) of a handled request is.
enum Recovered<'a> {
    /// The VM has none, or the action brings none up.
    NotAsked,
    /// Not recorded yet.
    Coming,
    /// Brought up, or failed to.
    Up(&'a lifeboat_api::protected_vm::RecoveredVm),
}

fn recovered_vm<'a>(vm: &'a ProtectedVM, action: &Action) -> Recovered<'a> {
    if vm.spec.recovered_vm.is_none() {
        return Recovered::NotAsked;
    }
    let status = vm.status.as_ref();
    let result = match action {
        Action::TestFailover(_) => status.and_then(|s| s.test_failover.as_ref()),
        Action::Failover { .. } => status.and_then(|s| s.failover.as_ref()),
        _ => return Recovered::NotAsked,
    };
    match result {
        // NB: a failback (a planned failover of a VM replicating in reverse) brings none up.
        Some(result) if result.failback => Recovered::NotAsked,
        Some(result) => match &result.recovered_vm {
            Some(up) => Recovered::Up(up),
            None => Recovered::Coming,
        },
        // NB: handled, and cleaned up (or failed back) since: nothing more to wait for.
        None => Recovered::NotAsked,
    }
}

/// Why [`wait`] gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// The job that handles the request failed (its reason and message).
    Failed(String),
    /// The request was not handled in time.
    Timeout(String),
    /// The VM or its job could not be read (the store, or the API server).
    Source(String),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::Failed(m) | WaitError::Timeout(m) | WaitError::Source(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for WaitError {}

/// What [`wait`] reports while it waits: the job that handles the request, each time it is
/// read (the `lifeboat` binary draws a progress bar from it), and the end of the wait.
pub trait Progress {
    /// The request's job as it is now.
    fn job(&mut self, job: &ReplicationJob);
    /// The wait is over (done, failed or timed out): clear or end the display.
    fn finish(&mut self);
}

/// No display: for scripts, and for output that is not a terminal.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn job(&mut self, _: &ReplicationJob) {}
    fn finish(&mut self) {}
}

/// Wait until the daemon (or the operator) echoes `token` for `action`, telling `progress`
/// about the job that handles it. Returns the VM as it then is.
///
/// # Errors
///
/// The wait timed out, the job failed (its error is the message), or the VM could not be read.
pub async fn wait(
    resources: &dyn Resources,
    namespace: &str,
    name: &str,
    action: &Action,
    token: &str,
    timeout: Duration,
    progress: &mut (dyn Progress + Send),
) -> Result<ProtectedVM, WaitError> {
    let result = wait_inner(resources, namespace, name, action, token, timeout, progress).await;
    progress.finish();
    result
}

async fn wait_inner(
    resources: &dyn Resources,
    namespace: &str,
    name: &str,
    action: &Action,
    token: &str,
    timeout: Duration,
    progress: &mut (dyn Progress + Send),
) -> Result<ProtectedVM, WaitError> {
    let started = Instant::now();
    loop {
        let vm = resources
            .vm(namespace, name)
            .await
            .map_err(WaitError::Source)?;
        let Some(vm) = vm else {
            return Err(WaitError::Source(format!(
                "ProtectedVM {namespace}/{name} disappeared"
            )));
        };
        let job_name = vm
            .status
            .as_ref()
            .and_then(|s| s.current_job.as_ref())
            .map(|j| j.name.clone());
        let job: Option<ReplicationJob> = match &job_name {
            Some(job) => resources
                .job(namespace, job)
                .await
                .map_err(WaitError::Source)?,
            None => None,
        };
        let ours = job.filter(|j| j.spec.parameters.request_token.as_deref() == Some(token));
        if let Some(job) = &ours {
            progress.job(job);
        }
        if let Some(status) = ours.as_ref().and_then(|j| j.status.as_ref())
            && status.phase == lifeboat_api::JobPhase::Failed
        {
            let why = status
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.reason, e.message))
                .unwrap_or_else(|| "no reason given".into());
            return Err(WaitError::Failed(format!(
                "the job {} failed: {why}",
                job_name.unwrap_or_default()
            )));
        }
        if handled(&vm, action).as_deref() == Some(token) {
            match recovered_vm(&vm, action) {
                Recovered::NotAsked => return Ok(vm),
                Recovered::Up(up) if up.succeeded => return Ok(vm),
                Recovered::Up(up) => {
                    return Err(WaitError::Failed(format!(
                        "the disks are written, but the recovered VM {} did not come up: {}",
                        up.name,
                        up.message.as_deref().unwrap_or("no reason given")
                    )));
                }
                Recovered::Coming => {}
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A point by time reaches the request as the API's NotAfter selector, and the action
    /// says it in words; a bad time is refused with the argument, a bad name kept by name.
    #[test]
    fn a_point_by_time_becomes_a_not_after_request() {
        let point = Some("not-after:2026-12-06T21:00:00+01:00".to_owned());
        let action = Action::TestFailover(point.clone());
        assert_eq!(
            action.to_string(),
            "test failover to the newest point at or before 2026-12-06T20:00:00Z"
        );
        let mut requests = Requests::default();
        apply_request(&mut requests, &action, "t1");
        let selector = requests
            .test_failover
            .map(|r| r.recovery_point)
            .unwrap_or_default();
        assert_eq!(
            selector.kind,
            lifeboat_api::common::RecoveryPointKind::NotAfter
        );
        assert_eq!(
            selector.time.map(|t| t.0.to_string()).as_deref(),
            Some("2026-12-06T20:00:00Z")
        );
        assert!(point_arg("not-after:noon").is_err_and(|e| e.contains("\"noon\"")));
        assert_eq!(point_arg("p-1").as_deref(), Ok("p-1"));
        // Never a quiet fall back to the latest point.
        assert_eq!(
            point_choice(&Some("not-after:noon".to_owned())),
            PointChoice::Named("not-after:noon".to_owned())
        );
    }
}
