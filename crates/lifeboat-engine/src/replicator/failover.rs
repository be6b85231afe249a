//! Failover: materialise a recovery point as a new disk set (raw image files, sparse, or
//! qcow2 images carrying a seed bitmap for the re-protect that follows), verify every disk
//! against the digest the manifest recorded, and report where it is. A
//! test failover does the same under a separate name and is removed by its cleanup; a
//! planned failover first ships everything pending; commit drops the other points.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use lifeboat_blockmap::{BlockMap, HashAlgorithm};
use lifeboat_store::{At, RecoveryPoint, ReplicaStore, VmKey};

use super::image::{self, DiskFormat, Image, StoreSource, write_from_store};
use super::maps;
use super::{Progress, ProgressSink, Replicator, Report, throughput};
use crate::backend::{Stopped, seed_bitmap_name};
use crate::error::EngineError;
use crate::stamp::{self, FileStamp};
use crate::state::EnginePhase;
use crate::twin;

/// Which recovery point to materialise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointChoice {
    /// The newest point.
    Latest,
    /// The newest application-consistent point.
    LatestAppConsistent,
    /// A point by id.
    Named(String),
    /// The newest point cut at or before this time (Unix milliseconds).
    NotAfter(u64),
}

impl std::fmt::Display for PointChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointChoice::Latest => f.write_str("latest point"),
            PointChoice::LatestAppConsistent => f.write_str("app-consistent point"),
            PointChoice::Named(id) => write!(f, "point {id:?}"),
            PointChoice::NotAfter(ms) => write!(
                f,
                "point at or before {}",
                lifeboat_core::format_rfc3339(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(*ms)
                )
            ),
        }
    }
}

/// One materialised disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaterialisedDisk {
    /// The disk's name.
    pub name: String,
    /// The image file.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
}

/// What a (test) failover produced.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverReport {
    /// The point used.
    pub point: RecoveryPoint,
    /// The disks, each verified against the point's digest.
    pub disks: Vec<MaterialisedDisk>,
    /// Bytes read from the store.
    pub bytes_read: u64,
    /// How a planned failover stopped the source VM.
    pub source_stopped: Option<String>,
    /// A failback: the bytes of the original disks read to compare them with the point (none
    /// for a disk whose seed held: see [`super::restore_onto`]).
    pub compared_bytes: u64,
}

/// The label of a failover's disks (`<vm>-failover-<disk>`): the recovered VM's, which a
/// re-protect can start from.
pub const FAILOVER_LABEL: &str = "failover";

/// The file a disk of a failover named `label` is materialised in, in `format`.
pub fn disk_image_path(
    dir: &Path,
    vm: &str,
    label: &str,
    disk: &str,
    format: DiskFormat,
) -> PathBuf {
    dir.join(format!("{vm}-{label}-{disk}.{}", format.extension()))
}

/// Where a failover writes its disks, and in which format.
#[derive(Clone, Copy, Debug)]
pub struct Output<'a> {
    /// The folder.
    pub dir: &'a Path,
    /// The images' format.
    pub format: DiskFormat,
}

impl<'a> Output<'a> {
    /// Raw images in `dir`.
    pub fn raw(dir: &'a Path) -> Self {
        Output {
            dir,
            format: DiskFormat::Raw,
        }
    }
}

fn algorithm_named(name: &str) -> Option<HashAlgorithm> {
    HashAlgorithm::ALL.into_iter().find(|a| a.name() == name)
}

/// The point `choice` names in `vm`'s manifest.
///
/// # Errors
///
/// The store holds nothing for the VM, or no point matches; store failures.
pub async fn choose_point(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    choice: &PointChoice,
) -> Result<RecoveryPoint, EngineError> {
    let manifest = store.manifest(vm).await?;
    let Some(manifest) = manifest else {
        return Err(EngineError::NotReady {
            what: format!("VM {vm} has no replica yet"),
        });
    };
    let point = match choice {
        PointChoice::Latest => manifest.latest(),
        PointChoice::LatestAppConsistent => manifest.latest_app_consistent(),
        PointChoice::Named(id) => manifest.point(id),
        PointChoice::NotAfter(ms) => manifest.latest_not_after(*ms),
    };
    point.cloned().ok_or_else(|| EngineError::NotReady {
        what: format!(
            "VM {vm} has no {choice} (it has {} recovery points)",
            manifest.points.len()
        ),
    })
}

