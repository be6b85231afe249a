//! Running the operator's jobs on the engine: one function maps each job kind onto the
//! engine's operations, for the cluster agent (ReplicationJob resources) and standalone mode
//! alike.
//!
//! | job | engine |
//! |---|---|
//! | EnableProtection | [`Replicator::enable`], then [`Replicator::initial_copy`] |
//! | FinalizeProtection | the first [`Replicator::run_cycle`] after the copy |
//! | Resynchronize | [`Replicator::resync`] |
//! | TestFailover | [`Replicator::materialise`] under the label `test` |
//! | CleanupTestFailover | [`Replicator::remove_materialised`] of the `test` disks |
//! | Failover | [`Replicator::failover`] (planned ships what is pending first) |
//! | Commit | [`Replicator::commit`] |
//! | DisableProtection | [`Replicator::disable`] |

use std::path::PathBuf;
use std::time::SystemTime;

use lifeboat_core::{FailoverKind, JobKind, JobParams};
use lifeboat_store::RecoveryPoint;

use crate::error::EngineError;
use crate::replicator::{FailoverReport, PointChoice, ProgressSink, Replicator, Report};
use crate::state::EnginePhase;

/// What a finished job produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobResult {
    /// The engine's report of the main operation.
    pub report: Report,
    /// The disks a (test) failover materialised.
    pub failover: Option<FailoverReport>,
    /// The point the job cut or used.
    pub point: Option<RecoveryPoint>,
}

/// Where failover disks go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobDirs {
    /// The folder (test) failover disks are materialised in.
    pub failover_dir: PathBuf,
}

fn engine_point(choice: Option<&lifeboat_core::PointChoice>) -> PointChoice {
    match choice {
        None
        | Some(lifeboat_core::PointChoice::Latest | lifeboat_core::PointChoice::LatestProcessed) => {
            PointChoice::Latest
        }
        Some(lifeboat_core::PointChoice::LatestAppConsistent) => PointChoice::LatestAppConsistent,
        Some(lifeboat_core::PointChoice::Named(name)) => PointChoice::Named(name.clone()),
    }
}

/// Run one job to its end. Idempotent where the engine is: a job retried after a crash
/// continues (an interrupted copy or resync resumes from its saved cursor).
///
/// # Errors
///
/// The engine's error; `is_recoverable` says whether a retry can help.
pub async fn run_job(
    engine: &mut Replicator,
    kind: JobKind,
    params: &JobParams,
    dirs: &JobDirs,
    now: SystemTime,
    progress: ProgressSink<'_>,
) -> Result<JobResult, EngineError> {
    let mut result = JobResult::default();
    match kind {
        JobKind::EnableProtection => {
            engine.enable().await?;
            if engine.state().phase == EnginePhase::Enabled {
                result.report = engine.initial_copy(progress).await?;
            }
        }
        JobKind::FinalizeProtection => {
            if engine.state().phase == EnginePhase::Copied {
                result.report = engine.run_cycle(now).await?;
                if let Some(reason) = &result.report.resync_required {
                    return Err(EngineError::NotReady {
                        what: format!("finalizing protection needs a resync: {reason}"),
                    });
                }
                result.point = result.report.point.clone();
            }
        }
        JobKind::Resynchronize => {
            if let Some(reason) = params.resync_reason
                && !matches!(engine.state().phase, EnginePhase::ResyncRequired { .. })
            {
                engine.require_resync(reason.as_str())?;
            }
            result.report = engine.resync(now, progress).await?;
            result.point = result.report.point.clone();
        }
        JobKind::TestFailover => {
            let report = engine
                .materialise(
                    &engine_point(params.point.as_ref()),
                    &dirs.failover_dir,
                    "test",
                    progress,
                )
                .await?;
            result.point = Some(report.point.clone());
            result.failover = Some(report);
        }
        JobKind::CleanupTestFailover => {
            let disks: Vec<String> = engine.disk_names();
            engine.remove_materialised(&dirs.failover_dir, "test", &disks)?;
        }
        JobKind::Failover => {
            let planned = params.failover == Some(FailoverKind::Planned);
            let report = engine
                .failover(
                    planned,
                    &engine_point(params.point.as_ref()),
                    &dirs.failover_dir,
                    now,
                    progress,
                )
                .await?;
            result.point = Some(report.point.clone());
            result.failover = Some(report);
        }
        JobKind::Commit => {
            engine.commit().await?;
        }
        JobKind::DisableProtection => {
            engine.disable(params.delete_replica).await?;
        }
    }
    Ok(result)
}
