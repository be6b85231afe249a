//! The local folder store: the embedded default, and what standalone mode uses.
//!
//! ```text
//!  ROOT/<namespace>/<vm>/
//!    manifest.json              replaced atomically (write, fsync, rename, fsync folder)
//!    disks/<disk>.img           the live replica, a sparse file
//!    maps/<disk>.map            the live replica's block map
//!    definition.json            the VM's definition as the agent applied it (opaque here)
//!    undo/<disk>/<seq>.undo     pre-images: content as of point <seq> of every 4 KiB granule
//!                               overwritten after that point was cut
//! ```
//!
//! # Why undo segments
//!
//! ext4 here has no reflinks, so a point cannot be a cheap copy of the disk. Instead the live
//! file always holds the newest data (so the latest point and a resync's target read straight
//! from it), and the first time a granule is overwritten after a point was cut, its old
//! content is appended to that point's undo segment, made durable, and only then
//! overwritten. Cutting a point is a flush and a manifest update: no data is copied.
//!
//! Reading point P at a granule takes the first segment, from P's own onwards, that holds
//! the granule; if none does, the granule has not changed since P and the live file has it.
//! Deleting the oldest point deletes its segment and frees its space; deleting a newer one
//! first moves the granules the next older point still needs into that point's segment.
//!
//! # Direct I/O
//!
//! On Linux each live file is also opened with `O_DIRECT`: a write whose buffer, offset and
//! length are page-aligned (the agent's NBD reads are) goes straight to the device, the rest
//! through the page cache. An initial copy or a resync then costs one copy of each byte
//! less, does not push the host's other work out of the cache, and leaves almost nothing for
//! the fsync that makes it durable (see `docs/benchmarks.md`, "Agent: initial replication").
//! The kernel keeps the two handles coherent; the flush's fsync covers both.
//!
//! A batch of writes ([`ReplicaStore::write_many`]: a cycle's, a resync's scattered blocks)
//! keeps several requests in flight: its pre-images are read, and then its pieces written,
//! on a few threads at once (`io::on_threads`), not one round trip to the device after
//! another. The pre-images are all appended and synced before the first piece is written;
//! pieces that overlap are written in order. A batch of reads ([`ReplicaStore::read_many`]:
//! a failover's or a failback's changed blocks) runs on those threads too.
//!
//! # Guarantees
//!
//! - A pre-image is durable before the live granule is overwritten, so a crash at any moment
//!   leaves every point readable; [`ReplicaStore::revert_to_latest_point`] puts the live
//!   file back to the latest point.
//! - A torn record at the end of the open segment (a crash while appending, before the live
//!   write) is cut off on open; a bad record anywhere else is reported as corruption.
//!
//! # Files
//!
//! - `mod.rs` (here): [`LocalStore`] and its [`ReplicaStore`] operations.
//! - `vm.rs`: one VM's folder: its manifest, points and disks, loaded once and kept in step.
//! - `disk.rs`: one replica disk: the live file, its pre-images, reads at a point.
//! - `undo.rs`: the undo segment's on-disk record format, and its reader and writer.
//! - `io.rs`: positional and direct I/O, several requests at once, hole punching, atomic
//!   replacement, on every platform.

mod disk;
mod epoch;
mod io;
#[cfg(test)]
mod tests;
mod undo;
mod vm;

pub use io::{PositionalIo, data_ranges};

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::manifest::{Manifest, PointDisk, RecoveryPoint, point_id};
use crate::{
    At, NewPoint, ReplicaStore, StoreError, VmKey, check_disk_name, check_disk_size, check_range,
    merge_ranges,
};
use disk::Disk;
use io::{punch_hole, read_if_exists, remove_if_exists, write_atomic};
use vm::{VmState, seq_of};

/// Whether a store may change what it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// A writing store: it holds each VM's lock while it has the VM loaded, and recovers the
    /// VM from a crash when it loads it.
    Write,
    /// A read-only store: it locks, creates, repairs and writes nothing.
    ReadOnly,
}

