//! What the local store knows of one VM (`ROOT/<namespace>/<vm>/`): its manifest, its points,
//! the paths of its files, and its disks, loaded once from the folder and kept in step with
//! the files. A writing store holds the VM's lock ([`LOCK_FILE`]) and recovers from a crash
//! on load (removing the undo segments of points whose deletion a crash cut short, cutting
//! torn records); a read-only one locks and repairs nothing.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::disk::Disk;
use super::epoch;
use super::io::{create_dir_durable, open_lock_file, sync_folder, write_atomic};
use super::undo::Segment;
use super::{Access, read_only_refusal};
use crate::manifest::{Manifest, PointDisk, RecoveryPoint};
use crate::{StoreError, merge_ranges};

/// The lock file of a VM's folder: held (`File::try_lock`, an exclusive `flock` on unix, a
/// `LockFileEx` on Windows: both per open file, so two stores of one process exclude each
/// other too) by the writing store that has the VM loaded, for as long as it has it.
pub(super) const LOCK_FILE: &str = "writer.lock";

/// How often a read-only load starts over when the manifest changed under it.
const READ_ONLY_ATTEMPTS: usize = 8;

/// Everything the store knows of one VM, loaded once and kept in step with the files.
#[derive(Debug)]
pub(super) struct VmState {
    pub(super) dir: PathBuf,
    key: String,
    describe: String,
    pub(super) access: Access,
    /// The VM's lock file, locked: a writing store holds it from the load on, or, when the
    /// VM's folder did not exist then, from [`VmState::claim`] on.
    lock: Option<File>,
    pub(super) manifest: Option<Manifest>,
    pub(super) disks: HashMap<String, Disk>,
    /// The epoch the store writes this VM under, if it holds one (set before every change).
    pub(super) held: Option<u64>,
}

pub(super) fn seq_of(point: &PointDisk) -> u64 {
    point.store_ref.parse().unwrap_or(0)
}

/// Lock the VM's lock file in `dir` (created if missing), or say who holds it.
fn lock_vm(dir: &Path, key: &str) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let created = !path.exists();
    let file = open_lock_file(&path, "open VM lock file")?;
    if created {
        sync_folder(dir)?;
    }
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Io {
            action: "lock VM",
            source: std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "VM {key} is held by another Lifeboat process (lock file {})",
                    path.display()
                ),
            ),
            path,
        }),
        Err(TryLockError::Error(e)) => Err(StoreError::io("lock VM", &path)(e)),
    }
}