/// Fail `vm` over from the store alone (the VM's own agent is gone): choose the point, move
/// the replica to a new epoch taken by `holder` (every other writer is fenced from then on),
/// and materialise the point in `out` as [`materialise_point`] does. The recovery side of a
/// lost site: another node's agent, or `lifeboat recover`, runs it.
///
/// # Errors
///
/// No such point, store failures (a fence that lost a race is [`lifeboat_store::StoreError::Conflict`],
/// recoverable), the folder cannot be written, or [`EngineError::DigestMismatch`].
pub async fn fail_over_from_store(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    choice: &PointChoice,
    holder: &str,
    now: SystemTime,
    out: Output<'_>,
    progress: ProgressSink<'_>,
) -> Result<(lifeboat_store::Epoch, FailoverReport), EngineError> {
    let point = choose_point(store, vm, choice).await?;
    let epoch = store.fence(vm, holder, super::unix_ms(now)).await?;
    let report = materialise_point(store, vm, point, out, FAILOVER_LABEL, progress).await?;
    Ok((epoch, report))
}

/// The first half of an unplanned failback from the store alone, run by the primary site's
/// agent when the recovered VM's node is lost: take the replica for `holder`'s new epoch,
/// fencing the lost agent should it come back, and choose the point. The latest is chosen
/// after the fence, so that the Failback job that follows (it resolves the same choice)
/// finds the same point even if the lost agent, only cut off, cut one more; a named or dated
/// point is chosen first, so that a point that does not exist fences nothing. No disk is
/// written: the Failback job brings the original disks to the point.
///
/// # Errors
///
/// No such point, or store failures.
pub async fn fail_back_from_store(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    choice: &PointChoice,
    holder: &str,
    now: SystemTime,
) -> Result<FailoverReport, EngineError> {
    let latest = matches!(choice, PointChoice::Latest);
    let chosen = if latest {
        None
    } else {
        Some(choose_point(store, vm, choice).await?)
    };
    store.fence(vm, holder, super::unix_ms(now)).await?;
    let point = match chosen {
        Some(point) => point,
        None => choose_point(store, vm, choice).await?,
    };
    Ok(FailoverReport {
        point,
        disks: Vec::new(),
        bytes_read: 0,
        source_stopped: None,
        compared_bytes: 0,
    })
}

/// Materialise `point` of `vm` as image files `<vm>-<label>-<disk>.<img|qcow2>` in `out`,
/// verified against the manifest's digests. Files of a failed attempt are removed. A qcow2
/// image gets an enabled persistent bitmap named [`seed_bitmap_name`] of the point, added
/// after its data: the VM that runs on it records its writes since the point there. A raw
/// image of a failover (`label` [`FAILOVER_LABEL`]) gets a reflinked [`twin`] of the point
/// instead, where its file system clones files, and its [`stamp`] beside it: the agent that
/// finds a VM running on it before the guest wrote has QEMU record the writes from then on.
///
/// It needs nothing but the store: no state folder, no hypervisor, no source host. The
/// agent's failover runs it, and so does a recovery from the store alone.
///
/// # Errors
///
/// Store failures, the folder cannot be written, or [`EngineError::DigestMismatch`].
pub async fn materialise_point(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point: RecoveryPoint,
    out: Output<'_>,
    label: &str,
    progress: ProgressSink<'_>,
) -> Result<FailoverReport, EngineError> {
    let dir = out.dir;
    std::fs::create_dir_all(dir).map_err(EngineError::state("create failover folder", dir))?;
    let mut disks = Vec::new();
    let mut bytes_read = 0;
    // NB: the disks a re-protect can start from (a failover's) keep a record of the writes
    // the recovered VM makes on them; a test failover's, removed at its cleanup, do not.
    let seeded = label == FAILOVER_LABEL;
    // NB: before any file is written (a failed attempt removes its files): a failover run
    // again once its VM was started on its disks would rewrite them under the VM, and its
    // twin would vouch for a file the VM no longer has open.
    for pd in &point.disks {
        let path = disk_image_path(dir, vm.name(), label, &pd.name, out.format);
        if let Some((pid, program)) = super::reprotect::held_open_by(&path) {
            return Err(EngineError::NotReady {
                what: format!(
                    "disk {:?}: {} is open by process {pid} ({program}): a failover writes its \
                     disks before a VM runs on them, never under one (stop it, or fail over to \
                     another folder)",
                    pd.name,
                    path.display()
                ),
            });
        }
    }
    for pd in &point.disks {
        let path = disk_image_path(dir, vm.name(), label, &pd.name, out.format);
        match materialise_disk(store, vm, &point, pd, &path, out.format, seeded, progress).await {
            Ok(read) => {
                bytes_read += read;
                disks.push(MaterialisedDisk {
                    name: pd.name.clone(),
                    path,
                    size_bytes: pd.size_bytes,
                });
            }
            Err(e) => {
                for disk in disks.iter().map(|d| &d.path).chain(std::iter::once(&path)) {
                    let _ = std::fs::remove_file(disk);
                    let _ = twin::remove_all(disk);
                    let _ = stamp::forget_all(disk);
                }
                return Err(e);
            }
        }
    }
    Ok(FailoverReport {
        point,
        disks,
        bytes_read,
        source_stopped: None,
        compared_bytes: 0,
    })
}

