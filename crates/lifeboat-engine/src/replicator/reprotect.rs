//! The way back after a failover: re-protect (replicate from where the VM runs now into the
//! replica it was recovered from) and fail back (bring the original disks to the newest point,
//! writing only the blocks that differ). Neither sends a whole disk when the other side still
//! holds most of it.
//!
//! ```text
//!  protect A→replica ── failover (point P) ──> B runs on P's disks
//!  re-protect B:   fence, drop the points after P, live replica = P,
//!                  resync B against P's block map: send the blocks B changed since P
//!  fail back:      (planned) on A's site while B runs: sync_original_disks, A's disks
//!                  brought to the newest point S (restore_onto, as below), their seed kept;
//!                  stop B, ship, point Q (fail_over_to_primary), then on A's site
//!                  restore_onto(A's disks, Q): from the seed, the blocks changed since S (or
//!                  without one, hash A's disks), write the blocks that differ from Q (B's
//!                  writes, and whatever an unplanned failover lost at A)
//!  re-protect A:   as for B, from Q: A equals Q, so only what A wrote since is sent
//! ```
//!
//! Both directions replicate into the same replica (one history of points, one store), each
//! under its own epoch: re-protect fences the store, so the site left behind cannot write to
//! it again.
//!
//! # Resuming
//!
//! Re-protect saves its phase (a resync "from point P") before it changes the store; a
//! resumed attempt drops the later points and puts the live replica back to P again (both
//! idempotent) until the resync has started, then resumes the resync from its saved map.
//! A restore can run again from the start: what it already wrote now matches and is skipped.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use lifeboat_blockmap::{BlockMap, HashAlgorithm, RangeOp, plan_resync};
use lifeboat_store::local::PositionalIo;
use lifeboat_store::{At, ReplicaStore, VmKey};

use super::failover::{
    FailoverReport, MaterialisedDisk, PointChoice, choose_point, keep_stamp, keep_twin,
    verify_digest,
};
use super::image::{self, Image, StoreSource, write_from_store};
use super::{Progress, ProgressSink, Replicator, Report, maps, throughput, unix_ms};
use crate::backend::{DiskRef, SEED_BITMAP_PREFIX, seed_bitmap_name, union_ranges};
use crate::error::EngineError;
use crate::stamp::FileStamp;
use crate::state::{AgentState, DiskRecord, EnginePhase};
use crate::twin;

/// How the phase of a re-protect's resync starts its reason.
pub(crate) const REPROTECT: &str = "Reprotect";

/// The point a re-protect in `phase` started from, if it is one.
pub(super) fn reprotecting_from(phase: &EnginePhase) -> Option<&str> {
    match phase {
        EnginePhase::ResyncRequired { reason } => reason
            .strip_prefix(REPROTECT)
            .and_then(|r| r.strip_prefix(" from point ")),
        _ => None,
    }
}

impl Replicator {
    /// Re-protect: protect the VM where it runs now (the recovered VM after a failover, the
    /// original after a failback) into the replica it was recovered from, seeded by the point
    /// `from_point` it started from. The replica is taken for this engine (a new epoch), the
    /// points after `from_point` (an older point's failover leaves the old site's later
    /// history) are dropped, the live replica is put back to `from_point`, and a resync
    /// compares every disk with that point's block map and sends only the blocks that differ.
    /// Delta cycles follow as for any protected VM.
    ///
    /// Idempotent, and resumable after a crash (see the module's notes). An engine that is
    /// protected already has nothing to do.
    ///
    /// # Errors
    ///
    /// No such point, a disk of the VM here whose size is not the point's, hypervisor and
    /// store failures (the saved state keeps what was done).
    pub async fn reprotect(
        &mut self,
        from_point: &str,
        now: SystemTime,
        progress: ProgressSink<'_>,
    ) -> Result<Report, EngineError> {
        if reprotecting_from(&self.state.phase) != Some(from_point) {
            // NB: protected already counts only while this engine still holds the replica (a
            // re-protect whose job ended unseen); an engine left Protected, or half way
            // through anything, by a site that was failed away from holds a dead epoch.
            let holds = self.store.epoch(&self.vm).await?.number == self.state.epoch;
            if self.state.phase == EnginePhase::Protected && holds {
                return Ok(Report::default());
            }
            self.take_replica(from_point, now).await?;
        }
        if self.state.resync_cycle.is_none() {
            // NB: not once the resync has started: it writes the live replica past the point.
            self.rewind_replica(from_point).await?;
        }
        // NB: a VM whose agent has not looked since it started (a re-protect asked at once)
        // may not have written yet: its raw disks can still be armed, and an arming left
        // unchecked is checked.
        self.arm_seeds().await;
        self.resync(now, progress).await
    }

