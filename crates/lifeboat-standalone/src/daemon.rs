//! The standalone daemon: the operator's decisions and the node agent in one process, on one
//! machine, over the embedded store instead of an API server.
//!
//! ```text
//!  every tick, and at once when a job or a recovered VM's work ends or the command line
//!  rings the doorbell (requests::ring, after it writes a request):
//!   folder ──refresh──> policies, VMs (+ CLI requests) ──> db (spec, generation)
//!   per policy: decide_policy ──> status
//!   per VM:     lifeboat_control::reconcile_vm over DbWriter (the operator's pass):
//!               decide_vm(spec, status, policy, job, agent report, heartbeat=now)
//!                 ├─ job to create ──> db ──> node: claim, run_job on the VM's worker, job status
//!                 └─ status (operator's fields) ──> db
//!   per VM:     worker.tick (cycles) ──> facts ──> status.agent
//!   per VM:     crate::recovered (its recovered VM brought up or down, as a task)
//!   plans:      crate::plans (a run per plan with a request pending, as a task)
//! ```
//!
//! The decisions, the carry-out path (`reconcile_vm`), the job kinds, the engine and the
//! mappings are the same code the operator and the cluster agent run; only the writer
//! differs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use lifeboat_agent::config::{VmConfig, vm_config};
use lifeboat_agent::report::same_but_time;
use lifeboat_agent::vm_worker::{ProgressThrottle, arm_started_vm, open_worker, run_job_on};
use lifeboat_agent::{SecretSource, StoreCache, agent_report, jobs};
use lifeboat_api::common::SecretKeyReference;
use lifeboat_api::job::JobPhase;
use lifeboat_api::{ProtectedVM, ProtectedVMStatus, ReplicationJob, ReplicationPolicy};
use lifeboat_control::mapping::{self, api_time, whole_seconds};
use lifeboat_control::{Created, JobNameTaken, VmPass, VmWriter, reconcile_vm};
use lifeboat_core::policy::{PolicyInput, decide_policy};
use lifeboat_core::vm::Notice;
use lifeboat_engine::replicator::Progress;
use lifeboat_engine::{JobDirs, Worker};
use lifeboat_store::{ReplicaStore, StoreError};
use tokio::sync::Mutex as AsyncMutex;

use crate::db::{Db, StateLock};
use crate::folder::{Folder, Key};
use crate::plans::Plans;
use crate::recovered::Recoveries;
use crate::requests;

/// The db's kinds.
pub const VM_KIND: &str = "ProtectedVM";
/// The db's kinds.
pub const POLICY_KIND: &str = "ReplicationPolicy";
/// The db's kinds.
pub const JOB_KIND: &str = "ReplicationJob";
/// The name jobs are claimed under.
const CLAIMER: &str = "standalone";

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The manifests folder.
    pub manifests: PathBuf,
    /// The state folder (embedded store, agent state, change logs).
    pub state_dir: PathBuf,
    /// Where (test) failover disks are materialised.
    pub failover_dir: PathBuf,
    /// The namespace of manifests that name none.
    pub default_namespace: String,
    /// How often the daemon looks at everything.
    pub tick: Duration,
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state folder is locked by another daemon or cannot be locked.
    #[error("{0}")]
    Locked(String),
    /// The manifests folder cannot be read.
    #[error("read the manifests folder {path}: {source}")]
    Manifests {
        /// The folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The embedded store failed.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// Every name tried for a VM's new job is taken.
    #[error(transparent)]
    JobNameTaken(#[from] JobNameTaken),
}

/// Secrets from the manifests folder.
struct FolderSecrets<'a>(&'a Folder);

impl SecretSource for FolderSecrets<'_> {
    fn secret_value(
        &self,
        namespace: &str,
        reference: &SecretKeyReference,
    ) -> Result<String, String> {
        self.0.secret(namespace, &reference.name, &reference.key).ok_or_else(|| {
            format!(
                "Secret {namespace}/{} has no key {:?}: add a Secret manifest (stringData.{}) to the manifests folder",
                reference.name, reference.key, reference.key
            )
        })
    }
}

