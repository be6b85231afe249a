//! One protected VM on this node, in a task of its own: it owns the VM's worker, so the VM
//! runs one thing at a time (a job, or a cycle), and a slow VM never holds up another.
//!
//! ```text
//!  every tick, while the VM is in the cache and on this node:
//!   Running jobs of this node that no task runs ──> Failed (recoverable, rv-guarded)
//!   policy + VM ──config──> worker (opened, or settings changed; reopened on a new target)
//!   oldest claimable job ──claim──> won: run to its end (progress ≤ 1/s) ──> job status
//!                                   lost (409): skipped until the job changes
//!   else Worker::tick ──> a cycle when due
//!   news, or a copy interval without a report ──> facts ──> status.agent
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use lifeboat_api::contract::is_claimable;
use lifeboat_api::job::{JobPhase, ReplicationJobStatus};
use lifeboat_api::policy::ReplicaTarget;
use lifeboat_api::{ProtectedVM, ReplicationJob, ReplicationPolicy};
use lifeboat_control::mapping::whole_seconds;
use lifeboat_engine::replicator::Progress;
use lifeboat_engine::{EngineError, JobDirs, JobResult, run_store_job};
use lifeboat_store::ReplicaStore;
use tokio::sync::watch;
use tokio::time::Instant;

use super::api::Claim;
use super::error::{ClusterError, is_conflict, is_not_found};
use super::{Backoff, Shared, Stop};
use crate::config::{Site, VmConfig, vm_config_on};
use crate::jobs;
use crate::report::{ReportGate, agent_report};
use crate::vm_worker::{OpenError, ProgressThrottle, arm_started_vm, open_worker, run_job_on};

/// The VM's opened engine.
struct Slot {
    worker: lifeboat_engine::Worker,
    config: VmConfig,
    target: ReplicaTarget,
}

/// Why the engine is not open.
enum NotOpen {
    /// Nothing to open with yet (no policy), or a transient API error: jobs wait.
    Waiting(String),
    /// Opening failed: jobs fail with this error, so that the operator shows it.
    Failed(OpenError),
}

/// How a job's run ended.
enum RunEnd {
    /// The engine finished it.
    Finished(Box<Result<JobResult, EngineError>>),
    /// The agent is stopping and the grace period is over.
    Stopped,
    /// The job was deleted (withdrawn by the operator) while it ran.
    Withdrawn,
}

pub(crate) struct VmTask {
    shared: Arc<Shared>,
    key: ObjectRef<ProtectedVM>,
    namespace: String,
    /// `namespace/name`, for logs and errors.
    vm: String,
    slot: Option<Slot>,
    not_open: Option<NotOpen>,
    open_backoff: Backoff,
    open_retry_at: Option<Instant>,
    claim_backoff: Backoff,
    claim_retry_at: Option<Instant>,
    /// Jobs whose claim was lost, by uid, with the resourceVersion it was lost on.
    lost: HashMap<String, String>,
    /// Jobs this task ran or failed (their cached copy may lag behind).
    done: HashSet<String>,
    gate: ReportGate,
    report_due: bool,
    report_backoff: Backoff,
    report_retry_at: Option<Instant>,
    retry_token: Option<Option<String>>,
    last_logged: Option<String>,
    /// The store refused the engine's credentials (or an operator asked for a retry): read
    /// the target's Secrets again, at most once per `max_backoff`, and reopen the engine
    /// when they changed (a rotated key).
    credentials_suspect: bool,
    credentials_checked_at: Option<Instant>,
    /// The store refused this agent for an epoch it no longer holds (a failover elsewhere
    /// fenced it): no more cycles; jobs still end (refused by the store) so that the
    /// operator hears why.
    fenced: bool,
    /// This node hosts the VM's recovered VM only (`spec.recoverySite.nodeName`).
    recovery_site_only: bool,
}

fn uid(job: &ReplicationJob) -> String {
    job.metadata.uid.clone().unwrap_or_else(|| job.name_any())
}

fn now() -> SystemTime {
    whole_seconds(SystemTime::now())
}

/// Whether a job needs only the replica store (`lifeboat_core::vm::store_only`).
pub(crate) fn store_only_job(job: &ReplicationJob) -> bool {
    let (kind, params) = crate::jobs::job_kind_params(job);
    lifeboat_core::vm::store_only(kind, &params)
}