    /// Check the VM here against the point, fence the store for this engine and record the
    /// re-protect (its resync) before anything in the store changes.
    async fn take_replica(&mut self, from_point: &str, now: SystemTime) -> Result<(), EngineError> {
        let infos = self.check_source_and_store().await?;
        let point = choose_point(
            self.store.as_ref(),
            &self.vm,
            &PointChoice::Named(from_point.to_owned()),
        )
        .await?;
        for info in &infos {
            match point.disks.iter().find(|d| d.name == info.name) {
                Some(pd) if pd.size_bytes == info.size_bytes => {}
                Some(pd) => {
                    return Err(EngineError::NotReady {
                        what: format!(
                            "disk {:?} of VM {} is {} bytes here and {} bytes at point {from_point}: \
                             re-protect seeds each disk from the point it was recovered from",
                            info.name, self.vm, info.size_bytes, pd.size_bytes
                        ),
                    });
                }
                None => {
                    return Err(EngineError::NotReady {
                        what: format!(
                            "disk {:?} of VM {} has no replica at point {from_point}",
                            info.name, self.vm
                        ),
                    });
                }
            }
        }
        super::check_log_space(
            self.fs.as_ref(),
            &self.dir,
            &infos,
            self.settings.log_threshold_percent,
        )?;
        let epoch = self
            .store
            .fence(&self.vm, &self.writer, unix_ms(now))
            .await?;
        let logs: Vec<crate::state::PendingLog> =
            self.state.pending.drain(..).flat_map(|c| c.logs).collect();
        self.state = AgentState {
            phase: EnginePhase::ResyncRequired {
                reason: format!("{REPROTECT} from point {from_point}"),
            },
            epoch: epoch.number,
            last_cycle: self.state.last_cycle,
            disks: infos.iter().map(DiskRecord::from).collect(),
            ..AgentState::default()
        };
        self.save()?;
        super::logs::delete_files(self.fs.as_ref(), &logs)
    }

    /// Make the live replica equal `from_point`: drop the points after it, then put the live
    /// disks back to the latest point (now `from_point`). Idempotent.
    async fn rewind_replica(&mut self, from_point: &str) -> Result<(), EngineError> {
        let manifest = self.store.manifest(&self.vm).await?;
        let later: Vec<String> = manifest
            .map(|m| {
                m.points
                    .into_iter()
                    .map(|p| p.id)
                    .skip_while(|id| id != from_point)
                    .skip(1)
                    .collect()
            })
            .unwrap_or_default();
        for id in &later {
            tracing::info!(vm = %self.vm, point = %id, from = %from_point, "re-protect drops a point of the site left behind");
            self.store.delete_point(&self.vm, id).await?;
        }
        self.store.revert_to_latest_point(&self.vm).await?;
        // NB: a map the old site left tagged otherwise (an interrupted copy or resync there)
        // describes nothing now; one tagged `resync` would be trusted by this re-protect's
        // own resumption. It is replaced by bytes no map decodes from: re-hashed when needed.
        let disks: Vec<String> = self.disks.iter().map(|d| d.name.clone()).collect();
        for disk in disks {
            let stale = self
                .store
                .block_map(&self.vm, &disk)
                .await?
                .is_some_and(|bytes| maps::decode(&bytes).is_none_or(|(tag, _)| tag != from_point));
            if stale {
                self.store
                    .put_block_map(&self.vm, &disk, bytes::Bytes::from_static(b"stale"))
                    .await?;
            }
        }
        Ok(())
    }
}

/// What a planned failover left at the site it stopped, for the failback that returns there:
/// the point the stopped disks were equal to, and each disk's block map at that point. With
/// the seed bitmap ([`crate::backend::seed_bitmap_name`]) the disks have recorded since, a
/// failback writes only the blocks either side changed, and reads none of the rest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeedMaps {
    /// The point.
    pub point: String,
    /// Each disk's block map at the point.
    pub maps: BTreeMap<String, BlockMap>,
    /// The raw image files' stamps when they were left at the point (by a planned failover
    /// that stopped them, or a failback's first step that wrote them): one whose file still
    /// matches has not been written since.
    pub stamps: BTreeMap<String, FileStamp>,
}

/// One disk's seed, as [`restore_disk`] uses it: the point the disk equals but for the blocks
/// written since, its block map there, and (a raw image file) its stamp then.
#[derive(Clone, Copy, Debug)]
struct Seed<'a> {
    point: &'a str,
    map: &'a BlockMap,
    stamp: Option<&'a FileStamp>,
}

impl SeedMaps {
    fn seed(&self, disk: &str) -> Option<Seed<'_>> {
        Some(Seed {
            point: &self.point,
            map: self.maps.get(disk)?,
            stamp: self.stamps.get(disk).filter(|s| s.point == self.point),
        })
    }
}

/// A seed file of disk `disk` in the state folder `dir`: `which` is `seed` (a planned
/// failover's, of the disks it stopped) or `original` (a failback's first step's, of the
/// original disks it wrote); `ext` is `map` or `stamp`.
fn seed_file(dir: &Path, which: &str, disk: &str, ext: &str) -> PathBuf {
    dir.join(format!("{which}-{disk}.{ext}"))
}

impl Replicator {
    /// After a planned failover to `point` (the source stopped, equal to the point): ask the
    /// hypervisor to record the disks' writes from now on as writes since `point`, keep each
    /// raw image file's [`FileStamp`] (a raw image cannot record its writes: an unchanged file
    /// has none; its reflinked twin, [`Replicator::keep_twins`], was made at the stop), and
    /// keep each disk's block map at `point` in the state folder. Best effort: a failback
    /// without them compares the whole disks.
    pub(crate) async fn keep_seed(&self, point: &str) {
        let marked = match self.hypervisor.mark_point(&self.disks, point).await {
            Ok(marked) => marked,
            Err(e) => {
                tracing::warn!(vm = %self.vm, point, error = %e, "the stopped disks cannot record their writes since the failover");
                false
            }
        };
        let stamped = self.keep_stamps(&self.disks, point, |disk| {
            seed_file(&self.dir, "seed", disk, "stamp")
        });
        if !marked && stamped == 0 {
            tracing::info!(vm = %self.vm, point, "the disks keep no record of their writes across a restart, and are not files: a failback will compare them in full");
            return;
        }
        self.keep_point_maps(point, |disk| seed_file(&self.dir, "seed", disk, "map"))
            .await;
    }