/// The standalone daemon's [`VmWriter`]: the embedded store; notices go to the log.
struct DbWriter<'a> {
    db: &'a Db,
    now: SystemTime,
}

fn qualified(vm: &ProtectedVM) -> String {
    let (ns, name) = crate::folder::key_of(vm);
    format!("{ns}/{name}")
}

#[async_trait]
impl VmWriter for DbWriter<'_> {
    type Error = DaemonError;

    async fn get_job(
        &self,
        vm: &ProtectedVM,
        name: &str,
    ) -> Result<Option<Arc<ReplicationJob>>, DaemonError> {
        let (ns, _) = crate::folder::key_of(vm);
        Ok(self.db.get(JOB_KIND, &ns, name)?.map(Arc::new))
    }

    async fn create_job(
        &self,
        vm: &ProtectedVM,
        job: &ReplicationJob,
    ) -> Result<Created, DaemonError> {
        let (ns, name) = crate::folder::key_of(job);
        if let Some(existing) = self.get_job(vm, &name).await? {
            return Ok(Created::Exists(existing));
        }
        let mut job = job.clone();
        job.metadata.creation_timestamp = Some(api_time(self.now));
        self.db.put(JOB_KIND, &ns, &name, &job)?;
        tracing::info!(vm = %qualified(vm), job = %name, "job created");
        Ok(Created::New)
    }

    // NB: the folder keeps no resourceVersion; the daemon decides and starts its jobs in one
    // loop, so the version guard has nothing to guard here.
    async fn delete_job(
        &self,
        vm: &ProtectedVM,
        name: &str,
        _version: Option<&str>,
    ) -> Result<(), DaemonError> {
        let (ns, _) = crate::folder::key_of(vm);
        Ok(self.db.delete(JOB_KIND, &ns, name)?)
    }

    async fn fail_job(
        &self,
        vm: &ProtectedVM,
        name: &str,
        _version: Option<&str>,
        status: &lifeboat_api::job::ReplicationJobStatus,
    ) -> Result<(), DaemonError> {
        let (ns, _) = crate::folder::key_of(vm);
        let Some(mut job) = self.db.get::<ReplicationJob>(JOB_KIND, &ns, name)? else {
            return Ok(());
        };
        job.status = Some(status.clone());
        Ok(self.db.put(JOB_KIND, &ns, name, &job)?)
    }

    async fn publish(&self, vm: &ProtectedVM, notices: &[Notice], _job: Option<&str>) {
        for notice in notices {
            if notice.warning {
                tracing::warn!(vm = %qualified(vm), reason = notice.reason, "{}", notice.note);
            } else {
                tracing::info!(vm = %qualified(vm), reason = notice.reason, "{}", notice.note);
            }
        }
    }

    async fn write_status(
        &self,
        vm: &ProtectedVM,
        status: &ProtectedVMStatus,
    ) -> Result<(), DaemonError> {
        let (ns, name) = crate::folder::key_of(vm);
        let agent = vm.status.as_ref().and_then(|s| s.agent.clone());
        let mut vm = vm.clone();
        vm.status = Some(ProtectedVMStatus {
            agent,
            ..status.clone()
        });
        Ok(self.db.put(VM_KIND, &ns, &name, &vm)?)
    }

    async fn release(&self, vm: &ProtectedVM) -> Result<(), DaemonError> {
        let (ns, name) = crate::folder::key_of(vm);
        self.db.delete(VM_KIND, &ns, &name)?;
        tracing::info!(vm = %qualified(vm), "protection disabled; the VM is forgotten");
        Ok(())
    }
}

/// How often the daemon looks at the doorbell between two ticks.
const DOORBELL_POLL: Duration = Duration::from_millis(50);

/// One VM's node side: its worker and the job it runs.
struct Slot {
    worker: Arc<AsyncMutex<Worker>>,
    config: VmConfig,
    job: Option<tokio::task::JoinHandle<()>>,
}

