//! The node agent in a cluster: a DaemonSet pod on every VM host that watches the
//! `ProtectedVM`s and `ReplicationJob`s of its node, runs them on the engine and writes back
//! facts (`status.agent`) and job status. It decides nothing: the operator does, from what the
//! agent writes (`lifeboat_api::contract` has the protocol).
//!
//! ```text
//!  watch (fieldSelector spec.nodeName=<node>,        watch (all in the namespace)
//!         and spec.recoverySite.nodeName=<node>)
//!  ProtectedVM ──┐  ReplicationJob ──┐                ReplicationPolicy ──┐
//!                v                   v                                    v
//!           reflector caches ─────────────────────────────────────────────┘
//!                │ one task per VM on this node (supervisor, every tick)
//!                v
//!  VM task: open engine (Secrets read for the policy's target) ──> Worker
//!     ├─ claimable job? ──claim (rv-guarded merge patch; 409: lost)──> run_job_on
//!     │       progress ≤ 1/s, end ──> replicationjobs/status (merge patch)
//!     ├─ idle: Worker::tick ──> delta cycle when due
//!     └─ facts ──> status.agent (SSA, only when news or once per copy interval)
//!  heartbeat task: Lease lifeboat-agent-<node> every 10 s ──> the operator's namespace
//!  /healthz /readyz /metrics
//! ```
//!
//! Both modes run a VM the same way: the engine is opened, jobs are run and facts become a
//! report by the same `lifeboat-agent` functions that standalone mode uses.
//!
//! # Assumptions
//!
//! One agent per node (a DaemonSet without surge): a job found Running under this node's
//! name that this process does not run was left by an earlier agent (a crash, a restart),
//! and is failed as recoverable so that the operator runs it again.

mod api;
mod error;
mod health;
mod recovery;
mod vm;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, future};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use lifeboat_api::{ProtectedVM, ReplicationJob, ReplicationPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use api::{Claim, FetchedSecrets, Heartbeat, NodeApi};
pub use error::{ClusterError, api_error_is_recoverable};
pub use health::Metrics;

use crate::stores::StoreCache;

/// How often things happen. The defaults suit a cluster; tests shorten them.
#[derive(Clone, Debug)]
pub struct Timing {
    /// How often each VM task looks at its VM, its jobs and its cycle schedule.
    pub tick: Duration,
    /// How often the heartbeat Lease is renewed.
    pub heartbeat: Duration,
    /// The least time between two progress writes of a running job.
    pub progress: Duration,
    /// How long a running job or cycle may go on after SIGTERM before it is abandoned.
    pub shutdown_grace: Duration,
    /// The longest wait between retries of a failed API call; also the least time between
    /// two readings of a target's Secrets while its store refuses the credentials.
    pub max_backoff: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            heartbeat: Duration::from_secs(10),
            progress: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(20),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// How the cluster agent runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The node this agent runs on (from the pod's `spec.nodeName`).
    pub node_name: String,
    /// The agent pod's name: jobs are claimed as `<node>/<pod>`.
    pub pod_name: String,
    /// Watch this namespace only; `None`: every namespace.
    pub namespace: Option<String>,
    /// The operator's namespace, where the heartbeat Lease lives.
    pub lease_namespace: String,
    /// Engine state and change logs (a hostPath: it must outlive the pod).
    pub state_dir: PathBuf,
    /// Where (test) failover disks are materialised.
    pub failover_dir: PathBuf,
    /// Serve `/healthz`, `/readyz` and `/metrics` here; `None`: no endpoint.
    pub health_addr: Option<SocketAddr>,
    /// Periods and limits.
    pub timing: Timing,
}

impl AgentOptions {
    /// Options for the agent on `node_name` with the defaults of the DaemonSet: every
    /// namespace, Lease in `lifeboat-system`, state under `/var/lib/lifeboat`, health on
    /// port 8081, the pod's name from `POD_NAME`.
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.to_owned(),
            pod_name: std::env::var("POD_NAME").unwrap_or_else(|_| "lifeboat-agent".into()),
            namespace: None,
            lease_namespace: "lifeboat-system".into(),
            state_dir: PathBuf::from("/var/lib/lifeboat"),
            failover_dir: PathBuf::from("/var/lib/lifeboat/failover"),
            health_addr: Some(SocketAddr::from(([0, 0, 0, 0], 8081))),
            timing: Timing::default(),
        }
    }

    /// The name jobs are claimed under: `<node>/<pod>`.
    pub fn claimer(&self) -> String {
        format!("{}/{}", self.node_name, self.pod_name)
    }
}