#[allow(clippy::too_many_arguments)] // NB: one disk of materialise_point's loop.
async fn materialise_disk(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point: &RecoveryPoint,
    pd: &lifeboat_store::PointDisk,
    path: &Path,
    format: DiskFormat,
    seeded: bool,
    progress: ProgressSink<'_>,
) -> Result<u64, EngineError> {
    let map_error = |source| EngineError::BlockMap {
        disk: pd.name.clone(),
        source,
    };
    let algorithm =
        algorithm_named(&pd.digest.algorithm).ok_or_else(|| EngineError::DigestMismatch {
            disk: pd.name.clone(),
            point: point.id.clone(),
            detail: format!("unknown digest algorithm {:?}", pd.digest.algorithm),
        })?;
    let block = u64::from(pd.digest.block_size_bytes);
    let mut map = BlockMap::new_zeroed(algorithm, pd.digest.block_size_bytes, pd.size_bytes)
        .map_err(map_error)?;
    let image = match format {
        DiskFormat::Raw => {
            let file = std::fs::File::create(path)
                .map_err(EngineError::state("create failover disk", path))?;
            file.set_len(pd.size_bytes)
                .map_err(EngineError::state("size failover disk", path))?;
            Image::file(file, path)
        }
        DiskFormat::Qcow2 => {
            image::create_qcow2(path, pd.size_bytes).await?;
            Image::open_qcow2(path, None).await?
        }
    };
    let at = At::Point(point.id.clone());
    let started = Instant::now();
    let ranges: Vec<_> = maps::align(
        &store.data_ranges(vm, &pd.name, &at).await?,
        block,
        pd.size_bytes,
    )
    .into_iter()
    .map(|r| (r, false))
    .collect();
    let source = StoreSource {
        store,
        vm,
        disk: &pd.name,
        at: &at,
    };
    let read = write_from_store(&source, &ranges, true, &image, &mut map, |end, read| {
        progress(&Progress {
            operation: "Failover",
            disk: pd.name.clone(),
            bytes_done: end,
            bytes_total: pd.size_bytes,
            throughput_bytes_per_second: throughput(read, started),
        });
    })
    .await?;
    image.finish().await?;
    verify_digest(&map, point, pd, |got| format!("the replica reads as {got}"))?;
    match format {
        DiskFormat::Qcow2 => image::add_bitmap(path, &seed_bitmap_name(&point.id)).await?,
        // NB: a VM started on the image while it was written (past the check before it)
        // would have its writes vouched for as the point's.
        DiskFormat::Raw if seeded => {
            // NB: the stamp before the check: a VM that opened the file before it is found,
            // one that opens it after cannot have written before the stamp.
            let stamp = FileStamp::of(path, &point.id);
            if super::reprotect::held_open_by(path).is_none() {
                keep_twin(path, &pd.name, &point.id);
                keep_stamp(path, &pd.name, stamp);
            }
        }
        DiskFormat::Raw => {}
    }
    Ok(read)
}

/// Keep a [`twin`] of the raw image at `path` (disk `disk`), equal to `point` and flushed:
/// the record of its writes since, for the re-protect that starts from `point`. Best effort:
/// without one the re-protect compares the whole disk.
pub(super) fn keep_twin(path: &Path, disk: &str, point: &str) {
    match twin::make(path, point) {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(disk, path = %path.display(), "the raw image's file system cannot clone it: a re-protect from this point compares the whole disk");
        }
        Err(e) => {
            tracing::warn!(disk, path = %path.display(), error = %e, "the raw image's twin was not made: a re-protect from this point compares the whole disk");
        }
    }
}