    /// Right after a planned failover stopped the VM and chose `point` (its disks equal it):
    /// keep a reflinked [`twin`] of each raw image file, where its file system clones files,
    /// which names every write made to it since, for the failback that returns to it. Best
    /// effort, as [`Replicator::keep_seed`].
    pub(crate) fn keep_twins(&self, point: &str) {
        for disk in &self.disks {
            let path = Path::new(&disk.path);
            if is_raw_image_file(path) {
                keep_twin(path, &disk.name, point);
            }
        }
    }

    /// Keep the [`FileStamp`] for `point` of each of `disks` that is a regular file at
    /// `path_of(disk)` (and remove an older one of the others); how many were kept.
    fn keep_stamps(
        &self,
        disks: &[DiskRef],
        point: &str,
        path_of: impl Fn(&str) -> PathBuf,
    ) -> usize {
        let kept = disks.iter().map(|disk| {
            let stamp = FileStamp::of(Path::new(&disk.path), point);
            self.store_stamp(&disk.name, &path_of(&disk.name), stamp.as_ref())
        });
        kept.filter(|&kept| kept).count()
    }

    /// Write `stamp` of disk `disk` at `path`, or remove the one there when there is none;
    /// whether one is kept. Best effort: a disk without one is compared in full.
    fn store_stamp(&self, disk: &str, path: &Path, stamp: Option<&FileStamp>) -> bool {
        let done = match stamp {
            Some(stamp) => serde_json::to_vec(stamp)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    self.fs
                        .write_atomic(path, &bytes)
                        .map_err(|e| e.to_string())
                }),
            None => self.fs.remove(path).map(drop).map_err(|e| e.to_string()),
        };
        if let Err(why) = &done {
            tracing::warn!(vm = %self.vm, disk, why, "the disk's stamp was not kept: a failback will compare it in full");
        }
        done.is_ok() && stamp.is_some()
    }

    /// The stamp kept at `path`, if there is a readable one.
    fn read_stamp(&self, path: &Path) -> Option<FileStamp> {
        let bytes = self.fs.read(path).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Keep each disk's block map at `point` (the store's, when it describes the point) in
    /// the state folder, at `path_of(disk)`. Best effort: a disk without one is compared in
    /// full by the failback.
    async fn keep_point_maps(&self, point: &str, path_of: impl Fn(&str) -> PathBuf) {
        let Ok(point_info) = choose_point(
            self.store.as_ref(),
            &self.vm,
            &PointChoice::Named(point.to_owned()),
        )
        .await
        else {
            return;
        };
        for pd in &point_info.disks {
            let map = maps::load_trusted(
                self.store.as_ref(),
                &self.vm,
                &pd.name,
                pd.size_bytes,
                pd.digest.block_size_bytes,
                &[point],
            )
            .await;
            let kept = match map {
                Ok(Some(map)) => self
                    .fs
                    .write_atomic(&path_of(&pd.name), &maps::encode(point, &map))
                    .map_err(|e| e.to_string()),
                Ok(None) => Err("the stored block map does not describe the point".to_owned()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = kept {
                tracing::warn!(vm = %self.vm, disk = %pd.name, point, why, "no block map kept for the failback: it will compare this disk in full");
            }
        }
    }

    /// The seed of the original disks `disks` kept in the state folder `dir`: the one a
    /// failback's first step left (the point it brought them to), else the one a planned
    /// failover left when it stopped them, if any. Each names its point in its maps; a disk's
    /// map is used only with the seed that still holds on the disk (a qcow2 image's bitmap for
    /// that point, a raw file's stamp for it, which names its inode), so an old seed costs a
    /// compare. Not caught: a qcow2 image of another disk of the VM put in this one's place
    /// (`spec.disks` paths swapped) that carries a bitmap for the same point.
    fn failback_seeds<'d>(
        &self,
        dir: &Path,
        disks: impl Iterator<Item = &'d str> + Clone,
    ) -> Option<SeedMaps> {
        ["original", "seed"].into_iter().find_map(|which| {
            let mut seeds: Option<SeedMaps> = None;
            for disk in disks.clone() {
                let Ok(Some(bytes)) = self.fs.read(&seed_file(dir, which, disk, "map")) else {
                    continue;
                };
                let Some((tag, map)) = maps::decode(&bytes) else {
                    continue;
                };
                let seeds = seeds.get_or_insert_with(|| SeedMaps {
                    point: tag.clone(),
                    ..SeedMaps::default()
                });
                // NB: the disks of one step share its point; a disk kept for another is not
                // used.
                if tag != seeds.point {
                    continue;
                }
                seeds.maps.insert(disk.to_owned(), map);
                if let Some(stamp) = self.read_stamp(&seed_file(dir, which, disk, "stamp")) {
                    seeds.stamps.insert(disk.to_owned(), stamp);
                }
            }
            seeds
        })
    }

    /// A planned failback's first step, while the recovered VM still runs and replicates:
    /// bring the original disks `targets` to the newest point with [`restore_onto`] (seeded as
    /// [`Replicator::fail_back`] is), then keep what they hold as the seed of the failback's
    /// last step: each disk's block map at that point and, for a raw image file, its
    /// [`FileStamp`] (a qcow2 image got its seed bitmap for the point). Once the VM is stopped
    /// and its last changes shipped, `fail_back` writes only the blocks changed since, and
    /// reads none of the disks: the VM is down for its last changes only, not for everything
    /// it wrote since the failover (on a raw disk, not for a read of the whole disk either).
    ///
    /// The seeds are read from and kept in `seed_dir` (the state folder of the original
    /// disks' site), by default this engine's. The newest point is chosen again when the
    /// recovered VM cuts a newer one while its maps are read (`newest_point_with_maps`).
    ///
    /// Can run again: a seed that no longer holds (the disk written since) is not used.
    ///
    /// # Errors
    ///
    /// As [`restore_onto`].
    pub async fn sync_original_disks(
        &self,
        targets: &[DiskRef],
        seed_dir: Option<&Path>,
        progress: ProgressSink<'_>,
    ) -> Result<FailoverReport, EngineError> {
        let dir = seed_dir.unwrap_or(&self.dir);
        let (point, wants) = newest_point_with_maps(self.store.as_ref(), &self.vm).await?;
        let seeds = self.failback_seeds(dir, targets.iter().map(|t| t.name.as_str()));
        let (report, restored) = restore_disks(
            self.store.as_ref(),
            &self.vm,
            &point.id,
            targets,
            seeds.as_ref(),
            wants,
            progress,
        )
        .await?;
        // NB: the stamps first: a map without its stamp makes a raw disk compared in full,
        // a stamp whose map names another point is not used. A file written since its own
        // flush (its stamp then is not its stamp now) keeps none.
        for target in targets {
            let stamp = restored
                .get(&target.name)
                .and_then(|disk| disk.stamp.as_ref())
                .filter(|&then| {
                    FileStamp::of(Path::new(&target.path), &point.id).as_ref() == Some(then)
                });
            let path = seed_file(dir, "original", &target.name, "stamp");
            self.store_stamp(&target.name, &path, stamp);
        }
        for (disk, restored) in &restored {
            let path = seed_file(dir, "original", disk, "map");
            if let Err(e) = self
                .fs
                .write_atomic(&path, &maps::encode(&point.id, &restored.map))
            {
                tracing::warn!(vm = %self.vm, disk, error = %e, "no block map kept for the failback: it will compare this disk in full");
            }
        }
        tracing::info!(vm = %self.vm, point = %point.id, written = report.bytes_read, "failback: the original disks hold the newest point; the recovered VM can be stopped");
        Ok(report)
    }

    /// Fail back onto `targets`, the VM's original disks: bring them to `point_id` with
    /// [`restore_onto`], using the seed kept in `seed_dir` (the state folder of their site, by
    /// default this engine's: see [`Replicator::sync_original_disks`]) when there is one, then
    /// forget the seeds.
    ///
    /// # Errors
    ///
    /// As [`restore_onto`].
    pub async fn fail_back(
        &self,
        point_id: &str,
        targets: &[DiskRef],
        seed_dir: Option<&Path>,
        progress: ProgressSink<'_>,
    ) -> Result<FailoverReport, EngineError> {
        let dir = seed_dir.unwrap_or(&self.dir);
        let seeds = self.failback_seeds(dir, targets.iter().map(|t| t.name.as_str()));
        let report = restore_onto(
            self.store.as_ref(),
            &self.vm,
            point_id,
            targets,
            seeds.as_ref(),
            progress,
        )
        .await?;
        let names = targets.iter().map(|t| t.name.as_str());
        for disk in names.chain(self.disks.iter().map(|d| d.name.as_str())) {
            for folder in [dir, self.dir.as_path()] {
                for (which, ext) in [
                    ("seed", "map"),
                    ("seed", "stamp"),
                    ("original", "map"),
                    ("original", "stamp"),
                ] {
                    let _ = self.fs.remove(&seed_file(folder, which, disk, ext));
                }
            }
        }
        Ok(report)
    }
}

