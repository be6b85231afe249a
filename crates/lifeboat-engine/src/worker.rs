//! One protected VM on this node: the engine, the cycle schedule with ASR's retry backoff, the
//! cycle history of the last hour, and the facts the agent reports (what happened, never a
//! decision: health, phase and conditions are the operator's).
//!
//! ```text
//!  tick(now) ──due?──> run_cycle ──ok──> next = now + interval
//!                          └──error──> next = next_retry(class, failures, now, interval)
//!  facts(now) ──> last cycles, pending logs, per-disk progress, points, last error
//! ```
//!
//! Delta replication is not a job per cycle: the worker runs it by itself once the VM is
//! protected, and the operator learns of it from the facts.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lifeboat_core::{ErrorClass, ErrorReport, RetryDecision, next_retry};
use lifeboat_store::{Consistency, RecoveryPoint};

use crate::error::EngineError;
use crate::replicator::{Progress, Replicator, Report};
use crate::state::{DiskRecord, EnginePhase};

/// How far back "the last hour" of cycle statistics reaches.
const HISTORY: Duration = Duration::from_secs(3600);

/// A recovery point as the facts show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointFact {
    /// Its id.
    pub id: String,
    /// The instant it captures.
    pub time: SystemTime,
    /// Crash- or app-consistent.
    pub app_consistent: bool,
}

/// One disk's facts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskFact {
    /// The disk.
    pub name: String,
    /// Its size, as the replica has it.
    pub size_bytes: u64,
    /// Its sealed logs not yet shipped.
    pub pending_log_bytes: u64,
    /// Copy progress of the running operation, if any.
    pub bytes_done: u64,
    /// Bytes that operation goes through.
    pub bytes_total: u64,
    /// Its throughput.
    pub throughput_bytes_per_second: u64,
    /// Its image format, as the hypervisor named it at enable (None: not enabled yet).
    pub format: Option<String>,
    /// Whether its change tracking survives a clean restart of the hypervisor (None: not
    /// enabled yet).
    pub tracking_survives_restart: Option<bool>,
    /// Why its tracking does not survive a restart, and what would make it, when it does not.
    pub tracking_note: Option<String>,
}

/// What the agent reports about a VM.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmFacts {
    /// When the last cycle started.
    pub last_cycle_start: Option<SystemTime>,
    /// When the last successful cycle ended.
    pub last_successful_cycle: Option<SystemTime>,
    /// How long the last cycle took.
    pub last_cycle_duration: Option<Duration>,
    /// Cycles that succeeded in the last hour.
    pub succeeded_last_hour: u32,
    /// Cycles that failed in the last hour.
    pub failed_last_hour: u32,
    /// Since the worker started.
    pub succeeded_total: u64,
    /// Since the worker started.
    pub failed_total: u64,
    /// Bytes shipped since the worker started.
    pub bytes_shipped_total: u64,
    /// Sealed logs not yet shipped, all disks.
    pub pending_log_bytes: u64,
    /// Per disk.
    pub disks: Vec<DiskFact>,
    /// The newest point.
    pub latest_point: Option<PointFact>,
    /// The newest app-consistent point.
    pub latest_app_consistent_point: Option<PointFact>,
    /// The oldest point kept.
    pub oldest_point: Option<PointFact>,
    /// How many points are kept.
    pub point_count: u32,
    /// The last cycle error, until a cycle succeeds.
    pub last_error: Option<ErrorReport>,
    /// Set when only a resync can continue: why, and since when.
    pub resync_required: Option<(String, SystemTime)>,
    /// When the next cycle is due.
    pub next_cycle: Option<SystemTime>,
}

/// The error report of an agent error.
pub fn error_report(
    error: &EngineError,
    retry_count: u32,
    next_retry_time: Option<SystemTime>,
    first_seen: SystemTime,
) -> ErrorReport {
    ErrorReport {
        class: if error.is_recoverable() {
            ErrorClass::Recoverable
        } else {
            ErrorClass::NonRecoverable
        },
        reason: error.reason().to_owned(),
        message: error.to_string(),
        retry_count,
        next_retry_time,
        first_seen_time: Some(first_seen),
    }
}

/// Note what the hypervisor said of each disk at enable (its format, whether its tracking
/// survives a restart) in the disks' facts.
fn note_records(disks: &mut BTreeMap<String, DiskFact>, records: &[DiskRecord]) {
    for record in records {
        let fact = disks
            .entry(record.name.clone())
            .or_insert_with(|| DiskFact {
                name: record.name.clone(),
                ..DiskFact::default()
            });
        fact.format = Some(record.format.clone());
        fact.tracking_survives_restart = Some(record.tracking_survives_restart);
        fact.tracking_note.clone_from(&record.tracking_note);
    }
}

fn point_fact(point: &RecoveryPoint) -> PointFact {
    PointFact {
        id: point.id.clone(),
        time: SystemTime::UNIX_EPOCH + Duration::from_millis(point.time_unix_ms),
        app_consistent: point.consistency == Consistency::AppConsistent,
    }
}

