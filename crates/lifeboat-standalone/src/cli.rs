//! What the `lifeboat` command shows and asks in standalone mode: a `kubectl get pvm`-like
//! table, recovery points, and requests (resync, failover, cleanup, commit) written for the
//! daemon and waited on, telling a progress display (the binary's) about the job.

pub mod plan;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use lifeboat_agent::StoreCache;
use lifeboat_api::common::RecoveryPointSelector;
use lifeboat_api::protected_vm::{FailoverRequest, FailoverType, Requests, TestFailoverRequest};
use lifeboat_api::{ProtectedVM, ReplicationJob, ReplicationPolicy};
use lifeboat_control::mapping::system_time;
use lifeboat_core::{PointChoice, format_duration};
use lifeboat_store::VmKey;

use crate::daemon::{JOB_KIND, POLICY_KIND, VM_KIND};
use crate::db::Db;
use crate::requests;

/// A VM named on the command line: `NAME` or `NAMESPACE/NAME`.
pub fn parse_vm(arg: &str, default_namespace: &str) -> (String, String) {
    match arg.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => (default_namespace.to_owned(), arg.to_owned()),
    }
}

fn age(time: Option<SystemTime>, now: SystemTime) -> String {
    match time {
        Some(t) => format!(
            "{} ago",
            format_duration(now.duration_since(t).unwrap_or_default())
        ),
        None => "-".to_owned(),
    }
}

/// Bytes for people: `512 B`, `3.2 MiB`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The VMs the daemon knows.
///
/// # Errors
///
/// The embedded store cannot be read.
pub fn vms(state_dir: &Path) -> Result<Vec<ProtectedVM>, String> {
    Db::new(state_dir).list(VM_KIND).map_err(|e| e.to_string())
}

/// An API enum as its manifests spell it (`Protected`, `CrashConsistent`), not Rust's Debug.
pub fn words<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(word)) => word,
        Ok(other) => other.to_string(),
        Err(_) => "unknown".into(),
    }
}

/// Which columns a table has: `wide` adds details, `namespaces` the NAMESPACE column (for a
/// list across namespaces, as `kubectl get -A`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Columns {
    /// `-o wide`.
    pub wide: bool,
    /// `-A`: the first column is the namespace.
    pub namespaces: bool,
}

/// Rows as aligned columns, three spaces apart, no trailing blanks.
pub fn render(rows: &[Vec<String>]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let widths: Vec<usize> = (0..first.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_owned()
                + "\n"
        })
        .collect()
}