/// Keep `stamp` of the raw image at `path` (disk `disk`), taken with it equal to the stamp's
/// point and flushed, beside the image ([`stamp::keep_beside`]): what lets the agent record
/// the writes of a VM started on it from that point on. Best effort: without one the
/// re-protect from the point compares the whole disk (unless a twin names what changed).
pub(super) fn keep_stamp(path: &Path, disk: &str, stamp: Option<FileStamp>) {
    let Some(stamp) = stamp else {
        return;
    };
    if let Err(e) = stamp::keep_beside(path, &stamp) {
        tracing::warn!(disk, path = %path.display(), error = %e, "the raw image's stamp was not kept: a re-protect from this point compares the whole disk");
    }
}

/// Check that `map`, what was written for disk `pd` of `point`, has the digest the manifest
/// recorded; `found` says what the map describes, given its fingerprint.
///
/// # Errors
///
/// [`EngineError::DigestMismatch`] with both fingerprints.
pub(super) fn verify_digest(
    map: &BlockMap,
    point: &RecoveryPoint,
    pd: &lifeboat_store::PointDisk,
    found: impl FnOnce(&str) -> String,
) -> Result<(), EngineError> {
    let got = maps::digest(map);
    if got != pd.digest {
        return Err(EngineError::DigestMismatch {
            disk: pd.name.clone(),
            point: point.id.clone(),
            detail: format!(
                "the manifest says {}, {}",
                pd.digest.fingerprint,
                found(&got.fingerprint)
            ),
        });
    }
    Ok(())
}

impl Replicator {
    /// Materialise the point `choice` names ([`materialise_point`]).
    ///
    /// # Errors
    ///
    /// No such point, store failures, or [`EngineError::DigestMismatch`].
    pub async fn materialise(
        &self,
        choice: &PointChoice,
        out: Output<'_>,
        label: &str,
        progress: ProgressSink<'_>,
    ) -> Result<FailoverReport, EngineError> {
        let point = choose_point(self.store.as_ref(), &self.vm, choice).await?;
        materialise_point(self.store.as_ref(), &self.vm, point, out, label, progress).await
    }

    /// Remove the disks of failover `label` from `dir` (in whichever format they were written).
    ///
    /// # Errors
    ///
    /// A file that exists and cannot be removed.
    pub fn remove_materialised(
        &self,
        dir: &Path,
        label: &str,
        disks: &[String],
    ) -> Result<(), EngineError> {
        remove_disk_images(dir, self.vm.name(), label, disks).map(drop)
    }

    /// Fail over. Planned: the source VM is stopped first ([`Hypervisor::stop_vm`]: its guest
    /// shut down, or paused after the policy's grace), then one last cycle ships everything
    /// written up to the stop (straight to the store, without a change log), and that newest
    /// point is used: nothing is lost, and the two copies never run at once. Unplanned: the
    /// source is not touched; `choice` picks the point.
    ///
    /// Idempotent: a VM the engine has failed over already (the agent stopped after the
    /// failover and before its job ended, and the job runs again) is reported failed over to
    /// the same point, its disks materialised again and verified in case they were lost.
    ///
    /// # Errors
    ///
    /// [`EngineError::SourceNotStopped`] (nothing failed over, the VM stays protected), the
    /// final cycle's, the store's or the verification's failure; the VM stays protected if the
    /// failover did not happen.
    ///
    /// [`Hypervisor::stop_vm`]: crate::backend::Hypervisor::stop_vm
    pub async fn failover(
        &mut self,
        planned: bool,
        choice: &PointChoice,
        out: Output<'_>,
        now: SystemTime,
        progress: ProgressSink<'_>,
    ) -> Result<FailoverReport, EngineError> {
        if let EnginePhase::FailedOver { point } = &self.state.phase {
            let done = PointChoice::Named(point.clone());
            return self.materialise(&done, out, FAILOVER_LABEL, progress).await;
        }
        let (point, stopped) = self.take_point(planned, choice, now).await?;
        if stopped.is_some() {
            // NB: now, while the stopped disks still equal the point: the failover's own disks
            // take long to write, and a VM started again meanwhile would write into the twins.
            // (Not at a failback's stop: nothing returns to the recovered VM's disks.)
            self.keep_twins(&point.id);
        }
        let mut report = materialise_point(
            self.store.as_ref(),
            &self.vm,
            point,
            out,
            FAILOVER_LABEL,
            progress,
        )
        .await?;
        self.failed_over(planned, &report.point.id).await?;
        report.source_stopped = stopped.map(|s| s.to_string());
        Ok(report)
    }

