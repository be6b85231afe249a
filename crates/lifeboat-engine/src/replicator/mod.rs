//! The replication engine for one VM: the life cycle ASR runs for a Hyper-V VM, on any
//! [`Hypervisor`] and any [`ReplicaStore`].
//!
//! ```text
//!  enable ──> initial_copy ──> run_cycle (finalize) ──> run_cycle ... ──> failover / disable
//!                                  │  ▲
//!                    ResyncRequired│  │resync
//!                                  ▼  │
//! ```
//!
//! A cycle freezes every disk at one instant, writes and seals one HRL log per disk in the
//! VM's state folder, records the cycle as pending, then ships: applies the logs to the
//! live replica, cuts a recovery point, prunes, and only then deletes the logs.
//!
//! # Guarantees
//!
//! - Nothing is lost on a crash: a log is deleted only after the point that contains it is
//!   durable; a crash while applying is undone ([`ReplicaStore::revert_to_latest_point`])
//!   and the logs applied again (applying is idempotent); changes frozen by a view whose
//!   logs never got recorded stay in the hypervisor's tracking (the backend folds them back).
//! - The replica is never silently wrong: a log that fails its checks, or tracking the
//!   hypervisor cannot vouch for, leads to a resync, never to a guess.
//! - The block map stored beside each replica describes the latest point (tagged with its
//!   id), so a resync compares against it without reading the replica back.

mod copy;
mod cycle;
mod failover;
mod image;
mod logs;
mod maps;
mod reprotect;
mod resync;
mod upload;

pub use failover::{
    FAILOVER_LABEL, FailoverReport, MaterialisedDisk, Output, PointChoice, choose_point,
    commit_in_store, disk_image_path, fail_back_from_store, fail_over_from_store,
    materialise_point, remove_disk_images,
};
pub use image::DiskFormat;
pub use reprotect::{SeedMaps, restore_onto};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_store::{RecoveryPoint, ReplicaStore, VmKey};

use crate::backend::{BackendError, DiskInfo, DiskRef, Hypervisor};
use crate::error::EngineError;
use crate::fs::{LocalFs, StateFs};
use crate::state::{AgentState, DiskRecord, EnginePhase};
use crate::throttle::Throttle;

/// Bytes read from a view at a time by the initial copy and the resync (a whole number of
/// blocks). One read is split into the NBD client's requests, up to its window in flight;
/// with 16 MiB the window stays full for most of a read, where 4 MiB left the source idle
/// between reads (about 20 % slower in the agent bench's copy part). Two reads' worth is in
/// memory at a time, plus the store writes in flight.
const VIEW_CHUNK_BYTES: u64 = 16 * 1024 * 1024;

/// How a VM replicates: the policy's settings, in the engine's units.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The copy interval.
    pub copy_interval: Duration,
    /// How long recovery points are kept (the latest always is).
    pub retention: Duration,
    /// How often to take an application-consistent point; None: never.
    pub app_consistent_every: Option<Duration>,
    /// Resync when a disk's pending logs reach this percent of its size.
    pub log_threshold_percent: u32,
    /// Block size of the block maps and of resync.
    pub block_size_bytes: u32,
    /// Store requests in flight per VM.
    pub upload_concurrency: usize,
    /// How much of a disk an initial copy or a resync goes through between two saved
    /// checkpoints (what a crash can cost it).
    pub checkpoint_bytes: u64,
    /// How long a planned failover waits for the guest to shut down before it pauses it.
    pub stop_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            copy_interval: Duration::from_secs(300),
            retention: Duration::from_secs(24 * 3600),
            app_consistent_every: None,
            log_threshold_percent: 50,
            block_size_bytes: lifeboat_blockmap::DEFAULT_BLOCK_SIZE_BYTES,
            upload_concurrency: 4,
            checkpoint_bytes: 256 * 1024 * 1024,
            stop_grace: Duration::from_secs(120),
        }
    }
}

