//! The engine's facts as `status.agent`: what happened, never a decision.

use std::time::{Duration, SystemTime};

use lifeboat_api::ProtectedVM;
use lifeboat_api::job::ResyncReason;
use lifeboat_api::protected_vm::{
    AgentReport, Consistency, CycleStatistics, DiskProgress, RecoveryPointRef,
    RecoveryPointsSummary, TrackingLost,
};
use lifeboat_control::mapping::{api_time, error_status};
use lifeboat_engine::worker::{PointFact, VmFacts};

fn point_ref(point: &PointFact) -> RecoveryPointRef {
    RecoveryPointRef {
        name: point.id.clone(),
        time: api_time(point.time),
        consistency: if point.app_consistent {
            Consistency::AppConsistent
        } else {
            Consistency::CrashConsistent
        },
    }
}

/// Why the engine wants a resync, in the API's words (the engine's reasons start with one).
fn resync_reason(reason: &str) -> ResyncReason {
    if reason.starts_with("CorruptLog") {
        ResyncReason::CorruptLog
    } else if reason.starts_with("LogThresholdReached") {
        ResyncReason::LogThresholdReached
    } else if reason.starts_with("Requested") {
        ResyncReason::Requested
    } else {
        ResyncReason::TrackingLost
    }
}

/// The report of `facts` at `now`, for a VM replicating with policy generation
/// `policy_generation`.
pub fn agent_report(
    facts: &VmFacts,
    policy_generation: Option<i64>,
    now: SystemTime,
) -> AgentReport {
    AgentReport {
        report_time: Some(api_time(now)),
        policy_generation,
        last_cycle_start_time: facts.last_cycle_start.map(api_time),
        last_successful_cycle_time: facts.last_successful_cycle.map(api_time),
        last_cycle_duration_seconds: facts.last_cycle_duration.map(|d| d.as_secs_f64()),
        cycles: CycleStatistics {
            succeeded_last_hour: facts.succeeded_last_hour,
            failed_last_hour: facts.failed_last_hour,
            succeeded_total: facts.succeeded_total,
            failed_total: facts.failed_total,
            bytes_shipped_total: facts.bytes_shipped_total,
        },
        pending_log_bytes: facts.pending_log_bytes,
        disks: facts
            .disks
            .iter()
            .map(|d| DiskProgress {
                name: d.name.clone(),
                bytes_done: d.bytes_done,
                bytes_total: d.bytes_total,
                throughput_bytes_per_second: d.throughput_bytes_per_second,
                size_bytes: d.size_bytes,
                pending_log_bytes: d.pending_log_bytes,
                format: d.format.clone(),
                tracking_survives_restart: d.tracking_survives_restart,
                tracking_note: d.tracking_note.clone(),
            })
            .collect(),
        recovery_points: RecoveryPointsSummary {
            latest: facts.latest_point.as_ref().map(point_ref),
            latest_app_consistent: facts.latest_app_consistent_point.as_ref().map(point_ref),
            oldest: facts.oldest_point.as_ref().map(point_ref),
            count: facts.point_count,
        },
        last_error: facts.last_error.as_ref().map(error_status),
        tracking_lost: facts
            .resync_required
            .as_ref()
            .map(|(reason, since)| TrackingLost {
                reason: resync_reason(reason),
                time: api_time(*since),
                message: Some(reason.clone()),
            }),
    }
}

/// The namespace and name of a VM.
pub fn vm_id(vm: &ProtectedVM) -> (String, String) {
    (
        vm.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        vm.metadata.name.clone().unwrap_or_default(),
    )
}

/// The report of an error that just happened.
pub fn error_report_now(
    error: &lifeboat_engine::EngineError,
    now: SystemTime,
) -> lifeboat_core::ErrorReport {
    lifeboat_engine::worker::error_report(error, 0, None, now)
}

/// Whether two reports say the same but for their time.
pub fn same_but_time(old: &AgentReport, new: &AgentReport) -> bool {
    let mut same = old.clone();
    same.report_time.clone_from(&new.report_time);
    &same == new
}

