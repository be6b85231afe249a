//! What happens to a ReplicationJob once it ended: it stays for a while, so that
//! `kubectl get rjob` reads like ASR's jobs list, then it is deleted.

use std::time::{Duration, SystemTime};

use crate::model::JobState;

/// How long finished jobs are kept by default.
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// What to do with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobFate {
    /// It still runs (or waits to be claimed): the VM's controller follows it.
    Active,
    /// It ended: keep it until then.
    KeepUntil(SystemTime),
    /// It ended long enough ago: delete it.
    Delete,
}

/// Decide what happens to a job in `state` that ended at `completed` (or, when that is not
/// known, was created at `created`).
pub fn job_fate(
    state: JobState,
    completed: Option<SystemTime>,
    created: SystemTime,
    now: SystemTime,
    retention: Duration,
) -> JobFate {
    if !state.is_finished() {
        return JobFate::Active;
    }
    let until = completed.unwrap_or(created) + retention;
    if until <= now {
        JobFate::Delete
    } else {
        JobFate::KeepUntil(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_jobs_are_kept_for_the_retention_then_deleted() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let keep = Duration::from_secs(100);
        assert_eq!(
            job_fate(JobState::Running, None, t(0), t(1000), keep),
            JobFate::Active
        );
        assert_eq!(
            job_fate(JobState::Succeeded, Some(t(50)), t(0), t(100), keep),
            JobFate::KeepUntil(t(150))
        );
        assert_eq!(
            job_fate(JobState::Failed, Some(t(50)), t(0), t(150), keep),
            JobFate::Delete
        );
        assert_eq!(
            job_fate(JobState::Failed, None, t(0), t(99), keep),
            JobFate::KeepUntil(t(100)),
            "the creation time stands in for a missing completion time"
        );
    }
}