/// One protected VM on this node.
#[derive(Debug)]
pub struct Worker {
    engine: Replicator,
    cycles: VecDeque<(SystemTime, bool)>,
    succeeded_total: u64,
    failed_total: u64,
    bytes_shipped_total: u64,
    last_cycle_start: Option<SystemTime>,
    last_successful_cycle: Option<SystemTime>,
    last_cycle_duration: Option<Duration>,
    next_cycle: Option<SystemTime>,
    failures: u32,
    last_error: Option<ErrorReport>,
    resync_since: Option<SystemTime>,
    progress: Arc<Mutex<BTreeMap<String, Progress>>>,
}

impl Worker {
    /// A worker around an opened engine.
    pub fn new(engine: Replicator) -> Worker {
        Worker {
            engine,
            cycles: VecDeque::new(),
            succeeded_total: 0,
            failed_total: 0,
            bytes_shipped_total: 0,
            last_cycle_start: None,
            last_successful_cycle: None,
            last_cycle_duration: None,
            next_cycle: None,
            failures: 0,
            last_error: None,
            resync_since: None,
            progress: Arc::default(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Replicator {
        &self.engine
    }

    /// The engine, to run jobs or change settings.
    pub fn engine_mut(&mut self) -> &mut Replicator {
        &mut self.engine
    }

    /// A progress sink that keeps the latest progress of each disk for the facts.
    pub fn progress_recorder(&self) -> impl Fn(&Progress) + Send + Sync + 'static {
        let progress = self.progress.clone();
        move |p: &Progress| {
            progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p.disk.clone(), p.clone());
        }
    }

    /// Forget the progress of the operation that ended.
    pub fn clear_progress(&self) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether the engine replicates by cycles now.
    pub fn replicating(&self) -> bool {
        self.engine.state().phase == EnginePhase::Protected
    }

    /// When the next cycle is due (None: not replicating, or stopped on a non-recoverable
    /// error until [`Worker::retry_now`]).
    pub fn next_cycle(&self) -> Option<SystemTime> {
        self.next_cycle
    }

    /// Try again at once (an operator asked, or the resource changed).
    pub fn retry_now(&mut self, now: SystemTime) {
        self.next_cycle = Some(now);
    }

    /// Run a cycle if one is due at `now`. Returns the cycle's outcome when one ran.
    pub async fn tick(&mut self, now: SystemTime) -> Option<Result<Report, EngineError>> {
        if !self.replicating() {
            self.next_cycle = None;
            return None;
        }
        let interval = self.engine.settings().copy_interval;
        match self.next_cycle {
            None if self.last_error.is_none() => {
                self.next_cycle = Some(now);
            }
            _ => {}
        }
        let due = self.next_cycle?;
        if now < due {
            return None;
        }
        self.last_cycle_start = Some(now);
        let outcome = self.engine.run_cycle(now).await;
        let ended = now + outcome.as_ref().map(|r| r.duration).unwrap_or_default();
        self.prune_history(ended);
        match &outcome {
            Ok(report) if report.resync_required.is_none() => {
                self.cycles.push_back((ended, true));
                self.succeeded_total += 1;
                self.bytes_shipped_total += report.bytes_sent;
                self.last_successful_cycle = Some(ended);
                self.last_cycle_duration = Some(report.duration);
                self.failures = 0;
                self.last_error = None;
                self.next_cycle = Some(now + interval);
            }
            Ok(report) => {
                self.resync_since.get_or_insert(ended);
                self.last_cycle_duration = Some(report.duration);
                self.next_cycle = None;
            }
            Err(error) => {
                self.cycles.push_back((ended, false));
                self.failed_total += 1;
                self.failures += 1;
                let class = if error.is_recoverable() {
                    ErrorClass::Recoverable
                } else {
                    ErrorClass::NonRecoverable
                };
                let retry_at = match next_retry(class, self.failures, ended, interval) {
                    RetryDecision::RetryAt(at) => Some(at),
                    RetryDecision::GiveUp => None,
                };
                let first_seen = self
                    .last_error
                    .as_ref()
                    .and_then(|e| e.first_seen_time)
                    .unwrap_or(ended);
                self.last_error = Some(error_report(
                    error,
                    self.failures.saturating_sub(1),
                    retry_at,
                    first_seen,
                ));
                self.next_cycle = retry_at;
                tracing::warn!(vm = %self.engine.vm(), error = %error, retry_at = ?retry_at, "replication cycle failed");
            }
        }
        Some(outcome)
    }

    fn prune_history(&mut self, now: SystemTime) {
        while let Some((at, _)) = self.cycles.front() {
            if now.duration_since(*at).unwrap_or_default() > HISTORY {
                self.cycles.pop_front();
            } else {
                break;
            }
        }
    }

    /// Count a job that shipped changes and cut a point (finalize protection, a resync) as a
    /// successful cycle: the VM's last sync is then, and the next cycle is an interval later.
    pub fn record_shipped(&mut self, now: SystemTime, report: &Report) {
        self.prune_history(now);
        self.cycles.push_back((now, true));
        self.succeeded_total += 1;
        self.bytes_shipped_total += report.bytes_sent;
        self.last_successful_cycle = Some(now);
        self.last_cycle_duration = Some(report.duration);
    }

    /// Note that a job finished, so that the schedule follows (a resync or finalize makes the
    /// VM replicate again at once).
    pub fn job_finished(&mut self, now: SystemTime) {
        self.clear_progress();
        if self.replicating() {
            self.resync_since = None;
            self.last_error = None;
            self.failures = 0;
            self.next_cycle = Some(now + self.engine.settings().copy_interval);
        }
    }

    /// The last cycle error, without asking the store anything.
    pub fn facts_without_store(&self) -> Option<ErrorReport> {
        self.last_error.clone()
    }

    /// The facts to report at `now`.
    ///
    /// # Errors
    ///
    /// The store's manifest cannot be read.
    pub async fn facts(&mut self, now: SystemTime) -> Result<VmFacts, EngineError> {
        self.prune_history(now);
        let state = self.engine.state();
        let mut disks: BTreeMap<String, DiskFact> = BTreeMap::new();
        for log in state.pending.iter().flat_map(|c| c.logs.iter()) {
            let fact = disks.entry(log.disk.clone()).or_insert_with(|| DiskFact {
                name: log.disk.clone(),
                ..DiskFact::default()
            });
            fact.pending_log_bytes += log.size_bytes;
        }
        for progress in self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let fact = disks
                .entry(progress.disk.clone())
                .or_insert_with(|| DiskFact {
                    name: progress.disk.clone(),
                    ..DiskFact::default()
                });
            fact.bytes_done = progress.bytes_done;
            fact.bytes_total = progress.bytes_total;
            fact.throughput_bytes_per_second = progress.throughput_bytes_per_second;
        }
        note_records(&mut disks, &state.disks);
        let manifest = self.engine.store().manifest(self.engine.vm()).await?;
        let mut facts = VmFacts {
            last_cycle_start: self.last_cycle_start,
            last_successful_cycle: self.last_successful_cycle,
            last_cycle_duration: self.last_cycle_duration,
            succeeded_last_hour: self.cycles.iter().filter(|(_, ok)| *ok).count() as u32,
            failed_last_hour: self.cycles.iter().filter(|(_, ok)| !*ok).count() as u32,
            succeeded_total: self.succeeded_total,
            failed_total: self.failed_total,
            bytes_shipped_total: self.bytes_shipped_total,
            pending_log_bytes: state.pending_log_bytes(),
            last_error: self.last_error.clone(),
            next_cycle: self.next_cycle,
            ..VmFacts::default()
        };
        if let EnginePhase::ResyncRequired { reason } = &state.phase {
            facts.resync_required = Some((reason.clone(), self.resync_since.unwrap_or(now)));
        }
        if let Some(manifest) = manifest {
            for disk in &manifest.disks {
                disks
                    .entry(disk.name.clone())
                    .or_insert_with(|| DiskFact {
                        name: disk.name.clone(),
                        ..DiskFact::default()
                    })
                    .size_bytes = disk.size_bytes;
            }
            facts.latest_point = manifest.latest().map(point_fact);
            facts.latest_app_consistent_point = manifest.latest_app_consistent().map(point_fact);
            facts.oldest_point = manifest.points.first().map(point_fact);
            facts.point_count = manifest.points.len() as u32;
        }
        facts.disks = disks.into_values().collect();
        Ok(facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disks_facts_say_each_disks_format_and_tracking_durability() {
        let mut disks = BTreeMap::new();
        disks.insert(
            "root".to_owned(),
            DiskFact {
                name: "root".into(),
                pending_log_bytes: 7,
                ..DiskFact::default()
            },
        );
        let records = [
            DiskRecord {
                name: "root".into(),
                format: "raw".into(),
                tracking_survives_restart: false,
                tracking_note: Some("a raw disk cannot store a dirty bitmap".into()),
            },
            DiskRecord {
                name: "data".into(),
                format: "qcow2".into(),
                tracking_survives_restart: true,
                tracking_note: None,
            },
        ];
        note_records(&mut disks, &records);
        let root = &disks["root"];
        assert_eq!(root.pending_log_bytes, 7);
        assert_eq!(root.format.as_deref(), Some("raw"));
        assert_eq!(root.tracking_survives_restart, Some(false));
        assert_eq!(
            root.tracking_note.as_deref(),
            Some("a raw disk cannot store a dirty bitmap")
        );
        let data = &disks["data"];
        assert_eq!(data.format.as_deref(), Some("qcow2"));
        assert_eq!(data.tracking_survives_restart, Some(true));
        assert_eq!(data.tracking_note, None);
    }
}