    /// The first half of a failback: fail over as [`Replicator::failover`] does (a planned one
    /// stops the VM and ships everything first), writing no disks here: the point goes onto
    /// the original disks at the site the VM returns to ([`super::restore_onto`], the Failback
    /// job). Idempotent as `failover` is.
    ///
    /// # Errors
    ///
    /// As [`Replicator::failover`].
    pub async fn fail_over_to_primary(
        &mut self,
        planned: bool,
        choice: &PointChoice,
        now: SystemTime,
    ) -> Result<FailoverReport, EngineError> {
        let (point, stopped) = match &self.state.phase {
            EnginePhase::FailedOver { point } => {
                // NB: a retry of this engine's own failback (it fenced the replica at its
                // epoch); the primary site's engine, failed over since the way out, must not
                // answer with the point it failed over to then.
                let epoch = self.store.epoch(&self.vm).await?;
                if epoch.number != self.state.epoch {
                    return Err(EngineError::NotReady {
                        what: format!(
                            "VM {} failed over from this site at epoch {}, and the replica is at epoch {} ({}): this site does not replicate it, so it cannot fail it back",
                            self.vm, self.state.epoch, epoch.number, epoch.holder
                        ),
                    });
                }
                let done = PointChoice::Named(point.clone());
                (
                    choose_point(self.store.as_ref(), &self.vm, &done).await?,
                    None,
                )
            }
            _ => {
                let (point, stopped) = self.take_point(planned, choice, now).await?;
                self.failed_over(planned, &point.id).await?;
                (point, stopped)
            }
        };
        Ok(FailoverReport {
            point,
            disks: Vec::new(),
            bytes_read: 0,
            source_stopped: stopped.map(|s| s.to_string()),
            compared_bytes: 0,
        })
    }

    /// A planned failback's first step at the site it leaves: a cycle of the running VM,
    /// shipped straight from its view (`Replicator::run_direct_cycle`), nothing stopped or
    /// fenced, so that the original disks are brought to a fresh point while the VM runs on,
    /// and the stop that follows ships only what it writes meanwhile.
    /// The cycle's report; its point is the one it cut (the latest, if it cut none).
    ///
    /// # Errors
    ///
    /// A VM that needs a resync (a planned failback of it would be refused at its stop), and
    /// the cycle's failures.
    pub async fn ship_before_stop(&mut self, now: SystemTime) -> Result<Report, EngineError> {
        let vm = self.vm.clone();
        let needs_resync = |reason: &str| EngineError::NotReady {
            what: format!("a planned failback of VM {vm} needs a resync first: {reason}"),
        };
        if let EnginePhase::ResyncRequired { reason } = &self.state.phase {
            return Err(needs_resync(reason));
        }
        let mut report = self.run_direct_cycle(now).await?;
        if let Some(reason) = &report.resync_required {
            return Err(needs_resync(reason));
        }
        if report.point.is_none() {
            report.point =
                Some(choose_point(self.store.as_ref(), &self.vm, &PointChoice::Latest).await?);
        }
        Ok(report)
    }