/// Bring the original disks `targets` (raw or qcow2 images, or block devices, at the site the
/// VM returns to) to `point_id` of `vm`, writing only the blocks that differ (the recovered
/// VM's writes, and whatever an unplanned failover lost at this site):
///
/// - a disk with a seed (`seeds`: the block map at the point a planned failover, or a
///   failback's first step, left it at) that still holds (a qcow2 image's seed bitmap,
///   intact; a raw image file's [`FileStamp`], unchanged) is not read at all: the blocks its
///   bitmap marks and the blocks whose hashes differ between the seed's point and `point_id`
///   are written;
/// - any other disk is hashed block by block and compared with the point's block map.
///
/// A disk whose image is gone is created and filled: the one case that copies a whole disk.
/// Every disk's map is checked against the point's digest at the end, and a qcow2 disk gets a
/// new seed bitmap for the point (a raw image file, a reflinked [`crate::twin`] where its file
/// system clones files), so that the re-protect that follows reads and sends only what the VM
/// writes after the failback.
///
/// Needs only the store and the images: the agent of the site the VM returns to runs it (the
/// Failback jobs: a planned failback's first while the recovered VM still runs, the last once
/// it is stopped). Nothing else may write the images meanwhile: one held open is refused.
/// Without a seed the disks' hashes are compared with the point's digest; with one, the
/// block map the disk is known to have (the seed's, with the blocks written) is.
///
/// # Errors
///
/// No such point, a disk of the point without an original disk, an image in a format that is
/// not written in place (VHDX, a dynamic VHD, VMDK), an image another process holds open, I/O,
/// `qemu-img`/`qemu-nbd` and store failures, or [`EngineError::DigestMismatch`].
pub async fn restore_onto(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point_id: &str,
    targets: &[DiskRef],
    seeds: Option<&SeedMaps>,
    progress: ProgressSink<'_>,
) -> Result<FailoverReport, EngineError> {
    restore_disks(
        store,
        vm,
        point_id,
        targets,
        seeds,
        BTreeMap::new(),
        progress,
    )
    .await
    .map(|(report, _)| report)
}

