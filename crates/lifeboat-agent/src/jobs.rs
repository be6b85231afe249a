//! A `ReplicationJob` as the agent runs it: its kind and parameters in the engine's terms,
//! and the status it shows while running and when done (steps, progress, error, result, and
//! the `Complete` / `Failed` conditions of a Kubernetes Job, decided by
//! [`lifeboat_core::conditions::job_verdicts`]).

use std::time::SystemTime;

use lifeboat_api::ReplicationJob;
use lifeboat_api::common::{ErrorClass, ErrorStatus};
use lifeboat_api::contract::{ENABLE_PROTECTION_STEPS, INITIAL_REPLICATION_STEP};
use lifeboat_api::job::{JobPhase, JobProgress, JobStep, JobType, ReplicationJobStatus, StepState};
use lifeboat_api::protected_vm::{Consistency, FailoverResult, MaterialisedDisk, RecoveryPointRef};
use lifeboat_control::mapping::{api_time, error_status, job_kind, params};
use lifeboat_core::{JobKind, JobParams};
use lifeboat_engine::replicator::{FailoverReport, Progress};
use lifeboat_engine::{EngineError, JobResult};

use crate::report::error_report_now;

/// The job's kind and parameters, as the engine takes them.
pub fn job_kind_params(job: &ReplicationJob) -> (JobKind, JobParams) {
    (job_kind(job.spec.job_type), params(&job.spec.parameters))
}

fn steps_of(job_type: JobType) -> Vec<&'static str> {
    match job_type {
        JobType::EnableProtection => ENABLE_PROTECTION_STEPS.to_vec(),
        JobType::FinalizeProtection => vec!["ShipChangesMadeDuringCopy", "CutFirstRecoveryPoint"],
        JobType::Resynchronize => vec![
            "CompareBlockChecksums",
            "SendDifferingBlocks",
            "CutRecoveryPoint",
        ],
        JobType::TestFailover => vec!["MaterialiseRecoveryPoint", "VerifyDigests"],
        JobType::CleanupTestFailover => vec!["RemoveTestFailoverDisks"],
        JobType::Failover => vec![
            "ShipPendingChanges",
            "MaterialiseRecoveryPoint",
            "VerifyDigests",
        ],
        JobType::Commit => vec!["DeleteOtherRecoveryPoints"],
        JobType::Reprotect => vec![
            "TakeReplica",
            "CompareBlockChecksums",
            "SendDifferingBlocks",
            "CutRecoveryPoint",
        ],
        JobType::Failback => vec![
            "CompareOriginalDisks",
            "WriteDifferingBlocks",
            "VerifyDigests",
        ],
        JobType::DisableProtection => vec!["StopChangeTracking", "RemoveReplica"],
    }
}

/// The status of a job the agent has just claimed: Running, every step not started.
pub fn started(job: &ReplicationJob, claimer: &str, now: SystemTime) -> ReplicationJobStatus {
    ReplicationJobStatus {
        phase: JobPhase::Running,
        claimed_by: Some(claimer.to_owned()),
        start_time: Some(api_time(now)),
        steps: steps_of(job.spec.job_type)
            .into_iter()
            .enumerate()
            .map(|(i, name)| JobStep {
                name: name.to_owned(),
                state: if i == 0 {
                    StepState::InProgress
                } else {
                    StepState::NotStarted
                },
                start_time: (i == 0).then(|| api_time(now)),
                ..JobStep::default()
            })
            .collect(),
        ..ReplicationJobStatus::default()
    }
}

/// Fold engine progress into a running job's status: bytes, percent, and, for an enable job,
/// the copy step in progress (the earlier steps are done by then).
pub fn progressed(status: &mut ReplicationJobStatus, progress: &[Progress], now: SystemTime) {
    let done: u64 = progress.iter().map(|p| p.bytes_done).sum();
    let total: u64 = progress.iter().map(|p| p.bytes_total).sum();
    let rate: u64 = progress.iter().map(|p| p.throughput_bytes_per_second).sum();
    status.progress = JobProgress {
        percent: done
            .saturating_mul(100)
            .checked_div(total)
            .map_or(0, |p| p.min(100) as u8),
        bytes_done: done,
        bytes_total: total,
        message: progress.last().map(|p| {
            format!(
                "{} of disk {}: {} of {} bytes, {} B/s",
                p.operation, p.disk, p.bytes_done, p.bytes_total, rate
            )
        }),
    };
    if progress.iter().any(|p| p.operation == "InitialReplication") {
        let mut reached = false;
        for step in &mut status.steps {
            if step.name == INITIAL_REPLICATION_STEP {
                reached = true;
                if step.state != StepState::InProgress {
                    step.state = StepState::InProgress;
                    step.start_time = Some(api_time(now));
                }
            } else if !reached && step.state != StepState::Succeeded {
                step.state = StepState::Succeeded;
                step.completion_time = Some(api_time(now));
            }
        }
    }
}