/// The error of a change asked of a read-only store.
pub(super) fn read_only_refusal(vm: &str) -> StoreError {
    StoreError::InvalidRequest {
        what: format!("VM {vm}: this local store was opened read-only"),
    }
}

/// A replica store in a folder of this machine.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    access: Access,
    vms: Mutex<HashMap<VmKey, Arc<Mutex<Option<VmState>>>>>,
    held: crate::fence::Held,
}

impl LocalStore {
    /// A store rooted at `root` (created if missing), to write.
    ///
    /// A VM is written by one store at a time: the store locks the VM's lock file
    /// (`<vm>/writer.lock`) when it loads the VM (its first call about it) and holds it until
    /// the store is dropped; loading the VM runs crash recovery. A call about a VM another
    /// store holds, in this process or another, fails with a recoverable
    /// [`StoreError::Io`] ("VM ns/name is held by another Lifeboat process (lock file ...)");
    /// it can be retried once that store is gone.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the folder cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalStore, StoreError> {
        let root = root.into();
        io::create_dir_durable(&root, "create store folder")?;
        Ok(LocalStore {
            root,
            access: Access::Write,
            vms: Mutex::new(HashMap::new()),
            held: crate::fence::Held::default(),
        })
    }

    /// A store rooted at `root` that only reads, for commands beside the daemon (`lifeboat
    /// points`): it never repairs anything (no deletions, no truncation, no writes, not even
    /// a lock file), it reads each VM's manifest and points as they are on disk, and it reads
    /// a VM a writing store holds. That is safe because a writer's state on disk is
    /// consistent at every fsync'd step (a pre-image is durable before
    /// the granule it saves is overwritten, a point's data before the manifest names it, and the
    /// manifest is replaced atomically); a read-only
    /// store may see the newest point a moment late (it sees the points as of its first call
    /// about the VM). Every change is refused with [`StoreError::InvalidRequest`].
    ///
    /// NB: reading a point's *data* while a writer is applying writes can race: a granule the
    /// reader's segment index (built at its load) does not hold is read from the live file,
    /// which the writer may overwrite after saving the pre-image. The manifest and the list
    /// of points are always as on disk; read point data with a read-only store only while no
    /// writer is applying writes to the VM.
    ///
    /// # Errors
    ///
    /// None yet: a missing folder reads as a store without VMs.
    pub fn open_read_only(root: impl Into<PathBuf>) -> Result<LocalStore, StoreError> {
        Ok(LocalStore {
            root: root.into(),
            access: Access::ReadOnly,
            vms: Mutex::new(HashMap::new()),
            held: crate::fence::Held::default(),
        })
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn vm_dir(&self, vm: &VmKey) -> PathBuf {
        self.root.join(vm.namespace()).join(vm.name())
    }

    fn slot(&self, vm: &VmKey) -> Arc<Mutex<Option<VmState>>> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.entry(vm.clone()).or_default().clone()
    }

    /// Run `f` on the VM's state (loaded from disk on first use) on a blocking thread.
    async fn with_vm<T: Send + 'static>(
        &self,
        vm: &VmKey,
        f: impl FnOnce(&mut VmState) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = self.slot(vm);
        let dir = self.vm_dir(vm);
        let key = vm.to_string();
        let describe = self.describe();
        let access = self.access;
        let held = self.held.get(vm);
        let run = move || {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                // NB: a fenced writer must not even run crash recovery on the VM: it loads
                // the VM as a reader does (no lock, no repair), and every change is refused.
                let fenced = access == Access::Write
                    && crate::fence::check(&key, held, &epoch::read(&dir)?).is_err();
                let access = if fenced { Access::ReadOnly } else { access };
                *guard = Some(VmState::load(dir, key, describe, access)?);
            }
            match guard.as_mut() {
                Some(state) => {
                    state.held = held;
                    f(state)
                }
                None => Err(StoreError::InvalidRequest {
                    what: "VM state missing after load".into(),
                }),
            }
        };
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| StoreError::InvalidRequest {
                what: format!("a store task ended abnormally: {e}"),
            })?
    }
}

