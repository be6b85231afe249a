//! What happens to a ReplicationJob once it ended: it stays for a while, so that
//! `kubectl get rjob` reads like ASR's jobs list, then it is deleted.

use std::time::{Duration, SystemTime};

use crate::model::{JobKind, JobParams, JobState};

/// How long finished jobs are kept by default.
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long a succeeded job that kept a VM's original disks in step is kept, at most: one
/// runs every copy interval while the VM replicates in reverse (2,880 a day at 30 s), and
/// the last hour of them says how they go.
pub const IN_STEP_JOB_RETENTION: Duration = Duration::from_secs(3600);

/// How long a job that ended in `state` is kept: `retention`, or at most
/// [`IN_STEP_JOB_RETENTION`] when it succeeded in keeping the original disks in step
/// ([`crate::vm::keeps_in_step`]; a failed one is kept as any job is).
pub fn retention_of(
    kind: JobKind,
    params: &JobParams,
    state: JobState,
    retention: Duration,
) -> Duration {
    if state == JobState::Succeeded && crate::vm::keeps_in_step(kind, params) {
        retention.min(IN_STEP_JOB_RETENTION)
    } else {
        retention
    }
}

/// What to do with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobFate {
    /// It still runs (or waits to be claimed): the VM's controller follows it.
    Active,
    /// It ended: keep it until then.
    KeepUntil(SystemTime),
    /// It ended long enough ago, but its VM has not taken its end in yet (the VM's status
    /// still names it as its current job, unfinished): keep it until the VM has, or the VM
    /// would find it gone and take it for lost (`JobDeleted`, a retry much later).
    AwaitVm,
    /// It ended long enough ago: delete it.
    Delete,
}

/// Decide what happens to a job in `state` that ended at `completed` (or, when that is not
/// known, was created at `created`); `vm_follows`: its VM's status names it as its current
/// job, not finished yet.
pub fn job_fate(
    state: JobState,
    completed: Option<SystemTime>,
    created: SystemTime,
    now: SystemTime,
    retention: Duration,
    vm_follows: bool,
) -> JobFate {
    if !state.is_finished() {
        return JobFate::Active;
    }
    let until = completed.unwrap_or(created) + retention;
    match (until <= now, vm_follows) {
        (false, _) => JobFate::KeepUntil(until),
        (true, true) => JobFate::AwaitVm,
        (true, false) => JobFate::Delete,
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
            job_fate(JobState::Running, None, t(0), t(1000), keep, false),
            JobFate::Active
        );
        assert_eq!(
            job_fate(JobState::Succeeded, Some(t(50)), t(0), t(100), keep, false),
            JobFate::KeepUntil(t(150))
        );
        assert_eq!(
            job_fate(JobState::Failed, Some(t(50)), t(0), t(150), keep, false),
            JobFate::Delete
        );
        assert_eq!(
            job_fate(JobState::Failed, None, t(0), t(99), keep, false),
            JobFate::KeepUntil(t(100)),
            "the creation time stands in for a missing completion time"
        );
        assert_eq!(
            job_fate(JobState::Failed, Some(t(50)), t(0), t(150), keep, true),
            JobFate::AwaitVm,
            "past its retention, kept while its VM has not taken its end in"
        );
    }

    #[test]
    fn jobs_that_kept_the_original_disks_in_step_are_kept_an_hour_once_they_succeeded() {
        let day = DEFAULT_JOB_RETENTION;
        let in_step = JobParams {
            presync: true,
            ..JobParams::default()
        };
        let failback = JobParams {
            request_token: Some("f2".into()),
            ..in_step.clone()
        };
        let kept = |kind, params: &JobParams, state| retention_of(kind, params, state, day);
        assert_eq!(
            kept(JobKind::Failback, &in_step, JobState::Succeeded),
            IN_STEP_JOB_RETENTION
        );
        assert_eq!(kept(JobKind::Failback, &in_step, JobState::Failed), day);
        assert_eq!(kept(JobKind::Failback, &failback, JobState::Succeeded), day);
        assert_eq!(kept(JobKind::Failover, &in_step, JobState::Succeeded), day);
        assert_eq!(
            retention_of(
                JobKind::Failback,
                &in_step,
                JobState::Succeeded,
                Duration::from_secs(60)
            ),
            Duration::from_secs(60),
            "never longer than asked"
        );
    }
}
