//! The words the decisions speak: the life-cycle phases, the jobs, the requests, the errors.
//! They mirror the API types of `lifeboat-api` without depending on Kubernetes; the operator
//! maps one to the other (and a round-trip test there keeps the two in step).

use std::time::{Duration, SystemTime};

use crate::retry::ErrorClass;

/// Where a VM is in its protection life cycle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted; protection not started yet.
    #[default]
    Pending,
    /// The EnableProtection job is checking prerequisites and creating the replica disks.
    EnablingProtection,
    /// The EnableProtection job is copying the disks.
    InitialReplication,
    /// The FinalizeProtection job ships the changes made during the copy.
    FinalizingProtection,
    /// Delta replication every copy interval.
    Protected,
    /// A Resynchronize job runs.
    Resynchronizing,
    /// A Failover job runs.
    FailingOver,
    /// Failed over; not replicating.
    FailedOver,
    /// Failover committed.
    FailoverCommitted,
    /// A Reprotect job runs: replication starts from where the VM runs now, sending only the
    /// blocks that differ from the point it was recovered from.
    Reprotecting,
    /// Failing back to the primary site: the recovered VM is stopped and its last changes
    /// shipped (a Failover job), then the original disks are brought to that point (a
    /// Failback job).
    FailingBack,
    /// Back on the primary site's disks; not replicating until re-protected.
    FailedBack,
    /// A DisableProtection job runs.
    DisablingProtection,
    /// Not protected.
    Disabled,
}

impl Phase {
    /// Whether the node's agent has work for the VM in this phase, so that its silence matters.
    pub fn needs_agent(self) -> bool {
        matches!(
            self,
            Self::EnablingProtection
                | Self::InitialReplication
                | Self::FinalizingProtection
                | Self::Protected
                | Self::Resynchronizing
                | Self::FailingOver
                | Self::Reprotecting
                | Self::FailingBack
                | Self::DisablingProtection
        )
    }
}

/// The operations, as ASR names its jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Check prerequisites, create the replica disks, copy the disks.
    EnableProtection,
    /// Ship the changes made during the copy, cut the first recovery point.
    FinalizeProtection,
    /// Compare block checksums and send the blocks that differ.
    Resynchronize,
    /// Materialise a recovery point under a separate name.
    TestFailover,
    /// Remove a test failover's disks.
    CleanupTestFailover,
    /// Fail over to a recovery point.
    Failover,
    /// After a failover, drop the other recovery points.
    Commit,
    /// After a failover (or a failback), protect the VM where it runs now, seeded by the
    /// point it started from.
    Reprotect,
    /// Bring the primary site's original disks to the point a failback cut.
    Failback,
    /// Stop tracking and, if asked, delete the replica.
    DisableProtection,
}

impl JobKind {
    /// Every kind, in life-cycle order.
    pub const ALL: [Self; 10] = [
        Self::EnableProtection,
        Self::FinalizeProtection,
        Self::Resynchronize,
        Self::TestFailover,
        Self::CleanupTestFailover,
        Self::Failover,
        Self::Commit,
        Self::Reprotect,
        Self::Failback,
        Self::DisableProtection,
    ];

    /// The word job names use for the kind (`web01-resync-7`).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::EnableProtection => "enable",
            Self::FinalizeProtection => "finalize",
            Self::Resynchronize => "resync",
            Self::TestFailover => "testfailover",
            Self::CleanupTestFailover => "cleanup",
            Self::Failover => "failover",
            Self::Commit => "commit",
            Self::Reprotect => "reprotect",
            Self::Failback => "failback",
            Self::DisableProtection => "disable",
        }
    }

    /// The kind's name, as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EnableProtection => "EnableProtection",
            Self::FinalizeProtection => "FinalizeProtection",
            Self::Resynchronize => "Resynchronize",
            Self::TestFailover => "TestFailover",
            Self::CleanupTestFailover => "CleanupTestFailover",
            Self::Failover => "Failover",
            Self::Commit => "Commit",
            Self::Reprotect => "Reprotect",
            Self::Failback => "Failback",
            Self::DisableProtection => "DisableProtection",
        }
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Created, not claimed yet.
    #[default]
    Pending,
    /// Claimed and running.
    Running,
    /// Claimed, waiting for something outside Lifeboat.
    WaitingForInput,
    /// Done.
    Succeeded,
    /// Ended with an error.
    Failed,
}