    /// Stop the source and ship what it wrote (planned), choose the point, and take the
    /// replica for this engine's new epoch (every other writer is fenced from then on).
    async fn take_point(
        &mut self,
        planned: bool,
        choice: &PointChoice,
        now: SystemTime,
    ) -> Result<(RecoveryPoint, Option<Stopped>), EngineError> {
        let mut stopped = None;
        let choice = if planned {
            // NB: before the stop: a VM that needs a resync cannot be failed over without loss,
            // and stopping it would only take it down for nothing.
            if let EnginePhase::ResyncRequired { reason } = &self.state.phase {
                return Err(EngineError::NotReady {
                    what: format!(
                        "a planned failover of VM {} needs a resync first: {reason}",
                        self.vm
                    ),
                });
            }
            let how = self
                .hypervisor
                .stop_vm(&self.disks, self.settings.stop_grace)
                .await
                .map_err(|source| EngineError::SourceNotStopped {
                    vm: self.vm.to_string(),
                    source,
                })?;
            tracing::info!(vm = %self.vm, how = %how, "the source VM is stopped for a planned failover");
            stopped = Some(how);
            let report = self.run_direct_cycle(now).await?;
            if let Some(reason) = report.resync_required {
                return Err(EngineError::NotReady {
                    what: format!(
                        "a planned failover of VM {} needs a resync first: {reason}",
                        self.vm
                    ),
                });
            }
            PointChoice::Latest
        } else {
            choice.clone()
        };
        // NB: the point is chosen before the fence: a fence changes no point, and choosing
        // first keeps a failover to a point that does not exist from fencing anything.
        let point = choose_point(self.store.as_ref(), &self.vm, &choice).await?;
        let epoch = self
            .store
            .fence(&self.vm, &self.writer, super::unix_ms(now))
            .await?;
        self.state.epoch = epoch.number;
        self.save()?;
        Ok((point, stopped))
    }

    /// The failover to `point` happened: tracking stops (planned: the source is stopped and
    /// everything it wrote is in the point, so its disks are marked to record their writes
    /// since the point, for a failback: [`Replicator::keep_seed`]) and the pending cycles are
    /// dropped.
    async fn failed_over(&mut self, planned: bool, point: &str) -> Result<(), EngineError> {
        if planned {
            self.hypervisor.stop_tracking(&self.disks).await?;
            self.keep_seed(point).await;
        }
        self.state.phase = EnginePhase::FailedOver {
            point: point.to_owned(),
        };
        self.drop_pending()?;
        self.save()
    }

    /// Commit a failover: delete every point but the one failed over to.
    ///
    /// # Errors
    ///
    /// Not failed over, or store failures.
    pub async fn commit(&mut self) -> Result<Vec<String>, EngineError> {
        let EnginePhase::FailedOver { point } = self.state.phase.clone() else {
            return Err(EngineError::NotReady {
                what: format!("VM {} has not failed over", self.vm),
            });
        };
        delete_points_but(self.store.as_ref(), &self.vm, &point).await
    }
}

/// Delete every point of `vm` but `keep` (a commit); the ids deleted.
async fn delete_points_but(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    keep: &str,
) -> Result<Vec<String>, EngineError> {
    let manifest = store.manifest(vm).await?;
    let others: Vec<String> = manifest
        .map(|m| {
            m.points
                .into_iter()
                .map(|p| p.id)
                .filter(|id| id != keep)
                .collect()
        })
        .unwrap_or_default();
    for id in &others {
        store.delete_point(vm, id).await?;
    }
    Ok(others)
}

/// Commit a failover from the store alone (the VM's own agent is lost or fenced): keep
/// `point`, the failover's, and delete the others, writing at the epoch the failover took.
///
/// # Errors
///
/// The replica was never failed over (it is at the first epoch), `point` is not in it, or
/// store failures.
pub async fn commit_in_store(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point: &str,
) -> Result<Vec<String>, EngineError> {
    let epoch = store.epoch(vm).await?;
    if epoch.number == 0 {
        return Err(EngineError::NotReady {
            what: format!("VM {vm}'s replica was never failed over: nothing to commit"),
        });
    }
    choose_point(store, vm, &PointChoice::Named(point.to_owned())).await?;
    store.hold_epoch(vm, epoch.number);
    delete_points_but(store, vm, point).await
}

/// Remove the image files (of any [`DiskFormat`]) of `disks` of a failover named `label` from
/// `dir`; the disks that had none there.
///
/// # Errors
///
/// A file that exists cannot be removed.
pub fn remove_disk_images(
    dir: &Path,
    vm: &str,
    label: &str,
    disks: &[String],
) -> Result<Vec<String>, EngineError> {
    let mut missing = Vec::new();
    for disk in disks {
        let mut found = false;
        for format in DiskFormat::ALL {
            let path = disk_image_path(dir, vm, label, disk, format);
            twin::remove_all(&path).map_err(EngineError::state("remove the twin of", &path))?;
            stamp::forget_all(&path).map_err(EngineError::state("remove the stamp of", &path))?;
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::state("remove failover disk", path)(e)),
                Ok(()) => found = true,
            }
        }
        if !found {
            missing.push(disk.clone());
        }
    }
    Ok(missing)
}
