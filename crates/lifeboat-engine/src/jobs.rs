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
//! | Failover, a planned failback's first step | [`Replicator::ship_before_stop`] (a cycle of the running VM) |
//! | Failover, a failback's first half | [`Replicator::fail_over_to_primary`] (no disks written) |
//! | Failback with `presync`: the original disks kept in step, or a planned failback's second step | [`Replicator::sync_original_disks`] (the recovered VM runs on) |
//! | Failback | [`Replicator::fail_back`] the original disks ([`JobDirs::original_disks`]) |
//! | Reprotect | [`Replicator::reprotect`] from the point the job names |
//! | DisableProtection | [`Replicator::disable`] |
//!
//! An EnableProtection job's result names each disk's format and whether its change tracking
//! survives a restart of the hypervisor ([`JobResult::prerequisites_message`]), so that a raw
//! disk's cost (a resync after every restart of QEMU) is said up front.

use std::path::PathBuf;
use std::time::SystemTime;

use lifeboat_core::{FailoverKind, JobKind, JobParams};
use lifeboat_store::RecoveryPoint;

use crate::error::EngineError;
use crate::replicator::{
    DiskFormat, FailoverReport, Output, PointChoice, ProgressSink, Replicator, Report,
    choose_point, commit_in_store, fail_back_from_store, fail_over_from_store, materialise_point,
    remove_disk_images,
};
use crate::state::{DiskRecord, EnginePhase};

/// What a finished job produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobResult {
    /// The engine's report of the main operation.
    pub report: Report,
    /// The disks a (test) failover materialised.
    pub failover: Option<FailoverReport>,
    /// The point the job cut or used.
    pub point: Option<RecoveryPoint>,
    /// EnableProtection: what the prerequisite check found of each disk (its format, and
    /// whether its tracking survives a restart of the hypervisor).
    pub disks: Vec<DiskRecord>,
}