fn job_type(job: &ReplicationJob) -> String {
    serde_json::to_value(job.spec.job_type)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl VmTask {
    pub(crate) fn new(shared: Arc<Shared>, key: ObjectRef<ProtectedVM>) -> Self {
        let max = shared.timing.max_backoff;
        let namespace = key.namespace.clone().unwrap_or_default();
        Self {
            vm: format!("{namespace}/{}", key.name),
            namespace,
            shared,
            key,
            slot: None,
            not_open: None,
            open_backoff: Backoff::new(max),
            open_retry_at: None,
            claim_backoff: Backoff::new(max),
            claim_retry_at: None,
            lost: HashMap::new(),
            done: HashSet::new(),
            gate: ReportGate::default(),
            report_due: true,
            report_backoff: Backoff::new(max),
            report_retry_at: None,
            retry_token: None,
            last_logged: None,
            credentials_suspect: false,
            credentials_checked_at: None,
            fenced: false,
            recovery_site_only: false,
        }
    }

    /// Log a standing problem once, not every tick.
    fn log_once(&mut self, message: String) {
        if self.last_logged.as_ref() != Some(&message) {
            tracing::warn!(vm = %self.vm, "{message}");
            self.last_logged = Some(message);
        }
    }

    fn api_failed(&self, error: &ClusterError) {
        self.shared.metrics.api_error(error.metric_label());
    }

    /// Run until the VM leaves the cache or this node, or the agent stops.
    pub(crate) async fn run(mut self, stop: Stop) {
        tracing::info!(vm = %self.vm, "protecting");
        while !stop.is_set() {
            let Some(vm) = self.shared.vm(&self.key) else {
                tracing::info!(vm = %self.vm, "the VM is gone");
                break;
            };
            if !vm.on_node(&self.shared.node) {
                tracing::info!(vm = %self.vm, node = %vm.spec.node_name, "the VM moved to another node");
                break;
            }
            self.step(&vm, &stop).await;
            tokio::select! {
                () = stop.wait() => break,
                () = tokio::time::sleep(self.shared.timing.tick) => {}
            }
        }
    }

    /// One look at the VM.
    pub(crate) async fn step(&mut self, vm: &ProtectedVM, stop: &Stop) {
        self.recovery_site_only = vm.spec.node_name != self.shared.node;
        let jobs: Vec<Arc<ReplicationJob>> = self
            .shared
            .jobs
            .state()
            .into_iter()
            .filter(|j| {
                j.namespace().as_deref() == Some(self.namespace.as_str())
                    && j.spec.vm_ref.name == self.key.name
                    && j.spec.node_name == self.shared.node
            })
            .collect();
        // NB: forget the jobs that are gone, so that a VM with years of jobs keeps two small
        // sets.
        let present: HashSet<String> = jobs.iter().map(|j| uid(j)).collect();
        self.done.retain(|u| present.contains(u));
        self.lost.retain(|u, _| present.contains(u));
        self.fail_orphans(&jobs).await;
        let policy = self
            .shared
            .policies
            .get(&ObjectRef::new(&vm.spec.policy_ref.name).within(&self.namespace));
        // NB: a retry first: it may send ensure_open to read the target's credentials again
        // before a job is claimed on the old ones.
        self.follow_retry_request(vm);
        self.ensure_open(vm, policy.as_deref()).await;
        if let Some(slot) = &self.slot {
            let limit = slot.config.upload_limit_bytes_per_second(SystemTime::now());
            slot.worker.engine().throttle().set_limit(limit);
        }
        if let Some(job) = self.next_claimable(&jobs) {
            self.claim_and_run(&job, stop).await;
        } else {
            self.cycle(stop).await;
            self.arm_started_vm(vm, policy.as_deref()).await;
        }
        self.report(vm).await;
    }

    /// Jobs of this node's agent left Running by an earlier agent process: failed as
    /// recoverable, guarded by the version seen (a job this task just ended may still show
    /// Running in the cache; the guard makes that write a harmless 409).
    async fn fail_orphans(&mut self, jobs: &[Arc<ReplicationJob>]) {
        let node_prefix = format!("{}/", self.shared.node);
        for job in jobs {
            let Some(status) = job.status.as_ref() else {
                continue;
            };
            let ours = status
                .claimed_by
                .as_deref()
                .is_some_and(|c| c.starts_with(&node_prefix));
            if status.phase != JobPhase::Running || !ours || self.done.contains(&uid(job)) {
                continue;
            }
            let Some(version) = job.resource_version() else {
                continue;
            };
            let message = format!(
                "the agent on node {} restarted while the job ran (claimed by {}); the job can run again and resumes from the engine's saved state",
                self.shared.node,
                status.claimed_by.as_deref().unwrap_or_default()
            );
            let failed = jobs::abandoned(status.clone(), "AgentRestarted", message, now());
            let name = job.name_any();
            match self
                .shared
                .api
                .write_job_status(&self.namespace, &name, &failed, Some(&version))
                .await
            {
                Ok(_) => {
                    tracing::warn!(vm = %self.vm, job = %name, "failed a job an earlier agent left running");
                    self.shared.metrics.job(&job_type(job), "abandoned");
                    self.done.insert(uid(job));
                }
                Err(ClusterError::WriteJobStatus { source, .. })
                    if is_conflict(&source) || is_not_found(&source) => {}
                Err(error) => {
                    self.api_failed(&error);
                    tracing::warn!(vm = %self.vm, job = %name, %error, "fail a job left running");
                }
            }
        }
    }

    /// Open the engine, or follow a changed configuration.
    async fn ensure_open(&mut self, vm: &ProtectedVM, policy: Option<&ReplicationPolicy>) {
        let Some(policy) = policy else {
            if self.slot.is_none() {
                let message = format!(
                    "ReplicationPolicy {}/{} not found",
                    self.namespace, vm.spec.policy_ref.name
                );
                self.log_once(message.clone());
                self.not_open = Some(NotOpen::Waiting(message));
            }
            return;
        };
        let config = match vm_config_on(vm, policy, Some(&self.shared.node)) {
            Ok(config) => config,
            Err(e) => {
                if self.slot.is_none() {
                    self.log_once(e.to_string());
                    self.not_open = Some(NotOpen::Failed(e.into()));
                }
                return;
            }
        };
        if self.credentials_changed(&policy.spec.target).await {
            tracing::info!(vm = %self.vm, "the target's credentials changed: opening the engine again");
            self.slot = None;
        }
        if let Some(slot) = &mut self.slot {
            let reopen = slot.target != policy.spec.target
                || slot.config.site != config.site
                || slot.config.hypervisor != config.hypervisor
                || slot.config.vm_name != config.vm_name;
            if !reopen {
                if slot.config != config {
                    slot.worker
                        .engine_mut()
                        .set_settings(config.settings.clone());
                    slot.worker.engine_mut().set_disks(config.disks.clone());
                    slot.worker.retry_now(now());
                    slot.config = config;
                    self.report_due = true;
                }
                return;
            }
            tracing::info!(vm = %self.vm, "the target or the hypervisor changed: opening the engine again");
            self.slot = None;
        }
        if self.open_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        match self.open(&config, &policy.spec.target).await {
            Ok(worker) => {
                tracing::info!(vm = %self.vm, "engine open");
                self.slot = Some(Slot {
                    worker,
                    config,
                    target: policy.spec.target.clone(),
                });
                self.not_open = None;
                self.open_backoff.reset();
                self.open_retry_at = None;
                self.last_logged = None;
                self.report_due = true;
            }
            Err(not_open) => {
                let message = match &not_open {
                    NotOpen::Waiting(m) => m.clone(),
                    NotOpen::Failed(e) => e.to_string(),
                };
                self.log_once(message);
                self.not_open = Some(not_open);
                self.open_retry_at = Some(Instant::now() + self.open_backoff.next_wait());
            }
        }
    }

    /// Whether the open engine's store was opened with credentials the target's Secrets no
    /// longer hold; asked only while they are suspect, and at most once per `max_backoff`.
    async fn credentials_changed(&mut self, target: &ReplicaTarget) -> bool {
        let due = self
            .credentials_checked_at
            .is_none_or(|at| at.elapsed() >= self.shared.timing.max_backoff);
        let Some(slot) = &self.slot else {
            return false;
        };
        if !self.credentials_suspect || !due || slot.target != *target {
            return false;
        }
        let concurrency = slot.config.settings.upload_concurrency;
        let current = Arc::clone(slot.worker.engine().store());
        self.credentials_checked_at = Some(Instant::now());
        match self.target_store(target, concurrency).await {
            Ok(store) => {
                let changed = !Arc::ptr_eq(&store, &current);
                if changed {
                    self.credentials_suspect = false;
                }
                changed
            }
            // NB: the API call failed (logged): look again after max_backoff.
            Err(NotOpen::Waiting(_)) => false,
            // NB: the Secret went missing or lost its key: the engine keeps what it has, and
            // its next failure says what the store refuses.
            Err(NotOpen::Failed(error)) => {
                tracing::warn!(vm = %self.vm, %error, "reading the target's credentials again failed");
                false
            }
        }
    }

    /// Note an error that may come from credentials the store no longer takes.
    fn note_error(&mut self, error: &EngineError) {
        match error.reason() {
            "StoreAccessDenied" => self.credentials_suspect = true,
            lifeboat_core::conditions::FENCED_REASON if !self.fenced => {
                tracing::error!(vm = %self.vm, %error, "fenced: this agent writes nothing more for the VM");
                self.fenced = true;
            }
            _ => {}
        }
    }

    /// The store of `target`, with its Secrets read now (the cache opens it again when they
    /// hold new credentials).
    async fn target_store(
        &self,
        target: &ReplicaTarget,
        upload_concurrency: usize,
    ) -> Result<Arc<dyn ReplicaStore>, NotOpen> {
        let secrets = match self.shared.api.secrets_for(&self.namespace, target).await {
            Ok(secrets) => secrets,
            Err(error) => {
                self.api_failed(&error);
                return Err(NotOpen::Waiting(error.to_string()));
            }
        };
        self.shared
            .stores
            .store(&self.namespace, target, upload_concurrency, &secrets)
            .map_err(|source| {
                NotOpen::Failed(OpenError::Store {
                    vm: self.vm.clone(),
                    source,
                })
            })
    }

    async fn open(
        &self,
        config: &VmConfig,
        target: &ReplicaTarget,
    ) -> Result<lifeboat_engine::Worker, NotOpen> {
        let store = self
            .target_store(target, config.settings.upload_concurrency)
            .await?;
        open_worker(config, store, &self.shared.state_dir)
            .await
            .map_err(NotOpen::Failed)
    }

    /// A changed `spec.requests.retry` token makes a stopped schedule try again at once.
    fn follow_retry_request(&mut self, vm: &ProtectedVM) {
        let token = vm
            .spec
            .requests
            .as_ref()
            .and_then(|r| r.retry.as_ref())
            .cloned();
        match &self.retry_token {
            None => self.retry_token = Some(token),
            Some(seen) if *seen != token => {
                // NB: the fix may have been a new key in the Secret: look at once.
                self.credentials_suspect = true;
                self.credentials_checked_at = None;
                if let Some(slot) = &mut self.slot {
                    tracing::info!(vm = %self.vm, "retry requested");
                    slot.worker.retry_now(now());
                }
                self.retry_token = Some(token);
            }
            Some(_) => {}
        }
    }

    /// The oldest job this agent may claim now.
    fn next_claimable(&self, jobs: &[Arc<ReplicationJob>]) -> Option<Arc<ReplicationJob>> {
        if self.claim_retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let mut claimable: Vec<&Arc<ReplicationJob>> = jobs
            .iter()
            .filter(|j| is_claimable(j, &self.shared.node))
            .filter(|j| !self.done.contains(&uid(j)))
            // NB: the recovery site's agent leaves a store-only job to the recovery runner
            // (`recovery.rs`), which needs nothing but the store, as for any VM not hosted here.
            .filter(|j| !(self.recovery_site_only && store_only_job(j)))
            .filter(|j| {
                // NB: a claim lost on this version is not tried again until the job changes.
                self.lost.get(&uid(j)).map(String::as_str) != j.metadata.resource_version.as_deref()
            })
            .collect();
        claimable.sort_by_key(|j| {
            (
                j.metadata.creation_timestamp.clone().map(|t| t.0),
                j.name_any(),
            )
        });
        let first = claimable.first().map(|j| Arc::clone(j))?;
        match (&self.slot, &self.not_open) {
            (Some(_), _) | (None, Some(NotOpen::Failed(_))) => Some(first),
            // Nothing to run it with yet: it stays Pending.
            _ => None,
        }
    }

    async fn claim_and_run(&mut self, job: &ReplicationJob, stop: &Stop) {
        let name = job.name_any();
        let claimed = match self
            .shared
            .api
            .claim_job(job, &self.shared.claimer, now())
            .await
        {
            Ok(Claim::Won(claimed)) => claimed,
            Ok(Claim::Lost) => {
                self.shared.metrics.claim("lost");
                tracing::info!(vm = %self.vm, job = %name, "the job was claimed by another agent or changed; skipped");
                self.lost
                    .insert(uid(job), job.resource_version().unwrap_or_default());
                return;
            }
            Err(error) => {
                self.shared.metrics.claim("error");
                self.api_failed(&error);
                let wait = self.claim_backoff.next_wait();
                tracing::warn!(vm = %self.vm, job = %name, %error, retry_in = ?wait, "claim");
                self.claim_retry_at = Some(Instant::now() + wait);
                return;
            }
        };
        self.shared.metrics.claim("won");
        self.claim_backoff.reset();
        self.claim_retry_at = None;
        self.done.insert(uid(job));
        let kind = job_type(job);
        let started = jobs::started(&claimed, &self.shared.claimer, now());
        if let Err(error) = self
            .shared
            .api
            .write_job_status(&self.namespace, &name, &started, None)
            .await
        {
            // NB: not fatal: the job is ours, and its end carries every step.
            self.api_failed(&error);
            tracing::warn!(vm = %self.vm, job = %name, %error, "write the job's steps");
        }
        let Some(slot) = self.slot.as_mut() else {
            let error = match &self.not_open {
                Some(NotOpen::Failed(e)) => e.error_status(now()),
                _ => return,
            };
            tracing::warn!(vm = %self.vm, job = %name, reason = %error.reason, "the engine cannot open: the job fails");
            let failed = jobs::failed(started, error, now());
            self.write_end(&name, &failed, stop).await;
            self.shared.metrics.job(&kind, "failed");
            return;
        };
        tracing::info!(vm = %self.vm, job = %name, kind = %kind, "job started");

        let status = Arc::new(Mutex::new(started));
        let (tx, rx) = watch::channel(Vec::<Progress>::new());
        let writer = tokio::spawn(progress_writer(
            Arc::clone(&self.shared),
            self.namespace.clone(),
            name.clone(),
            Arc::clone(&status),
            rx,
        ));
        let throttle = ProgressThrottle::new(self.shared.timing.progress);
        let sink = move |p: &Progress| {
            if let Some(all) = throttle.note(p, SystemTime::now()) {
                tx.send_replace(all);
            }
        };
        let dirs = JobDirs {
            failover_dir: self.shared.failover_dir.clone(),
            original_disks: slot.config.original_disks.clone(),
            failover_format: slot.config.failover_format,
            seed_dir: slot.config.seed_dir(&self.shared.state_dir),
        };
        let upload = Arc::clone(slot.worker.engine().throttle());
        let config = slot.config.clone();
        let (job_kind, params) = jobs::job_kind_params(&claimed);
        // NB: an unplanned failback sent to the primary site because the recovered VM's node
        // is lost: this site's engine does not replicate the VM (it failed over on the way
        // out), so the point is chosen and the replica fenced from the store alone.
        let from_store = config.site == Site::Primary
            && lifeboat_core::vm::unplanned_failback(job_kind, &params);
        let end = {
            let run = async {
                if from_store {
                    let engine = slot.worker.engine();
                    run_store_job(
                        engine.store().as_ref(),
                        engine.vm(),
                        job_kind,
                        &params,
                        &dirs,
                        // NB: the identity this agent's engines write under.
                        &config.writer,
                        SystemTime::now(),
                        &sink,
                    )
                    .await
                } else {
                    run_job_on(&mut slot.worker, &claimed, &dirs, &sink).await
                }
            };
            tokio::pin!(run);
            let mut check = tokio::time::interval(self.shared.timing.tick);
            let deadline = stop.after(self.shared.timing.shutdown_grace);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    outcome = &mut run => break RunEnd::Finished(Box::new(outcome)),
                    () = &mut deadline => break RunEnd::Stopped,
                    _ = check.tick() => {
                        // NB: a long copy crosses the work-hours edges: follow them.
                        upload.set_limit(config.upload_limit_bytes_per_second(SystemTime::now()));
                        let key = ObjectRef::from_obj(claimed.as_ref());
                        let gone = self.shared.jobs.get(&key).is_none_or(|j| {
                            j.metadata.deletion_timestamp.is_some() || j.metadata.uid != claimed.metadata.uid
                        });
                        if gone {
                            break RunEnd::Withdrawn;
                        }
                    }
                }
            }
        };
        // NB: the fence from the store took the replica's new epoch on this engine's store
        // handle too; this engine is not the one that replicates (it may be a stale
        // Protected one, left by an unplanned failover on the way out): the handle goes back
        // to the engine's own epoch, which the store refuses, and no cycle of it runs. A
        // re-protect here makes it the replicating one again.
        if from_store {
            let engine = slot.worker.engine();
            engine.store().hold_epoch(engine.vm(), engine.state().epoch);
            self.fenced = true;
        }
        drop(sink);
        if let Err(error) = writer.await {
            tracing::warn!(job = %name, %error, "the progress writer ended abnormally");
        }
        let status = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ended = now();
        match end {
            RunEnd::Finished(outcome) => {
                let outcome = *outcome;
                match &outcome {
                    // NB: a re-protect took the replica's epoch for this agent: it writes again.
                    Ok(_) if job.spec.job_type == lifeboat_api::job::JobType::Reprotect => {
                        tracing::info!(vm = %self.vm, job = %name, "job succeeded: this agent replicates the VM");
                        self.fenced = false;
                    }
                    Ok(_) => tracing::info!(vm = %self.vm, job = %name, "job succeeded"),
                    Err(e) => {
                        tracing::warn!(vm = %self.vm, job = %name, error = %e, "job failed");
                        self.note_error(e);
                    }
                }
                let outcome_label = if outcome.is_ok() {
                    "succeeded"
                } else {
                    "failed"
                };
                let finished = jobs::finished(status, &outcome, ended);
                self.write_end(&name, &finished, stop).await;
                self.shared.metrics.job(&kind, outcome_label);
            }
            RunEnd::Stopped => {
                tracing::warn!(vm = %self.vm, job = %name, "the agent is stopping: the job is abandoned");
                let message = format!(
                    "the agent on node {} stopped while the job ran; the job can run again and resumes from the engine's saved state",
                    self.shared.node
                );
                let failed = jobs::abandoned(status, "AgentStopped", message, ended);
                self.write_end(&name, &failed, stop).await;
                self.shared.metrics.job(&kind, "abandoned");
                // NB: the engine in memory stopped half-way: what is on disk is the truth.
                self.slot = None;
            }
            RunEnd::Withdrawn => {
                tracing::warn!(vm = %self.vm, job = %name, "the job was deleted while it ran: stopped");
                self.shared.metrics.job(&kind, "withdrawn");
                self.slot = None;
            }
        }
        self.report_due = true;
    }

    /// Write a job's end, retrying recoverable failures with backoff: a job left Running
    /// would hold up its VM until an agent restart noticed it. Gives up when the job is
    /// gone, the error needs someone to act, or the agent stops and its grace is over.
    async fn write_end(&self, name: &str, status: &ReplicationJobStatus, stop: &Stop) {
        let mut backoff = Backoff::new(self.shared.timing.max_backoff);
        let deadline = stop.after(self.shared.timing.shutdown_grace);
        tokio::pin!(deadline);
        loop {
            let error = match self
                .shared
                .api
                .write_job_status(&self.namespace, name, status, None)
                .await
            {
                Ok(_) => return,
                Err(ClusterError::WriteJobStatus { source, .. }) if is_not_found(&source) => {
                    return;
                }
                Err(error) => error,
            };
            self.api_failed(&error);
            if !error.is_recoverable() {
                tracing::error!(job = %name, %error, "write the job's end");
                return;
            }
            let wait = backoff.next_wait();
            tracing::warn!(job = %name, %error, retry_in = ?wait, "write the job's end");
            tokio::select! {
                () = &mut deadline => {
                    tracing::error!(job = %name, "gave up writing the job's end: the agent stops");
                    return;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// After a failover or a failback, before the re-protect: have the hypervisor of the VM
    /// started on this node record its writes since its raw disks' point, as soon as it runs
    /// (`vm_worker::arm_started_vm`).
    async fn arm_started_vm(&self, vm: &ProtectedVM, policy: Option<&ReplicationPolicy>) {
        let (Some(slot), Some(policy)) = (self.slot.as_ref(), policy) else {
            return;
        };
        arm_started_vm(
            vm,
            policy,
            &slot.worker,
            &slot.config,
            &self.shared.state_dir,
            Some(&self.shared.node),
        )
        .await;
    }

    /// A delta cycle, if one is due (never once fenced).
    async fn cycle(&mut self, stop: &Stop) {
        let Some(slot) = self.slot.as_mut().filter(|_| !self.fenced) else {
            return;
        };
        let outcome = tokio::select! {
            outcome = slot.worker.tick(now()) => outcome,
            () = stop.after(self.shared.timing.shutdown_grace) => {
                tracing::warn!(vm = %self.vm, "the agent is stopping: the cycle is abandoned");
                self.slot = None;
                return;
            }
        };
        let Some(outcome) = outcome else {
            return;
        };
        self.report_due = true;
        let label = match &outcome {
            Ok(report) if report.resync_required.is_some() => "resync_required",
            Ok(_) => "succeeded",
            Err(e) => {
                self.note_error(e);
                "failed"
            }
        };
        self.shared.metrics.cycle(label);
    }

    /// Write `status.agent` when it says something new, or as a sign of life once per copy
    /// interval; at most once per look.
    async fn report(&mut self, vm: &ProtectedVM) {
        // NB: one agent reports a VM's facts: the one whose VM replicates (the other site's
        // only runs the jobs given to its node, a failback's Failback job).
        if vm.active_node() != self.shared.node {
            return;
        }
        let Some(slot) = self.slot.as_mut() else {
            return;
        };
        let at = now();
        let interval = slot.config.settings.copy_interval;
        if !(self.report_due || self.gate.sign_of_life_due(at, interval)) {
            return;
        }
        if self.report_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let facts = match slot.worker.facts(at).await {
            Ok(facts) => facts,
            Err(e) => {
                let wait = self.report_backoff.next_wait();
                tracing::warn!(vm = %self.vm, error = %e, retry_in = ?wait, "read the facts");
                self.report_retry_at = Some(Instant::now() + wait);
                return;
            }
        };
        let report = agent_report(&facts, slot.config.policy_generation, at);
        self.report_due = false;
        if !self.gate.should_write(&report, at, interval) {
            self.shared.metrics.report("unchanged");
            return;
        }
        match self.shared.api.apply_report(vm, &report).await {
            Ok(()) => {
                self.shared.metrics.report("applied");
                self.gate.written(report, at);
                self.report_backoff.reset();
                self.report_retry_at = None;
            }
            Err(error) => {
                self.shared.metrics.report("failed");
                self.api_failed(&error);
                let wait = self.report_backoff.next_wait();
                tracing::warn!(vm = %self.vm, %error, retry_in = ?wait, "report");
                self.report_due = true;
                self.report_retry_at = Some(Instant::now() + wait);
            }
        }
    }
}

/// Write a running job's progress as it comes (the sink lets it through at most once per
/// interval); ends when the job's run drops the sender.
async fn progress_writer(
    shared: Arc<Shared>,
    namespace: String,
    name: String,
    status: Arc<Mutex<ReplicationJobStatus>>,
    mut progress: watch::Receiver<Vec<Progress>>,
) {
    while progress.changed().await.is_ok() {
        let all = progress.borrow_and_update().clone();
        let snapshot = {
            let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
            jobs::progressed(&mut status, &all, now());
            status.clone()
        };
        if let Err(error) = shared
            .api
            .write_job_status(&namespace, &name, &snapshot, None)
            .await
        {
            // NB: progress is best effort; the end is written with retries.
            shared.metrics.api_error(error.metric_label());
            tracing::debug!(job = %name, %error, "write progress");
        }
        tokio::time::sleep(shared.timing.progress.min(Duration::from_secs(5))).await;
    }
}