/// The embedded store's record of a resource of the manifests folder, as the API server
/// keeps one: the first time, the manifest with `spec` (its requests merged), generation 1,
/// created `now`, a uid of its own; after, the `stored` record with `spec` and a new
/// generation when the spec changed, and the manifest's labels.
pub(crate) fn record<K: kube::Resource + Clone, S: PartialEq>(
    stored: Option<K>,
    manifest: &K,
    spec: S,
    spec_of: impl Fn(&mut K) -> &mut S,
    now: SystemTime,
) -> K {
    match stored {
        None => {
            let mut fresh = manifest.clone();
            *spec_of(&mut fresh) = spec;
            let meta = fresh.meta_mut();
            meta.generation = Some(1);
            meta.creation_timestamp = Some(api_time(now));
            // NB: unique to this incarnation, as the API server makes it: jobs are adopted by
            // owner uid, and a VM re-created under the same name must not adopt its
            // predecessor's finished jobs.
            meta.uid = Some(format!("standalone-{}", uuid::Uuid::new_v4()));
            fresh
        }
        Some(mut kept) => {
            if *spec_of(&mut kept) != spec {
                *spec_of(&mut kept) = spec;
                let meta = kept.meta_mut();
                meta.generation = Some(meta.generation.unwrap_or(0) + 1);
            }
            let meta = kept.meta_mut();
            meta.deletion_timestamp = None;
            meta.labels.clone_from(&manifest.meta().labels);
            kept
        }
    }
}

/// The daemon.
pub struct Daemon {
    options: Options,
    folder: Folder,
    db: Db,
    stores: StoreCache,
    slots: BTreeMap<Key, Slot>,
    plans: Plans,
    recoveries: Recoveries,
    /// Rung when a job or a recovery task ends: the next step need not wait for the tick.
    wake: Arc<tokio::sync::Notify>,
    /// Errors already logged, so that a standing problem is logged once.
    reported: Mutex<BTreeMap<Key, String>>,
    _lock: StateLock,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn now() -> SystemTime {
    whole_seconds(SystemTime::now())
}

impl Daemon {
    /// Lock the state folder and read the manifests.
    ///
    /// # Errors
    ///
    /// Another daemon holds the state folder, or the manifests folder cannot be read.
    pub fn open(options: Options) -> Result<Daemon, DaemonError> {
        let lock = StateLock::acquire(&options.state_dir).map_err(DaemonError::Locked)?;
        let mut folder = Folder::new(&options.manifests, &options.default_namespace);
        folder.refresh().map_err(|source| DaemonError::Manifests {
            path: options.manifests.clone(),
            source,
        })?;
        let db = Db::new(&options.state_dir);
        abandon_interrupted_jobs(&db)?;
        Ok(Daemon {
            db: Db::new(&options.state_dir),
            folder,
            stores: StoreCache::default(),
            slots: BTreeMap::new(),
            plans: Plans::default(),
            recoveries: Recoveries::default(),
            wake: Arc::default(),
            reported: Mutex::default(),
            options,
            _lock: lock,
        })
    }

    /// The errors of manifest files that do not pass.
    pub fn manifest_errors(&self) -> Vec<String> {
        self.folder.errors()
    }