/// A (test) failover's result in the API's words.
pub fn failover_result(report: &FailoverReport) -> FailoverResult {
    FailoverResult {
        recovery_point: Some(RecoveryPointRef {
            name: report.point.id.clone(),
            time: api_time(
                SystemTime::UNIX_EPOCH
                    + std::time::Duration::from_millis(report.point.time_unix_ms),
            ),
            consistency: match report.point.consistency {
                lifeboat_store::Consistency::AppConsistent => Consistency::AppConsistent,
                lifeboat_store::Consistency::CrashConsistent => Consistency::CrashConsistent,
            },
        }),
        disks: report
            .disks
            .iter()
            .map(|d| MaterialisedDisk {
                name: d.name.clone(),
                location: d.path.display().to_string(),
            })
            .collect(),
        verified: true,
        node: None,
        recovered_vm: None,
        // NB: the operator (or daemon) marks a failback's result, from the job it ran.
        failback: false,
    }
}

/// The status of a job that ended. An EnableProtection job's prerequisite check step says
/// what it found of each disk: its format, and whether its tracking survives a restart of the
/// hypervisor ([`JobResult::prerequisites_message`]).
pub fn finished(
    mut status: ReplicationJobStatus,
    outcome: &Result<JobResult, EngineError>,
    now: SystemTime,
) -> ReplicationJobStatus {
    status.completion_time = Some(api_time(now));
    match outcome {
        Ok(result) => {
            status.phase = JobPhase::Succeeded;
            status.progress.percent = 100;
            status.progress.bytes_done = status.progress.bytes_total;
            for step in &mut status.steps {
                step.state = StepState::Succeeded;
                step.start_time.get_or_insert_with(|| api_time(now));
                step.completion_time.get_or_insert_with(|| api_time(now));
            }
            if let Some(message) = result.prerequisites_message()
                && let Some(step) = status
                    .steps
                    .iter_mut()
                    .find(|s| s.name == ENABLE_PROTECTION_STEPS[0])
            {
                step.message = Some(message);
            }
            if !result.report.warnings.is_empty() {
                // NB: what the job could not do and did not need to (a disable whose source
                // is gone): said where `kubectl get rjob -o wide` and describe show it.
                status.progress.message = Some(format!(
                    "done; left behind: {}",
                    result.report.warnings.join("; ")
                ));
            }
            status.result = result.failover.as_ref().map(|report| FailoverResult {
                node: status
                    .claimed_by
                    .as_deref()
                    .and_then(|c| c.split('/').next())
                    .map(str::to_owned),
                ..failover_result(report)
            });
            status.error = None;
        }
        Err(error) => {
            status.phase = JobPhase::Failed;
            if let Some(step) = status
                .steps
                .iter_mut()
                .find(|s| s.state != StepState::Succeeded)
            {
                step.state = StepState::Failed;
                step.completion_time = Some(api_time(now));
                step.message = Some(error.to_string());
            }
            status.error = Some(error_status(&error_report_now(error, now)));
        }
    }
    lifeboat_control::mapping::set_job_conditions(&mut status, now);
    status
}

/// The status of a job that failed with `error` before or outside the engine's run (the
/// engine could not open, the agent stopped).
pub fn failed(
    mut status: ReplicationJobStatus,
    error: ErrorStatus,
    now: SystemTime,
) -> ReplicationJobStatus {
    status.phase = JobPhase::Failed;
    status.completion_time = Some(api_time(now));
    if let Some(step) = status
        .steps
        .iter_mut()
        .find(|s| !matches!(s.state, StepState::Succeeded | StepState::Skipped))
    {
        step.state = StepState::Failed;
        step.completion_time = Some(api_time(now));
        step.message = Some(error.message.clone());
    }
    status.error = Some(error);
    lifeboat_control::mapping::set_job_conditions(&mut status, now);
    status
}

