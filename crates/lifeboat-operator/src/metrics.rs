//! Prometheus metrics (`prometheus-client`), served on `/metrics`.
//!
//! Two kinds: what the operator does (reconciles, errors, their durations, status writes,
//! jobs created and how long they took, leadership), kept as counters and histograms; and
//! what each VM is (RPO, health, cycles, missed cycles, bytes shipped, pending logs, resync
//! state), read from the VM cache at scrape time by a collector, so that a deleted VM leaves
//! no stale series behind and nothing is kept twice.
//!
//! | metric | labels |
//! |---|---|
//! | `lifeboat_reconciles_total`, `lifeboat_reconcile_duration_seconds` | controller |
//! | `lifeboat_reconcile_errors_total` | controller, error |
//! | `lifeboat_status_writes_total` | resource |
//! | `lifeboat_jobs_created_total` | type |
//! | `lifeboat_job_duration_seconds` | type, outcome |
//! | `lifeboat_leader` | |
//! | `lifeboat_vm_rpo_seconds`, `lifeboat_vm_health`, `lifeboat_vm_cycles_succeeded_total`, `lifeboat_vm_cycles_failed_total`, `lifeboat_vm_cycles_missed_last_hour`, `lifeboat_vm_bytes_shipped_total`, `lifeboat_vm_pending_log_bytes`, `lifeboat_vm_resync_required`, `lifeboat_vm_resynchronizing` | namespace, vm |

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use lifeboat_api::{Health, ProtectedVM, ProtectionPhase};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];
type HistogramMaker = fn() -> Histogram;

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

fn job_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 10))
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels1, Counter>,
    reconcile_errors: Family<Labels2, Counter>,
    reconcile_duration: Family<Labels1, Histogram, HistogramMaker>,
    status_writes: Family<Labels1, Counter>,
    jobs_created: Family<Labels1, Counter>,
    job_duration: Family<Labels2, Histogram, HistogramMaker>,
    leader: Gauge,
    missed: Arc<Mutex<HashMap<(String, String), u32>>>,
    vms: Arc<OnceLock<Store<ProtectedVM>>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lifeboat");
        let reconciles = Family::<Labels1, Counter>::default();
        let reconcile_errors = Family::<Labels2, Counter>::default();
        let reconcile_duration: Family<Labels1, Histogram, HistogramMaker> =
            Family::new_with_constructor(reconcile_histogram);
        let status_writes = Family::<Labels1, Counter>::default();
        let jobs_created = Family::<Labels1, Counter>::default();
        let job_duration: Family<Labels2, Histogram, HistogramMaker> =
            Family::new_with_constructor(job_histogram);
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles run, by controller",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and error",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles take, by controller",
            reconcile_duration.clone(),
        );
        registry.register(
            "status_writes",
            "Status writes (server-side apply), by resource",
            status_writes.clone(),
        );
        registry.register(
            "jobs_created",
            "ReplicationJobs created, by type",
            jobs_created.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "How long ReplicationJobs ran, from start to completion, by type and outcome",
            job_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads (or leader election is off)",
            leader.clone(),
        );
        let missed = Arc::new(Mutex::new(HashMap::new()));
        let vms = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(VmCollector {
            vms: Arc::clone(&vms),
            missed: Arc::clone(&missed),
        }));
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            status_writes,
            jobs_created,
            job_duration,
            leader,
            missed,
            vms,
        }
    }

    /// Read per-VM metrics from this cache from now on.
    pub fn watch_vms(&self, store: Store<ProtectedVM>) {
        let _ = self.vms.set(store);
    }

    /// A reconcile of `controller` starts; it is counted and timed when the guard drops.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles
            .get_or_create(&[("controller", controller.into())])
            .inc();
        ReconcileTimer {
            metrics: self,
            controller,
            started: Instant::now(),
        }
    }

    /// A reconcile of `controller` failed with an error labelled `error`.
    pub fn reconcile_failed(&self, controller: &'static str, error: &'static str) {
        self.reconcile_errors
            .get_or_create(&[("controller", controller.into()), ("error", error.into())])
            .inc();
    }

    /// A status was written.
    pub fn status_written(&self, resource: &'static str) {
        self.status_writes
            .get_or_create(&[("resource", resource.into())])
            .inc();
    }

    /// The status writes so far for `resource`.
    pub fn status_writes(&self, resource: &'static str) -> u64 {
        self.status_writes
            .get_or_create(&[("resource", resource.into())])
            .get()
    }

    /// A job was created.
    pub fn job_created(&self, job_type: &'static str) {
        self.jobs_created
            .get_or_create(&[("type", job_type.into())])
            .inc();
    }

    /// A job ended.
    pub fn job_finished(
        &self,
        job_type: &'static str,
        succeeded: bool,
        duration: Option<Duration>,
    ) {
        if let Some(duration) = duration {
            let outcome = if succeeded { "Succeeded" } else { "Failed" };
            self.job_duration
                .get_or_create(&[("type", job_type.into()), ("outcome", outcome.into())])
                .observe(duration.as_secs_f64());
        }
    }

    /// Whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The cycles a VM missed in the last hour, as the last reconcile decided.
    pub fn set_cycles_missed(&self, namespace: &str, vm: &str, missed: u32) {
        let mut map = self.missed.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert((namespace.to_owned(), vm.to_owned()), missed);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Counts and times one reconcile.
#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    started: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&[("controller", self.controller.into())])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Per-VM metrics, read from the cache at scrape time.
struct VmCollector {
    vms: Arc<OnceLock<Store<ProtectedVM>>>,
    missed: Arc<Mutex<HashMap<(String, String), u32>>>,
}

impl fmt::Debug for VmCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmCollector").finish_non_exhaustive()
    }
}