/// The `lifeboat status` table: what `kubectl get pvm` shows, plus the pending log.
pub fn status_table(vms: &[ProtectedVM], now: SystemTime, columns: Columns) -> String {
    let mut header = vec![
        "NAME",
        "PHASE",
        "HEALTH",
        "RPO",
        "LAST SYNC",
        "PENDING LOG",
        "POINTS",
    ];
    if columns.namespaces {
        header.insert(0, "NAMESPACE");
    }
    if columns.wide {
        header.extend(["REASON", "DIRECTION", "NODE", "POLICY", "JOB"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for vm in vms {
        let status = vm.status.clone().unwrap_or_default();
        // NB: the node of the VM that replicates (or last replicated): the recovery site's
        // once re-protected in reverse.
        let node = match (&status.direction, &vm.spec.recovery_site) {
            (lifeboat_api::protected_vm::ReplicationDirection::Reverse, Some(site)) => {
                site.node_name.clone()
            }
            _ => vm.spec.node_name.clone(),
        };
        let mut row = vec![
            vm.metadata.name.clone().unwrap_or_default(),
            words(&status.phase),
            words(&status.health),
            status.rpo.clone().unwrap_or_else(|| "-".into()),
            age(
                status.last_successful_cycle_time.as_ref().map(system_time),
                now,
            ),
            human_bytes(status.pending_log_bytes),
            status.recovery_points.count.to_string(),
        ];
        if columns.namespaces {
            row.insert(0, vm.metadata.namespace.clone().unwrap_or_default());
        }
        if columns.wide {
            row.extend([
                status.health_reason.clone().unwrap_or_else(|| "-".into()),
                words(&status.direction),
                node,
                vm.spec.policy_ref.name.clone(),
                status
                    .current_job
                    .as_ref()
                    .map(|j| j.name.clone())
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        rows.push(row);
    }
    render(&rows)
}

/// The jobs the daemon keeps (running and finished), oldest first.
///
/// # Errors
///
/// The embedded store cannot be read.
pub fn jobs(state_dir: &Path) -> Result<Vec<ReplicationJob>, String> {
    Db::new(state_dir).list(JOB_KIND).map_err(|e| e.to_string())
}

/// When a job started (else when it was created).
pub fn job_start(job: &ReplicationJob) -> Option<SystemTime> {
    job.status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(system_time)
}

/// The `lifeboat jobs` table: NAME VM TYPE PHASE PROGRESS STARTED DURATION, as
/// `kubectl get rjob` shows them, with the duration so far for a running job.
pub fn jobs_table(jobs: &[ReplicationJob], now: SystemTime, columns: Columns) -> String {
    let mut header = vec![
        "NAME", "VM", "TYPE", "PHASE", "PROGRESS", "STARTED", "DURATION",
    ];
    if columns.namespaces {
        header.insert(0, "NAMESPACE");
    }
    if columns.wide {
        header.extend(["NODE", "BYTES", "MESSAGE"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for job in jobs {
        let status = job.status.clone().unwrap_or_default();
        let started = job_start(job);
        let ended = status.completion_time.as_ref().map(system_time);
        let duration = match (started, ended) {
            (Some(start), Some(end)) => {
                format_duration(end.duration_since(start).unwrap_or_default())
            }
            (Some(start), None) => format_duration(now.duration_since(start).unwrap_or_default()),
            _ => "-".into(),
        };
        let mut row = vec![
            job.metadata.name.clone().unwrap_or_default(),
            job.spec.vm_ref.name.clone(),
            words(&job.spec.job_type),
            words(&status.phase),
            format!("{}%", status.progress.percent),
            age(started, now),
            duration,
        ];
        if columns.namespaces {
            row.insert(0, job.metadata.namespace.clone().unwrap_or_default());
        }
        if columns.wide {
            let message = status
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.reason, e.message))
                .or_else(|| status.progress.message.clone())
                .unwrap_or_else(|| "-".into());
            row.extend([
                job.spec.node_name.clone(),
                format!(
                    "{} / {}",
                    human_bytes(status.progress.bytes_done),
                    human_bytes(status.progress.bytes_total)
                ),
                message.replace('\n', " "),
            ]);
        }
        rows.push(row);
    }
    render(&rows)
}

/// The recovery points of a VM, newest last, from its replica store.
///
/// # Errors
///
/// The VM or its policy is unknown, or the store cannot be read.
pub async fn points(
    state_dir: &Path,
    namespace: &str,
    name: &str,
) -> Result<Vec<lifeboat_store::RecoveryPoint>, String> {
    let db = Db::new(state_dir);
    let vm: ProtectedVM = db
        .get(VM_KIND, namespace, name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "no ProtectedVM {namespace}/{name} in {}",
                state_dir.display()
            )
        })?;
    let policy: ReplicationPolicy = db
        .get(POLICY_KIND, namespace, &vm.spec.policy_ref.name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "ProtectedVM {namespace}/{name}: its ReplicationPolicy {} is unknown",
                vm.spec.policy_ref.name
            )
        })?;
    struct NoSecrets;
    impl lifeboat_agent::SecretSource for NoSecrets {
        fn secret_value(
            &self,
            namespace: &str,
            reference: &lifeboat_api::common::SecretKeyReference,
        ) -> Result<String, String> {
            std::env::var(format!(
                "LIFEBOAT_SECRET_{}_{}",
                reference.name.to_uppercase().replace('-', "_"),
                reference.key.to_uppercase()
            ))
            .map_err(|_| {
                format!(
                    "Secret {namespace}/{} key {} is needed to read the Azure target",
                    reference.name, reference.key
                )
            })
        }
    }
    // NB: read-only: the daemon holds the VM's local store, and a look must change nothing.
    let store = StoreCache::read_only()
        .store(namespace, &policy.spec.target, 4, &NoSecrets)
        .map_err(|e| e.to_string())?;
    let key = VmKey::new(namespace, name).map_err(|e| e.to_string())?;
    let manifest = store.manifest(&key).await.map_err(|e| e.to_string())?;
    Ok(manifest.map(|m| m.points).unwrap_or_default())
}

/// The points table.
pub fn points_table(points: &[lifeboat_store::RecoveryPoint]) -> String {
    let header = ["POINT", "CONSISTENCY", "CYCLE", "WRITTEN BY", "DISKS"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for p in points {
        let consistency = match p.consistency {
            lifeboat_store::Consistency::AppConsistent => "AppConsistent",
            lifeboat_store::Consistency::CrashConsistent => "CrashConsistent",
        };
        // NB: a disk's size and the start of its digest (the block map's fingerprint): enough
        // to tell points apart and to compare with a materialised disk's.
        let disks: Vec<String> = p
            .disks
            .iter()
            .map(|d| {
                let short: String = d.digest.fingerprint.chars().take(12).collect();
                format!(
                    "{}={} {}:{short}",
                    d.name,
                    human_bytes(d.size_bytes),
                    d.digest.algorithm
                )
            })
            .collect();
        let by = if p.written_by.is_empty() {
            "-"
        } else {
            p.written_by.as_str()
        };
        rows.push(vec![
            p.id.clone(),
            consistency.to_owned(),
            p.cycle.to_string(),
            by.to_owned(),
            disks.join(", "),
        ]);
    }
    render(&rows)
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
    /// Fail back: a planned failover of a VM that replicates in reverse, onto the primary
    /// site's original disks.
    Failback,
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
            Action::Failback => f.write_str("failback"),
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
fn point_choice(point: &Option<String>) -> PointChoice {
    match point.as_deref() {
        None => PointChoice::Latest,
        Some(p) => p
            .parse()
            .unwrap_or_else(|_| PointChoice::Named(p.to_owned())),
    }
}

fn selector(point: &Option<String>) -> RecoveryPointSelector {
    lifeboat_control::mapping::api_point(&point_choice(point))
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
        Action::Failover { planned, point } => {
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
        Action::Failback => {
            requests.failover = Some(FailoverRequest {
                token,
                failover_type: FailoverType::Planned,
                recovery_point: None,
            });
        }
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
        Action::Failback if status.direction != ReplicationDirection::Reverse => Err(format!(
            "{who} replicates forward, from its primary site: a failback returns a VM that was              failed over and re-protected in reverse (`lifeboat failover` fails it over)"
        )),
        Action::Failback if status.phase != P::Protected => Err(format!(
            "{who} is {phase}: a failback needs it protected in reverse"
        )),
        Action::Reprotect => match status.phase {
            P::FailedOver | P::FailoverCommitted if vm.spec.recovery_site.is_none() => {
                Err(format!(
                    "{who} has no spec.recoverySite: say where the recovered VM runs (its node,                  hypervisor and disks) before re-protecting it"
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

/// Write the request for `action` on a VM for the daemon using `state_dir`; returns its token.
///
/// # Errors
///
/// The VM is unknown to the daemon, or the request cannot be written.
pub fn request(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    action: &Action,
) -> Result<String, String> {
    let Some(vm) = Db::new(state_dir)
        .get::<ProtectedVM>(VM_KIND, namespace, name)
        .map_err(|e| e.to_string())?
    else {
        return Err(format!(
            "no ProtectedVM {namespace}/{name} is known to the daemon using {} (is `lifeboat standalone` running on it?)",
            state_dir.display()
        ));
    };
    check_action(&vm, action)?;
    let token = new_token();
    requests::write(state_dir, namespace, name, |r: &mut Requests| {
        apply_request(r, action, &token)
    })?;
    Ok(token)
}

/// Where `wait` reads the VM and its jobs from: the embedded store, or the API server.
#[async_trait::async_trait]
pub trait Resources: Send + Sync {
    /// A ProtectedVM.
    async fn vm(&self, namespace: &str, name: &str) -> Result<Option<ProtectedVM>, String>;
    /// A ReplicationJob.
    async fn job(&self, namespace: &str, name: &str) -> Result<Option<ReplicationJob>, String>;
}

/// The standalone daemon's embedded store as [`Resources`].
#[derive(Debug)]
pub struct Embedded(pub Db);

#[async_trait::async_trait]
impl Resources for Embedded {
    async fn vm(&self, namespace: &str, name: &str) -> Result<Option<ProtectedVM>, String> {
        self.0
            .get(VM_KIND, namespace, name)
            .map_err(|e| e.to_string())
    }
    async fn job(&self, namespace: &str, name: &str) -> Result<Option<ReplicationJob>, String> {
        self.0
            .get(JOB_KIND, namespace, name)
            .map_err(|e| e.to_string())
    }
}

fn handled(vm: &ProtectedVM, action: &Action) -> Option<String> {
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
        Action::Failback => h.failover,
        Action::Retry => h.retry,
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
            return Ok(vm);
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