impl JobResult {
    /// What the prerequisite check found, one disk after the other (see [`disk_summary`]);
    /// None when the job checked no disk (every job but EnableProtection).
    pub fn prerequisites_message(&self) -> Option<String> {
        (!self.disks.is_empty()).then(|| {
            self.disks
                .iter()
                .map(disk_summary)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// One disk as the prerequisite check of EnableProtection describes it: its format and whether
/// its tracking survives a restart of the hypervisor, with the reason when it does not, e.g.
/// `disk data: qcow2, tracking survives restarts` or `disk root: raw, tracked in the
/// hypervisor's memory only (a raw disk cannot store a dirty bitmap: ...)`.
pub fn disk_summary(disk: &DiskRecord) -> String {
    if disk.tracking_survives_restart {
        format!(
            "disk {}: {}, tracking survives restarts",
            disk.name, disk.format
        )
    } else {
        let note = disk.tracking_note.as_deref().unwrap_or(
            "a restart, crash or migration of the hypervisor costs a resync of this disk",
        );
        format!(
            "disk {}: {}, tracked in the hypervisor's memory only ({note})",
            disk.name, disk.format
        )
    }
}

/// Where failover disks go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobDirs {
    /// The folder (test) failover disks are materialised in.
    pub failover_dir: PathBuf,
    /// The VM's disks at the primary site (`spec.disks`), which a Failback job brings to its
    /// point.
    pub original_disks: Vec<crate::backend::DiskRef>,
    /// The format (test) failover disks are written in (`spec.recoverySite.diskFormat`).
    pub failover_format: DiskFormat,
    /// The state folder of the original disks' site, where the Failback jobs find and keep
    /// their seed, when the engine that runs them is another site's (standalone mode runs
    /// every job on the engine of the site the VM replicates from); None: the engine's own.
    pub seed_dir: Option<PathBuf>,
}

impl JobDirs {
    /// Where (test) failover disks go, in which format.
    pub fn output(&self) -> Output<'_> {
        Output {
            dir: &self.failover_dir,
            format: self.failover_format,
        }
    }
}

/// The engine's choice for a job's (or a command's) choice of point; none: the latest.
pub fn engine_point(choice: Option<&lifeboat_core::PointChoice>) -> PointChoice {
    match choice {
        None
        | Some(lifeboat_core::PointChoice::Latest | lifeboat_core::PointChoice::LatestProcessed) => {
            PointChoice::Latest
        }
        Some(lifeboat_core::PointChoice::LatestAppConsistent) => PointChoice::LatestAppConsistent,
        Some(lifeboat_core::PointChoice::Named(name)) => PointChoice::Named(name.clone()),
        Some(lifeboat_core::PointChoice::NotAfter(ms)) => PointChoice::NotAfter(*ms),
    }
}

/// Run a job that needs nothing but the store (`lifeboat_core::vm::jobs::store_only`: a test
/// failover, an unplanned failover, the cleanup and the commit that follow them; and an
/// unplanned failback's Failover, `lifeboat_core::vm::unplanned_failback`, when the
/// recovered VM's node is lost) on an agent that is not the one replicating the VM (that one
/// is lost, or fenced by a failover elsewhere). A failover moves the replica to a new epoch
/// taken by `holder`, fencing the VM's agent; the commit deletes every point but the one its
/// job names; the cleanup removes the test disks in this node's folder and says which it did
/// not find here.
///
/// # Errors
///
/// Any other kind of job (it needs the VM's node), no such point, store failures, the
/// folder cannot be written, or a digest mismatch.
#[allow(clippy::too_many_arguments)]
pub async fn run_store_job(
    store: &dyn lifeboat_store::ReplicaStore,
    vm: &lifeboat_store::VmKey,
    kind: JobKind,
    params: &JobParams,
    dirs: &JobDirs,
    holder: &str,
    now: SystemTime,
    progress: ProgressSink<'_>,
) -> Result<JobResult, EngineError> {
    let choice = engine_point(params.point.as_ref());
    let report = match kind {
        JobKind::CleanupTestFailover => {
            let disks: Vec<String> = match store.manifest(vm).await? {
                Some(m) => m.disks.into_iter().map(|d| d.name).collect(),
                None => Vec::new(),
            };
            let dir = &dirs.failover_dir;
            let missing = remove_disk_images(dir, vm.name(), "test", &disks)?;
            let mut result = JobResult::default();
            if !missing.is_empty() {
                result.report.warnings.push(format!(
                    "no test failover disk {} in {} on this node (written on another node)",
                    missing.join(", "),
                    dir.display()
                ));
            }
            return Ok(result);
        }
        JobKind::Commit => {
            let Some(lifeboat_core::PointChoice::Named(point)) = &params.point else {
                return Err(EngineError::NotReady {
                    what: format!(
                        "a commit of VM {vm} away from the VM's node needs the failover's point in its parameters"
                    ),
                });
            };
            commit_in_store(store, vm, point).await?;
            return Ok(JobResult::default());
        }
        JobKind::TestFailover => {
            let point = choose_point(store, vm, &choice).await?;
            materialise_point(store, vm, point, dirs.output(), "test", progress).await?
        }
        // NB: an unplanned failback whose recovered VM's node is lost: the point and the
        // fence, from the store (the original disks are written by the Failback job next).
        JobKind::Failover if lifeboat_core::vm::unplanned_failback(kind, params) => {
            fail_back_from_store(store, vm, &choice, holder, now).await?
        }
        JobKind::Failover if params.failover == Some(FailoverKind::Unplanned) => {
            fail_over_from_store(store, vm, &choice, holder, now, dirs.output(), progress)
                .await?
                .1
        }
        _ => {
            return Err(EngineError::NotReady {
                what: format!(
                    "a {} job of VM {vm} needs the agent of the VM's own node",
                    kind.as_str()
                ),
            });
        }
    };
    Ok(JobResult {
        point: Some(report.point.clone()),
        failover: Some(report),
        ..JobResult::default()
    })
}

/// The point a Reprotect or Failback job names (it always names one).
fn named_point<'a>(
    params: &'a JobParams,
    vm: &lifeboat_store::VmKey,
    kind: JobKind,
) -> Result<&'a str, EngineError> {
    match &params.point {
        Some(lifeboat_core::PointChoice::Named(point)) => Ok(point),
        _ => Err(EngineError::NotReady {
            what: format!(
                "a {} job of VM {vm} needs the point it starts from in its parameters",
                kind.as_str()
            ),
        }),
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
            result.disks = engine
                .enable()
                .await?
                .iter()
                .map(DiskRecord::from)
                .collect();
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
                    dirs.output(),
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
        JobKind::Failover if params.to_primary && params.presync => {
            result.report = engine.ship_before_stop(now).await?;
            result.point = result.report.point.clone();
        }
        JobKind::Failover if params.to_primary => {
            let planned = params.failover == Some(FailoverKind::Planned);
            let report = engine
                .fail_over_to_primary(planned, &engine_point(params.point.as_ref()), now)
                .await?;
            result.point = Some(report.point.clone());
            result.failover = Some(report);
        }
        JobKind::Failback if params.presync => {
            let report = engine
                .sync_original_disks(&dirs.original_disks, dirs.seed_dir.as_deref(), progress)
                .await?;
            result.point = Some(report.point.clone());
            result.failover = Some(report);
        }
        JobKind::Failback => {
            // NB: the point the failback's Failover job chose, resolved now: the replica is
            // fenced for that failover and nothing has cut a point since.
            let chosen = choose_point(
                engine.store().as_ref(),
                engine.vm(),
                &engine_point(params.point.as_ref()),
            )
            .await?;
            let point = chosen.id.as_str();
            let report = engine
                .fail_back(
                    point,
                    &dirs.original_disks,
                    dirs.seed_dir.as_deref(),
                    progress,
                )
                .await?;
            result.point = Some(report.point.clone());
            result.failover = Some(report);
        }
        JobKind::Reprotect => {
            let point = named_point(params, engine.vm(), kind)?.to_owned();
            result.report = engine.reprotect(&point, now, progress).await?;
            result.point = result.report.point.clone();
        }
        JobKind::Failover => {
            let planned = params.failover == Some(FailoverKind::Planned);
            let report = engine
                .failover(
                    planned,
                    &engine_point(params.point.as_ref()),
                    dirs.output(),
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
            result.report.warnings = engine.disable(params.delete_replica).await?;
        }
    }
    // NB: the VM's definition goes beside the replica whenever protection is established or
    // re-established, so that the store describes the VM as it was last applied.
    if matches!(
        kind,
        JobKind::EnableProtection
            | JobKind::FinalizeProtection
            | JobKind::Resynchronize
            | JobKind::Reprotect
    ) {
        engine.store_definition().await?;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prerequisite_check_names_each_disks_format_and_tracking_durability() {
        let result = JobResult {
            disks: vec![
                DiskRecord {
                    name: "root".into(),
                    format: "raw".into(),
                    tracking_survives_restart: false,
                    tracking_note: Some(
                        "a raw disk cannot store a dirty bitmap: tracking lives in QEMU's memory"
                            .into(),
                    ),
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
        assert_eq!(
            result.prerequisites_message().as_deref(),
            Some(
                "disk root: raw, tracked in the hypervisor's memory only (a raw disk cannot \
                 store a dirty bitmap: tracking lives in QEMU's memory); disk data: qcow2, \
                 tracking survives restarts"
            )
        );
        assert_eq!(JobResult::default().prerequisites_message(), None);
    }
}
