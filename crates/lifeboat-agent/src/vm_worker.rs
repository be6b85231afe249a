//! A VM's engine on this node, the same in both modes: where its state lives, how it is
//! opened, and how a job runs on its worker (progress recorded for the facts, the schedule
//! told when the job ends).
//!
//! ```text
//!  <state_dir>/agent/<namespace>/<name>/            engine state, change logs (vm_state_dir)
//!  <state_dir>/agent/<namespace>/<name>/hypervisor   the backend's work files
//!  <state_dir>/agent/<namespace>/<name>@recovery/    the same for the recovered VM, which
//!                                                    replicates in reverse
//!
//!  VmConfig + store ──open_worker──> Worker ──run_job_on(job, sink)──> JobResult
//! ```
//!
//! Every engine opened under one state folder (one node's agent, one standalone daemon)
//! draws its uploads from one [`SharedBandwidth`] ([`host_bandwidth`]): the policies'
//! bandwidth limits apply to the host as a whole, shared fairly between its VMs (see
//! `lifeboat_engine::throttle`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use lifeboat_api::common::{ErrorClass, ErrorStatus};
use lifeboat_api::protected_vm::ProtectionPhase;
use lifeboat_api::{ProtectedVM, ReplicationJob, ReplicationPolicy};
use lifeboat_control::mapping::{api_time, whole_seconds};
use lifeboat_core::JobKind;
use lifeboat_engine::replicator::{Progress, ProgressSink};
use lifeboat_engine::throttle::SharedBandwidth;
use lifeboat_engine::{EngineError, JobDirs, JobResult, Replicator, Worker, run_job};
use lifeboat_store::{ReplicaStore, VmKey};

use crate::config::{ConfigError, Site, VmConfig, hypervisor, vm_config_at};
use crate::jobs::job_kind_params;

/// The agent state folder of `vm` under the state folder (change logs, engine state): one per
/// site, since the recovered VM's engine tracks other disks than the primary's.
pub fn vm_state_dir(state_dir: &Path, vm: &VmKey, site: Site) -> PathBuf {
    let ns = state_dir.join("agent").join(vm.namespace());
    match site {
        Site::Primary => ns.join(vm.name()),
        // NB: `@` is not in a DNS label: no VM's folder can be named so.
        Site::Recovery => ns.join(format!("{}@recovery", vm.name())),
    }
}

/// The upload bandwidth of the agent whose state folder is `state_dir`, shared by every VM
/// engine it opens: created with the first, kept while any engine holds it. One agent (or
/// daemon) owns a state folder, so this is one bucket per agent process.
pub fn host_bandwidth(state_dir: &Path) -> Arc<SharedBandwidth> {
    static HOSTS: Mutex<BTreeMap<PathBuf, Weak<SharedBandwidth>>> = Mutex::new(BTreeMap::new());
    let mut hosts = HOSTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(host) = hosts.get(state_dir).and_then(Weak::upgrade) {
        return host;
    }
    hosts.retain(|_, host| host.strong_count() > 0);
    let host = Arc::new(SharedBandwidth::new());
    hosts.insert(state_dir.to_owned(), Arc::downgrade(&host));
    host
}

/// Why a VM's engine could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The resources cannot configure it (a field, an unsupported hypervisor).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Its replica store cannot be opened (credentials, a folder).
    #[error("open the replica store of VM {vm}: {source}")]
    Store {
        /// `namespace/name`.
        vm: String,
        /// The store's error.
        #[source]
        source: lifeboat_store::StoreError,
    },
    /// Its agent state cannot be opened or recovered.
    #[error("open the agent state of VM {vm}: {source}")]
    Engine {
        /// `namespace/name`.
        vm: String,
        /// The engine's error.
        #[source]
        source: EngineError,
    },
}

impl OpenError {
    /// Whether trying again later can help without anyone changing anything.
    pub fn is_recoverable(&self) -> bool {
        match self {
            Self::Config(_) => false,
            Self::Store { source, .. } => source.is_recoverable(),
            Self::Engine { source, .. } => source.is_recoverable(),
        }
    }

