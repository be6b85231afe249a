//! The operator: kube-rs controllers for `ReplicationPolicy`, `ProtectedVM`,
//! `ReplicationJob` and `RecoveryPlan`, thin shells around the decisions of `lifeboat-core`
//! (and the plan runs of `lifeboat-control`).
//!
//! ```text
//!            watch (shared caches, managedFields dropped)
//!  ProtectedVM ───────┬──> VM controller ──> jobs, status, events ──┐
//!  ReplicationJob ────┤    (owns jobs; watches policies: a policy    │
//!  ReplicationPolicy ─┤     change re-decides every VM using it)     ├──> API server
//!  agent Leases ──────┘──> policy controller ──> status, finalizer ──┤
//!                      └─> job controller ──> deletes old jobs ──────┤
//!  RecoveryPlan ──────────> plan controller ──> runs: VM requests, ───┘
//!                           hook Jobs, status
//!  /metrics /healthz /readyz ── hyper ── Metrics (+ per-VM series read from the VM cache)
//!  leader election ── Lease: only the leader runs the controllers
//! ```
//!
//! The operator writes decisions only; the node agents write facts (the contract is in
//! `lifeboat_api::contract` and docs/agent-contract.md).

pub mod context;
pub mod error;
pub mod events;
pub mod finalizer;
pub mod hook;
pub mod job;
pub mod leader;

pub mod metrics;
pub mod plan;
pub mod policy;
pub mod probe;
pub mod recovered;
pub mod vm;

use std::collections::HashMap;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use lifeboat_api::contract::{HEARTBEAT_LABEL, HEARTBEAT_LABEL_VALUE};
use lifeboat_api::{ProtectedVM, RecoveryPlan, ReplicationJob, ReplicationPolicy};
use lifeboat_core::{Clock, SystemClock};

pub use context::{Context, Settings, Stores};
pub use error::{Error, Result};
pub use metrics::Metrics;
pub use probe::{TargetProbe, TcpProbe};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch this namespace only; `None`: every namespace.
    pub namespace: Option<String>,
    /// Serve `/metrics`, `/healthz` and `/readyz` here; `None`: no endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Elect a leader among replicas with a Lease.
    pub leader_election: bool,
    /// The leader election Lease's name.
    pub lease_name: String,
    /// The namespace of the leader election Lease and of the agents' heartbeat Leases.
    pub lease_namespace: String,
    /// This replica's identity in the election (the pod's name).
    pub identity: String,
    /// How long the leader's Lease holds without renewal; the leader gives up after two
    /// thirds of it without a successful renewal and retries every 2/15 of it (client-go's
    /// 15 s : 10 s : 2 s).
    pub lease_duration: Duration,
    /// How long finished jobs are kept.
    pub job_retention: Duration,
    /// Reconciles of each controller that may run at once.
    pub concurrency: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            metrics_addr: None,
            leader_election: false,
            lease_name: "lifeboat-operator".into(),
            lease_namespace: "lifeboat-system".into(),
            identity: std::env::var("POD_NAME").unwrap_or_else(|_| "lifeboat-operator".into()),
            lease_duration: Duration::from_secs(15),
            job_retention: lifeboat_core::job::DEFAULT_JOB_RETENTION,
            concurrency: 16,
        }
    }
}

pub use lifeboat_http::install_crypto_provider;

/// Run the operator with the in-cluster (or kubeconfig) client until SIGTERM or Ctrl+C.
///
/// # Errors
///
/// No client could be made, the metrics endpoint could not listen, or leadership was lost.
pub async fn run(config: Config) -> Result<()> {
    install_crypto_provider();
    let client = Client::try_default()
        .await
        .map_err(|source| Error::ConnectApi { source })?;
    Operator::new(client, config)
        .run(lifeboat_http::shutdown_signal())
        .await
}

