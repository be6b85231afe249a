//! Prometheus metrics (`prometheus-client`), served on `/metrics`.
//!
//! Two kinds: what the operator does (reconciles, errors, their durations, status writes,
//! jobs created, ended and how long they took, leadership), kept as counters and histograms;
//! and what each VM is (RPO, health, cycles, missed cycles, bytes replicated, pending logs,
//! resync state), read from the VM cache at scrape time by a collector, so that a deleted VM
//! leaves no stale series behind and nothing is kept twice.
//!
//! Names follow Prometheus' conventions: the unit before `_total`, a state as a label whose
//! series are 1 or 0 (never a numeric code), one spelling of `outcome` (`succeeded`,
//! `failed`) across the operator and the agent, and `lifeboat_build_info` on both.
//!
//! | metric | labels |
//! |---|---|
//! | `lifeboat_build_info` (1) | version, component="operator" |
//! | `lifeboat_reconciles_total`, `lifeboat_reconcile_duration_seconds` | controller |
//! | `lifeboat_reconcile_errors_total` | controller, error |
//! | `lifeboat_status_writes_total` | resource |
//! | `lifeboat_jobs_created_total` | type |
//! | `lifeboat_jobs_finished_total`, `lifeboat_job_duration_seconds` | type, outcome: succeeded, failed |
//! | `lifeboat_leader` | |
//! | `lifeboat_vm_rpo_seconds`, `lifeboat_vm_cycles_missed_total`, `lifeboat_vm_replicated_bytes_total`, `lifeboat_vm_pending_log_bytes`, `lifeboat_vm_resync_required`, `lifeboat_vm_resynchronizing` | namespace, vm |
//! | `lifeboat_vm_health` (1 for the VM's state, 0 for the others) | namespace, vm, state: Normal, Warning, Critical |
//! | `lifeboat_vm_health_reason` (1) | namespace, vm, reason (e.g. `AgentLost`, `RpoOverThreshold`) |
//! | `lifeboat_vm_cycles_total` | namespace, vm, outcome: succeeded, failed |
//! | `lifeboat_plan_drill_last_success`, `lifeboat_plan_drill_last_timestamp_seconds`, `lifeboat_plan_drill_recovery_seconds` (once a drill ran), `lifeboat_plan_drill_next_timestamp_seconds` | namespace, plan (a RecoveryPlan with `spec.drill`) |

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use lifeboat_api::{Health, ProtectedVM, ProtectionPhase, RecoveryPlan};
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

/// The `outcome` label of a job or cycle, spelt the same on every metric.
pub fn outcome(succeeded: bool) -> &'static str {
    if succeeded { "succeeded" } else { "failed" }
}

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

fn job_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 10))
}

/// The window of "cycles missed in the last hour".
const MISSED_WINDOW: Duration = Duration::from_secs(3600);

/// The missed cycles of one VM, counted from the operator's one-hour window.
#[derive(Debug, Default)]
struct Missed {
    /// Missed cycles counted since this replica started.
    total: u64,
    /// When each missed cycle still in the window was counted.
    recent: VecDeque<Instant>,
}