    /// The error as a job or report shows it.
    pub fn error_status(&self, now: SystemTime) -> ErrorStatus {
        let (recoverable, reason) = match self {
            Self::Config(_) => (false, "InvalidConfiguration"),
            Self::Store { source, .. } => (source.is_recoverable(), source.reason()),
            Self::Engine { source, .. } => (source.is_recoverable(), source.reason()),
        };
        ErrorStatus {
            class: if recoverable {
                ErrorClass::Recoverable
            } else {
                ErrorClass::NonRecoverable
            },
            reason: reason.into(),
            message: self.to_string(),
            retry_count: 0,
            next_retry_time: None,
            first_seen_time: Some(api_time(now)),
        }
    }
}

/// Open the engine of a configured VM over `store`, recovering from a crash (the engine
/// removes unrecorded logs and reverts a half-applied replica), and wrap it in a worker. Its
/// uploads draw from the host's bandwidth ([`host_bandwidth`] of `state_dir`).
///
/// # Errors
///
/// The hypervisor is not supported here, or the state folder or the store failed.
pub async fn open_worker(
    config: &VmConfig,
    store: Arc<dyn ReplicaStore>,
    state_dir: &Path,
) -> Result<Worker, OpenError> {
    let dir = vm_state_dir(state_dir, &config.key, config.site);
    let hv = hypervisor(config, &dir.join("hypervisor"))?;
    let mut engine = Replicator::open(
        config.key.clone(),
        config.disks.clone(),
        dir,
        hv,
        store,
        config.settings.clone(),
    )
    .await
    .map_err(|source| OpenError::Engine {
        vm: config.key.to_string(),
        source,
    })?;
    engine.throttle().share(&host_bandwidth(state_dir));
    engine.set_definition(config.definition.clone());
    engine.set_writer(&config.writer);
    Ok(Worker::new(engine))
}

/// The site whose VM may run on raw disks a failover or a failback left at a point, and does
/// not replicate yet, by the VM's phase: the recovered VM after a failover, the original after
/// a failback (a re-protect arms its own VM as it starts).
pub fn site_to_arm(vm: &ProtectedVM) -> Option<Site> {
    match vm.status.as_ref().map(|s| s.phase) {
        Some(ProtectionPhase::FailedOver | ProtectionPhase::FailoverCommitted)
            if vm.spec.recovery_site.is_some() =>
        {
            Some(Site::Recovery)
        }
        Some(ProtectionPhase::FailedBack) => Some(Site::Primary),
        _ => None,
    }
}

/// Have the hypervisor of the VM [`site_to_arm`] names record its writes since the point its
/// raw disks were left at, if it runs on them now and nothing wrote them yet
/// (`lifeboat_engine::backend::Hypervisor::arm_seeds`). Called every tick: the sooner after
/// the VM starts, the likelier its guest has not written. Through `worker`'s engine when it
/// is that site's (`open` its configuration), else through a connection of its own, when
/// that site is on `node` (None: both sites are, the standalone daemon). The disks armed.
pub async fn arm_started_vm(
    vm: &ProtectedVM,
    policy: &ReplicationPolicy,
    worker: &Worker,
    open: &VmConfig,
    state_dir: &Path,
    node: Option<&str>,
) -> Vec<String> {
    let Some(site) = site_to_arm(vm) else {
        return Vec::new();
    };
    let armed = if site == open.site {
        if worker.replicating() {
            return Vec::new();
        }
        worker.engine().arm_seeds().await
    } else {
        let Ok(config) = vm_config_at(vm, policy, site) else {
            return Vec::new();
        };
        if node.is_some_and(|n| n != config.node) {
            return Vec::new();
        }
        let dir = vm_state_dir(state_dir, &config.key, config.site);
        let Ok(hv) = hypervisor(&config, &dir.join("hypervisor")) else {
            return Vec::new();
        };
        lifeboat_engine::replicator::arm_seeds(hv.as_ref(), &config.key, &config.disks).await
    };
    if !armed.is_empty() {
        tracing::info!(vm = %open.key, disks = ?armed, "the VM's writes since its disks' point are recorded");
    }
    armed
}