/// The operator, ready to run: a client, a configuration, and the clock and target probe
/// (replaceable, for tests and benchmarks).
pub struct Operator {
    client: Client,
    config: Config,
    clock: Arc<dyn Clock>,
    probe: Arc<dyn TargetProbe>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("config", &self.config)
            .field("clock", &self.clock)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

/// Watch-event buffer of each shared cache, per subscriber.
const SHARED_BUFFER: usize = 1024;

/// Keep only the items whose `key` changed since the last one for the same object: a filter
/// for secondary triggers, so that (say) every VM status write does not re-decide its policy.
fn changed_by<K, T>(
    key: impl Fn(&K) -> T + Send + 'static,
) -> impl FnMut(&Arc<K>) -> future::Ready<bool> + Send
where
    K: Resource<DynamicType = ()> + 'static,
    T: Hash,
{
    // NB: shared streams carry no deletions, so entries of deleted objects stay: a few bytes
    // each, and a re-created object of the same name still gets its first trigger through
    // because its key differs (generation, finalizers).
    let mut seen: HashMap<ObjectRef<K>, u64> = HashMap::new();
    move |obj| {
        let mut hasher = DefaultHasher::new();
        key(obj).hash(&mut hasher);
        let hash = hasher.finish();
        future::ready(seen.insert(ObjectRef::from_obj(obj.as_ref()), hash) != Some(hash))
    }
}

/// Drop what the operator never reads and a large cache pays for: managed fields and the
/// last-applied annotation.
fn slim<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
    obj.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

fn subscribe<T>(kind: &'static str, handle: Option<T>) -> Result<T> {
    handle.ok_or(Error::Subscribe { kind })
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

fn log_reconcile<K, E: std::fmt::Display>(
    controller: &'static str,
) -> impl FnMut(Result<(ObjectRef<K>, controller::Action), E>) -> future::Ready<()>
where
    K: Resource,
{
    move |result| {
        if let Err(error) = result {
            tracing::debug!(controller, %error, "reconcile");
        }
        future::ready(())
    }
}

impl Operator {
    /// An operator with the system clock and a TCP probe of remote targets.
    pub fn new(client: Client, config: Config) -> Self {
        Self {
            client,
            config,
            clock: Arc::new(SystemClock),
            probe: Arc::new(TcpProbe::default()),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Decide with this clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Probe remote targets with this.
    #[must_use]
    pub fn with_probe(mut self, probe: Arc<dyn TargetProbe>) -> Self {
        self.probe = probe;
        self
    }

    /// The metrics (to read them in tests and benchmarks).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.config.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Run until `shutdown` resolves (then finish the reconciles under way) or leadership
    /// is lost.
    ///
    /// # Errors
    ///
    /// The metrics endpoint could not listen, a cache could not be shared, or leadership was
    /// lost.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let shutdown = shutdown.boxed().shared();
        let ready = Arc::new(AtomicBool::new(false));
        if let Some(addr) = self.config.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::BindMetrics { addr, source })?;
            tokio::spawn(lifeboat_http::serve(
                listener,
                self.metrics(),
                Arc::clone(&ready),
            ));
        }
        let election = self.config.leader_election.then(|| {
            let mut election = leader::LeaderElection::new(
                self.client.clone(),
                &self.config.lease_namespace,
                &self.config.lease_name,
                &self.config.identity,
                Arc::clone(&self.clock),
            );
            election.set_lease_duration(self.config.lease_duration);
            election
        });
        if let Some(election) = &election {
            // NB: a standby is ready: it serves its purpose by waiting.
            ready.store(true, Ordering::Relaxed);
            tracing::info!(identity = %self.config.identity, "waiting to lead");
            futures::select! {
                () = election.acquire().fuse() => {}
                () = shutdown.clone().fuse() => return Ok(()),
            }
            ready.store(false, Ordering::Relaxed);
        }
        self.metrics.set_leader(true);
        let keep = async {
            match &election {
                Some(election) => election.keep().await,
                None => future::pending().await,
            }
        };
        let result = futures::select! {
            result = self.controllers(shutdown.clone(), Arc::clone(&ready)).fuse() => result,
            lost = keep.fuse() => Err(lost),
        };
        self.metrics.set_leader(false);
        result
    }

    async fn controllers(
        &self,
        shutdown: future::Shared<future::BoxFuture<'static, ()>>,
        ready: Arc<AtomicBool>,
    ) -> Result<()> {
        let config = &self.config;
        let wc = watcher::Config::default();

        let (vm_reader, vm_writer) = reflector::store_shared::<ProtectedVM>(SHARED_BUFFER);
        let (job_reader, job_writer) = reflector::store_shared::<ReplicationJob>(SHARED_BUFFER);
        let (policy_reader, policy_writer) =
            reflector::store_shared::<ReplicationPolicy>(SHARED_BUFFER);
        let vms_for_vm_controller = subscribe("ProtectedVM", vm_writer.subscribe())?;
        let vms_for_policy_controller = subscribe("ProtectedVM", vm_writer.subscribe())?;
        let jobs_for_job_controller = subscribe("ReplicationJob", job_writer.subscribe())?;
        let jobs_for_vm_controller = subscribe("ReplicationJob", job_writer.subscribe())?;
        let policies_for_policy_controller =
            subscribe("ReplicationPolicy", policy_writer.subscribe())?;
        let policies_for_vm_controller = subscribe("ReplicationPolicy", policy_writer.subscribe())?;

        let vm_feed = watcher(self.api::<ProtectedVM>(), wc.clone())
            .default_backoff()
            .modify(slim)
            .reflect_shared(vm_writer)
            .for_each(log_watch("ProtectedVM"));
        let job_feed = watcher(self.api::<ReplicationJob>(), wc.clone())
            .default_backoff()
            .modify(slim)
            .reflect_shared(job_writer)
            .for_each(log_watch("ReplicationJob"));
        let policy_feed = watcher(self.api::<ReplicationPolicy>(), wc.clone())
            .default_backoff()
            .modify(slim)
            .reflect_shared(policy_writer)
            .for_each(log_watch("ReplicationPolicy"));
        let (lease_reader, lease_writer) = reflector::store::<Lease>();
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &config.lease_namespace);
        let lease_feed = watcher(
            leases,
            watcher::Config::default()
                .labels(&format!("{HEARTBEAT_LABEL}={HEARTBEAT_LABEL_VALUE}")),
        )
        .default_backoff()
        .modify(slim)
        .reflect(lease_writer)
        .for_each(log_watch("Lease"));

        // NB: metadata only (a Node's status is large): the labels are all a recovery node
        // selector reads.
        let (node_reader, node_writer) = reflector::store::<PartialObjectMeta<Node>>();
        let node_feed = watcher(
            Api::<PartialObjectMeta<Node>>::all(self.client.clone()),
            wc.clone(),
        )
        .default_backoff()
        .modify(slim)
        .reflect(node_writer)
        .for_each(log_watch("Node"));

        self.metrics.watch_vms(vm_reader.clone());
        let stores = Stores {
            vms: vm_reader.clone(),
            jobs: job_reader.clone(),
            policies: policy_reader.clone(),
            leases: lease_reader.clone(),
            nodes: node_reader.clone(),
        };
        let ctx = Arc::new(Context::new(
            self.client.clone(),
            stores,
            self.metrics(),
            Arc::clone(&self.clock),
            Arc::clone(&self.probe),
            Settings {
                heartbeat_namespace: config.lease_namespace.clone(),
                job_retention: config.job_retention,
            },
        ));
        let controller_config = controller::Config::default().concurrency(config.concurrency);

        let vms_by_policy = vm_reader.clone();
        let vm_controller = Controller::for_shared_stream(vms_for_vm_controller, vm_reader.clone())
            .with_config(controller_config.clone())
            .owns_shared_stream(jobs_for_vm_controller)
            .watches_shared_stream(
                policies_for_vm_controller.filter(changed_by(|p: &ReplicationPolicy| {
                    (
                        p.metadata.generation,
                        p.metadata.deletion_timestamp.is_some(),
                    )
                })),
                move |policy: Arc<ReplicationPolicy>| {
                    let (ns, name) = (policy.namespace(), policy.name_any());
                    vms_by_policy
                        .state()
                        .into_iter()
                        .filter(|vm| vm.spec.policy_ref.name == name && vm.namespace() == ns)
                        .map(|vm| ObjectRef::from_obj(vm.as_ref()))
                        .collect::<Vec<_>>()
                },
            )
            .graceful_shutdown_on(shutdown.clone())
            .run(vm::reconcile, vm::error_policy, Arc::clone(&ctx))
            .for_each(log_reconcile(vm::CONTROLLER));

        let policy_controller =
            Controller::for_shared_stream(policies_for_policy_controller, policy_reader.clone())
                .with_config(controller_config.clone())
                .watches_shared_stream(
                    vms_for_policy_controller.filter(changed_by(|vm: &ProtectedVM| {
                        (
                            vm.spec.policy_ref.name.clone(),
                            vm.metadata.deletion_timestamp.is_some(),
                            vm.finalizers().len(),
                        )
                    })),
                    |vm: Arc<ProtectedVM>| {
                        let ns = vm.namespace().unwrap_or_default();
                        Some(ObjectRef::new(&vm.spec.policy_ref.name).within(&ns))
                    },
                )
                .graceful_shutdown_on(shutdown.clone())
                .run(policy::reconcile, policy::error_policy, Arc::clone(&ctx))
                .for_each(log_reconcile(policy::CONTROLLER));

        let job_controller =
            Controller::for_shared_stream(jobs_for_job_controller, job_reader.clone())
                .with_config(controller_config)
                .graceful_shutdown_on(shutdown.clone())
                .run(job::reconcile, job::error_policy, Arc::clone(&ctx))
                .for_each(log_reconcile(job::CONTROLLER));

        // NB: its own watch, not a shared cache: nothing else reads plans.
        let plan_controller = Controller::new(self.api::<RecoveryPlan>(), wc.clone());
        self.metrics.watch_plans(plan_controller.store());
        let plan_controller = plan_controller
            .with_config(controller::Config::default().concurrency(config.concurrency))
            .graceful_shutdown_on(shutdown.clone())
            .run(
                plan::reconcile,
                plan::error_policy,
                Arc::new(plan::PlanContext::new(self.client.clone())),
            )
            .for_each(log_reconcile(plan::CONTROLLER));

        let readiness = async move {
            let synced = future::join5(
                vm_reader.wait_until_ready(),
                job_reader.wait_until_ready(),
                policy_reader.wait_until_ready(),
                lease_reader.wait_until_ready(),
                node_reader.wait_until_ready(),
            )
            .await;
            if matches!(synced, (Ok(()), Ok(()), Ok(()), Ok(()), Ok(()))) {
                ready.store(true, Ordering::Relaxed);
                tracing::info!("caches synced; reconciling");
            }
            future::pending::<()>().await;
        };
        let cluster_feeds = future::join(lease_feed, node_feed);
        let feeds = future::join5(vm_feed, job_feed, policy_feed, cluster_feeds, readiness);
        let controllers = future::join4(
            vm_controller,
            policy_controller,
            job_controller,
            plan_controller,
        );
        futures::pin_mut!(feeds, controllers);
        // NB: the feeds never end by themselves; the controllers end at shutdown.
        future::select(feeds, controllers).await;
        Ok(())
    }
}