/// Run the agent with the in-cluster (or kubeconfig) client until SIGTERM or Ctrl+C.
///
/// # Errors
///
/// No client could be made, the node name is empty, or the health endpoint could not
/// listen.
pub async fn run(options: AgentOptions) -> Result<(), ClusterError> {
    lifeboat_http::install_crypto_provider();
    let client = Client::try_default()
        .await
        .map_err(|source| ClusterError::ConnectApi { source })?;
    Agent::new(client, options)?
        .run(lifeboat_http::shutdown_signal())
        .await
}

/// A stop signal shared by the tasks: set once at shutdown.
#[derive(Clone, Debug)]
pub(crate) struct Stop(watch::Receiver<bool>);

impl Stop {
    pub(crate) fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the stop is set (or its sender is gone).
    pub(crate) async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Resolves `grace` after the stop is set.
    pub(crate) async fn after(&self, grace: Duration) {
        self.wait().await;
        tokio::time::sleep(grace).await;
    }
}

/// Exponential backoff between retries of a failed call: 1 s, 2 s, 4 s, ... up to a limit;
/// reset by a success.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    failures: u32,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Self {
        Self { failures: 0, max }
    }

    /// The wait before the next try, counting one more failure.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = Duration::from_secs(1u64 << self.failures.min(16)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// What every VM task shares.
pub(crate) struct Shared {
    pub(crate) api: NodeApi,
    pub(crate) node: String,
    pub(crate) claimer: String,
    pub(crate) vms: Store<ProtectedVM>,
    /// The VMs whose recovered VM runs on this node (`spec.recoverySite.nodeName`).
    pub(crate) recovered: Store<ProtectedVM>,
    pub(crate) jobs: Store<ReplicationJob>,
    pub(crate) policies: Store<ReplicationPolicy>,
    pub(crate) stores: StoreCache,
    pub(crate) state_dir: PathBuf,
    pub(crate) failover_dir: PathBuf,
    pub(crate) timing: Timing,
    pub(crate) metrics: Arc<Metrics>,
}

impl Shared {
    /// A VM of this node: hosted here, or its recovered VM is.
    pub(crate) fn vm(&self, key: &ObjectRef<ProtectedVM>) -> Option<Arc<ProtectedVM>> {
        self.vms.get(key).or_else(|| self.recovered.get(key))
    }
}