    /// Run until `stop` resolves.
    ///
    /// # Errors
    ///
    /// The manifests folder vanished or the embedded store failed.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        tokio::pin!(stop);
        let doorbell = requests::doorbell(&self.options.state_dir);
        let mut rung = requests::rung(&doorbell);
        loop {
            self.step().await?;
            // NB: the doorbell is a small file the command line rewrites; reading it costs
            // little, and answering a request at once spares its waiter the tick.
            let bell = async {
                loop {
                    tokio::time::sleep(DOORBELL_POLL).await;
                    let now = requests::rung(&doorbell);
                    if now != rung {
                        rung = now;
                        break;
                    }
                }
            };
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(self.options.tick) => {}
                () = self.wake.notified() => {}
                () = bell => {}
            }
        }
        for slot in self.slots.values_mut() {
            if let Some(job) = slot.job.take() {
                job.abort();
            }
        }
        self.plans.abort();
        self.recoveries.abort();
        Ok(())
    }

    fn report_once(&self, key: &Key, message: String) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        if reported.get(key) != Some(&message) {
            tracing::error!(vm = %format!("{}/{}", key.0, key.1), "{message}");
            reported.insert(key.clone(), message);
        }
    }

    /// One pass over everything.
    ///
    /// # Errors
    ///
    /// The manifests folder vanished or the embedded store failed.
    pub async fn step(&mut self) -> Result<(), DaemonError> {
        self.folder
            .refresh()
            .map_err(|source| DaemonError::Manifests {
                path: self.options.manifests.clone(),
                source,
            })?;
        let now = now();
        let policies = self.folder.policies();
        let manifests = self.folder.vms();
        let vms = self.sync_vms(&manifests, now)?;
        self.decide_policies(&policies, &vms, now)?;
        for (key, mut vm) in vms {
            let policy = policies.get(&(key.0.clone(), vm.spec.policy_ref.name.clone()));
            let manifests = &self.options.manifests;
            if self
                .recoveries
                .step(&self.db, &key, &mut vm, manifests, now, &self.wake)
                .await?
            {
                // NB: its recovered VM comes up or goes down: the VM's decisions wait, its
                // cycles go on.
                self.node(&key, &vm, policy, now).await?;
                continue;
            }
            let vm = self.decide(&key, vm, policy, now).await?;
            if let Some(vm) = vm {
                self.node(&key, &vm, policy, now).await?;
            }
        }
        self.plans.step(
            &self.options.state_dir,
            &self.options.manifests,
            &self.folder.plans(),
            now,
        )?;
        Ok(())
    }

    /// The db's VMs brought in step with the folder: new ones created, changed specs given a
    /// new generation, removed ones marked as being deleted.
    fn sync_vms(
        &self,
        manifests: &BTreeMap<Key, ProtectedVM>,
        now: SystemTime,
    ) -> Result<BTreeMap<Key, ProtectedVM>, DaemonError> {
        let mut out = BTreeMap::new();
        for (key, manifest) in manifests {
            let stored: Option<ProtectedVM> = self.db.get(VM_KIND, &key.0, &key.1)?;
            let mut spec = manifest.spec.clone();
            spec.requests = requests::merged(
                spec.requests.take(),
                requests::read(&self.options.state_dir, &key.0, &key.1),
            );
            let vm = record(stored, manifest, spec, |vm| &mut vm.spec, now);
            self.db.put(VM_KIND, &key.0, &key.1, &vm)?;
            out.insert(key.clone(), vm);
        }
        for stored in self.db.list::<ProtectedVM>(VM_KIND)? {
            let key = crate::folder::key_of(&stored);
            out.entry(key).or_insert_with(|| {
                let mut vm = stored;
                vm.metadata
                    .deletion_timestamp
                    .get_or_insert_with(|| api_time(now));
                vm
            });
        }
        Ok(out)
    }

    fn decide_policies(
        &self,
        policies: &BTreeMap<Key, ReplicationPolicy>,
        vms: &BTreeMap<Key, ProtectedVM>,
        now: SystemTime,
    ) -> Result<(), DaemonError> {
        for (key, policy) in policies {
            let mut stored: ReplicationPolicy = self
                .db
                .get(POLICY_KIND, &key.0, &key.1)?
                .unwrap_or_else(|| policy.clone());
            if stored.spec != policy.spec || stored.metadata.generation.is_none() {
                stored.metadata.generation = Some(stored.metadata.generation.unwrap_or(0) + 1);
                stored.spec = policy.spec.clone();
            }
            let spec = mapping::policy_spec(&stored);
            let state = mapping::policy_state(&stored);
            let mut users: Vec<String> = vms
                .iter()
                .filter(|((ns, _), vm)| ns == &key.0 && vm.spec.policy_ref.name == key.1)
                .map(|((_, name), _)| name.clone())
                .collect();
            users.sort();
            let decision = decide_policy(&PolicyInput {
                now,
                spec: &spec,
                deleting: false,
                state: &state,
                reachable: None,
                users: &users,
            });
            if decision.changed || stored.status.is_none() {
                stored.status = Some(mapping::policy_status(&decision.state));
                self.db.put(POLICY_KIND, &key.0, &key.1, &stored)?;
            }
        }
        Ok(())
    }

    /// Decide one VM and carry the decision out (the operator's pass, over the embedded
    /// store); `None` when the VM is gone for good.
    async fn decide(
        &mut self,
        key: &Key,
        vm: ProtectedVM,
        policy: Option<&ReplicationPolicy>,
        now: SystemTime,
    ) -> Result<Option<ProtectedVM>, DaemonError> {
        let carried = reconcile_vm(
            &DbWriter { db: &self.db, now },
            VmPass {
                vm: &vm,
                policy,
                // NB: the agent is this process: alive while it decides.
                heartbeat: &|_: &str| Some(now),
                nodes_labelled: &|_| Vec::new(),
                cluster: false,
                now,
            },
        )
        .await?;
        if carried.decision.release_finalizer {
            self.slots.remove(key);
            return Ok(None);
        }
        let report = vm.status.as_ref().and_then(|s| s.agent.clone());
        Ok(Some(ProtectedVM {
            status: Some(ProtectedVMStatus {
                agent: report,
                ..carried.status
            }),
            ..vm
        }))
    }

    /// The node side of one VM: its worker, its jobs, its cycles, its report.
    async fn node(
        &mut self,
        key: &Key,
        vm: &ProtectedVM,
        policy: Option<&ReplicationPolicy>,
        now: SystemTime,
    ) -> Result<(), DaemonError> {
        let Some(policy) = policy else { return Ok(()) };
        let config = match vm_config(vm, policy) {
            Ok(config) => config,
            Err(e) => {
                self.report_once(key, e.to_string());
                return Ok(());
            }
        };
        if self.store_changed(key, policy, &config) {
            tracing::info!(
                vm = %format!("{}/{}", key.0, key.1),
                "the policy's target or its credentials changed: opening the engine again"
            );
            self.slots.remove(key);
        }
        // NB: a job that ended is let go before the site is looked at, not after: a job
        // ending between the two would otherwise leave the old site's engine to start the
        // next job (on the wrong site's disks).
        if let Some(slot) = self.slots.get_mut(key)
            && slot.job.as_ref().is_some_and(|j| j.is_finished())
        {
            slot.job = None;
        }
        if self
            .slots
            .get(key)
            .is_some_and(|slot| slot.config.site != config.site && slot.job.is_none())
        {
            // NB: re-protect turned the VM's direction: the other site's VM replicates now,
            // with its own engine state.
            tracing::info!(
                vm = %format!("{}/{}", key.0, key.1),
                site = ?config.site,
                "the VM replicates from the other site now: opening that site's engine"
            );
            self.slots.remove(key);
        }
        if !self.slots.contains_key(key) {
            let store = match self.target_store(key, policy, &config) {
                Ok(store) => store,
                Err(e) => {
                    self.report_once(
                        key,
                        format!(
                            "ReplicationPolicy {}/{}: target: {e}",
                            key.0,
                            policy.metadata.name.clone().unwrap_or_default()
                        ),
                    );
                    return Ok(());
                }
            };
            let worker = match open_worker(&config, store, &self.options.state_dir).await {
                Ok(worker) => worker,
                Err(e) => {
                    self.report_once(key, e.to_string());
                    return Ok(());
                }
            };
            self.slots.insert(
                key.clone(),
                Slot {
                    worker: Arc::new(AsyncMutex::new(worker)),
                    config: config.clone(),
                    job: None,
                },
            );
        }
        let Some(slot) = self.slots.get_mut(key) else {
            return Ok(());
        };
        // NB: the same site's settings and disks only: the other site's engine is opened
        // once the job that holds this one ends (above).
        if slot.config != config
            && slot.config.site == config.site
            && let Ok(mut worker) = slot.worker.try_lock()
        {
            worker.engine_mut().set_settings(config.settings.clone());
            worker.engine_mut().set_disks(config.disks.clone());
            slot.config = config.clone();
        }
        if let Ok(worker) = slot.worker.try_lock() {
            let limit = config.upload_limit_bytes_per_second(SystemTime::now());
            worker.engine().throttle().set_limit(limit);
        }
        if slot.job.is_none() {
            let pending: Vec<ReplicationJob> = self
                .db
                .list::<ReplicationJob>(JOB_KIND)?
                .into_iter()
                .filter(|j| {
                    j.metadata.namespace.as_deref() == Some(key.0.as_str())
                        && j.spec.vm_ref.name == key.1
                })
                .filter(|j| {
                    j.status
                        .as_ref()
                        .is_none_or(|s| s.phase == JobPhase::Pending)
                })
                .collect();
            if let Some(job) = pending.into_iter().next() {
                slot.job = Some(spawn_job(
                    self.db.clone(),
                    slot.worker.clone(),
                    job,
                    JobDirs {
                        failover_dir: self.options.failover_dir.clone(),
                        original_disks: config.original_disks.clone(),
                        failover_format: config.failover_format,
                        // NB: of the engine that runs the job: a failback's jobs run on the
                        // recovered VM's here.
                        seed_dir: slot.config.seed_dir(&self.options.state_dir),
                    },
                    now,
                    Arc::clone(&self.wake),
                ));
            }
        }
        let idle = slot.job.is_none();
        let worker = slot.worker.clone();
        let slot_config = slot.config.clone();
        if idle && let Ok(mut worker) = worker.try_lock() {
            if let Some(Err(e)) = worker.tick(now).await {
                tracing::warn!(vm = %format!("{}/{}", key.0, key.1), error = %e, "cycle failed");
            }
            // NB: both sites' VMs run on this machine; one site's engine is open.
            arm_started_vm(
                vm,
                policy,
                &worker,
                &slot_config,
                &self.options.state_dir,
                None,
            )
            .await;
            let facts = worker.facts(now).await;
            drop(worker);
            match facts {
                Ok(facts) => {
                    let report = agent_report(&facts, config.policy_generation, now);
                    self.write_report(key, report)?;
                }
                Err(e) => self.report_once(key, format!("report on VM {}/{}: {e}", key.0, key.1)),
            }
        }
        Ok(())
    }

    /// The store of the VM's policy's target, with the Secret manifests as they are now (the
    /// cache opens it again when they hold new credentials).
    fn target_store(
        &self,
        key: &Key,
        policy: &ReplicationPolicy,
        config: &VmConfig,
    ) -> Result<Arc<dyn ReplicaStore>, StoreError> {
        self.stores.store(
            &key.0,
            &policy.spec.target,
            config.settings.upload_concurrency,
            &FolderSecrets(&self.folder),
        )
    }

    /// Whether the VM's idle engine writes to another store than its policy's target now
    /// names: the target changed, or its Secret holds new credentials (a rotated key).
    fn store_changed(&self, key: &Key, policy: &ReplicationPolicy, config: &VmConfig) -> bool {
        let Some(slot) = self.slots.get(key) else {
            return false;
        };
        if slot.job.as_ref().is_some_and(|j| !j.is_finished()) {
            return false;
        }
        let Ok(worker) = slot.worker.try_lock() else {
            return false;
        };
        // NB: a target that cannot be opened now keeps the engine on the store it has; its
        // next failure says why.
        self.target_store(key, policy, config)
            .is_ok_and(|store| !Arc::ptr_eq(&store, worker.engine().store()))
    }

    fn write_report(
        &self,
        key: &Key,
        mut report: lifeboat_api::protected_vm::AgentReport,
    ) -> Result<(), DaemonError> {
        let Some(mut vm) = self.db.get::<ProtectedVM>(VM_KIND, &key.0, &key.1)? else {
            return Ok(());
        };
        let status = vm.status.get_or_insert_with(ProtectedVMStatus::default);
        // NB: a report that says nothing new is not written (only its time would change).
        if status
            .agent
            .as_ref()
            .is_some_and(|old| same_but_time(old, &report))
        {
            return Ok(());
        }
        report.report_time.get_or_insert_with(|| api_time(now()));
        status.agent = Some(report);
        Ok(self.db.put(VM_KIND, &key.0, &key.1, &vm)?)
    }
}