/// How many times [`newest_point_with_maps`] chooses the newest point.
const NEWEST_POINT_TRIES: usize = 3;

/// The newest point of `vm` and each of its disks' block maps there, as the store keeps them
/// (its live maps describe the newest point only). A cycle that cuts a newer point between
/// the choice and the maps' reads (the writer replicates on while this runs) makes them
/// describe that one: the newer point is chosen then, up to [`NEWEST_POINT_TRIES`] times,
/// rather than hashing the chosen one from the store (for a remote store, a download of the
/// whole replica). A map missing for another reason is left out (the point is hashed).
async fn newest_point_with_maps(
    store: &dyn ReplicaStore,
    vm: &VmKey,
) -> Result<(lifeboat_store::RecoveryPoint, BTreeMap<String, BlockMap>), EngineError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let point = choose_point(store, vm, &PointChoice::Latest).await?;
        let mut wants = BTreeMap::new();
        for pd in &point.disks {
            let (size, block_size) = (pd.size_bytes, pd.digest.block_size_bytes);
            match maps::load_trusted(store, vm, &pd.name, size, block_size, &[&point.id]).await? {
                Some(map) => {
                    wants.insert(pd.name.clone(), map);
                }
                None => break,
            }
        }
        if wants.len() == point.disks.len() || tries == NEWEST_POINT_TRIES {
            return Ok((point, wants));
        }
        let newest = choose_point(store, vm, &PointChoice::Latest).await?;
        if newest.id == point.id {
            return Ok((point, wants));
        }
        tracing::info!(vm = %vm, chosen = %point.id, newest = %newest.id, "a newer point was cut while the disks' maps were read: choosing it");
    }
}

/// One original disk to bring to a point: the point's disk, the original, and what the point
/// holds on it (its block map).
#[derive(Debug)]
struct DiskWork<'a> {
    pd: &'a lifeboat_store::PointDisk,
    target: &'a DiskRef,
    want: BlockMap,
}

/// What [`restore_disk`] left on one original disk.
#[derive(Debug)]
struct RestoredDisk {
    /// Bytes read from the store and written.
    read: u64,
    /// Bytes of the disk read to compare it.
    compared: u64,
    /// The disk's block map now, checked against the point's digest: the seed of a later step.
    map: BlockMap,
    /// A raw image file's [`FileStamp`], taken right after its flush.
    stamp: Option<FileStamp>,
}

/// [`restore_onto`], with what each disk holds now, by name; `wants` has the point's block
/// maps already read (the others are read, or hashed from the store).
async fn restore_disks(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point_id: &str,
    targets: &[DiskRef],
    seeds: Option<&SeedMaps>,
    mut wants: BTreeMap<String, BlockMap>,
    progress: ProgressSink<'_>,
) -> Result<(FailoverReport, BTreeMap<String, RestoredDisk>), EngineError> {
    let point = choose_point(store, vm, &PointChoice::Named(point_id.to_owned())).await?;
    let mut report = FailoverReport {
        point: point.clone(),
        disks: Vec::new(),
        bytes_read: 0,
        source_stopped: None,
        compared_bytes: 0,
    };
    // NB: every disk's target and map before any is written: the store's live map describes
    // only the newest point, and a failback's first step runs while the recovered VM may cut
    // the next one.
    let mut work = Vec::new();
    for pd in &point.disks {
        let target =
            targets
                .iter()
                .find(|t| t.name == pd.name)
                .ok_or_else(|| EngineError::NotReady {
                    what: format!(
                        "disk {:?} of point {point_id} has no original disk to fail back onto",
                        pd.name
                    ),
                })?;
        let want = match wants.remove(&pd.name) {
            Some(want) => want,
            None => point_map(store, vm, &point, pd).await?,
        };
        work.push(DiskWork { pd, target, want });
    }
    let mut restored = BTreeMap::new();
    for disk in work {
        let (pd, target) = (disk.pd, disk.target);
        let seed = seeds.and_then(|s| s.seed(&pd.name));
        let disk = restore_disk(store, vm, &point, disk, seed, progress).await?;
        report.bytes_read += disk.read;
        report.compared_bytes += disk.compared;
        report.disks.push(MaterialisedDisk {
            name: pd.name.clone(),
            path: target.path.clone().into(),
            size_bytes: pd.size_bytes,
        });
        restored.insert(pd.name.clone(), disk);
    }
    Ok((report, restored))
}