impl Missed {
    /// The window holds `in_window` missed cycles at `now`: those the recent record does not
    /// account for are new. NB: a cycle is counted when a reconcile first sees it missed, and
    /// a cycle that is late but then succeeds may be counted; the count never goes down.
    fn observe(&mut self, in_window: u32, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= MISSED_WINDOW)
        {
            self.recent.pop_front();
        }
        let known = self.recent.len();
        let in_window = usize::try_from(in_window).unwrap_or(usize::MAX);
        for _ in known..in_window {
            self.recent.push_back(now);
            self.total += 1;
        }
    }
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels1, Counter>,
    reconcile_errors: Family<Labels2, Counter>,
    reconcile_duration: Family<Labels1, Histogram, HistogramMaker>,
    status_writes: Family<Labels1, Counter>,
    jobs_created: Family<Labels1, Counter>,
    jobs_finished: Family<Labels2, Counter>,
    job_duration: Family<Labels2, Histogram, HistogramMaker>,
    leader: Gauge,
    missed: Arc<Mutex<HashMap<(String, String), Missed>>>,
    vms: Arc<OnceLock<Store<ProtectedVM>>>,
    plans: Arc<OnceLock<Store<RecoveryPlan>>>,
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
        let jobs_finished = Family::<Labels2, Counter>::default();
        // NB: a counter's series appear at 0, so that increase() sees the first failure.
        for kind in lifeboat_core::JobKind::ALL {
            for succeeded in [true, false] {
                let _ = jobs_finished.get_or_create(&[
                    ("type", kind.as_str().into()),
                    ("outcome", outcome(succeeded).into()),
                ]);
            }
        }
        let job_duration: Family<Labels2, Histogram, HistogramMaker> =
            Family::new_with_constructor(job_histogram);
        let leader = Gauge::default();
        let build_info = Family::<Labels2, Gauge>::default();
        build_info
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION").into()),
                ("component", "operator".into()),
            ])
            .set(1);
        registry.register(
            "build_info",
            "1, labelled with the version of the running operator",
            build_info,
        );
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
            "jobs_finished",
            "ReplicationJobs that ended, by type and outcome (succeeded, failed)",
            jobs_finished.clone(),
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
        let plans = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(PlanCollector {
            plans: Arc::clone(&plans),
        }));
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
            jobs_finished,
            job_duration,
            leader,
            missed,
            vms,
            plans,
        }
    }

    /// Read per-VM metrics from this cache from now on.
    pub fn watch_vms(&self, store: Store<ProtectedVM>) {
        let _ = self.vms.set(store);
    }

    /// Read the per-plan drill series from this cache (the plan controller's).
    pub fn watch_plans(&self, store: Store<RecoveryPlan>) {
        let _ = self.plans.set(store);
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

    /// A job ended: counted, and timed when it ran.
    pub fn job_finished(
        &self,
        job_type: &'static str,
        succeeded: bool,
        duration: Option<Duration>,
    ) {
        let labels = [
            ("type", job_type.into()),
            ("outcome", outcome(succeeded).into()),
        ];
        self.jobs_finished.get_or_create(&labels).inc();
        if let Some(duration) = duration {
            self.job_duration
                .get_or_create(&labels)
                .observe(duration.as_secs_f64());
        }
    }

    /// Whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The cycles a VM missed in the last hour, as the last reconcile decided: those not yet
    /// counted are added to `lifeboat_vm_cycles_missed_total`.
    pub fn set_cycles_missed(&self, namespace: &str, vm: &str, missed_last_hour: u32) {
        self.cycles_missed_at(namespace, vm, missed_last_hour, Instant::now());
    }

    fn cycles_missed_at(&self, namespace: &str, vm: &str, missed_last_hour: u32, now: Instant) {
        let mut map = self.missed.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry((namespace.to_owned(), vm.to_owned()))
            .or_default()
            .observe(missed_last_hour, now);
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
    missed: Arc<Mutex<HashMap<(String, String), Missed>>>,
}

impl fmt::Debug for VmCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmCollector").finish_non_exhaustive()
    }
}