/// Run `job` on `worker` to its end: progress goes to `sink` and to the worker's facts, and
/// the worker's schedule learns that the job ended (a finalize or a resync makes the VM
/// replicate again).
///
/// # Caveats
///
/// Dropping the returned future abandons the job half-way: the engine's state on disk is
/// crash-safe, but the worker in memory is not to be trusted after that; open it again.
///
/// # Errors
///
/// The engine's error; `is_recoverable` says whether a retry can help.
pub async fn run_job_on(
    worker: &mut Worker,
    job: &ReplicationJob,
    dirs: &JobDirs,
    sink: ProgressSink<'_>,
) -> Result<JobResult, EngineError> {
    let (kind, params) = job_kind_params(job);
    let recorder = worker.progress_recorder();
    let both = move |p: &Progress| {
        recorder(p);
        sink(p);
    };
    let outcome = run_job(
        worker.engine_mut(),
        kind,
        &params,
        dirs,
        SystemTime::now(),
        &both,
    )
    .await;
    let now = whole_seconds(SystemTime::now());
    if let Ok(result) = &outcome
        && result.point.is_some()
        && (matches!(kind, JobKind::FinalizeProtection | JobKind::Resynchronize)
            || (kind == JobKind::Failover && params.to_primary && params.presync))
    {
        worker.record_shipped(now, &result.report);
    }
    if lifeboat_core::vm::keeps_in_step(kind, &params) {
        // NB: not a step of the VM's replication: on a node hosting both sites (the standalone
        // daemon) it runs on the worker that replicates, whose schedule and cycle error stay.
        worker.clear_progress();
    } else {
        worker.job_finished(now);
    }
    outcome
}

/// The latest progress of each disk of a running job, let through at most once per
/// `interval` (and whenever a disk finishes), so that a job's status is not written on
/// every megabyte.
#[derive(Debug)]
pub struct ProgressThrottle {
    interval: Duration,
    inner: Mutex<(BTreeMap<String, Progress>, Option<SystemTime>)>,
}

impl ProgressThrottle {
    /// A throttle that lets progress through at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            inner: Mutex::new((BTreeMap::new(), None)),
        }
    }

    /// Note `progress` at `now`; returns every disk's latest progress when a write is due.
    pub fn note(&self, progress: &Progress, now: SystemTime) -> Option<Vec<Progress>> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.insert(progress.disk.clone(), progress.clone());
        let recent = guard
            .1
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() < self.interval);
        if recent && progress.bytes_done < progress.bytes_total {
            return None;
        }
        guard.1 = Some(now);
        Some(guard.0.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(disk: &str, done: u64) -> Progress {
        Progress {
            operation: "InitialReplication",
            disk: disk.into(),
            bytes_done: done,
            bytes_total: 100,
            throughput_bytes_per_second: 1,
        }
    }

    #[test]
    fn progress_is_let_through_once_a_second_and_when_a_disk_ends() {
        let t = ProgressThrottle::new(Duration::from_secs(1));
        let at = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(t.note(&progress("a", 1), at(0)).map(|v| v.len()), Some(1));
        assert!(t.note(&progress("b", 1), at(10)).is_none());
        assert!(t.note(&progress("a", 2), at(900)).is_none());
        let all = t.note(&progress("a", 3), at(1000));
        assert_eq!(all.as_ref().map(Vec::len), Some(2));
        assert!(t.note(&progress("b", 100), at(1010)).is_some());
    }

    #[test]
    fn state_folders_are_per_namespace_name_and_site() {
        let key = VmKey::new("prod", "web").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            vm_state_dir(Path::new("/var/lib/lifeboat"), &key, Site::Primary),
            PathBuf::from("/var/lib/lifeboat/agent/prod/web")
        );
        assert_eq!(
            vm_state_dir(Path::new("/var/lib/lifeboat"), &key, Site::Recovery),
            PathBuf::from("/var/lib/lifeboat/agent/prod/web@recovery")
        );
    }

    #[test]
    fn the_vms_of_one_state_folder_share_one_bandwidth() {
        let dir = Path::new("/nonexistent/lifeboat-test/host-bandwidth");
        let host = host_bandwidth(dir);
        assert!(Arc::ptr_eq(&host, &host_bandwidth(dir)));
        let other = host_bandwidth(&dir.join("other"));
        assert!(!Arc::ptr_eq(&host, &other));
        // Two VMs' throttles, as open_worker hands them the host's bucket.
        let (a, b) = (
            lifeboat_engine::throttle::Throttle::new(Some(1_000_000)),
            lifeboat_engine::throttle::Throttle::new(Some(400_000)),
        );
        a.share(&host_bandwidth(dir));
        b.share(&host_bandwidth(dir));
        assert_eq!((host.members(), host.limit()), (2, Some(400_000)));
        assert_eq!(other.members(), 0);
    }
}