/// One per-VM series: name, help, type, and the value of a VM (none: no sample).
type Series = (
    &'static str,
    &'static str,
    MetricType,
    fn(&ProtectedVM, Option<u32>) -> Option<i64>,
);

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

const SERIES: [Series; 9] = [
    (
        "vm_rpo_seconds",
        "Age of the VM's latest durable recovery point",
        MetricType::Gauge,
        |vm, _| vm.status.as_ref().and_then(|s| s.rpo_seconds).map(clamp),
    ),
    (
        "vm_health",
        "The VM's health: 0 Normal, 1 Warning, 2 Critical",
        MetricType::Gauge,
        |vm, _| {
            vm.status.as_ref().map(|s| match s.health {
                Health::Normal => 0,
                Health::Warning => 1,
                Health::Critical => 2,
            })
        },
    ),
    (
        "vm_cycles_succeeded",
        "Replication cycles that succeeded, as the agent counts them",
        MetricType::Counter,
        |vm, _| agent(vm).map(|a| clamp(a.cycles.succeeded_total)),
    ),
    (
        "vm_cycles_failed",
        "Replication cycles that failed, as the agent counts them",
        MetricType::Counter,
        |vm, _| agent(vm).map(|a| clamp(a.cycles.failed_total)),
    ),
    (
        "vm_cycles_missed_last_hour",
        "Cycles due in the last hour that did not succeed",
        MetricType::Gauge,
        |_, missed| missed.map(i64::from),
    ),
    (
        "vm_bytes_shipped",
        "Bytes shipped to the replica store",
        MetricType::Counter,
        |vm, _| agent(vm).map(|a| clamp(a.cycles.bytes_shipped_total)),
    ),
    (
        "vm_pending_log_bytes",
        "Bytes of change logs awaiting shipment",
        MetricType::Gauge,
        |vm, _| vm.status.as_ref().map(|s| clamp(s.pending_log_bytes)),
    ),
    (
        "vm_resync_required",
        "1 while the VM needs a resynchronization",
        MetricType::Gauge,
        |vm, _| {
            vm.status.as_ref().map(|s| {
                i64::from(s.conditions.iter().any(|c| {
                    c.type_ == lifeboat_core::conditions::types::RESYNC_REQUIRED
                        && c.status == "True"
                }))
            })
        },
    ),
    (
        "vm_resynchronizing",
        "1 while a resynchronization runs",
        MetricType::Gauge,
        |vm, _| {
            vm.status
                .as_ref()
                .map(|s| i64::from(s.phase == ProtectionPhase::Resynchronizing))
        },
    ),
];

fn agent(vm: &ProtectedVM) -> Option<&lifeboat_api::AgentReport> {
    vm.status.as_ref().and_then(|s| s.agent.as_ref())
}

impl Collector for VmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(store) = self.vms.get() else {
            return Ok(());
        };
        let vms = store.state();
        let mut missed = self.missed.lock().unwrap_or_else(PoisonError::into_inner);
        // NB: forget deleted VMs here, where the cache says what exists.
        if missed.len() > vms.len() {
            let live: std::collections::HashSet<(String, String)> = vms
                .iter()
                .map(|vm| (vm.namespace().unwrap_or_default(), vm.name_any()))
                .collect();
            missed.retain(|key, _| live.contains(key));
        }
        for (name, help, metric_type, value) in SERIES {
            let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
            for vm in &vms {
                let key = (vm.namespace().unwrap_or_default(), vm.name_any());
                let Some(v) = value(vm, missed.get(&key).copied()) else {
                    continue;
                };
                let labels: Labels2 = [("namespace", key.0), ("vm", key.1)];
                let family = metric.encode_family(&labels)?;
                match metric_type {
                    MetricType::Counter => {
                        ConstCounter::new(u64::try_from(v).unwrap_or(0)).encode(family)?;
                    }
                    _ => ConstGauge::new(v).encode(family)?,
                }
            }
        }
        Ok(())
    }
}

impl lifeboat_http::MetricsText for Metrics {
    fn encode(&self) -> Result<String, fmt::Error> {
        Metrics::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_operator_metric() {
        let metrics = Metrics::new();
        {
            let _timer = metrics.reconcile("ProtectedVM");
        }
        metrics.reconcile_failed("ProtectedVM", "apply_status");
        metrics.status_written("ProtectedVM");
        metrics.job_created("EnableProtection");
        metrics.job_finished("EnableProtection", true, Some(Duration::from_secs(42)));
        metrics.set_leader(true);
        let text = metrics.encode().unwrap_or_default();
        for line in [
            "lifeboat_reconciles_total{controller=\"ProtectedVM\"} 1",
            "lifeboat_reconcile_errors_total{controller=\"ProtectedVM\",error=\"apply_status\"} 1",
            "lifeboat_status_writes_total{resource=\"ProtectedVM\"} 1",
            "lifeboat_jobs_created_total{type=\"EnableProtection\"} 1",
            "lifeboat_job_duration_seconds_count{type=\"EnableProtection\",outcome=\"Succeeded\"} 1",
            "lifeboat_leader 1",
            "lifeboat_reconcile_duration_seconds_count{controller=\"ProtectedVM\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(metrics.status_writes("ProtectedVM"), 1);
    }
}