fn read_manifest(dir: &Path, key: &str) -> Result<Option<Manifest>, StoreError> {
    let path = VmState::manifest_path(dir);
    let manifest = match std::fs::read(&path) {
        Ok(bytes) => Some(
            Manifest::from_json(&bytes).map_err(|detail| StoreError::Corrupt {
                path: path.display().to_string(),
                detail,
            })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(StoreError::io("read manifest", &path)(e)),
    };
    if let Some(m) = &manifest
        && m.vm != key
    {
        return Err(StoreError::Corrupt {
            path: path.display().to_string(),
            detail: format!("the manifest is for VM {}, not {key}", m.vm),
        });
    }
    Ok(manifest)
}

impl VmState {
    pub(super) fn manifest_path(dir: &Path) -> PathBuf {
        dir.join("manifest.json")
    }

    /// Load the VM from its folder.
    ///
    /// With [`Access::Write`], the VM's lock is taken first (when its folder exists; an error
    /// naming the lock file when another store holds it), then crash recovery runs: undo
    /// segments of points the manifest no longer lists are removed. The listed segments are
    /// opened when first needed ([`Disk::open_segments`]), and a torn record at the end of
    /// one is cut off then, before anything reads or appends to it.
    ///
    /// With [`Access::ReadOnly`] nothing is locked, created, removed, cut or written: the
    /// manifest and the segments it lists are read as they are (a torn tail is left, and the
    /// index stops before it; unlisted segments are ignored), beside a writer if one holds
    /// the VM. That is safe because the writer's state on disk is consistent at every
    /// fsync'd step (a pre-image is durable before the granule it saves is overwritten, a
    /// point's data before the manifest names it, the manifest is replaced atomically); a
    /// manifest that changes while the load reads the segments starts the load over. A
    /// read-only store sees the points as of its first use of the VM: it may see the newest
    /// point a moment late (open another to see later ones).
    pub(super) fn load(
        dir: PathBuf,
        key: String,
        describe: String,
        access: Access,
    ) -> Result<VmState, StoreError> {
        if access == Access::Write {
            let lock = if dir.is_dir() {
                Some(lock_vm(&dir, &key)?)
            } else {
                None
            };
            let manifest = read_manifest(&dir, &key)?;
            return VmState::open_disks(dir, key, describe, access, lock, manifest);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let manifest = read_manifest(&dir, &key)?;
            let seen = manifest.as_ref().map(Manifest::to_json);
            let state = VmState::open_disks(
                dir.clone(),
                key.clone(),
                describe.clone(),
                access,
                None,
                manifest,
            );
            let now = read_manifest(&dir, &key)?.as_ref().map(Manifest::to_json);
            if now == seen {
                return state;
            }
            if attempt >= READ_ONLY_ATTEMPTS {
                return Err(StoreError::Io {
                    action: "read manifest",
                    path: VmState::manifest_path(&dir),
                    source: std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "the manifest of VM {key} changed {attempt} times while it was read; try again"
                        ),
                    ),
                });
            }
        }
    }

    /// The VM's state from `manifest`: its disks' live files and undo segments, recovered
    /// (with [`Access::Write`]) from a crash.
    fn open_disks(
        dir: PathBuf,
        key: String,
        describe: String,
        access: Access,
        lock: Option<File>,
        manifest: Option<Manifest>,
    ) -> Result<VmState, StoreError> {
        let mut state = VmState {
            dir,
            key,
            describe,
            access,
            lock,
            manifest,
            disks: HashMap::new(),
            held: None,
        };
        let names: Vec<String> = state.known_disks();
        for name in names {
            let mut disk = Disk::open(state.disk_path(&name), state.undo_dir(&name), None, access)?;
            let wanted: Vec<u64> = state
                .points()
                .iter()
                .filter_map(|p| p.disks.iter().find(|d| d.name == name).map(seq_of))
                .collect();
            let mut removed = false;
            if let Ok(entries) = std::fs::read_dir(&disk.undo_dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let seq = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.parse::<u64>().ok());
                    match seq {
                        // NB: any segment, not only the latest, can end in a torn record:
                        // deleting a point appends to the next older point's segment.
                        Some(seq) if wanted.contains(&seq) && access == Access::Write => {
                            disk.unopened.insert(seq);
                        }
                        Some(seq) if wanted.contains(&seq) => {
                            let segment = Segment::open(path, access)?;
                            disk.segments.insert(seq, segment);
                        }
                        // A segment of a point the manifest no longer has: its deletion was
                        // cut short by a crash (or, to a reader, is under way).
                        _ if access == Access::ReadOnly => {}
                        _ => {
                            std::fs::remove_file(&path)
                                .map_err(StoreError::io("remove stale undo segment", &path))?;
                            removed = true;
                        }
                    }
                }
            }
            if removed {
                sync_folder(&disk.undo_dir)?;
            }
            state.disks.insert(name, disk);
        }
        Ok(state)
    }

    /// Make sure this (writing) store holds the VM's lock before it creates the VM: when the
    /// folder did not exist at the load, create it (durably), lock it, and load again (another
    /// process may have created the VM since).
    pub(super) fn claim(&mut self) -> Result<(), StoreError> {
        self.writable()?;
        if self.lock.is_some() {
            return Ok(());
        }
        create_dir_durable(&self.dir, "create VM folder")?;
        let held = self.held;
        *self = VmState::load(
            self.dir.clone(),
            self.key.clone(),
            self.describe.clone(),
            Access::Write,
        )?;
        self.held = held;
        Ok(())
    }

    /// Whether this store holds the VM's lock.
    pub(super) fn is_locked(&self) -> bool {
        self.lock.is_some()
    }

    /// Let go of the VM's lock (its folder is gone).
    pub(super) fn release(&mut self) {
        self.lock = None;
    }

    /// Refuse a change in a read-only store.
    pub(super) fn writable(&self) -> Result<(), StoreError> {
        match self.access {
            Access::Write => Ok(()),
            Access::ReadOnly => Err(read_only_refusal(&self.key)),
        }
    }

    pub(super) fn points(&self) -> &[RecoveryPoint] {
        self.manifest
            .as_ref()
            .map(|m| m.points.as_slice())
            .unwrap_or_default()
    }

    pub(super) fn latest(&self) -> Option<&RecoveryPoint> {
        self.points().last()
    }

    /// Disks in the manifest now, and disks only points still reference.
    fn known_disks(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        if let Some(m) = &self.manifest {
            names.extend(m.disks.iter().map(|d| d.name.clone()));
            names.extend(
                m.points
                    .iter()
                    .flat_map(|p| p.disks.iter().map(|d| d.name.clone())),
            );
        }
        names.sort();
        names.dedup();
        names
    }

    pub(super) fn disk_path(&self, disk: &str) -> PathBuf {
        self.dir.join("disks").join(format!("{disk}.img"))
    }

    pub(super) fn undo_dir(&self, disk: &str) -> PathBuf {
        self.dir.join("undo").join(disk)
    }

    pub(super) fn map_path(&self, disk: &str) -> PathBuf {
        self.dir.join("maps").join(format!("{disk}.map"))
    }

    pub(super) fn definition_path(&self) -> PathBuf {
        self.dir.join("definition.json")
    }

    pub(super) fn not_found(&self, what: String) -> StoreError {
        StoreError::NotFound {
            what,
            store: self.describe.clone(),
        }
    }

    pub(super) fn vm_name(&self) -> String {
        // NB: the key, not the manifest's name: the manifest is gone once the VM is deleted,
        // and an error about a deleted VM named no VM at all.
        self.key.clone()
    }

    /// A live disk of the manifest, for writing.
    pub(super) fn live_disk(&mut self, disk: &str) -> Result<&mut Disk, StoreError> {
        let listed = self
            .manifest
            .as_ref()
            .is_some_and(|m| m.disk(disk).is_some());
        let vm = self.vm_name();
        match self.disks.get_mut(disk) {
            Some(d) if listed => Ok(d),
            _ => Err(StoreError::NotFound {
                what: format!("disk {disk:?} of VM {vm}"),
                store: self.describe.clone(),
            }),
        }
    }

    /// Replace the manifest; with an epoch held, under the epoch lock and only while the
    /// VM is still at that epoch (a fence and a manifest write never interleave).
    pub(super) fn save_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        self.writable()?;
        let _lock = match self.held {
            Some(_) => {
                let lock = epoch::lock(&self.dir)?;
                self.check_epoch()?;
                Some(lock)
            }
            None => None,
        };
        write_atomic(&Self::manifest_path(&self.dir), &manifest.to_json())
    }

    /// `Ok` when this store may change the VM: it holds no epoch, or the one the VM is at.
    pub(super) fn check_epoch(&self) -> Result<(), StoreError> {
        if self.held.is_none() {
            return Ok(());
        }
        crate::fence::check(&self.key, self.held, &epoch::read(&self.dir)?)
    }

    /// The latest point's sequence number and its size of `disk`, if it has the disk.
    fn latest_of(&self, disk: &str) -> Option<(u64, u64)> {
        self.latest()?
            .disks
            .iter()
            .find(|d| d.name == disk)
            .map(|d| (seq_of(d), d.size_bytes))
    }

    /// Save the pre-images a write to `range` of `disk` would destroy, durably.
    pub(super) fn preserve(&mut self, disk: &str, range: Range<u64>) -> Result<(), StoreError> {
        self.preserve_many(disk, std::iter::once(range))
    }

    /// Save the pre-images writes to `ranges` of `disk` would destroy, with one sync for
    /// them all.
    pub(super) fn preserve_many(
        &mut self,
        disk: &str,
        ranges: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<(), StoreError> {
        let Some((seq, size)) = self.latest_of(disk) else {
            return Ok(());
        };
        let live = self.live_disk(disk)?;
        live.preserve_unsynced(seq, size, &merge_ranges(ranges.into_iter().collect()))?;
        // NB: also when this call appended nothing: an earlier one that failed halfway may
        // have indexed records it never synced, and this write may overwrite their granules.
        let segment = live.segment(seq)?;
        if segment.unsynced {
            segment.sync()?;
        }
        Ok(())
    }
}