/// Claim `job` and run it on the VM's worker in a task of its own, writing its status as it
/// goes (progress at most once a second).
fn spawn_job(
    db: Db,
    worker: Arc<AsyncMutex<Worker>>,
    mut job: ReplicationJob,
    dirs: JobDirs,
    now: SystemTime,
    wake: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    let ns = job.metadata.namespace.clone().unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    job.status = Some(jobs::started(&job, CLAIMER, now));
    if let Err(e) = db.put(JOB_KIND, &ns, &name, &job) {
        tracing::error!(job = %name, error = %e, "claim the job");
    }
    tokio::spawn(async move {
        let (kind, params) = jobs::job_kind_params(&job);
        tracing::info!(job = %format!("{ns}/{name}"), kind = kind.as_str(), "job started");
        let throttle = ProgressThrottle::new(Duration::from_secs(1));
        let sink = {
            let (db, job) = (db.clone(), job.clone());
            let (ns, name) = (ns.clone(), name.clone());
            move |p: &Progress| {
                let at = SystemTime::now();
                let Some(all) = throttle.note(p, at) else {
                    return;
                };
                let mut job = job.clone();
                if let Some(status) = job.status.as_mut() {
                    jobs::progressed(status, &all, at);
                }
                let _ = db.put(JOB_KIND, &ns, &name, &job);
            }
        };
        let mut worker = worker.lock().await;
        let outcome = run_job_on(&mut worker, &job, &dirs, &sink).await;
        drop(worker);
        let ended = whole_seconds(SystemTime::now());
        let mut finished: ReplicationJob =
            db.get(JOB_KIND, &ns, &name).ok().flatten().unwrap_or(job);
        let status = finished.status.take().unwrap_or_default();
        finished.status = Some(jobs::finished(status, &outcome, ended));
        match &outcome {
            Ok(_) => tracing::info!(job = %format!("{ns}/{name}"), "job succeeded"),
            Err(e) => tracing::warn!(job = %format!("{ns}/{name}"), error = %e, "job failed"),
        }
        if let Err(e) = db.put(JOB_KIND, &ns, &name, &finished) {
            tracing::error!(job = %name, error = %e, "write the job's end");
        }
        if outcome.is_ok() && lifeboat_core::vm::keeps_in_step(kind, &params) {
            forget_old_in_step_jobs(&db, &finished, ended);
        }
        wake.notify_one();
    })
}