/// Samples of one VM: the labels besides namespace and vm, and the value.
type Samples = Vec<(Option<(&'static str, String)>, i64)>;

/// One per-VM series: name, help, type, and the samples of a VM given its missed cycles
/// (none: no sample).
type Series = (
    &'static str,
    &'static str,
    MetricType,
    fn(&ProtectedVM, Option<u64>) -> Samples,
);

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One sample without further labels, if there is a value.
fn one(value: Option<i64>) -> Samples {
    value.map(|v| (None, v)).into_iter().collect()
}

const HEALTH_STATES: [(Health, &str); 3] = [
    (Health::Normal, "Normal"),
    (Health::Warning, "Warning"),
    (Health::Critical, "Critical"),
];

const SERIES: [Series; 9] = [
    (
        "vm_rpo_seconds",
        "Age of the VM's latest durable recovery point",
        MetricType::Gauge,
        |vm, _| one(vm.status.as_ref().and_then(|s| s.rpo_seconds).map(clamp)),
    ),
    (
        "vm_health",
        "The VM's health: 1 for its state (Normal, Warning, Critical), 0 for the others",
        MetricType::Gauge,
        |vm, _| {
            vm.status.as_ref().map_or_else(Vec::new, |s| {
                HEALTH_STATES
                    .iter()
                    .map(|(h, name)| {
                        (
                            Some(("state", (*name).to_owned())),
                            i64::from(s.health == *h),
                        )
                    })
                    .collect()
            })
        },
    ),
    (
        "vm_health_reason",
        "1, labelled with the reason of the VM's health (Healthy, AgentLost, RpoOverThreshold, ...)",
        MetricType::Gauge,
        |vm, _| {
            vm.status
                .as_ref()
                .and_then(|s| s.health_reason.clone())
                .filter(|r| !r.is_empty())
                .map(|r| (Some(("reason", r)), 1))
                .into_iter()
                .collect()
        },
    ),
    (
        "vm_cycles",
        "Replication cycles that ended, by outcome (succeeded, failed), as the agent counts them",
        MetricType::Counter,
        |vm, _| {
            agent(vm).map_or_else(Vec::new, |a| {
                vec![
                    (
                        Some(("outcome", outcome(true).to_owned())),
                        clamp(a.cycles.succeeded_total),
                    ),
                    (
                        Some(("outcome", outcome(false).to_owned())),
                        clamp(a.cycles.failed_total),
                    ),
                ]
            })
        },
    ),
    (
        "vm_cycles_missed",
        "Cycles that were due and did not succeed (failed or never ran), counted by this replica",
        MetricType::Counter,
        |_, missed| one(missed.map(clamp)),
    ),
    (
        "vm_replicated_bytes",
        "Bytes shipped to the replica store",
        MetricType::Counter,
        |vm, _| one(agent(vm).map(|a| clamp(a.cycles.bytes_shipped_total))),
    ),
    (
        "vm_pending_log_bytes",
        "Bytes of change logs awaiting shipment",
        MetricType::Gauge,
        |vm, _| one(vm.status.as_ref().map(|s| clamp(s.pending_log_bytes))),
    ),
    (
        "vm_resync_required",
        "1 while the VM needs a resynchronization",
        MetricType::Gauge,
        |vm, _| {
            one(vm.status.as_ref().map(|s| {
                i64::from(s.conditions.iter().any(|c| {
                    c.type_ == lifeboat_core::conditions::types::RESYNC_REQUIRED
                        && c.status == "True"
                }))
            }))
        },
    ),
    (
        "vm_resynchronizing",
        "1 while a resynchronization runs",
        MetricType::Gauge,
        |vm, _| {
            one(vm
                .status
                .as_ref()
                .map(|s| i64::from(s.phase == ProtectionPhase::Resynchronizing)))
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
        for (name, help, metric_type, samples) in SERIES {
            let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
            for vm in &vms {
                let key = (vm.namespace().unwrap_or_default(), vm.name_any());
                let vm_missed = missed.get(&key).map(|m| m.total);
                for (extra, v) in samples(vm, vm_missed) {
                    let mut labels = vec![("namespace", key.0.clone()), ("vm", key.1.clone())];
                    labels.extend(extra);
                    let family = metric.encode_family(&labels)?;
                    match metric_type {
                        MetricType::Counter => {
                            ConstCounter::new(u64::try_from(v).unwrap_or(0)).encode(family)?;
                        }
                        _ => ConstGauge::new(v).encode(family)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// Per-plan drill metrics, read from the plan cache at scrape time.
struct PlanCollector {
    plans: Arc<OnceLock<Store<RecoveryPlan>>>,
}

impl fmt::Debug for PlanCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlanCollector").finish_non_exhaustive()
    }
}

/// One per-plan series: name, help, and the value of a drilled plan (none: no sample).
type PlanSeries = (&'static str, &'static str, fn(&RecoveryPlan) -> Option<f64>);

fn unix_seconds(time: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> f64 {
    time.0.as_millisecond() as f64 / 1000.0
}

fn last_drill(plan: &RecoveryPlan) -> Option<&lifeboat_api::plan::DrillStatus> {
    plan.status.as_ref()?.last_drill.as_ref()
}

const PLAN_SERIES: [PlanSeries; 4] = [
    (
        "plan_drill_last_success",
        "1 when the plan's last drill recovered, verified and cleaned up every VM, else 0",
        |p| last_drill(p).map(|d| f64::from(u8::from(d.succeeded))),
    ),
    (
        "plan_drill_last_timestamp_seconds",
        "When the plan's last drill started (Unix seconds)",
        |p| last_drill(p).map(|d| unix_seconds(&d.start_time)),
    ),
    (
        "plan_drill_recovery_seconds",
        "The recovery time the plan's last successful drill measured",
        |p| last_drill(p).and_then(|d| d.recovery_time_seconds),
    ),
    (
        "plan_drill_next_timestamp_seconds",
        "When the plan's next drill is due (Unix seconds)",
        |p| {
            let created = p.metadata.creation_timestamp.as_ref()?;
            let created = lifeboat_control::mapping::system_time(created);
            let due = lifeboat_control::plan::next_drill(&p.spec, p.status.as_ref(), created)?;
            Some(
                due.duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            )
        },
    ),
];

impl Collector for PlanCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(store) = self.plans.get() else {
            return Ok(());
        };
        let plans = store.state();
        for (name, help, value) in PLAN_SERIES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for plan in plans.iter().filter(|p| p.spec.drill.is_some()) {
                if let Some(v) = value(plan) {
                    let labels = [
                        ("namespace", plan.namespace().unwrap_or_default()),
                        ("plan", plan.name_any()),
                    ];
                    ConstGauge::new(v).encode(metric.encode_family(&labels)?)?;
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
    use kube::runtime::watcher::Event;

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
        metrics.job_finished("Resynchronize", false, None);
        metrics.set_leader(true);
        let text = metrics.encode().unwrap_or_default();
        for line in [
            concat!(
                "lifeboat_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\",component=\"operator\"} 1"
            ),
            "lifeboat_reconciles_total{controller=\"ProtectedVM\"} 1",
            "lifeboat_reconcile_errors_total{controller=\"ProtectedVM\",error=\"apply_status\"} 1",
            "lifeboat_status_writes_total{resource=\"ProtectedVM\"} 1",
            "lifeboat_jobs_created_total{type=\"EnableProtection\"} 1",
            "lifeboat_jobs_finished_total{type=\"EnableProtection\",outcome=\"succeeded\"} 1",
            "lifeboat_jobs_finished_total{type=\"Resynchronize\",outcome=\"failed\"} 1",
            "lifeboat_job_duration_seconds_count{type=\"EnableProtection\",outcome=\"succeeded\"} 1",
            "lifeboat_leader 1",
            "lifeboat_reconcile_duration_seconds_count{controller=\"ProtectedVM\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A job that never ran is counted, not timed.
        assert!(
            !text.contains("lifeboat_job_duration_seconds_count{type=\"Resynchronize\""),
            "{text}"
        );
        assert_eq!(metrics.status_writes("ProtectedVM"), 1);
    }

    #[test]
    fn a_drilled_plan_exports_its_last_and_next_drill() {
        let metrics = Metrics::new();
        let (store, mut writer) = kube::runtime::reflector::store::<RecoveryPlan>();
        let plan = |name: &str, drill: bool| -> RecoveryPlan {
            let mut spec = serde_json::json!({"groups": [{"name": "db", "vms": ["db-01"]}]});
            if drill {
                spec["drill"] = serde_json::json!({"intervalHours": 24});
            }
            serde_json::from_value(serde_json::json!({
                "apiVersion": "lifeboat.io/v1alpha1", "kind": "RecoveryPlan",
                "metadata": {"name": name, "namespace": "prod",
                             "creationTimestamp": "2026-12-01T00:00:00Z"},
                "spec": spec,
                "status": {"lastDrill": {"startTime": "2026-12-02T00:00:00Z", "succeeded": false,
                                         "message": "verify: ProtectedVM db-01: not verified"},
                           "nextDrillTime": "2026-12-03T00:00:00Z"}
            }))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        writer.apply_watcher_event(&Event::Apply(plan("three-tier", true)));
        writer.apply_watcher_event(&Event::Apply(plan("undrilled", false)));
        metrics.watch_plans(store);
        let text = metrics.encode().unwrap_or_default();
        for line in [
            "lifeboat_plan_drill_last_success{namespace=\"prod\",plan=\"three-tier\"} 0",
            "lifeboat_plan_drill_last_timestamp_seconds{namespace=\"prod\",plan=\"three-tier\"} 1796169600",
            "lifeboat_plan_drill_next_timestamp_seconds{namespace=\"prod\",plan=\"three-tier\"} 1796256000",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("undrilled"), "{text}");
        assert!(
            !text.contains("lifeboat_plan_drill_recovery_seconds{"),
            "{text}"
        );
    }

    #[test]
    fn per_vm_series_carry_states_and_outcomes_as_labels() {
        let metrics = Metrics::new();
        let (store, mut writer) = kube::runtime::reflector::store::<ProtectedVM>();
        let vm: ProtectedVM = serde_json::from_value(serde_json::json!({
            "apiVersion": "lifeboat.io/v1alpha1",
            "kind": "ProtectedVM",
            "metadata": {"name": "web", "namespace": "prod"},
            "spec": {
                "vmName": "web", "nodeName": "node-1",
                "hypervisor": {"qemu": {"qmpSocket": "/run/web.qmp"}},
                "disks": [{"name": "os", "path": "/vm/web.qcow2", "blockNode": "os0"}],
                "policyRef": {"name": "gold"}
            },
            "status": {
                "phase": "Protected", "health": "Warning", "healthReason": "CyclesMissed",
                "rpoSeconds": 90,
                "agent": {"cycles": {"succeededTotal": 7, "failedTotal": 3, "bytesShippedTotal": 4096}}
            }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        writer.apply_watcher_event(&Event::Apply(vm));
        metrics.watch_vms(store);
        metrics.set_cycles_missed("prod", "web", 2);
        let text = metrics.encode().unwrap_or_default();
        for line in [
            "lifeboat_vm_health{namespace=\"prod\",vm=\"web\",state=\"Normal\"} 0",
            "lifeboat_vm_health{namespace=\"prod\",vm=\"web\",state=\"Warning\"} 1",
            "lifeboat_vm_health{namespace=\"prod\",vm=\"web\",state=\"Critical\"} 0",
            "lifeboat_vm_health_reason{namespace=\"prod\",vm=\"web\",reason=\"CyclesMissed\"} 1",
            "lifeboat_vm_cycles_total{namespace=\"prod\",vm=\"web\",outcome=\"succeeded\"} 7",
            "lifeboat_vm_cycles_total{namespace=\"prod\",vm=\"web\",outcome=\"failed\"} 3",
            "lifeboat_vm_cycles_missed_total{namespace=\"prod\",vm=\"web\"} 2",
            "lifeboat_vm_replicated_bytes_total{namespace=\"prod\",vm=\"web\"} 4096",
            "lifeboat_vm_rpo_seconds{namespace=\"prod\",vm=\"web\"} 90",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn missed_cycles_are_counted_once_as_they_enter_the_hour() {
        let metrics = Metrics::new();
        let t0 = Instant::now();
        let at = |minutes: u64| t0 + Duration::from_secs(minutes * 60);
        let total = || {
            metrics
                .missed
                .lock()
                .map(|m| {
                    m.get(&("ns".to_owned(), "vm".to_owned()))
                        .map_or(0, |m| m.total)
                })
                .unwrap_or(0)
        };
        metrics.cycles_missed_at("ns", "vm", 0, at(0));
        assert_eq!(total(), 0);
        // A VM failing every 5-minute cycle: the window fills to 12 in an hour...
        for n in 1..=12 {
            metrics.cycles_missed_at("ns", "vm", n, at(5 * u64::from(n)));
        }
        assert_eq!(total(), 12);
        // ...then stays at 12 as old misses leave and new ones enter: still counted.
        for n in 13..=24u32 {
            metrics.cycles_missed_at("ns", "vm", 12, at(5 * u64::from(n)));
        }
        assert_eq!(total(), 24);
        // Looking again without news counts nothing; recovery never lowers the count.
        metrics.cycles_missed_at("ns", "vm", 12, at(120));
        metrics.cycles_missed_at("ns", "vm", 0, at(200));
        assert_eq!(total(), 24);
    }
}