/// What `point` holds on disk `pd`: the store's block map when it describes the point, else
/// the point read from the store and hashed.
async fn point_map(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point: &lifeboat_store::RecoveryPoint,
    pd: &lifeboat_store::PointDisk,
) -> Result<BlockMap, EngineError> {
    let (size, block_size) = (pd.size_bytes, pd.digest.block_size_bytes);
    match maps::load_trusted(store, vm, &pd.name, size, block_size, &[&point.id]).await? {
        Some(map) => Ok(map),
        None => {
            maps::hash_replica(
                store,
                vm,
                &pd.name,
                &At::Point(point.id.clone()),
                size,
                block_size,
            )
            .await
        }
    }
}

/// Whether `path` is a regular file of raw data (not a qcow2, VHDX, dynamic VHD or VMDK
/// image): one whose offsets are the disk's, which a [`twin`] can describe.
fn is_raw_image_file(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = [0u8; 8];
    // NB: unsure is not raw (a twin of another format's file would be read as guest offsets);
    // only a file too short to have a header is.
    file.metadata().is_ok_and(|m| m.is_file())
        && match file.read_exact_at(&mut head, 0) {
            Ok(()) => image_format(&head).is_none(),
            Err(e) => e.kind() == std::io::ErrorKind::UnexpectedEof,
        }
}

/// The format of an image whose first bytes are `head`, when it is one whose data is not laid
/// out raw; None for raw data (and a fixed VHD, raw data with a footer at its end).
fn image_format(head: &[u8; 8]) -> Option<&'static str> {
    match head {
        [b'Q', b'F', b'I', 0xfb, ..] => Some("qcow2"),
        b"vhdxfile" => Some("VHDX"),
        // NB: a dynamic or differencing VHD starts with a copy of its footer.
        b"conectix" => Some("dynamic VHD"),
        [b'K', b'D', b'M', b'V', ..] => Some("VMDK"),
        _ => None,
    }
}

/// Another process that has `path` open (its pid and program), found through `/proc/*/fd`:
/// a hypervisor still holding the original disk (a QEMU paused by the failover, say) would
/// run on, or resume, over blocks rewritten under it. Linux only; elsewhere, and for processes
/// this agent may not inspect, nothing is found.
pub(super) fn held_open_by(path: &Path) -> Option<(u32, String)> {
    #[cfg(target_os = "linux")]
    {
        let target = std::fs::canonicalize(path).ok()?;
        let me = std::process::id();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                continue;
            };
            if fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
            {
                let program = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default();
                return Some((pid, program));
            }
        }
        None
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// An original disk, checked and ready to open.
#[derive(Debug)]
enum Target {
    /// A raw image or block device, open for writing in place.
    Raw(std::fs::File),
    /// A qcow2 image (written through `qemu-nbd`); `created` when the failback made it.
    Qcow2 { created: bool },
}