/// Progress of long work, disk by disk.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// What is running: `InitialReplication`, `Resynchronize`, `Failover`.
    pub operation: &'static str,
    /// The disk.
    pub disk: String,
    /// Bytes gone through.
    pub bytes_done: u64,
    /// Bytes in all.
    pub bytes_total: u64,
    /// Bytes per second since the disk started.
    pub throughput_bytes_per_second: u64,
}

/// Where progress goes (a status writer, a terminal).
pub type ProgressSink<'a> = &'a (dyn Fn(&Progress) + Send + Sync);

/// What a finished operation did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Bytes sent to the store (data written).
    pub bytes_sent: u64,
    /// Bytes zeroed in the store without sending data.
    pub bytes_zeroed: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// The point cut, if one was.
    pub point: Option<RecoveryPoint>,
    /// Points pruned by retention.
    pub pruned: Vec<String>,
    /// How long it took.
    pub duration: Duration,
    /// Set when the operation ended because the VM needs a resync (its reason).
    pub resync_required: Option<String>,
    /// Problems that did not fail the operation (e.g. a view that did not close cleanly).
    pub warnings: Vec<String>,
    /// A resync: the disks it read and compared in full (the others: only the blocks their
    /// tracking says changed).
    pub disks_compared_in_full: Vec<String>,
}

/// The engine for one VM.
#[derive(Debug)]
pub struct Replicator {
    vm: VmKey,
    disks: Vec<DiskRef>,
    dir: PathBuf,
    fs: Arc<dyn StateFs>,
    hypervisor: Arc<dyn Hypervisor>,
    store: Arc<dyn ReplicaStore>,
    settings: Settings,
    throttle: Arc<Throttle>,
    state: AgentState,
    /// The VM's definition, kept beside the replica (see [`Replicator::set_definition`]).
    definition: Option<bytes::Bytes>,
    /// Who this engine is in the store's records (points' `written_by`, the epoch's holder).
    writer: String,
}

/// The digest a point records for a disk whose blocks `map` describes.
pub fn disk_digest(map: &lifeboat_blockmap::BlockMap) -> lifeboat_store::DiskDigest {
    maps::digest(map)
}