impl JobState {
    /// Succeeded or Failed.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Why a resync runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResyncReason {
    /// The pending logs reached the policy's threshold.
    LogThresholdReached,
    /// Change tracking was lost.
    TrackingLost,
    /// A change log failed its checksums.
    CorruptLog,
    /// Someone asked.
    Requested,
}

impl ResyncReason {
    /// The reason's name, as the API and the conditions spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LogThresholdReached => "LogThresholdReached",
            Self::TrackingLost => "TrackingLost",
            Self::CorruptLog => "CorruptLog",
            Self::Requested => "Requested",
        }
    }
}

/// Planned or unplanned failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailoverKind {
    /// Ship what is pending first.
    Planned,
    /// Use the latest durable point.
    Unplanned,
}

/// Which recovery point a (test) failover uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PointChoice {
    /// The newest point.
    Latest,
    /// The newest fully applied point.
    LatestProcessed,
    /// The newest app-consistent point.
    LatestAppConsistent,
    /// A point by name.
    Named(String),
    /// The newest point cut at or before this time (Unix milliseconds, a whole second: the
    /// API keeps times to the second): one rule that picks, for each of many VMs, a point no
    /// newer than the same instant.
    NotAfter(u64),
}

impl std::str::FromStr for PointChoice {
    type Err = String;

    /// `latest`, `latest-app-consistent`, `not-after:TIME` (RFC 3339, such as
    /// `2026-12-06T20:00:00Z`), or a point's name.
    fn from_str(s: &str) -> Result<PointChoice, String> {
        Ok(match s {
            "" => return Err("the point is empty: give latest, latest-app-consistent, not-after:TIME or a point's name".to_owned()),
            "latest" => PointChoice::Latest,
            "latest-processed" => PointChoice::LatestProcessed,
            "latest-app-consistent" => PointChoice::LatestAppConsistent,
            _ => match s.strip_prefix("not-after:") {
                Some(time) => PointChoice::NotAfter(parse_unix_ms(time).map_err(|e| {
                    format!("point {s:?}: {e}")
                })?),
                None => PointChoice::Named(s.to_owned()),
            },
        })
    }
}

impl PointChoice {
    /// The choice as `--point` takes it (what [`FromStr`](std::str::FromStr) reads back).
    pub fn arg(&self) -> String {
        match self {
            PointChoice::Latest => "latest".to_owned(),
            PointChoice::LatestProcessed => "latest-processed".to_owned(),
            PointChoice::LatestAppConsistent => "latest-app-consistent".to_owned(),
            PointChoice::Named(name) => name.clone(),
            PointChoice::NotAfter(ms) => format!(
                "not-after:{}",
                crate::rpo::format_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(*ms))
            ),
        }
    }
}

/// An RFC 3339 time (`2026-12-06T20:00:00Z`, `2026-12-06T21:00:00+01:00`) as Unix
/// milliseconds, down to its whole second (the API keeps times to the second; down, so that
/// a bound never admits a later point).
///
/// # Errors
///
/// Not such a time, or one before 1970.
pub fn parse_unix_ms(time: &str) -> Result<u64, String> {
    let at: jiff::Timestamp = time.parse().map_err(|e| {
        format!("{time:?} is not an RFC 3339 time such as 2026-12-06T20:00:00Z ({e})")
    })?;
    u64::try_from(at.as_second())
        .map(|s| s * 1000)
        .map_err(|_| format!("{time:?} is before 1970"))
}

/// The choice in words: "the latest point", "point 20261206T...", "the newest point at or
/// before 2026-12-06T20:00:00Z".
impl std::fmt::Display for PointChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointChoice::Latest => f.write_str("the latest point"),
            PointChoice::LatestProcessed => f.write_str("the latest processed point"),
            PointChoice::LatestAppConsistent => f.write_str("the latest app-consistent point"),
            PointChoice::Named(name) => write!(f, "point {name}"),
            PointChoice::NotAfter(ms) => write!(
                f,
                "the newest point at or before {}",
                crate::rpo::format_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(*ms))
            ),
        }
    }
}