/// The status of a job the agent did not finish (it stopped, or it restarted and found the
/// job still Running under its node): Failed with a recoverable error named `reason`, so
/// that the operator retries it (the engine resumes from its saved state).
pub fn abandoned(
    status: ReplicationJobStatus,
    reason: &str,
    message: String,
    now: SystemTime,
) -> ReplicationJobStatus {
    let error = ErrorStatus {
        class: ErrorClass::Recoverable,
        reason: reason.to_owned(),
        message,
        retry_count: 0,
        next_retry_time: None,
        first_seen_time: Some(api_time(now)),
    };
    failed(status, error, now)
}

#[cfg(test)]
mod tests {
    use lifeboat_engine::state::DiskRecord;

    use super::*;

    #[test]
    fn an_enable_job_says_each_disks_format_and_tracking_durability_in_its_prerequisite_step() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let running = ReplicationJobStatus {
            phase: JobPhase::Running,
            steps: steps_of(JobType::EnableProtection)
                .into_iter()
                .map(|name| JobStep {
                    name: name.to_owned(),
                    ..JobStep::default()
                })
                .collect(),
            ..ReplicationJobStatus::default()
        };
        let result = JobResult {
            disks: vec![
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
            ],
            ..JobResult::default()
        };
        let status = finished(running.clone(), &Ok(result), at);
        assert_eq!(status.phase, JobPhase::Succeeded);
        let check = &status.steps[0];
        assert_eq!(check.name, "PrerequisitesCheck");
        assert_eq!(
            check.message.as_deref(),
            Some(
                "disk root: raw, tracked in the hypervisor's memory only (a raw disk cannot \
                 store a dirty bitmap); disk data: qcow2, tracking survives restarts"
            )
        );
        assert!(status.steps[1..].iter().all(|s| s.message.is_none()));

        let plain = finished(running, &Ok(JobResult::default()), at);
        assert!(plain.steps.iter().all(|s| s.message.is_none()));
    }

    fn condition<'s>(
        status: &'s ReplicationJobStatus,
        type_: &str,
    ) -> Option<(&'s str, &'s str, &'s str)> {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
    }

    fn job(job_type: &str) -> ReplicationJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationJob",
            "metadata": {"name": "web-enable-1", "namespace": "ns"},
            "spec": {"vmRef": {"name": "web"}, "nodeName": "node-1", "type": job_type},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_running_job_has_no_conditions_and_a_succeeded_one_is_complete() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let running = started(&job("FinalizeProtection"), "node-1/agent", at);
        assert!(running.conditions.is_empty(), "{:?}", running.conditions);
        let mut progressing = running.clone();
        progressed(&mut progressing, &[], at);
        assert!(progressing.conditions.is_empty());

        let done = finished(running, &Ok(JobResult::default()), at);
        assert_eq!(
            condition(&done, "Complete"),
            Some(("True", "Succeeded", "the job succeeded"))
        );
        assert_eq!(condition(&done, "Failed"), None);
        assert_eq!(done.conditions.len(), 1);
        assert_eq!(done.conditions[0].last_transition_time, api_time(at));
    }

    #[test]
    fn a_failed_or_abandoned_job_is_failed_with_the_errors_reason() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let running = started(&job("TestFailover"), "node-1/agent", at);

        let outcome = Err(EngineError::NotReady {
            what: "the engine is not ready".into(),
        });
        let failed_run = finished(running.clone(), &outcome, at);
        assert_eq!(failed_run.phase, JobPhase::Failed);
        assert_eq!(
            condition(&failed_run, "Failed"),
            Some(("True", "NotReady", "the engine is not ready"))
        );
        assert_eq!(condition(&failed_run, "Complete"), None);

        let stopped = abandoned(
            running.clone(),
            "AgentStopped",
            "the agent stopped".into(),
            at,
        );
        assert_eq!(
            condition(&stopped, "Failed"),
            Some(("True", "AgentStopped", "the agent stopped"))
        );
        assert_eq!(condition(&stopped, "Complete"), None);

        let not_open = failed(
            running,
            ErrorStatus {
                class: ErrorClass::NonRecoverable,
                reason: "AuthorizationFailed".into(),
                message: "the store refused the key".into(),
                retry_count: 0,
                next_retry_time: None,
                first_seen_time: None,
            },
            at,
        );
        assert_eq!(
            condition(&not_open, "Failed"),
            Some(("True", "AuthorizationFailed", "the store refused the key"))
        );
        assert_eq!(not_open.conditions.len(), 1);
    }
}