/// Delete the jobs of `latest`'s VM that kept its original disks in step and succeeded past
/// their retention (an hour: one runs every copy interval while the VM replicates in
/// reverse), as the operator's job controller does in a cluster. The daemon keeps every
/// other finished job.
fn forget_old_in_step_jobs(db: &Db, latest: &ReplicationJob, now: SystemTime) {
    use lifeboat_core::job::{DEFAULT_JOB_RETENTION, JobFate, job_fate, retention_of};
    let all = match db.list::<ReplicationJob>(JOB_KIND) {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!(error = %e, "list the jobs to delete those past their retention");
            return;
        }
    };
    for job in all {
        if job.metadata.namespace != latest.metadata.namespace
            || job.spec.vm_ref.name != latest.spec.vm_ref.name
            || job.metadata.name == latest.metadata.name
        {
            continue;
        }
        let (kind, params) = jobs::job_kind_params(&job);
        if !lifeboat_core::vm::keeps_in_step(kind, &params) {
            continue;
        }
        let status = job.status.clone().unwrap_or_default();
        let state = mapping::job_state(status.phase);
        let completed = status.completion_time.as_ref().map(mapping::system_time);
        let retention = retention_of(kind, &params, state, DEFAULT_JOB_RETENTION);
        let expired = completed.is_some_and(|at| {
            job_fate(state, Some(at), at, now, retention, false) == JobFate::Delete
        });
        if expired {
            let (ns, name) = crate::folder::key_of(&job);
            if let Err(e) = db.delete(JOB_KIND, &ns, &name) {
                tracing::warn!(job = %name, error = %e, "delete a job past its retention");
            }
        }
    }
}