/// Check an original disk's image before the failback writes it: nobody else may hold it
/// open; a raw image (grown, sparse, to the disk's size if short) or block device is opened;
/// a qcow2 image is recognised (one that is gone is created when its name ends in `.qcow2`);
/// other formats are refused.
async fn open_target(path: &Path, disk: &str, size: u64) -> Result<Target, EngineError> {
    if let Some((pid, program)) = held_open_by(path) {
        return Err(EngineError::NotReady {
            what: format!(
                "disk {disk:?}: {} is open by process {pid} ({program}): power the VM at the \
                 site it returns to off (its hypervisor process gone) before the failback writes \
                 its disks, and start it fresh afterwards",
                path.display()
            ),
        });
    }
    if !path.exists() && path.extension().is_some_and(|e| e == "qcow2") {
        image::create_qcow2(path, size).await?;
        return Ok(Target::Qcow2 { created: true });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(EngineError::state("open original disk", path))?;
    let len = file
        .metadata()
        .map_err(EngineError::state("inspect original disk", path))?
        .len();
    let mut head = [0u8; 8];
    if len >= 8
        && file.read_exact_at(&mut head, 0).is_ok()
        && let Some(format) = image_format(&head)
    {
        if format == "qcow2" {
            return Ok(Target::Qcow2 { created: false });
        }
        return Err(EngineError::NotReady {
            what: format!(
                "disk {disk:?}: {} is a {format} image; failback writes raw and qcow2 images \
                 (a fixed VHD too: its data is raw) and block devices in place (convert it with \
                 qemu-img, or fail back to new disks)",
                path.display()
            ),
        });
    }
    // NB: a block device reports 0 here and has its size; a raw file shorter than the disk
    // (a new one) grows, sparse.
    if file
        .metadata()
        .map_err(EngineError::state("inspect original disk", path))?
        .is_file()
        && len < size
    {
        file.set_len(size)
            .map_err(EngineError::state("size original disk", path))?;
    }
    Ok(Target::Raw(file))
}

/// Open the original disk at `path` for the failback; with the seed of point `seed_point`,
/// a qcow2 image whose seed bitmap is intact is opened with that bitmap exported. Whether it
/// is qcow2.
async fn open_original(
    path: &Path,
    disk: &str,
    size: u64,
    seed_point: Option<&str>,
) -> Result<(Image, bool), EngineError> {
    match open_target(path, disk, size).await? {
        Target::Raw(file) => Ok((Image::file(file, path), false)),
        Target::Qcow2 { created } => {
            let info = image::qcow2_info(path).await?;
            if info.virtual_size != size {
                return Err(EngineError::NotReady {
                    what: format!(
                        "disk {disk:?}: {} is a qcow2 image of {} bytes, and the disk has {size} \
                         at the point: fail back to the disk it was, or resize it with qemu-img",
                        path.display(),
                        info.virtual_size
                    ),
                });
            }
            let seed = seed_point.map(seed_bitmap_name).filter(|name| {
                !created
                    && info
                        .bitmaps
                        .iter()
                        .any(|b| &b.name == name && b.enabled && !b.in_use)
            });
            if seed_point.is_some() && seed.is_none() {
                tracing::info!(disk, path = %path.display(), "the disk's seed bitmap is gone or was not stored cleanly (its QEMU killed?): comparing the whole disk");
            }
            Ok((Image::open_qcow2(path, seed.as_deref()).await?, true))
        }
    }
}

/// Replace a qcow2 failback target's seed bitmaps with one for `point`.
async fn reseed(path: &Path, point: &str) -> Result<(), EngineError> {
    for old in image::qcow2_info(path).await?.bitmaps {
        if old.name.starts_with(SEED_BITMAP_PREFIX) {
            image::remove_bitmap(path, &old.name).await?;
        }
    }
    image::add_bitmap(path, &seed_bitmap_name(point)).await
}

async fn restore_disk(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    point: &lifeboat_store::RecoveryPoint,
    disk: DiskWork<'_>,
    seed: Option<Seed<'_>>,
    progress: ProgressSink<'_>,
) -> Result<RestoredDisk, EngineError> {
    let DiskWork { pd, target, want } = disk;
    let path = Path::new(&target.path);
    // NB: before the image is opened (a short raw file grows): a raw file's stamp holds
    // only while nothing has written it since the failback's first step.
    let untouched = seed
        .and_then(|s| s.stamp)
        .is_some_and(|stamp| FileStamp::of(path, &stamp.point).as_ref() == Some(stamp));
    let map_error = |source| EngineError::BlockMap {
        disk: pd.name.clone(),
        source,
    };
    let block_size = pd.digest.block_size_bytes;
    let block = u64::from(block_size);
    let size = pd.size_bytes;
    let (image, qcow2) = open_original(path, &pd.name, size, seed.map(|s| s.point)).await?;
    // NB: a raw file's twin of the seed's point names what was written since, whoever wrote
    // it: stronger than its stamp, which only says nothing was (within a timestamp tick).
    let since_twin = match seed {
        Some(seed) if !qcow2 => twin::changed_since(path, seed.point).unwrap_or_else(|e| {
            tracing::warn!(vm = %vm, disk = %pd.name, error = %e, "the raw image's twin cannot be compared: its stamp, or a compare, decides");
            None
        }),
        _ => None,
    };
    let started = Instant::now();
    let report = |done: u64, read: u64| {
        progress(&Progress {
            operation: "Failback",
            disk: pd.name.clone(),
            bytes_done: done,
            bytes_total: size,
            throughput_bytes_per_second: throughput(read, started),
        });
    };
    let by_twin = since_twin.is_some();
    let dirty = match image.dirty_ranges(size).await? {
        Some(dirty) => Some(dirty),
        None if by_twin => since_twin,
        None if !qcow2 && untouched => Some(Vec::new()),
        None => None,
    };
    let seeded = match (dirty, seed) {
        (
            Some(dirty),
            Some(Seed {
                point: from, map, ..
            }),
        ) if map.image_size_bytes() == size && map.block_size_bytes() == block_size => {
            Some((from, map, dirty))
        }
        _ => None,
    };
    // NB: a twin of the disk vouches for what it holds: not made for content only a stamp
    // vouched for (a write it missed would then never be compared again).
    let by_stamp_only = seeded.is_some() && !qcow2 && !by_twin;
    // The disk's map as it will be, and what to write: (range, whether it is zeros).
    let mut compared = 0;
    let (mut have, writes): (BlockMap, Vec<(Range<u64>, bool)>) = match seeded {
        Some((from, map, dirty)) => {
            // The disk equals `from` but for the blocks its bitmap marks: write those and
            // the ones the replica changed between `from` and the point, nothing else.
            let changed = plan_resync(&want, map).map_err(map_error)?;
            let mut ranges: Vec<Range<u64>> = changed
                .ranges()
                .iter()
                .map(|r| r.offset_bytes..r.end_bytes())
                .collect();
            ranges.extend(maps::align(&dirty, block, size));
            tracing::info!(vm = %vm, disk = %pd.name, from, "failback: the disk's seed holds (its bitmap, or a raw file's stamp); writing only the blocks either side changed");
            let writes = union_ranges(ranges)
                .into_iter()
                .map(|r| (r, false))
                .collect();
            (map.clone(), writes)
        }
        None => {
            // What the original disk holds now: hash it (holes are zeros and are not read).
            let mut have = BlockMap::new_zeroed(HashAlgorithm::default(), block_size, size)
                .map_err(map_error)?;
            let ranges = maps::align(&image.data_ranges(size).await?, block, size);
            let image = &image;
            compared = maps::hash_ranges(
                &mut have,
                &pd.name,
                &ranges,
                super::VIEW_CHUNK_BYTES / block * block,
                |pieces| async move { image.read_many(pieces).await },
                |done| report(done / 2, 0),
            )
            .await?;
            let plan = plan_resync(&want, &have).map_err(map_error)?;
            let writes = plan
                .ranges()
                .iter()
                .map(|r| (r.offset_bytes..r.end_bytes(), matches!(r.op, RangeOp::Zero)))
                .collect();
            (have, writes)
        }
    };
    if by_twin {
        // NB: the twin has named what was written since its point; every block written now
        // would otherwise be copied first (its space is the twin's too). A new one is made
        // once the disk holds the point; a job that fails before then leaves the stamp.
        if let Err(e) = twin::remove_all(path) {
            tracing::warn!(vm = %vm, disk = %pd.name, error = %e, "the raw image's twin was not removed: the failback's writes copy its blocks first");
        }
    }
    let at = At::Point(point.id.clone());
    let source = StoreSource {
        store,
        vm,
        disk: &pd.name,
        at: &at,
    };
    let read = write_from_store(&source, &writes, false, &image, &mut have, |end, read| {
        report(size / 2 + end / 2, read);
    })
    .await?;
    image.finish().await?;
    // NB: right after the flush, before anything else can write the file.
    let stamp = if qcow2 {
        None
    } else {
        FileStamp::of(path, &point.id)
    };
    report(size, read);
    verify_digest(&have, point, pd, |got| {
        format!("the original disk reads as {got} after the failback")
    })?;
    if qcow2 {
        reseed(path, &point.id).await?;
    } else if by_stamp_only {
        if let Err(e) = twin::remove_all(path) {
            tracing::warn!(vm = %vm, disk = %pd.name, error = %e, "an older twin of the raw image was not removed");
        }
    } else {
        keep_twin(path, &pd.name, &point.id);
    }
    // NB: beside the file too, for the agent that finds the VM started on it (a raw file
    // cannot record its writes until then): the re-protect from the point reads only those.
    // Not for a file a VM opened meanwhile: its first writes would count as the point's.
    // Kept where only a stamp vouched for the disk too (unlike a twin, above): it vouches for
    // no more than the stamp it replaces, whose chain the jobs keeping the disk in step
    // already trust from one point to the next, within one boot of the host.
    if held_open_by(path).is_none() {
        keep_stamp(path, &pd.name, stamp.clone());
    }
    tracing::info!(vm = %vm, disk = %pd.name, path = %path.display(), written = read, compared, "original disk brought to the point");
    Ok(RestoredDisk {
        read,
        compared,
        map: have,
        stamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_that_are_not_raw_data_are_named_and_raw_data_is_not() {
        assert_eq!(image_format(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        assert_eq!(image_format(b"vhdxfile"), Some("VHDX"));
        assert_eq!(image_format(b"conectix"), Some("dynamic VHD"));
        assert_eq!(image_format(b"KDMV\x01\0\0\0"), Some("VMDK"));
        assert_eq!(image_format(&[0; 8]), None);
        assert_eq!(
            image_format(b"\xebc\x90MSWIN"),
            None,
            "a boot sector is data"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failback_onto_a_disk_another_process_holds_open_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("root.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap_or_else(|e| panic!("{e}"));
        let ready = dir.path().join("ready");
        let mut holder = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>'{}'; touch '{}'; sleep 30",
                path.display(),
                ready.display()
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        while !ready.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let refused = open_target(&path, "root", 4096).await.map(drop);
        let _ = holder.kill();
        let _ = holder.wait();
        let Err(EngineError::NotReady { what }) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            what.contains(&format!("process {}", holder.id())) && what.contains("power the VM"),
            "{what}"
        );
        assert!(
            open_target(&path, "root", 4096).await.is_ok(),
            "free once it is closed"
        );
    }

    #[tokio::test]
    async fn a_failback_onto_a_vhdx_image_is_refused_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("root.vhdx");
        let image = b"vhdxfile and the rest of a VHDX header".to_vec();
        std::fs::write(&path, &image).unwrap_or_else(|e| panic!("{e}"));
        let refused = open_target(&path, "root", 1 << 20).await.map(drop);
        let Err(EngineError::NotReady { what }) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            what.contains("VHDX") && what.contains("root.vhdx"),
            "{what}"
        );
        assert_eq!(std::fs::read(&path).unwrap_or_default(), image);
    }

    #[tokio::test]
    async fn a_qcow2_original_is_recognised_and_a_missing_one_is_created_as_qcow2() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("root.qcow2");
        let made = open_target(&path, "root", 1 << 20).await;
        assert!(
            matches!(made, Ok(Target::Qcow2 { created: true })),
            "{made:?}"
        );
        let info = image::qcow2_info(&path)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.virtual_size, 1 << 20);
        let found = open_target(&path, "root", 1 << 20).await;
        assert!(
            matches!(found, Ok(Target::Qcow2 { created: false })),
            "{found:?}"
        );
    }

    #[test]
    fn union_merges_touching_and_overlapping_ranges() {
        assert_eq!(
            union_ranges(vec![8..12, 0..4, 4..6, 10..16, 20..21]),
            [0..6, 8..16, 20..21]
        );
        assert!(union_ranges(Vec::new()).is_empty());
    }
}
