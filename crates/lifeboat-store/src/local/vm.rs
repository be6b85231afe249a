//! What the local store knows of one VM (`ROOT/<namespace>/<vm>/`): its manifest, its points,
//! the paths of its files, and its disks, loaded once from the folder (removing the undo
//! segments of points whose deletion a crash cut short) and kept in step with the files.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::disk::Disk;
use super::io::write_atomic;
use super::undo::Segment;
use crate::StoreError;
use crate::manifest::{Manifest, PointDisk, RecoveryPoint};

/// Everything the store knows of one VM, loaded once and kept in step with the files.
#[derive(Debug)]
pub(super) struct VmState {
    pub(super) dir: PathBuf,
    describe: String,
    pub(super) manifest: Option<Manifest>,
    pub(super) disks: HashMap<String, Disk>,
}

pub(super) fn seq_of(point: &PointDisk) -> u64 {
    point.store_ref.parse().unwrap_or(0)
}

impl VmState {
    pub(super) fn manifest_path(dir: &Path) -> PathBuf {
        dir.join("manifest.json")
    }

    pub(super) fn load(dir: PathBuf, key: String, describe: String) -> Result<VmState, StoreError> {
        let path = Self::manifest_path(&dir);
        let manifest = match std::fs::read(&path) {
            Ok(bytes) => {
                Some(
                    Manifest::from_json(&bytes).map_err(|detail| StoreError::Corrupt {
                        path: path.display().to_string(),
                        detail,
                    })?,
                )
            }
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
        let mut state = VmState {
            dir,
            describe,
            manifest,
            disks: HashMap::new(),
        };
        let names: Vec<String> = state.known_disks();
        let latest_seq = state
            .latest()
            .map(|p| p.disks.first().map(seq_of).unwrap_or(0));
        for name in names {
            let mut disk = Disk::open(state.disk_path(&name), state.undo_dir(&name), None)?;
            let wanted: Vec<u64> = state
                .points()
                .iter()
                .filter_map(|p| p.disks.iter().find(|d| d.name == name).map(seq_of))
                .collect();
            if let Ok(entries) = std::fs::read_dir(&disk.undo_dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let seq = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.parse::<u64>().ok());
                    match seq {
                        Some(seq) if wanted.contains(&seq) => {
                            let segment = Segment::open(path, Some(seq) == latest_seq)?;
                            disk.segments.insert(seq, segment);
                        }
                        // A segment of a point the manifest no longer has: its deletion was
                        // cut short by a crash.
                        _ => std::fs::remove_file(&path)
                            .map_err(StoreError::io("remove stale undo segment", &path))?,
                    }
                }
            }
            state.disks.insert(name, disk);
        }
        Ok(state)
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

    pub(super) fn not_found(&self, what: String) -> StoreError {
        StoreError::NotFound {
            what,
            store: self.describe.clone(),
        }
    }

    pub(super) fn vm_name(&self) -> String {
        self.manifest
            .as_ref()
            .map(|m| m.vm.clone())
            .unwrap_or_default()
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

    pub(super) fn save_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        write_atomic(&Self::manifest_path(&self.dir), &manifest.to_json())
    }

    /// The latest point's sequence number and its size of `disk`, if it has the disk.
    fn latest_of(&self, disk: &str) -> Option<(u64, u64)> {
        self.latest()?
            .disks
            .iter()
            .find(|d| d.name == disk)
            .map(|d| (seq_of(d), d.size_bytes))
    }

    /// Save the pre-images a write to `range` of `disk` would destroy.
    pub(super) fn preserve(&mut self, disk: &str, range: Range<u64>) -> Result<(), StoreError> {
        if let Some((seq, size)) = self.latest_of(disk) {
            self.live_disk(disk)?.preserve(seq, size, range)?;
        }
        Ok(())
    }
}