impl LocalStore {
    /// [`LocalStore::with_vm`] for a change: refused up front by a read-only store.
    async fn with_vm_mut<T: Send + 'static>(
        &self,
        vm: &VmKey,
        f: impl FnOnce(&mut VmState) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if self.access == Access::ReadOnly {
            return Err(read_only_refusal(&vm.to_string()));
        }
        self.with_vm(vm, |state| {
            state.check_epoch()?;
            f(state)
        })
        .await
    }
}

/// The writes [`LocalStore`] gathers into one [`ReplicaStore::write_many`] (one sync of
/// their pre-images).
const WRITE_BATCH_BYTES: u64 = 16 * 1024 * 1024;

/// Whether any two of `writes` touch the same byte.
fn overlapping(writes: &[(u64, Bytes)]) -> bool {
    let mut ranges: Vec<(u64, u64)> = writes
        .iter()
        .map(|(offset, data)| (*offset, offset + data.len() as u64))
        .collect();
    ranges.sort_unstable();
    ranges.windows(2).any(|pair| pair[1].0 < pair[0].1)
}

#[async_trait]
impl ReplicaStore for LocalStore {
    fn describe(&self) -> String {
        format!("local folder {}", self.root.display())
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        if self.access == Access::ReadOnly {
            return Err(StoreError::InvalidRequest {
                what: format!("{}: opened read-only", self.describe()),
            });
        }
        // NB: one probe file per call: the VMs of one agent check the store at once.
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let probe = root.join(format!(".lifeboat-probe-{}-{n}", std::process::id()));
            write_atomic(&probe, b"probe")?;
            remove_if_exists(&probe, "remove probe file")
        })
        .await
        .map_err(|e| StoreError::InvalidRequest {
            what: format!("a store task ended abnormally: {e}"),
        })?
    }

    async fn create_disk(&self, vm: &VmKey, disk: &str, size_bytes: u64) -> Result<(), StoreError> {
        check_disk_name(disk)?;
        check_disk_size(disk, size_bytes)?;
        let (disk, key) = (disk.to_owned(), vm.to_string());
        self.with_vm_mut(vm, move |state| {
            state.claim()?;
            let mut manifest = state.manifest.clone().unwrap_or_else(|| Manifest::new(&key));
            if let Some(existing) = manifest.disk(&disk) {
                return if existing.size_bytes == size_bytes {
                    Ok(())
                } else {
                    Err(StoreError::InvalidRequest {
                        what: format!("disk {disk:?} of VM {key} exists with size {}, not {size_bytes}", existing.size_bytes),
                    })
                };
            }
            if state.disks.contains_key(&disk) {
                return Err(StoreError::InvalidRequest {
                    what: format!("disk {disk:?} of VM {key} was deleted but recovery points still hold it; prune them first"),
                });
            }
            let path = state.disk_path(&disk);
            io::create_dir_durable(&state.dir.join("disks"), "create disks folder")?;
            // A leftover file from a create cut short by a crash starts over as zeros.
            remove_if_exists(&path, "remove leftover replica disk")?;
            let file = Disk::open(path, state.undo_dir(&disk), Some(size_bytes), state.access)?;
            file.file.sync_all().map_err(StoreError::io("sync replica disk", &file.path))?;
            manifest.disks.push(crate::ManifestDisk { name: disk.clone(), size_bytes });
            state.save_manifest(&manifest)?;
            state.manifest = Some(manifest);
            state.disks.insert(disk, file);
            Ok(())
        })
        .await
    }

    async fn resize_disk(&self, vm: &VmKey, disk: &str, size_bytes: u64) -> Result<(), StoreError> {
        check_disk_size(disk, size_bytes)?;
        let disk = disk.to_owned();
        self.with_vm_mut(vm, move |state| {
            let current = state.live_disk(&disk)?.size_bytes;
            if size_bytes < current {
                state.preserve(&disk, size_bytes..current)?;
            }
            let d = state.live_disk(&disk)?;
            d.file
                .set_len(size_bytes)
                .map_err(StoreError::io("resize replica disk", &d.path))?;
            d.file
                .sync_all()
                .map_err(StoreError::io("sync replica disk", &d.path))?;
            d.size_bytes = size_bytes;
            let mut manifest = state.manifest.clone().unwrap_or_else(|| Manifest::new(""));
            if let Some(entry) = manifest.disks.iter_mut().find(|d| d.name == disk) {
                entry.size_bytes = size_bytes;
            }
            state.save_manifest(&manifest)?;
            state.manifest = Some(manifest);
            Ok(())
        })
        .await
    }

    async fn delete_disk(&self, vm: &VmKey, disk: &str) -> Result<(), StoreError> {
        let disk = disk.to_owned();
        self.with_vm_mut(vm, move |state| {
            let Some(mut manifest) = state.manifest.clone() else {
                return Ok(());
            };
            if manifest.disk(&disk).is_none() {
                return Ok(());
            }
            manifest.disks.retain(|d| d.name != disk);
            state.save_manifest(&manifest)?;
            state.manifest = Some(manifest);
            remove_if_exists(&state.map_path(&disk), "remove block map")?;
            // NB: points that include the disk still read its live file (frozen now: nothing
            // writes to it); the files go when the last such point is deleted.
            let referenced = state
                .points()
                .iter()
                .any(|p| p.disks.iter().any(|d| d.name == disk));
            if !referenced {
                state.disks.remove(&disk);
                remove_if_exists(&state.disk_path(&disk), "remove replica disk")?;
            }
            Ok(())
        })
        .await
    }

    async fn write(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        self.write_many(vm, disk, vec![(offset, data)]).await
    }

    async fn write_many(
        &self,
        vm: &VmKey,
        disk: &str,
        writes: Vec<(u64, Bytes)>,
    ) -> Result<(), StoreError> {
        let disk = disk.to_owned();
        self.with_vm_mut(vm, move |state| {
            let size = state.live_disk(&disk)?.size_bytes;
            for (offset, data) in &writes {
                check_range(&disk, *offset, data.len() as u64, size, true)?;
            }
            // NB: every pre-image is durable before any of the writes lands, as for one write.
            state.preserve_many(
                &disk,
                writes
                    .iter()
                    .map(|(offset, data)| *offset..offset + data.len() as u64),
            )?;
            let d = state.live_disk(&disk)?;
            if overlapping(&writes) {
                // NB: in order: a later write over an earlier one wins.
                for (offset, data) in &writes {
                    d.write_live(data, *offset)?;
                }
            } else {
                io::on_threads(&writes, |(offset, data)| d.write_live(data, *offset))?;
            }
            Ok(())
        })
        .await
    }

    /// One sync of the pre-images per batch instead of one per write: a cycle's random
    /// 64 KiB writes cost a device flush each otherwise.
    fn write_batch_bytes(&self) -> u64 {
        WRITE_BATCH_BYTES
    }

    async fn zero(&self, vm: &VmKey, disk: &str, offset: u64, len: u64) -> Result<(), StoreError> {
        let disk = disk.to_owned();
        self.with_vm_mut(vm, move |state| {
            let size = state.live_disk(&disk)?.size_bytes;
            check_range(&disk, offset, len, size, false)?;
            state.preserve(&disk, offset..offset + len)?;
            let d = state.live_disk(&disk)?;
            punch_hole(&d.file, offset, len)
                .map_err(StoreError::io("free replica disk range", &d.path))
        })
        .await
    }

    async fn read(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        let mut data = self.read_many(vm, disk, at, &[(offset, len)]).await?;
        Ok(data.pop().unwrap_or_default())
    }

    /// One trip to the blocking pool and one lookup of the point for all the pieces.
    async fn read_many(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        pieces: &[(u64, u64)],
    ) -> Result<Vec<Bytes>, StoreError> {
        let (disk, at, pieces) = (disk.to_owned(), at.clone(), pieces.to_vec());
        self.with_vm(vm, move |state| {
            let buffer = |len: u64| vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
            match &at {
                At::Live => {
                    let d = state.live_disk(&disk)?;
                    for &(offset, len) in &pieces {
                        check_range(&disk, offset, len, d.size_bytes, false)?;
                    }
                    let d = &*d;
                    io::on_threads(&pieces, |&(offset, len)| {
                        let mut buf = buffer(len);
                        d.read_live(offset, &mut buf)?;
                        Ok(Bytes::from(buf))
                    })
                }
                At::Point(id) => {
                    let vm = state.vm_name();
                    let point = state.points().iter().find(|p| &p.id == id).cloned();
                    let Some(point) = point else { return Err(state.not_found(format!("recovery point {id} of VM {vm}"))) };
                    let Some(pd) = point.disks.iter().find(|d| d.name == disk) else {
                        return Err(state.not_found(format!("disk {disk:?} at recovery point {id} of VM {vm}")));
                    };
                    let seq = seq_of(pd);
                    let d = state.disks.get_mut(&disk).ok_or_else(|| StoreError::Corrupt {
                        path: disk.clone(),
                        detail: format!("recovery point {id} names disk {disk:?}, whose replica file is gone"),
                    })?;
                    for &(offset, len) in &pieces {
                        check_range(&disk, offset, len, pd.size_bytes, false)?;
                    }
                    d.open_segments(seq..)?;
                    let d = &*d;
                    io::on_threads(&pieces, |&(offset, len)| {
                        let mut buf = buffer(len);
                        d.read_at(seq, offset, &mut buf)?;
                        Ok(Bytes::from(buf))
                    })
                }
            }
        })
        .await
    }

    async fn data_ranges(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let (disk, at) = (disk.to_owned(), at.clone());
        self.with_vm(vm, move |state| match &at {
            At::Live => state.live_disk(&disk)?.live_data_ranges(),
            At::Point(id) => {
                let vm = state.vm_name();
                let point = state.points().iter().find(|p| &p.id == id).cloned();
                let pd = point.and_then(|p| p.disks.into_iter().find(|d| d.name == disk));
                let Some(pd) = pd else {
                    return Err(
                        state.not_found(format!("disk {disk:?} at recovery point {id} of VM {vm}"))
                    );
                };
                let Some(d) = state.disks.get_mut(&disk) else {
                    return Err(state.not_found(format!("replica file of disk {disk:?}")));
                };
                d.open_segments(seq_of(&pd)..)?;
                let mut ranges = d.live_data_ranges()?;
                for segment in d.segments.range(seq_of(&pd)..).map(|(_, s)| s) {
                    ranges.extend(segment.index.iter().map(|(&g, &(_, len))| g..g + len));
                }
                let clipped = ranges
                    .into_iter()
                    .map(|r| r.start.min(pd.size_bytes)..r.end.min(pd.size_bytes))
                    .collect();
                Ok(merge_ranges(clipped))
            }
        })
        .await
    }

    async fn flush(&self, vm: &VmKey) -> Result<(), StoreError> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        self.with_vm(vm, |state| {
            for d in state.disks.values() {
                d.file
                    .sync_all()
                    .map_err(StoreError::io("sync replica disk", &d.path))?;
            }
            Ok(())
        })
        .await
    }

    async fn cut_point(&self, vm: &VmKey, point: NewPoint) -> Result<RecoveryPoint, StoreError> {
        let key = vm.to_string();
        self.with_vm_mut(vm, move |state| {
            let Some(mut manifest) = state.manifest.clone() else {
                return Err(state.not_found(format!("VM {key}")));
            };
            let seq = manifest
                .points
                .iter()
                .flat_map(|p| p.disks.iter().map(seq_of))
                .max()
                .unwrap_or(0)
                + 1;
            let mut disks = Vec::new();
            for md in &manifest.disks {
                let Some(digest) = point.digests.get(&md.name) else {
                    return Err(StoreError::InvalidRequest {
                        what: format!(
                            "recovery point of VM {key} has no digest for disk {:?}",
                            md.name
                        ),
                    });
                };
                disks.push(PointDisk {
                    name: md.name.clone(),
                    size_bytes: md.size_bytes,
                    digest: digest.clone(),
                    store_ref: seq.to_string(),
                });
            }
            // The data the point claims is durable before the manifest names it.
            for d in state.disks.values() {
                d.file
                    .sync_all()
                    .map_err(StoreError::io("sync replica disk", &d.path))?;
            }
            let id = point_id(point.time_unix_ms, point.cycle);
            if let Some(existing) = manifest.point(&id) {
                return crate::existing_point(existing, &point, &key);
            }
            let cut = RecoveryPoint {
                id,
                time_unix_ms: point.time_unix_ms,
                cycle: point.cycle,
                consistency: point.consistency,
                disks,
                written_by: point.written_by.clone(),
            };
            manifest.points.push(cut.clone());
            state.save_manifest(&manifest)?;
            state.manifest = Some(manifest);
            Ok(cut)
        })
        .await
    }

    async fn delete_point(&self, vm: &VmKey, point_id: &str) -> Result<(), StoreError> {
        let id = point_id.to_owned();
        self.with_vm_mut(vm, move |state| {
            let Some(mut manifest) = state.manifest.clone() else {
                return Ok(());
            };
            let Some(index) = manifest.points.iter().position(|p| p.id == id) else {
                return Ok(());
            };
            let doomed = manifest.points[index].clone();
            let older = index.checked_sub(1).map(|i| manifest.points[i].clone());
            for pd in &doomed.disks {
                let seq = seq_of(pd);
                let older_seq = older
                    .as_ref()
                    .and_then(|o| o.disks.iter().find(|d| d.name == pd.name))
                    .map(seq_of);
                let Some(d) = state.disks.get_mut(&pd.name) else {
                    continue;
                };
                // The next older point reads through this segment for granules it does not
                // hold itself: move those into its own segment first.
                if let Some(older_seq) = older_seq {
                    d.open_segments(older_seq..=older_seq)?;
                    d.open_segments(seq..=seq)?;
                }
                if let (Some(older_seq), Some(segment)) = (older_seq, d.segments.get(&seq)) {
                    let moving: Vec<(u64, Vec<u8>)> = segment
                        .index
                        .keys()
                        .copied()
                        .collect::<Vec<_>>()
                        .into_iter()
                        .filter(|g| {
                            !d.segments
                                .get(&older_seq)
                                .is_some_and(|s| s.index.contains_key(g))
                        })
                        .map(|g| {
                            segment
                                .read_granule(g)
                                .map(|data| (g, data.unwrap_or_default()))
                        })
                        .collect::<Result<_, _>>()?;
                    if !moving.is_empty() {
                        let target = d.segment(older_seq)?;
                        for (g, data) in &moving {
                            target.append(*g, data)?;
                        }
                        target.sync()?;
                    }
                }
            }
            manifest.points.remove(index);
            state.save_manifest(&manifest)?;
            state.manifest = Some(manifest);
            for pd in &doomed.disks {
                let seq = seq_of(pd);
                if let Some(d) = state.disks.get_mut(&pd.name) {
                    d.drop_segment(seq);
                    remove_if_exists(&d.segment_path(seq), "remove undo segment")?;
                }
                let still_listed = state
                    .manifest
                    .as_ref()
                    .is_some_and(|m| m.disk(&pd.name).is_some());
                let still_referenced = state
                    .points()
                    .iter()
                    .any(|p| p.disks.iter().any(|d| d.name == pd.name));
                if !still_listed && !still_referenced {
                    state.disks.remove(&pd.name);
                    remove_if_exists(&state.disk_path(&pd.name), "remove replica disk")?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn revert_to_latest_point(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.with_vm_mut(vm, |state| {
            let Some(latest) = state.latest().cloned() else {
                return Ok(());
            };
            for pd in &latest.disks {
                let seq = seq_of(pd);
                let Some(d) = state.disks.get_mut(&pd.name) else {
                    continue;
                };
                if d.size_bytes != pd.size_bytes {
                    d.file
                        .set_len(pd.size_bytes)
                        .map_err(StoreError::io("resize replica disk", &d.path))?;
                    d.size_bytes = pd.size_bytes;
                }
                d.open_segments(seq..=seq)?;
                if let Some(segment) = d.segments.get(&seq) {
                    for &granule in segment.index.keys() {
                        if let Some(data) = segment.read_granule(granule)? {
                            d.file
                                .write_all_at(&data, granule)
                                .map_err(StoreError::io("restore replica disk", &d.path))?;
                        }
                    }
                }
                d.file
                    .sync_all()
                    .map_err(StoreError::io("sync replica disk", &d.path))?;
                // The live file equals the point again: its pre-images are no longer needed.
                if let Some(segment) = d.segments.get_mut(&seq) {
                    segment
                        .file
                        .set_len(0)
                        .map_err(StoreError::io("empty undo segment", &segment.path))?;
                    segment
                        .file
                        .sync_all()
                        .map_err(StoreError::io("sync undo segment", &segment.path))?;
                    segment.index.clear();
                    segment.end = 0;
                }
            }
            let mut manifest = state.manifest.clone().unwrap_or_else(|| Manifest::new(""));
            for entry in &mut manifest.disks {
                if let Some(pd) = latest.disks.iter().find(|d| d.name == entry.name) {
                    entry.size_bytes = pd.size_bytes;
                }
            }
            state.save_manifest(&manifest)?;
            state.manifest = Some(manifest);
            Ok(())
        })
        .await
    }

    async fn manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        self.with_vm(vm, |state| {
            let Some(mut manifest) = state.manifest.clone() else {
                return Ok(None);
            };
            manifest.epoch = epoch::read(&state.dir)?;
            Ok(Some(manifest))
        })
        .await
    }

    fn hold_epoch(&self, vm: &VmKey, epoch: u64) {
        self.held.hold(vm, epoch);
    }

    async fn epoch(&self, vm: &VmKey) -> Result<crate::Epoch, StoreError> {
        let dir = self.vm_dir(vm);
        tokio::task::spawn_blocking(move || epoch::read(&dir))
            .await
            .map_err(|e| StoreError::InvalidRequest {
                what: format!("a store task ended abnormally: {e}"),
            })?
    }

    async fn fence(
        &self,
        vm: &VmKey,
        holder: &str,
        now_unix_ms: u64,
    ) -> Result<crate::Epoch, StoreError> {
        let dir = self.vm_dir(vm);
        let holder = holder.to_owned();
        let missing = StoreError::NotFound {
            what: format!("VM {vm}"),
            store: self.describe(),
        };
        // NB: outside the VM's writer lock, which the old writer may still hold (a paused
        // process, a node cut off but alive): the epoch lock is all a fence needs.
        let next = tokio::task::spawn_blocking(move || {
            if !VmState::manifest_path(&dir).is_file() {
                return Err(missing);
            }
            let _lock = epoch::lock(&dir)?;
            let next = epoch::read(&dir)?.next(&holder, now_unix_ms);
            epoch::write(&dir, &next)?;
            Ok(next)
        })
        .await
        .map_err(|e| StoreError::InvalidRequest {
            what: format!("a store task ended abnormally: {e}"),
        })??;
        self.held.hold(vm, next.number);
        // NB: the VM as this store loaded it under the old epoch goes: loaded while fenced,
        // it is read-only for good, and the holder of the new epoch (a re-protect on the node
        // that was fenced) must write. The next use loads it again, as the new writer.
        let slot = self.slot(vm);
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(next)
    }

    async fn put_block_map(
        &self,
        vm: &VmKey,
        disk: &str,
        encoded: Bytes,
    ) -> Result<(), StoreError> {
        let disk = disk.to_owned();
        self.with_vm_mut(vm, move |state| {
            state.live_disk(&disk)?;
            write_atomic(&state.map_path(&disk), &encoded)
        })
        .await
    }

    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError> {
        let disk = disk.to_owned();
        self.with_vm(vm, move |state| {
            read_if_exists(&state.map_path(&disk), "read block map")
        })
        .await
    }

    async fn put_definition(&self, vm: &VmKey, encoded: Bytes) -> Result<(), StoreError> {
        self.with_vm_mut(vm, move |state| {
            if state.manifest.is_none() {
                return Err(state.not_found(format!("VM {}", state.vm_name())));
            }
            write_atomic(&state.definition_path(), &encoded)
        })
        .await
    }

    async fn definition(&self, vm: &VmKey) -> Result<Option<Bytes>, StoreError> {
        self.with_vm(vm, move |state| {
            read_if_exists(&state.definition_path(), "read VM definition")
        })
        .await
    }

    async fn list_vms(&self) -> Result<Vec<VmKey>, StoreError> {
        // NB: a folder without a manifest is a VM being created or deleted, and a name that
        // is not a VM key is not ours: neither is listed.
        let mut vms = Vec::new();
        for namespace in list_folders(&self.root)? {
            for name in list_folders(&self.root.join(&namespace))? {
                let Ok(key) = VmKey::new(&namespace, &name) else {
                    continue;
                };
                if VmState::manifest_path(&self.vm_dir(&key)).is_file() {
                    vms.push(key);
                }
            }
        }
        vms.sort();
        Ok(vms)
    }

    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.with_vm_mut(vm, |state| {
            if !state.is_locked() {
                if !state.dir.exists() {
                    return Ok(());
                }
                state.claim()?;
            }
            // The manifest goes first: without it, nothing claims the rest.
            remove_if_exists(&VmState::manifest_path(&state.dir), "remove manifest")?;
            state.manifest = None;
            state.disks.clear();
            // Then everything but the lock file, which goes last, with the lock let go of.
            let entries = std::fs::read_dir(&state.dir)
                .map_err(StoreError::io("list VM folder", &state.dir))?;
            for entry in entries {
                let path = entry
                    .map_err(StoreError::io("list VM folder", &state.dir))?
                    .path();
                if path.file_name().is_some_and(|n| n == vm::LOCK_FILE) {
                    continue;
                }
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match removed {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(StoreError::io("remove VM files", &path)(e));
                    }
                    _ => {}
                }
            }
            io::sync_folder(&state.dir)?;
            remove_if_exists(&state.dir.join(vm::LOCK_FILE), "remove VM lock file")?;
            state.release();
            // NB: another store may have created the VM again meanwhile: then it stays.
            match std::fs::remove_dir(&state.dir) {
                Ok(()) => {
                    if let Some(parent) = state.dir.parent() {
                        io::sync_folder(parent)?;
                    }
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(_) if state.dir.exists() => Ok(()),
                Err(e) => Err(StoreError::io("remove VM folder", &state.dir)(e)),
            }
        })
        .await
    }
}

/// The names of the folders in `dir` (none if `dir` does not exist).
fn list_folders(dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list folder", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list folder", dir))?;
        if entry.path().is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}