/// Milliseconds since the Unix epoch of `time`.
pub fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Replicator {
    /// Open the engine for `vm` with its state folder `dir`, recovering from a crash:
    /// logs that no recorded cycle names are removed, and a store left half-applied is put
    /// back to its latest point.
    ///
    /// # Errors
    ///
    /// State folder or store failures.
    pub async fn open(
        vm: VmKey,
        disks: Vec<DiskRef>,
        dir: PathBuf,
        hypervisor: Arc<dyn Hypervisor>,
        store: Arc<dyn ReplicaStore>,
        settings: Settings,
    ) -> Result<Replicator, EngineError> {
        Self::open_on(
            Arc::new(LocalFs),
            vm,
            disks,
            dir,
            hypervisor,
            store,
            settings,
        )
        .await
    }

    /// [`Replicator::open`] with the state folder on `fs` (the power-cut simulation's file
    /// system; the agent's is [`LocalFs`]).
    ///
    /// # Errors
    ///
    /// State folder or store failures.
    pub async fn open_on(
        fs: Arc<dyn StateFs>,
        vm: VmKey,
        disks: Vec<DiskRef>,
        dir: PathBuf,
        hypervisor: Arc<dyn Hypervisor>,
        store: Arc<dyn ReplicaStore>,
        settings: Settings,
    ) -> Result<Replicator, EngineError> {
        fs.create_dir_all(&dir)
            .map_err(EngineError::state("create agent state folder", &dir))?;
        let state = AgentState::load(fs.as_ref(), &dir)?;
        // NB: a new protection adopts the replica's epoch at enable; until then the store
        // has nothing of this agent's to refuse.
        if !matches!(state.phase, EnginePhase::New | EnginePhase::Disabled) {
            store.hold_epoch(&vm, state.epoch);
        }
        let engine = Replicator {
            vm,
            disks,
            dir,
            fs,
            hypervisor,
            store,
            settings,
            throttle: Arc::new(Throttle::default()),
            state,
            definition: None,
            writer: String::new(),
        };
        logs::remove_unrecorded(engine.fs.as_ref(), &engine.dir, &engine.state)?;
        if engine.state.applying && engine.state.phase != EnginePhase::Copied {
            // NB: a crash while applying a cycle leaves the live replica between two points;
            // put it back to the latest one, then apply the cycle again from its logs. Not
            // after a copy (the first cycle): the live replica's base is then the copy, not
            // the latest point (a point kept from an earlier protection, when the replica
            // was kept at disable, is older than the copy); the cycle's logs are applied
            // again over it, whole blocks each, which is what applying them once gives.
            engine.store.revert_to_latest_point(&engine.vm).await?;
        }
        Ok(engine)
    }

    /// The VM.
    pub fn vm(&self) -> &VmKey {
        &self.vm
    }

    /// The agent's view of the VM.
    pub fn state(&self) -> &AgentState {
        &self.state
    }

    /// The names of the protected disks.
    pub fn disk_names(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.name.clone()).collect()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The replica store.
    pub fn store(&self) -> &Arc<dyn ReplicaStore> {
        &self.store
    }

    /// The VM's state folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Have the hypervisor record the writes since the point its raw disks were left at by a
    /// failover or a failback, when it runs the VM and nothing wrote them yet
    /// ([`arm_seeds`]). The agent calls it every tick while the VM does not replicate.
    pub async fn arm_seeds(&self) -> Vec<String> {
        arm_seeds(self.hypervisor.as_ref(), &self.vm, &self.disks).await
    }

    /// What the VM is (the agent gives its ProtectedVM and policy as applied, opaque here):
    /// [`Replicator::store_definition`] keeps it beside the replica, so that a recovery with
    /// nothing but the store knows what it recovers.
    pub fn set_definition(&mut self, definition: bytes::Bytes) {
        self.definition = Some(definition);
    }

    /// Store the definition given to [`Replicator::set_definition`], if any, beside the
    /// replica.
    ///
    /// # Errors
    ///
    /// Store failures.
    pub async fn store_definition(&self) -> Result<(), EngineError> {
        if let Some(definition) = &self.definition {
            self.store
                .put_definition(&self.vm, definition.clone())
                .await?;
        }
        Ok(())
    }

    /// Who this engine is in the store's records: recovery points say who wrote them, an
    /// epoch who took it (an agent: its node).
    pub fn set_writer(&mut self, writer: &str) {
        writer.clone_into(&mut self.writer);
    }

    /// The upload throttle (set its limit from the policy's bandwidth schedule).
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// Change the settings (the policy changed).
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Change the disk list (the ProtectedVM changed): new disks are created in the store at
    /// the next enable and need a resync to fill.
    pub fn set_disks(&mut self, disks: Vec<DiskRef>) {
        self.disks = disks;
    }

    /// Make what was written durable and cut a point vouching for it: flush the store, cut
    /// the point with each disk's digest from `maps`, then store the maps tagged with the
    /// point (the cycle's and the resync's last step alike).
    ///
    /// NB: the maps are stored after the point, so a map tagged with a point always
    /// describes data that point holds; a crash in between leaves maps tagged with an
    /// older point, which are not trusted for the new one and are re-hashed.
    async fn cut_point_with_maps(
        &self,
        maps: &std::collections::BTreeMap<String, lifeboat_blockmap::BlockMap>,
        time_unix_ms: u64,
        cycle: u64,
        consistency: lifeboat_store::Consistency,
    ) -> Result<RecoveryPoint, EngineError> {
        self.store.flush(&self.vm).await?;
        let digests = maps
            .iter()
            .map(|(disk, map)| (disk.clone(), maps::digest(map)))
            .collect();
        let point = self
            .store
            .cut_point(
                &self.vm,
                lifeboat_store::NewPoint {
                    time_unix_ms,
                    cycle,
                    consistency,
                    digests,
                    written_by: self.writer.clone(),
                },
            )
            .await?;
        for (disk, map) in maps {
            self.store
                .put_block_map(&self.vm, disk, maps::encode(&point.id, map))
                .await?;
        }
        Ok(point)
    }

    /// A checkpoint of long work: what the uploader has in flight lands, the store makes it
    /// durable, and only then is the disk's map saved, tagged `tag`, claiming it (writes are
    /// not durable until a flush: a resumed copy or resync trusts what the map claims).
    async fn save_map_durably(
        &self,
        uploader: &mut upload::Uploader,
        disk: &str,
        tag: &str,
        map: &lifeboat_blockmap::BlockMap,
    ) -> Result<(), EngineError> {
        uploader.finish().await?;
        self.store.flush(&self.vm).await?;
        self.store
            .put_block_map(&self.vm, disk, maps::encode(tag, map))
            .await?;
        Ok(())
    }

    fn save(&self) -> Result<(), EngineError> {
        self.state.save(self.fs.as_ref(), &self.dir)
    }

    /// Drop every pending cycle (a resync, a disable or a failover supersedes them): the
    /// state that forgets them is saved first, then their logs are deleted, so that a crash
    /// in between leaves logs no cycle names (removed at the next open), never a recorded
    /// cycle whose logs are gone.
    ///
    /// The caller sets the phase that supersedes the cycles first: it is saved in the same
    /// write. Their views are committed, so a state that forgot them under a phase that
    /// ships cycles would lose their changes for good.
    ///
    /// `applying` is left as it is: a cycle half applied left the live replica ahead of the
    /// latest point whether or not its logs are kept, and the mark is what makes the next
    /// resync (or the next open) put the live replica back before anything trusts the latest
    /// point's block map.
    fn drop_pending(&mut self) -> Result<(), EngineError> {
        if self.state.pending.is_empty() {
            return Ok(());
        }
        let logs: Vec<crate::state::PendingLog> =
            self.state.pending.drain(..).flat_map(|c| c.logs).collect();
        self.save()?;
        logs::delete_files(self.fs.as_ref(), &logs)
    }

    fn set_phase(&mut self, phase: EnginePhase) -> Result<(), EngineError> {
        self.state.phase = phase;
        self.save()
    }

    /// An uploader to the store with the policy's concurrency and this engine's throttle.
    fn uploader(&self) -> upload::Uploader {
        upload::Uploader::new(
            self.store.clone(),
            self.vm.clone(),
            self.throttle.clone(),
            self.settings.upload_concurrency,
        )
    }

    fn next_cycle(&mut self) -> u64 {
        self.state.last_cycle += 1;
        self.state.last_cycle
    }

    /// Enable protection: check the prerequisites (the VM and its disks, the store, local
    /// space for logs), create the replica disks and start tracking. Idempotent.
    ///
    /// # Errors
    ///
    /// The first prerequisite that fails, naming what is wrong.
    pub async fn enable(&mut self) -> Result<Vec<DiskInfo>, EngineError> {
        let infos = self.check_source_and_store().await?;
        if matches!(self.state.phase, EnginePhase::New | EnginePhase::Disabled) {
            // NB: new protection writes under the replica's epoch as it finds it (a replica
            // kept from an earlier protection may have been fenced since); from then on the
            // epoch is this agent's, and a store that moved on refuses it.
            self.state.epoch = self.store.epoch(&self.vm).await?.number;
            self.store.hold_epoch(&self.vm, self.state.epoch);
        }
        check_log_space(
            self.fs.as_ref(),
            &self.dir,
            &infos,
            self.settings.log_threshold_percent,
        )?;
        for info in &infos {
            self.store
                .create_disk(&self.vm, &info.name, info.size_bytes)
                .await?;
        }
        self.hypervisor.start_tracking(&self.disks).await?;
        let records: Vec<DiskRecord> = infos.iter().map(DiskRecord::from).collect();
        if self.state.disks != records {
            self.state.disks = records;
            self.save()?;
        }
        if self.state.phase == EnginePhase::New || self.state.phase == EnginePhase::Disabled {
            self.set_phase(EnginePhase::Enabled)?;
        }
        Ok(infos)
    }

    /// The prerequisites a protection starts from (enable, re-protect): the VM has disks, the
    /// hypervisor finds them (their sizes), the store takes writes.
    ///
    /// # Errors
    ///
    /// The first that fails, naming what is wrong.
    async fn check_source_and_store(&self) -> Result<Vec<DiskInfo>, EngineError> {
        if self.disks.is_empty() {
            return Err(EngineError::NotReady {
                what: format!("VM {} has no disk to protect", self.vm),
            });
        }
        let infos = self.hypervisor.inspect(&self.disks).await?;
        self.store.check_writable().await?;
        Ok(infos)
    }

    /// Disable protection: stop tracking, drop pending logs and, if asked, the replica.
    /// A source VM that is gone does not stop it: there is no tracking left to stop (a
    /// bitmap left on a disk that comes back is swept by the next enable), and a finalizer
    /// must not hold the object of a VM whose host is lost.
    ///
    /// # Errors
    ///
    /// Hypervisor (other than the VM being gone) or store failures (other than a fenced
    /// replica, which is kept).
    pub async fn disable(&mut self, delete_replica: bool) -> Result<Vec<String>, EngineError> {
        let mut left = Vec::new();
        match self.hypervisor.stop_tracking(&self.disks).await {
            Ok(()) => {}
            Err(gone @ BackendError::VmNotFound { .. }) => {
                tracing::warn!(vm = %self.vm, error = %gone, "disabling a VM whose source is gone: no tracking to stop");
                left.push(format!(
                    "change tracking was not stopped on the source ({gone}): if the VM comes back, its dirty bitmaps (QEMU) or reference points (Hyper-V) are still there"
                ));
            }
            Err(e) => return Err(e.into()),
        }
        // NB: Disabled, with nothing of the old state, is durable before the logs and the
        // replica go: a crash in between must not leave a VM that believes it is protected
        // by a replica that is gone (its resyncs would fail for good), and a failure
        // deleting a log must not leave a half-applied mark or a cursor behind (a re-enable
        // copies over whatever a kept replica holds, so none of it is needed).
        let logs: Vec<crate::state::PendingLog> =
            self.state.pending.drain(..).flat_map(|c| c.logs).collect();
        self.state = AgentState {
            phase: EnginePhase::Disabled,
            last_cycle: self.state.last_cycle,
            ..AgentState::default()
        };
        self.save()?;
        logs::delete_files(self.fs.as_ref(), &logs)?;
        self.drop_twins();
        if delete_replica {
            match self.store.delete_vm(&self.vm).await {
                Ok(()) => {}
                // NB: the replica belongs to the failover that fenced this agent: it stays.
                Err(fenced @ lifeboat_store::StoreError::Fenced { .. }) => {
                    left.push(format!("the replica was kept: {fenced}"));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(left)
    }

    /// Remove the reflinked twins ([`crate::twin`]) and the stamps ([`crate::stamp`]) of the
    /// VM's raw disks: nothing reads them once the re-protect that started from their point
    /// ended, or protection is disabled, and each twin keeps the point's copy of every block
    /// the VM rewrote. Best effort.
    pub(crate) fn drop_twins(&self) {
        for disk in &self.disks {
            let path = Path::new(&disk.path);
            if let Err(e) = crate::twin::remove_all(path) {
                tracing::warn!(vm = %self.vm, disk = %disk.name, error = %e, "a twin of the raw image was not removed: it keeps the space of the blocks rewritten since its point");
            }
            if let Err(e) = crate::stamp::forget_all(path) {
                tracing::warn!(vm = %self.vm, disk = %disk.name, error = %e, "a stamp of the raw image was not removed");
            }
        }
    }

    /// Mark the VM for resync (on request, or when the caller found a reason).
    ///
    /// # Errors
    ///
    /// The state file cannot be saved.
    pub fn require_resync(&mut self, reason: &str) -> Result<(), EngineError> {
        self.set_phase(EnginePhase::ResyncRequired {
            reason: reason.to_owned(),
        })
    }
}

/// [`Hypervisor::arm_seeds`] of `disks` of `vm`, its failure logged, not returned: a VM that
/// is not running yet (no QMP socket), or cannot be reached, is looked at again next tick.
/// The disks armed.
pub async fn arm_seeds(hypervisor: &dyn Hypervisor, vm: &VmKey, disks: &[DiskRef]) -> Vec<String> {
    match hypervisor.arm_seeds(disks).await {
        Ok(armed) => armed,
        Err(e) => {
            tracing::debug!(vm = %vm, error = %e, "the VM's raw disks cannot be armed yet");
            Vec::new()
        }
    }
}

/// Refuse to start when the log folder's file system has less free space than the change
/// logs can take before a resync supersedes them: the policy's threshold percent of each
/// disk's size (the logs pile up to that while the store is away), at most the disks' whole
/// size (a threshold over 100 % may run out of room first: the cycles then fail recoverably
/// and the changes stay tracked, so nothing is lost).
fn check_log_space(
    fs: &dyn StateFs,
    dir: &Path,
    disks: &[DiskInfo],
    threshold_percent: u32,
) -> Result<(), EngineError> {
    let free = fs
        .free_space_bytes(dir)
        .map_err(EngineError::state("measure free space of", dir))?;
    let total: u64 = disks.iter().map(|d| d.size_bytes).sum();
    let needed = log_space_needed(disks, threshold_percent);
    if free < needed {
        return Err(EngineError::State {
            action: "find room for change logs in",
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{free} bytes free, {needed} needed for the logs of {total} bytes of disks \
                     (the resync threshold, {threshold_percent} % of each disk)"
                ),
            ),
        });
    }
    Ok(())
}

/// The room the change logs of `disks` can take before a resync (pure): the threshold's limit
/// of every disk, at most its size.
fn log_space_needed(disks: &[DiskInfo], threshold_percent: u32) -> u64 {
    let threshold = lifeboat_hrl::ResyncThreshold::new(threshold_percent);
    disks
        .iter()
        .map(|d| {
            let limit = threshold
                .limit_bytes(d.size_bytes)
                .min(u128::from(d.size_bytes));
            u64::try_from(limit).unwrap_or(d.size_bytes)
        })
        .fold(0u64, u64::saturating_add)
}

/// Throughput of `bytes` over the time since `started`.
fn throughput(bytes: u64, started: Instant) -> u64 {
    let secs = started.elapsed().as_secs_f64();
    if secs > 0.0 {
        (bytes as f64 / secs) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TrackingDurability;

    fn disk(size_bytes: u64) -> DiskInfo {
        DiskInfo {
            name: "root".into(),
            size_bytes,
            format: "qcow2".into(),
            durability: TrackingDurability::Persistent,
        }
    }

    #[test]
    fn the_log_space_check_asks_for_what_the_logs_reach_before_a_resync() {
        assert_eq!(log_space_needed(&[disk(1000), disk(3)], 50), 500 + 2);
        assert_eq!(
            log_space_needed(&[disk(1000)], 250),
            1000,
            "at most the disk"
        );
        assert_eq!(
            log_space_needed(&[disk(u64::MAX), disk(u64::MAX)], 100),
            u64::MAX
        );
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let free = crate::space::free_space_bytes(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        // Disks of four times the free space: half of them does not fit, a tenth does.
        let disks = [disk(free.saturating_mul(4))];
        let refused = check_log_space(&LocalFs, dir.path(), &disks, 50);
        assert!(
            matches!(&refused, Err(EngineError::State { source, .. }) if source.kind() == std::io::ErrorKind::StorageFull),
            "{refused:?}"
        );
        assert!(check_log_space(&LocalFs, dir.path(), &disks, 10).is_ok());
    }
}