/// The agent, ready to run.
pub struct Agent {
    client: Client,
    options: AgentOptions,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn slim<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
    obj.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

fn log_watch<T, E: std::fmt::Display>(
    kind: &'static str,
) -> impl FnMut(Result<T, E>) -> future::Ready<()> {
    move |event| {
        if let Err(error) = event {
            tracing::warn!(kind, %error, "watch");
        }
        future::ready(())
    }
}

impl Agent {
    /// An agent over `client`.
    ///
    /// # Errors
    ///
    /// `NoNodeName` when the options name no node.
    pub fn new(client: Client, options: AgentOptions) -> Result<Self, ClusterError> {
        if options.node_name.is_empty() {
            return Err(ClusterError::NoNodeName);
        }
        Ok(Self {
            client,
            options,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The metrics (to read them in tests).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.options.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Run until `shutdown` resolves, then let running jobs end (or abandon them after the
    /// grace period, marking them Failed as recoverable) and return.
    ///
    /// # Errors
    ///
    /// The health endpoint could not listen.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ClusterError> {
        let options = &self.options;
        let ready = Arc::new(AtomicBool::new(false));
        let health = match options.health_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ClusterError::BindHealth { addr, source })?;
                Some(tokio::spawn(health::serve(
                    listener,
                    self.metrics(),
                    Arc::clone(&ready),
                )))
            }
            None => None,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop = Stop(stop_rx);

        // NB: VMs and jobs are selected by node on the server (both declare spec.nodeName
        // selectable), so a node's agent holds only its own in memory; policies are few.
        let on_node =
            watcher::Config::default().fields(&format!("spec.nodeName={}", options.node_name));
        // NB: and the VMs whose recovered VM runs here (re-protect replicates it in reverse).
        let recovered_here = watcher::Config::default()
            .fields(&format!("spec.recoverySite.nodeName={}", options.node_name));
        let (vms, vm_writer) = reflector::store::<ProtectedVM>();
        let (recovered, recovered_writer) = reflector::store::<ProtectedVM>();
        let (jobs, job_writer) = reflector::store::<ReplicationJob>();
        let (policies, policy_writer) = reflector::store::<ReplicationPolicy>();
        let vm_feed = watcher(self.api::<ProtectedVM>(), on_node.clone())
            .default_backoff()
            .modify(slim)
            .reflect(vm_writer)
            .for_each(log_watch("ProtectedVM"));
        let recovered_feed = watcher(self.api::<ProtectedVM>(), recovered_here)
            .default_backoff()
            .modify(slim)
            .reflect(recovered_writer)
            .for_each(log_watch("ProtectedVM (recovery site)"));
        let job_feed = watcher(self.api::<ReplicationJob>(), on_node)
            .default_backoff()
            .modify(slim)
            .reflect(job_writer)
            .for_each(log_watch("ReplicationJob"));
        let policy_feed = watcher(self.api::<ReplicationPolicy>(), watcher::Config::default())
            .default_backoff()
            .modify(slim)
            .reflect(policy_writer)
            .for_each(log_watch("ReplicationPolicy"));
        let feeds = tokio::spawn(async move {
            future::join4(vm_feed, recovered_feed, job_feed, policy_feed).await;
        });

        let heartbeat = tokio::spawn(heartbeat_loop(
            Heartbeat::new(
                self.client.clone(),
                &options.lease_namespace,
                &options.node_name,
            ),
            options.timing.clone(),
            self.metrics(),
            stop.clone(),
        ));

        let shared = Arc::new(Shared {
            api: NodeApi::new(self.client.clone()),
            node: options.node_name.clone(),
            claimer: options.claimer(),
            vms,
            recovered,
            jobs,
            policies,
            stores: StoreCache::default(),
            state_dir: options.state_dir.clone(),
            failover_dir: options.failover_dir.clone(),
            timing: options.timing.clone(),
            metrics: self.metrics(),
        });
        let recovery = tokio::spawn(recovery::run(Arc::clone(&shared), stop.clone()));
        let supervisor = tokio::spawn(supervise(
            Arc::clone(&shared),
            Arc::clone(&ready),
            stop.clone(),
        ));

        shutdown.await;
        tracing::info!(
            "stopping: running jobs get {:?} to end",
            options.timing.shutdown_grace
        );
        let _ = stop_tx.send(true);
        if let Err(error) = supervisor.await {
            tracing::error!(%error, "the VM supervisor ended abnormally");
        }
        if let Err(error) = recovery.await {
            tracing::error!(%error, "the recovery job runner ended abnormally");
        }
        let _ = heartbeat.await;
        feeds.abort();
        if let Some(health) = health {
            health.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Renew the heartbeat Lease every period until the stop; retry failures with backoff.
async fn heartbeat_loop(
    mut heartbeat: Heartbeat,
    timing: Timing,
    metrics: Arc<Metrics>,
    stop: Stop,
) {
    let mut backoff = Backoff::new(timing.heartbeat);
    loop {
        let wait = match heartbeat.beat(SystemTime::now()).await {
            Ok(()) => {
                metrics.heartbeat("renewed");
                backoff.reset();
                timing.heartbeat
            }
            Err(error) => {
                metrics.heartbeat("failed");
                metrics.api_error(error.metric_label());
                tracing::warn!(%error, "heartbeat");
                backoff.next_wait()
            }
        };
        tokio::select! {
            () = stop.wait() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Start a task for every VM on this node once the caches are in sync, and keep the set in
/// step with the cache; at the stop, wait for every task to end.
async fn supervise(shared: Arc<Shared>, ready: Arc<AtomicBool>, stop: Stop) {
    let synced = tokio::select! {
        () = stop.wait() => return,
        synced = future::join4(
            shared.vms.wait_until_ready(),
            shared.recovered.wait_until_ready(),
            shared.jobs.wait_until_ready(),
            shared.policies.wait_until_ready(),
        ) => synced,
    };
    if !matches!(synced, (Ok(()), Ok(()), Ok(()), Ok(()))) {
        tracing::error!("the caches closed before they were in sync");
        return;
    }
    ready.store(true, Ordering::Relaxed);
    tracing::info!(node = %shared.node, "caches synced; protecting this node's VMs");
    let mut tasks: HashMap<ObjectRef<ProtectedVM>, JoinHandle<()>> = HashMap::new();
    loop {
        tasks.retain(|_, task| !task.is_finished());
        for vm in shared
            .vms
            .state()
            .into_iter()
            .chain(shared.recovered.state())
        {
            if !vm.on_node(&shared.node) || vm.namespace().is_none() {
                continue;
            }
            let key = ObjectRef::from_obj(vm.as_ref());
            if let std::collections::hash_map::Entry::Vacant(entry) = tasks.entry(key) {
                let task = vm::VmTask::new(Arc::clone(&shared), entry.key().clone());
                entry.insert(tokio::spawn(task.run(stop.clone())));
            }
        }
        shared.metrics.set_vms(tasks.len());
        tokio::select! {
            () = stop.wait() => break,
            () = tokio::time::sleep(shared.timing.tick) => {}
        }
    }
    for (key, task) in tasks {
        if let Err(error) = task.await {
            tracing::error!(vm = %key, %error, "a VM task ended abnormally");
        }
    }
}