/// Jobs an earlier daemon was running when it stopped (killed, crashed, powered off) end as
/// failed with a recoverable error, so that the decisions retry them: the engine's state on
/// disk lets the retry resume (an initial copy or a resync from its cursor).
fn abandon_interrupted_jobs(db: &Db) -> Result<(), DaemonError> {
    for mut job in db.list::<ReplicationJob>(JOB_KIND)? {
        let interrupted = job.status.as_ref().is_some_and(|s| {
            s.phase == JobPhase::Running && s.claimed_by.as_deref() == Some(CLAIMER)
        });
        if !interrupted {
            continue;
        }
        let (ns, name) = crate::folder::key_of(&job);
        let status = job.status.take().unwrap_or_default();
        job.status = Some(jobs::abandoned(
            status,
            "AgentRestarted",
            "the standalone daemon stopped while the job ran; it is retried".into(),
            now(),
        ));
        tracing::warn!(job = %format!("{ns}/{name}"), "the job was interrupted by a restart; it will be retried");
        db.put(JOB_KIND, &ns, &name, &job)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_api::common::LocalObjectReference;
    use lifeboat_api::job::{JobParameters, JobType, ReplicationJobSpec, ReplicationJobStatus};

    fn job(
        name: &str,
        vm: &str,
        job_type: JobType,
        parameters: JobParameters,
        phase: JobPhase,
        ended: SystemTime,
    ) -> ReplicationJob {
        let mut job = ReplicationJob::new(
            name,
            ReplicationJobSpec {
                vm_ref: LocalObjectReference { name: vm.into() },
                node_name: "site-a".into(),
                job_type,
                parameters,
            },
        );
        job.metadata.namespace = Some("default".into());
        job.status = Some(ReplicationJobStatus {
            phase,
            completion_time: Some(api_time(ended)),
            ..ReplicationJobStatus::default()
        });
        job
    }

    #[test]
    fn jobs_that_kept_the_original_disks_in_step_go_an_hour_after_they_succeeded() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = Db::new(dir.path());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let (hour, minute) = (Duration::from_secs(3600), Duration::from_secs(60));
        let in_step = JobParameters {
            presync: true,
            ..JobParameters::default()
        };
        let asked = JobParameters {
            request_token: Some("f2".into()),
            ..in_step.clone()
        };
        let (ok, failed, fb) = (JobPhase::Succeeded, JobPhase::Failed, JobType::Failback);
        let all = [
            job(
                "web-failback-3",
                "web",
                fb,
                in_step.clone(),
                ok,
                now - hour - minute,
            ),
            job(
                "web-failback-4",
                "web",
                fb,
                in_step.clone(),
                failed,
                now - hour - minute,
            ),
            job("web-failback-5", "web", fb, asked, ok, now - hour - minute),
            job(
                "web-failback-6",
                "web",
                fb,
                in_step.clone(),
                ok,
                now - hour + minute,
            ),
            job(
                "db-failback-2",
                "db",
                fb,
                in_step.clone(),
                ok,
                now - hour - minute,
            ),
            job("web-failback-7", "web", fb, in_step, ok, now),
        ];
        for j in &all {
            let name = j.metadata.name.clone().unwrap_or_default();
            db.put(JOB_KIND, "default", &name, j)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        forget_old_in_step_jobs(&db, &all[5], now);
        let mut left: Vec<String> = db
            .list::<ReplicationJob>(JOB_KIND)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .filter_map(|j| j.metadata.name)
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "db-failback-2",
                "web-failback-4",
                "web-failback-5",
                "web-failback-6",
                "web-failback-7"
            ],
            "only web's succeeded in-step job of over an hour ago goes"
        );
    }
}
