//! What every reconcile shares: the client, the caches, the event recorder, the metrics, the
//! clock and the settings (kube-rs `controller-rs`'s one `Context`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use lifeboat_api::contract::{OPERATOR_FIELD_MANAGER, agent_lease_name};
use lifeboat_api::{ProtectedVM, ReplicationJob, ReplicationPolicy};
use lifeboat_core::Clock;

use crate::metrics::Metrics;
use crate::probe::TargetProbe;

/// The caches the controllers read instead of asking the API server.
#[derive(Clone)]
pub struct Stores {
    /// ProtectedVMs.
    pub vms: Store<ProtectedVM>,
    /// ReplicationJobs.
    pub jobs: Store<ReplicationJob>,
    /// ReplicationPolicies.
    pub policies: Store<ReplicationPolicy>,
    /// The agents' heartbeat Leases, in the operator's namespace.
    pub leases: Store<Lease>,
    /// The cluster's Nodes, metadata only: their labels choose recovery nodes.
    pub nodes: Store<PartialObjectMeta<Node>>,
}

impl fmt::Debug for Stores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stores")
            .field("vms", &self.vms.len())
            .field("jobs", &self.jobs.len())
            .field("policies", &self.policies.len())
            .field("leases", &self.leases.len())
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

/// A probe's time and result.
pub(crate) type ProbeResult = (SystemTime, Result<(), String>);

/// Settings that shape the reconcilers.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The namespace of the agents' heartbeat Leases.
    pub heartbeat_namespace: String,
    /// How long finished jobs are kept.
    pub job_retention: Duration,
}

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Where "now" comes from.
    pub clock: Arc<dyn Clock>,
    /// The caches.
    pub stores: Stores,
    /// Checks that a remote target answers.
    pub probe: Arc<dyn TargetProbe>,
    /// Settings.
    pub settings: Settings,
    /// Recent probe results by account URL, so that a burst of reconciles probes once.
    pub(crate) probes: Mutex<HashMap<String, ProbeResult>>,
    /// What the operator last wrote to each VM's status.
    pub(crate) last_writes: crate::vm::LastWrites,
    /// Each node's heartbeat record (its Lease's renew time, as written) and when this
    /// operator first saw it, on its own clock (see [`Context::heartbeat`]).
    heartbeats: Mutex<HashMap<String, (SystemTime, SystemTime)>>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("stores", &self.stores)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context; events are reported as `lifeboat-operator` (instance: the pod's name).
    pub fn new(
        client: Client,
        stores: Stores,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        probe: Arc<dyn TargetProbe>,
        settings: Settings,
    ) -> Self {
        let reporter = Reporter {
            controller: OPERATOR_FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            clock,
            stores,
            probe,
            settings,
            probes: Mutex::new(HashMap::new()),
            last_writes: crate::vm::LastWrites::default(),
            heartbeats: Mutex::new(HashMap::new()),
        }
    }

    /// The last heartbeat of the agent on `node`, on this operator's clock: when it first saw
    /// the Lease's current renew (or acquire) time, as client-go judges a Lease's expiry, so
    /// that an agent whose clock is off is neither taken for lost (its jobs taken from it)
    /// nor kept alive. A record seen for the first time (the operator just started) counts
    /// from the time it names or now, whichever is earlier: a Lease abandoned before the
    /// operator started is as old as it says.
    pub fn heartbeat(&self, node: &str) -> Option<SystemTime> {
        let key =
            ObjectRef::new(&agent_lease_name(node)).within(&self.settings.heartbeat_namespace);
        let lease = self.stores.leases.get(&key)?;
        let spec = lease.spec.as_ref()?;
        let renewed = spec
            .renew_time
            .as_ref()
            .or(spec.acquire_time.as_ref())
            .map(|t| SystemTime::from(t.0))?;
        let now = self.clock.now();
        let mut seen = self
            .heartbeats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = seen
            .entry(node.to_owned())
            .or_insert((renewed, renewed.min(now)));
        if entry.0 != renewed {
            *entry = (renewed, now);
        }
        Some(entry.1)
    }

    /// The nodes that carry every label of `selector` (a `matchLabels`), by name.
    pub fn nodes_labelled(&self, selector: &BTreeMap<String, String>) -> Vec<String> {
        let mut names: Vec<String> = self
            .stores
            .nodes
            .state()
            .iter()
            .filter(|node| {
                let labels = node.labels();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|node| node.name_any())
            .collect();
        names.sort();
        names
    }

    /// A cached probe result for `url`, if recent enough.
    pub(crate) fn cached_probe(
        &self,
        url: &str,
        now: SystemTime,
        max_age: Duration,
    ) -> Option<Result<(), String>> {
        let probes = self.probes.lock().unwrap_or_else(PoisonError::into_inner);
        probes
            .get(url)
            .filter(|(at, _)| now.duration_since(*at).unwrap_or_default() < max_age)
            .map(|(_, result)| result.clone())
    }

    /// Remember a probe result.
    pub(crate) fn remember_probe(&self, url: &str, now: SystemTime, result: Result<(), String>) {
        let mut probes = self.probes.lock().unwrap_or_else(PoisonError::into_inner);
        probes.insert(url.to_owned(), (now, result));
    }
}
