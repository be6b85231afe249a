//! The agent's HTTP endpoint: `/healthz` (the process answers), `/readyz` (its caches are in
//! sync) and `/metrics` (Prometheus text), served by the operator's endpoint code.
//!
//! Names follow the operator's conventions (the unit before `_total`, one spelling of
//! `outcome`: `succeeded`, `failed`, ...).
//!
//! | metric | labels |
//! |---|---|
//! | `lifeboat_build_info` (1) | version, component="agent" |
//! | `lifeboat_agent_vms` | |
//! | `lifeboat_agent_claims_total` | outcome: won, lost, error |
//! | `lifeboat_agent_jobs_total` | type, outcome: succeeded, failed, abandoned, withdrawn |
//! | `lifeboat_agent_cycles_total` | outcome: succeeded, failed, resync_required |
//! | `lifeboat_agent_reports_total` | outcome: applied, unchanged, failed |
//! | `lifeboat_agent_heartbeats_total` | outcome: renewed, failed |
//! | `lifeboat_agent_api_errors_total` | action |

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

type Labels1 = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    vms: Gauge,
    claims: Family<Labels1, Counter>,
    jobs: Family<Labels2, Counter>,
    cycles: Family<Labels1, Counter>,
    reports: Family<Labels1, Counter>,
    heartbeats: Family<Labels1, Counter>,
    api_errors: Family<Labels1, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
        let mut root = Registry::default();
        let build_info = Family::<Labels2, Gauge>::default();
        build_info
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION").into()),
                ("component", "agent".into()),
            ])
            .set(1);
        root.register(
            "lifeboat_build_info",
            "1, labelled with the version of the running agent",
            build_info,
        );
        let registry = root.sub_registry_with_prefix("lifeboat_agent");
        let metrics = Self {
            vms: Gauge::default(),
            claims: Family::default(),
            jobs: Family::default(),
            cycles: Family::default(),
            reports: Family::default(),
            heartbeats: Family::default(),
            api_errors: Family::default(),
            registry: Registry::default(),
        };
        registry.register("vms", "Protected VMs this agent runs", metrics.vms.clone());
        registry.register("claims", "Job claims", metrics.claims.clone());
        registry.register("jobs", "Jobs run to an end", metrics.jobs.clone());
        registry.register("cycles", "Delta replication cycles", metrics.cycles.clone());
        registry.register(
            "reports",
            "status.agent reports considered",
            metrics.reports.clone(),
        );
        registry.register(
            "heartbeats",
            "Heartbeat Lease renewals",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "api_errors",
            "Kubernetes API calls that failed",
            metrics.api_errors.clone(),
        );
        Self {
            registry: root,
            ..metrics
        }
    }

    /// The number of VMs the agent runs.
    pub fn set_vms(&self, count: usize) {
        self.vms.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A claim ended with `outcome`.
    pub fn claim(&self, outcome: &'static str) {
        self.claims
            .get_or_create(&[("outcome", outcome.into())])
            .inc();
    }

    /// A job of `job_type` ended with `outcome`.
    pub fn job(&self, job_type: &str, outcome: &'static str) {
        self.jobs
            .get_or_create(&[("type", job_type.into()), ("outcome", outcome.into())])
            .inc();
    }

    /// A cycle ended with `outcome`.
    pub fn cycle(&self, outcome: &'static str) {
        self.cycles
            .get_or_create(&[("outcome", outcome.into())])
            .inc();
    }

    /// A report was applied, skipped as unchanged, or failed.
    pub fn report(&self, outcome: &'static str) {
        self.reports
            .get_or_create(&[("outcome", outcome.into())])
            .inc();
    }

    /// A heartbeat was renewed or failed.
    pub fn heartbeat(&self, outcome: &'static str) {
        self.heartbeats
            .get_or_create(&[("outcome", outcome.into())])
            .inc();
    }

    /// An API call of `action` failed.
    pub fn api_error(&self, action: &'static str) {
        self.api_errors
            .get_or_create(&[("action", action.into())])
            .inc();
    }

    /// The metrics as Prometheus text.
    ///
    /// # Errors
    ///
    /// Formatting failed.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl lifeboat_http::MetricsText for Metrics {
    fn encode(&self) -> Result<String, std::fmt::Error> {
        Metrics::encode(self)
    }
}

/// Serve the agent's endpoint on `listener` until the task is dropped (the operator's server,
/// with the agent's metrics).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    lifeboat_http::serve(listener, metrics, ready).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    // NB: the endpoint itself (routes, readiness) is the operator's and tested there; what is
    // the agent's own is its metrics.
    #[test]
    fn the_agents_metrics_in_prometheus_text() {
        let metrics = Metrics::new();
        metrics.claim("won");
        metrics.set_vms(3);
        let text = lifeboat_http::MetricsText::encode(&metrics).unwrap_or_default();
        assert!(
            text.contains("lifeboat_agent_claims_total{outcome=\"won\"} 1"),
            "{text}"
        );
        assert!(text.contains("lifeboat_agent_vms 3"), "{text}");
        assert!(
            text.contains(concat!(
                "lifeboat_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\",component=\"agent\"} 1"
            )),
            "{text}"
        );
    }
}