/// When a VM's report is worth writing: only when it says something new, or as a sign of life
/// once per `sign_of_life` (the copy interval), so that thousands of VMs do not write a
/// report that only changed its time.
#[derive(Clone, Debug, Default)]
pub struct ReportGate {
    last: Option<(AgentReport, SystemTime)>,
}

impl ReportGate {
    /// A gate that has seen `last` written at `at` (e.g. the report found in the VM's
    /// status when the agent starts).
    pub fn after(last: Option<(AgentReport, SystemTime)>) -> Self {
        Self { last }
    }

    /// Whether `report` should be written at `now`.
    pub fn should_write(
        &self,
        report: &AgentReport,
        now: SystemTime,
        sign_of_life: Duration,
    ) -> bool {
        match &self.last {
            None => true,
            Some((old, at)) => {
                !same_but_time(old, report)
                    || now.duration_since(*at).unwrap_or_default() >= sign_of_life
            }
        }
    }

    /// Whether a sign of life is due at `now` (nothing written for `sign_of_life`).
    pub fn sign_of_life_due(&self, now: SystemTime, sign_of_life: Duration) -> bool {
        self.last
            .as_ref()
            .is_none_or(|(_, at)| now.duration_since(*at).unwrap_or_default() >= sign_of_life)
    }

    /// Note that `report` was written at `now`.
    pub fn written(&mut self, report: AgentReport, now: SystemTime) {
        self.last = Some((report, now));
    }
}

#[cfg(test)]
mod tests {
    use lifeboat_engine::worker::DiskFact;

    use super::*;

    #[test]
    fn a_raw_disks_format_and_in_memory_tracking_reach_status_agent_disks() {
        let facts = VmFacts {
            disks: vec![
                DiskFact {
                    name: "root".into(),
                    size_bytes: 1 << 30,
                    format: Some("raw".into()),
                    tracking_survives_restart: Some(false),
                    tracking_note: Some("a raw disk cannot store a dirty bitmap".into()),
                    ..DiskFact::default()
                },
                DiskFact {
                    name: "data".into(),
                    format: Some("qcow2".into()),
                    tracking_survives_restart: Some(true),
                    ..DiskFact::default()
                },
            ],
            ..VmFacts::default()
        };
        let report = agent_report(&facts, Some(1), SystemTime::UNIX_EPOCH);
        let root = &report.disks[0];
        assert_eq!(root.name, "root");
        assert_eq!(root.size_bytes, 1 << 30);
        assert_eq!(root.format.as_deref(), Some("raw"));
        assert_eq!(root.tracking_survives_restart, Some(false));
        assert_eq!(
            root.tracking_note.as_deref(),
            Some("a raw disk cannot store a dirty bitmap")
        );
        let json = serde_json::to_value(&report).expect("a report serializes");
        assert_eq!(json["disks"][0]["format"], "raw");
        assert_eq!(json["disks"][0]["trackingSurvivesRestart"], false);
        assert_eq!(
            json["disks"][0]["trackingNote"],
            "a raw disk cannot store a dirty bitmap"
        );
        assert_eq!(json["disks"][1]["format"], "qcow2");
        assert_eq!(json["disks"][1]["trackingSurvivesRestart"], true);
        assert!(json["disks"][1].get("trackingNote").is_none());
    }

    #[test]
    fn only_news_or_a_sign_of_life_is_written() {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let interval = Duration::from_secs(300);
        let report = |time, shipped| AgentReport {
            report_time: Some(api_time(at(time))),
            cycles: CycleStatistics {
                bytes_shipped_total: shipped,
                ..CycleStatistics::default()
            },
            ..AgentReport::default()
        };
        let mut gate = ReportGate::default();
        assert!(gate.should_write(&report(0, 1), at(0), interval));
        gate.written(report(0, 1), at(0));
        assert!(!gate.should_write(&report(30, 1), at(30), interval));
        assert!(gate.should_write(&report(30, 2), at(30), interval));
        assert!(!gate.sign_of_life_due(at(299), interval));
        assert!(gate.sign_of_life_due(at(300), interval));
        assert!(gate.should_write(&report(300, 1), at(300), interval));
    }
}