/// An error as the agent reported it, or as the operator decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReport {
    /// Recoverable or NonRecoverable.
    pub class: ErrorClass,
    /// A stable CamelCase reason.
    pub reason: String,
    /// For a human.
    pub message: String,
    /// Retries so far.
    pub retry_count: u32,
    /// When the next retry is due.
    pub next_retry_time: Option<SystemTime>,
    /// When the error was first seen.
    pub first_seen_time: Option<SystemTime>,
}

/// The parameters of a job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobParams {
    /// The request token the job answers.
    pub request_token: Option<String>,
    /// Failover: planned or unplanned.
    pub failover: Option<FailoverKind>,
    /// (Test) failover: which point.
    pub point: Option<PointChoice>,
    /// Resynchronize: why.
    pub resync_reason: Option<ResyncReason>,
    /// DisableProtection: delete the replica too.
    pub delete_replica: bool,
    /// Failover: a failback's first half (ship and cut the point, write no disks: the
    /// Failback job writes them at the primary site).
    pub to_primary: bool,
    /// A planned failback's first steps, while the recovered VM still runs ("synchronize
    /// data before failover"): a Failover job (with `to_primary`) ships the running VM's
    /// changes and cuts a fresh point; a Failback job brings the original disks to the
    /// newest point. Once the VM is stopped, only its last changes are shipped and written.
    /// `failover` and `point` carry the request's, for the jobs that follow.
    pub presync: bool,
}

/// A policy's settings, as the decisions need them.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySettings {
    /// The policy's generation.
    pub generation: Option<i64>,
    /// The copy interval.
    pub copy_interval: Duration,
    /// Health turns Warning above this RPO.
    pub rpo_threshold: Duration,
    /// Automatic (true) or manual resync.
    pub resync_automatic: bool,
    /// When automatic resyncs may run (`None`: any time).
    pub resync_window: Option<crate::window::DailyWindow>,
    /// Resync when a disk's pending logs reach this percent of its size.
    pub log_threshold_percent: u32,
    /// Initial replication does not start before this time.
    pub initial_replication_start: Option<SystemTime>,
    /// Why new protection must wait (a field of the policy is invalid), as a condition reason.
    pub blocking_problem: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_choice_reads_back_from_its_argument() {
        for choice in [
            PointChoice::Latest,
            PointChoice::LatestProcessed,
            PointChoice::LatestAppConsistent,
            PointChoice::Named("20261206T200000.000Z-c7".to_owned()),
            PointChoice::NotAfter(1_796_587_200_000),
        ] {
            assert_eq!(choice.arg().parse(), Ok(choice.clone()), "{}", choice.arg());
        }
    }

    #[test]
    fn point_choices_parse_from_their_words_and_a_bad_time_is_named() {
        assert_eq!("latest".parse(), Ok(PointChoice::Latest));
        assert_eq!(
            "latest-app-consistent".parse(),
            Ok(PointChoice::LatestAppConsistent)
        );
        assert_eq!(
            "20261206T200000.000Z-c7".parse(),
            Ok(PointChoice::Named("20261206T200000.000Z-c7".to_owned()))
        );
        // 2026-12-06T20:00:00Z, written in UTC and in another offset.
        let at = PointChoice::NotAfter(1_796_587_200_000);
        assert_eq!("not-after:2026-12-06T20:00:00Z".parse(), Ok(at.clone()));
        assert_eq!(
            "not-after:2026-12-06T21:00:00+01:00".parse(),
            Ok(at.clone())
        );
        assert_eq!(
            at.to_string(),
            "the newest point at or before 2026-12-06T20:00:00Z"
        );
        let bad = "not-after:yesterday".parse::<PointChoice>();
        assert!(
            bad.as_ref()
                .is_err_and(|e| e.contains("\"yesterday\" is not an RFC 3339 time")),
            "{bad:?}"
        );
        assert_eq!("not-after:2026-12-06T20:00:00.900Z".parse(), Ok(at));
        assert!(
            "not-after:1969-12-31T23:59:59Z"
                .parse::<PointChoice>()
                .is_err()
        );
        assert!("".parse::<PointChoice>().is_err());
    }
}
