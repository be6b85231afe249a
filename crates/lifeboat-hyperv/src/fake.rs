//! `FakeHyperVHost`: a **test double** of [`HyperVHost`], a Hyper-V host in memory that keeps
//! the behaviours the backend relies on, so that the backend's logic runs on Linux:
//!
//! - a recovery checkpoint freezes each disk's image (the VM goes on writing to a new
//!   `.avhdx` child); destroying or converting it merges the child back;
//! - RCT: every write the VM makes is tagged with the generation it happened in; a frozen
//!   image's RCT id names its generation; `query_changes` returns the writes after the id's
//!   generation up to the image's; an id is valid while a reference point lists it;
//! - the VHDX data write GUID of an image changes when its data changes (a merge that brings
//!   writes, or a write behind RCT's back); `read_file_at` serves a small but real VHDX
//!   (headers, region table, metadata, BAT) so the backend parses it as it would on Windows.
//!
//! It is not Hyper-V: it makes no WMI calls and keeps no files. What it cannot show is in
//! docs/hyper-v.md's manual test plan.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::host::{
    ChangeTracking, Checkpoint, CheckpointRef, Consistency, DiskReader, HostError, HyperVHost,
    Missing, RctDisk, ReferencePoint, ReferencePointRef, VirtualDiskInfo, VmRef, codes,
};
use super::vhdx;

/// The payload block size of the images the fake serves.
pub const BLOCK_BYTES: u64 = 1024 * 1024;

#[derive(Debug)]
struct Disk {
    /// The base image path (what a ProtectedVM names).
    base: String,
    /// The image the VM writes to now (the base, or a checkpoint's child).
    leaf: String,
    data: Vec<u8>,
    /// Writes by generation.
    writes: Vec<(u64, Range<u64>)>,
    rct_enabled: bool,
    /// RCT ids below this generation were reset.
    valid_from: u64,
    guid: u128,
    /// The leaf holds writes since its checkpoint (a merge changes the parent's GUID).
    dirty_since_checkpoint: bool,
}

#[derive(Debug, Clone)]
struct FrozenImage {
    path: String,
    generation: u64,
    data: Arc<Vec<u8>>,
    guid: u128,
}

#[derive(Debug, Clone)]
struct Cp {
    id: String,
    recovery: bool,
    created_unix_ms: u64,
    consistency: Consistency,
    /// Per disk name.
    frozen: BTreeMap<String, FrozenImage>,
}

#[derive(Debug, Default)]
struct State {
    vm_exists: bool,
    disks: BTreeMap<String, Disk>,
    generation: u64,
    checkpoints: Vec<Cp>,
    reference_points: Vec<ReferencePoint>,
    next_id: u64,
    next_guid: u128,
    /// Failures to inject: operation name -> error, used once.
    failures: BTreeMap<String, HostError>,
    /// The operations done, in order.
    log: Vec<String>,
    /// Reads of attached disks.
    reads: u64,
    /// The guest ignores shutdown requests.
    ignores_shutdown: bool,
    /// Stopped: off (the guest shut down) or paused; None while it runs.
    stopped: Option<Power>,
}

/// How the fake VM was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// The guest shut down.
    Off,
    /// Paused.
    Paused,
}

/// The in-memory Hyper-V host (see the module docs).
#[derive(Debug, Clone)]
pub struct FakeHyperVHost {
    state: Arc<Mutex<State>>,
    vm: String,
}

fn rct_id(disk: &str, generation: u64) -> String {
    format!("rct:{disk}:{generation}")
}

fn parse_rct(id: &str) -> Option<(String, u64)> {
    let rest = id.strip_prefix("rct:")?;
    let (disk, generation) = rest.rsplit_once(':')?;
    Some((disk.to_owned(), generation.parse().ok()?))
}

fn vdid(disk: &str) -> String {
    format!("{{00000000-0000-0000-0000-{:012x}}}", disk.len())
}

impl FakeHyperVHost {
    /// A host with VM `vm` and its disks (name, size); disk `d` is the image `D:\vm\d.vhdx`.
    pub fn new(vm: &str, disks: &[(&str, u64)]) -> FakeHyperVHost {
        let mut state = State {
            vm_exists: true,
            generation: 1,
            next_guid: 0x1000,
            ..State::default()
        };
        for (name, size) in disks {
            let base = Self::image(name);
            state.disks.insert(
                (*name).to_owned(),
                Disk {
                    leaf: base.clone(),
                    base,
                    data: vec![0; *size as usize],
                    writes: Vec::new(),
                    rct_enabled: true,
                    valid_from: 0,
                    guid: 1,
                    dirty_since_checkpoint: false,
                },
            );
        }
        FakeHyperVHost {
            state: Arc::new(Mutex::new(state)),
            vm: vm.to_owned(),
        }
    }

    /// The guest ignores shutdown requests from now on: a stop pauses it after the grace.
    pub fn ignore_shutdown(&self) {
        self.lock().ignores_shutdown = true;
    }

    /// How the VM was stopped, or None while it runs.
    pub fn stopped(&self) -> Option<Power> {
        self.lock().stopped
    }

    /// The image path of disk `name`.
    pub fn image(name: &str) -> String {
        format!(r"D:\vm\{name}.vhdx")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest writes (tracked by RCT).
    pub fn write(&self, disk: &str, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        assert!(
            s.stopped.is_none(),
            "the guest of a stopped VM cannot write ({:?})",
            s.stopped
        );
        let generation = s.generation;
        if let Some(d) = s.disks.get_mut(disk) {
            d.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            d.writes
                .push((generation, offset..offset + data.len() as u64));
            d.dirty_since_checkpoint = true;
        }
    }

    /// Someone writes the image while tracking is off (no RCT record; the GUID changes).
    pub fn write_untracked(&self, disk: &str, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        s.next_guid += 1;
        let guid = s.next_guid;
        if let Some(d) = s.disks.get_mut(disk) {
            d.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            d.guid = guid;
        }
    }

    /// The disk's current content.
    pub fn data(&self, disk: &str) -> Vec<u8> {
        self.lock()
            .disks
            .get(disk)
            .map(|d| d.data.clone())
            .unwrap_or_default()
    }

    /// Delete a reference point behind the backend's back.
    pub fn delete_reference_points(&self) {
        self.lock().reference_points.clear();
    }

    /// Reset RCT of a disk (every id issued so far becomes invalid).
    pub fn reset_rct(&self, disk: &str) {
        let mut s = self.lock();
        let generation = s.generation;
        if let Some(d) = s.disks.get_mut(disk) {
            d.valid_from = generation;
        }
    }

    /// Turn RCT off for a disk.
    pub fn disable_rct(&self, disk: &str) {
        if let Some(d) = self.lock().disks.get_mut(disk) {
            d.rct_enabled = false;
        }
    }

    /// Remove the VM.
    pub fn remove_vm(&self) {
        self.lock().vm_exists = false;
    }

    /// Fail the next call of `operation` (a method name of [`HyperVHost`]) with `error`.
    pub fn fail_next(&self, operation: &str, error: HostError) {
        self.lock().failures.insert(operation.to_owned(), error);
    }

    /// The operations done so far.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// The checkpoints that exist.
    pub fn checkpoint_count(&self) -> usize {
        self.lock().checkpoints.len()
    }

    /// The reference points that exist.
    pub fn reference_point_ids(&self) -> Vec<String> {
        self.lock()
            .reference_points
            .iter()
            .map(|r| r.reference_point.instance_id.clone())
            .collect()
    }

    /// Reads of attached disks so far.
    pub fn reads(&self) -> u64 {
        self.lock().reads
    }

    /// Add a reference point another product made.
    pub fn add_foreign_reference_point(&self, id: &str) {
        self.lock().reference_points.push(ReferencePoint {
            reference_point: ReferencePointRef {
                instance_id: id.to_owned(),
                path: format!("rp:{id}"),
            },
            rct_based: true,
            consistency: Some(Consistency::Crash),
            disks: Vec::new(),
        });
    }

    fn enter(&self, op: &str, detail: &str) -> Result<std::sync::MutexGuard<'_, State>, HostError> {
        let mut s = self.lock();
        s.log.push(format!("{op} {detail}").trim().to_owned());
        if let Some(e) = s.failures.remove(op) {
            return Err(e);
        }
        Ok(s)
    }

    fn check_vm(&self, s: &State, vm: &VmRef) -> Result<(), HostError> {
        if !s.vm_exists || vm.name != self.vm {
            return Err(HostError::NotFound {
                kind: Missing::Vm,
                what: format!("VM {:?}", vm.name),
                detail: "the fake host has no such VM".into(),
            });
        }
        Ok(())
    }

    /// Merge a checkpoint's children back: the VM writes to the base images again.
    fn merge(s: &mut State, cp: &Cp) {
        let next = s.next_guid + 1;
        let mut used = false;
        for (name, frozen) in &cp.frozen {
            if let Some(d) = s.disks.get_mut(name) {
                d.leaf = frozen.path.clone();
                if d.dirty_since_checkpoint {
                    d.guid = next;
                    used = true;
                }
                d.dirty_since_checkpoint = false;
            }
        }
        if used {
            s.next_guid = next;
        }
    }

    /// Which image `path` is: (disk, Some(frozen) for a checkpoint's image, None for a leaf).
    fn which(s: &State, path: &str) -> Option<(String, Option<FrozenImage>)> {
        for (name, d) in &s.disks {
            if d.leaf == path {
                return Some((name.clone(), None));
            }
        }
        for cp in &s.checkpoints {
            for (name, f) in &cp.frozen {
                if f.path == path {
                    return Some((name.clone(), Some(f.clone())));
                }
            }
        }
        None
    }

    fn not_found(path: &str) -> HostError {
        HostError::NotFound {
            kind: Missing::Disk,
            what: format!("image {path}"),
            detail: "the fake host has no such image".into(),
        }
    }
}

/// A small VHDX file: headers, region table, metadata and a BAT with `allocated` blocks
/// present. No payload: the fake's data lives in memory.
pub fn vhdx_image(size: u64, allocated: &BTreeSet<u64>, guid: u128) -> Vec<u8> {
    const KIB: usize = 1024;
    let blocks = size.div_ceil(BLOCK_BYTES);
    let bat_offset = 1024 * KIB;
    let meta_offset = 2048 * KIB;
    let mut f = vec![0u8; meta_offset + 64 * KIB];
    f[0..8].copy_from_slice(vhdx::FILE_SIGNATURE);
    let mut h = vec![0u8; vhdx::HEADER_BYTES];
    h[0..4].copy_from_slice(b"head");
    h[8..16].copy_from_slice(&1u64.to_le_bytes());
    h[32..48].copy_from_slice(&uuid::Uuid::from_u128(guid).to_bytes_le());
    h[66..68].copy_from_slice(&1u16.to_le_bytes());
    let sum = vhdx::crc32c(&h);
    h[4..8].copy_from_slice(&sum.to_le_bytes());
    f[64 * KIB..64 * KIB + h.len()].copy_from_slice(&h);
    let mut r = vec![0u8; vhdx::REGION_TABLE_BYTES];
    r[0..4].copy_from_slice(b"regi");
    r[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (id, offset, len)) in [
        (vhdx::BAT_REGION, bat_offset, 1024 * KIB),
        (vhdx::METADATA_REGION, meta_offset, 64 * KIB),
    ]
    .into_iter()
    .enumerate()
    {
        let at = 16 + i * 32;
        r[at..at + 16].copy_from_slice(&id.to_bytes_le());
        r[at + 16..at + 24].copy_from_slice(&(offset as u64).to_le_bytes());
        r[at + 24..at + 28].copy_from_slice(&(len as u32).to_le_bytes());
    }
    let sum = vhdx::crc32c(&r);
    r[4..8].copy_from_slice(&sum.to_le_bytes());
    f[192 * KIB..192 * KIB + r.len()].copy_from_slice(&r);
    let m = &mut f[meta_offset..];
    m[0..8].copy_from_slice(b"metadata");
    m[10..12].copy_from_slice(&3u16.to_le_bytes());
    let items: [(uuid::Uuid, Vec<u8>); 3] = [
        (vhdx::FILE_PARAMETERS_ITEM, {
            let mut v = (BLOCK_BYTES as u32).to_le_bytes().to_vec();
            v.extend_from_slice(&0u32.to_le_bytes());
            v
        }),
        (vhdx::VIRTUAL_DISK_SIZE_ITEM, size.to_le_bytes().to_vec()),
        (
            vhdx::LOGICAL_SECTOR_SIZE_ITEM,
            512u32.to_le_bytes().to_vec(),
        ),
    ];
    for (i, (id, value)) in items.iter().enumerate() {
        let at = 32 + i * 32;
        let offset = 64 * KIB / 2 + i * 64;
        m[at..at + 16].copy_from_slice(&id.to_bytes_le());
        m[at + 16..at + 20].copy_from_slice(&(offset as u32).to_le_bytes());
        m[at + 20..at + 24].copy_from_slice(&(value.len() as u32).to_le_bytes());
        m[offset..offset + value.len()].copy_from_slice(value);
    }
    let chunk_ratio = (1u64 << 23) * 512 / BLOCK_BYTES;
    for b in 0..blocks {
        let entry = b + b / chunk_ratio;
        let state = if allocated.contains(&b) {
            u64::from(vhdx::PAYLOAD_BLOCK_FULLY_PRESENT)
        } else {
            u64::from(vhdx::PAYLOAD_BLOCK_NOT_PRESENT)
        };
        let at = bat_offset + entry as usize * 8;
        f[at..at + 8].copy_from_slice(&state.to_le_bytes());
    }
    f
}

/// A frozen image attached read-only.
#[derive(Debug)]
struct FakeReader {
    data: Arc<Vec<u8>>,
    state: Arc<Mutex<State>>,
}

impl DiskReader for FakeReader {
    fn size_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn sector_bytes(&self) -> u32 {
        512
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostError> {
        if !offset.is_multiple_of(512) || !buf.len().is_multiple_of(512) {
            return Err(HostError::VirtualDisk {
                action: "ReadFile",
                path: "fake".into(),
                code: codes::ERROR_INVALID_PARAMETER,
                message: format!("unaligned read {offset}+{}", buf.len()),
            });
        }
        let start = offset as usize;
        let end = (start + buf.len()).min(self.data.len());
        buf.fill(0);
        if start < end {
            buf[..end - start].copy_from_slice(&self.data[start..end]);
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reads += 1;
        Ok(())
    }
}

impl HyperVHost for FakeHyperVHost {
    fn stop_vm(&self, vm: &VmRef, _grace: std::time::Duration) -> Result<bool, HostError> {
        let mut s = self.enter("stop_vm", &vm.name)?;
        self.check_vm(&s, vm)?;
        let power = match s.stopped {
            Some(power) => power,
            None if s.ignores_shutdown => Power::Paused,
            None => Power::Off,
        };
        s.stopped = Some(power);
        Ok(power == Power::Off)
    }

    fn find_vm(&self, name: &str) -> Result<VmRef, HostError> {
        let s = self.enter("find_vm", name)?;
        let vm = VmRef {
            name: name.to_owned(),
            id: "6A1E0F9C-3F1B-4C8E-9B7E-2D4F0C1A5B77".into(),
            path: format!("vm:{name}"),
        };
        self.check_vm(&s, &vm)?;
        Ok(vm)
    }

    fn vm_disks(&self, vm: &VmRef) -> Result<Vec<String>, HostError> {
        let s = self.enter("vm_disks", "")?;
        self.check_vm(&s, vm)?;
        Ok(s.disks.values().map(|d| d.leaf.clone()).collect())
    }

    fn create_recovery_checkpoint(
        &self,
        vm: &VmRef,
        consistency: Consistency,
    ) -> Result<CheckpointRef, HostError> {
        let mut s = self.enter("create_recovery_checkpoint", &format!("{consistency:?}"))?;
        self.check_vm(&s, vm)?;
        s.next_id += 1;
        let id = format!("CP{}", s.next_id);
        let generation = s.generation;
        s.generation += 1;
        let mut frozen = BTreeMap::new();
        for (name, d) in s.disks.iter_mut() {
            frozen.insert(
                name.clone(),
                FrozenImage {
                    path: d.leaf.clone(),
                    generation,
                    data: Arc::new(d.data.clone()),
                    guid: d.guid,
                },
            );
            d.leaf = format!(r"D:\vm\{name}_{id}.avhdx");
            d.dirty_since_checkpoint = false;
        }
        let created_unix_ms = lifeboat_engine::replicator::unix_ms(std::time::SystemTime::now());
        s.checkpoints.push(Cp {
            id: id.clone(),
            recovery: true,
            created_unix_ms,
            consistency,
            frozen,
        });
        Ok(CheckpointRef {
            path: format!("cp:{id}"),
            instance_id: id,
        })
    }

    fn checkpoint_disks(&self, checkpoint: &CheckpointRef) -> Result<Vec<String>, HostError> {
        let s = self.enter("checkpoint_disks", &checkpoint.instance_id)?;
        let cp = s
            .checkpoints
            .iter()
            .find(|c| c.id == checkpoint.instance_id)
            .ok_or_else(|| HostError::NotFound {
                kind: Missing::Checkpoint,
                what: checkpoint.instance_id.clone(),
                detail: String::new(),
            })?;
        Ok(cp.frozen.values().map(|f| f.path.clone()).collect())
    }

    fn checkpoints(&self, vm: &VmRef) -> Result<Vec<Checkpoint>, HostError> {
        let s = self.enter("checkpoints", "")?;
        self.check_vm(&s, vm)?;
        Ok(s.checkpoints
            .iter()
            .map(|c| Checkpoint {
                checkpoint: CheckpointRef {
                    instance_id: c.id.clone(),
                    path: format!("cp:{}", c.id),
                },
                name: format!("{} - Backup", self.vm),
                recovery: c.recovery,
                created_unix_ms: Some(c.created_unix_ms),
            })
            .collect())
    }

    fn destroy_checkpoint(&self, checkpoint: &CheckpointRef) -> Result<(), HostError> {
        let mut s = self.enter("destroy_checkpoint", &checkpoint.instance_id)?;
        let Some(at) = s
            .checkpoints
            .iter()
            .position(|c| c.id == checkpoint.instance_id)
        else {
            return Err(HostError::NotFound {
                kind: Missing::Checkpoint,
                what: checkpoint.instance_id.clone(),
                detail: String::new(),
            });
        };
        let cp = s.checkpoints.remove(at);
        Self::merge(&mut s, &cp);
        Ok(())
    }

    fn convert_to_reference_point(
        &self,
        checkpoint: &CheckpointRef,
    ) -> Result<ReferencePoint, HostError> {
        let mut s = self.enter("convert_to_reference_point", &checkpoint.instance_id)?;
        let Some(at) = s
            .checkpoints
            .iter()
            .position(|c| c.id == checkpoint.instance_id)
        else {
            return Err(HostError::NotFound {
                kind: Missing::Checkpoint,
                what: checkpoint.instance_id.clone(),
                detail: String::new(),
            });
        };
        let cp = s.checkpoints.remove(at);
        Self::merge(&mut s, &cp);
        s.next_id += 1;
        let id = format!("RP{}", s.next_id);
        let rp = ReferencePoint {
            reference_point: ReferencePointRef {
                instance_id: id.clone(),
                path: format!("rp:{id}"),
            },
            rct_based: true,
            consistency: Some(cp.consistency),
            disks: cp
                .frozen
                .iter()
                .map(|(name, f)| RctDisk {
                    virtual_disk_id: vdid(name),
                    rct_id: rct_id(name, f.generation),
                })
                .collect(),
        };
        s.reference_points.push(rp.clone());
        Ok(rp)
    }

    fn reference_points(&self, vm: &VmRef) -> Result<Vec<ReferencePoint>, HostError> {
        let s = self.enter("reference_points", "")?;
        self.check_vm(&s, vm)?;
        Ok(s.reference_points.clone())
    }

    fn destroy_reference_point(
        &self,
        reference_point: &ReferencePointRef,
    ) -> Result<(), HostError> {
        let mut s = self.enter("destroy_reference_point", &reference_point.instance_id)?;
        let before = s.reference_points.len();
        s.reference_points
            .retain(|r| r.reference_point.instance_id != reference_point.instance_id);
        if s.reference_points.len() == before {
            return Err(HostError::NotFound {
                kind: Missing::ReferencePoint,
                what: reference_point.instance_id.clone(),
                detail: String::new(),
            });
        }
        Ok(())
    }

    fn disk_info(&self, path: &str) -> Result<VirtualDiskInfo, HostError> {
        let s = self.enter("disk_info", path)?;
        let (name, frozen) = Self::which(&s, path).ok_or_else(|| Self::not_found(path))?;
        let d = &s.disks[&name];
        let generation = frozen.as_ref().map_or(s.generation, |f| f.generation);
        let parent_path = if frozen.is_none() && d.leaf != d.base {
            // The VM writes to a checkpoint's child: its parent is the frozen image.
            s.checkpoints
                .iter()
                .rev()
                .find_map(|c| c.frozen.get(&name))
                .map(|f| f.path.clone())
        } else {
            None
        };
        Ok(VirtualDiskInfo {
            virtual_size_bytes: d.data.len() as u64,
            logical_sector_bytes: 512,
            virtual_disk_id: vdid(&name),
            change_tracking: Some(ChangeTracking {
                enabled: d.rct_enabled,
                newer_changes: false,
                most_recent_id: rct_id(&name, generation),
            }),
            parent_path,
        })
    }

    fn query_changes(
        &self,
        path: &str,
        rct: &str,
        range: Range<u64>,
    ) -> Result<Vec<Range<u64>>, HostError> {
        let s = self.enter("query_changes", &format!("{path} since {rct}"))?;
        let (name, frozen) = Self::which(&s, path).ok_or_else(|| Self::not_found(path))?;
        let d = &s.disks[&name];
        let invalid = |code| HostError::VirtualDisk {
            action: "QueryChangesVirtualDisk",
            path: path.to_owned(),
            code,
            message: "recorded by the fake host".into(),
        };
        if !d.rct_enabled {
            return Err(invalid(codes::ERROR_VHD_CHANGE_TRACKING_DISABLED));
        }
        let Some((disk, since)) = parse_rct(rct) else {
            return Err(invalid(codes::ERROR_VHD_INVALID_CHANGE_TRACKING_ID));
        };
        let kept = s
            .reference_points
            .iter()
            .any(|r| r.disks.iter().any(|x| x.rct_id == rct));
        if disk != name || since < d.valid_from || !kept {
            return Err(invalid(codes::ERROR_VHD_INVALID_CHANGE_TRACKING_ID));
        }
        let upto = frozen.as_ref().map_or(u64::MAX, |f| f.generation);
        let ranges: Vec<Range<u64>> = d
            .writes
            .iter()
            .filter(|(g, _)| *g > since && *g <= upto)
            .map(|(_, r)| r.start.max(range.start)..r.end.min(range.end))
            .filter(|r| !r.is_empty())
            .collect();
        Ok(lifeboat_engine::backend::union_ranges(ranges))
    }

    fn read_file_at(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, HostError> {
        let s = self.enter("read_file_at", path)?;
        let (name, frozen) = Self::which(&s, path).ok_or_else(|| Self::not_found(path))?;
        let Some(frozen) = frozen else {
            // NB: like Hyper-V, the image the VM writes to cannot be read while it runs.
            return Err(HostError::VirtualDisk {
                action: "ReadFile",
                path: path.to_owned(),
                code: codes::ERROR_SHARING_VIOLATION,
                message: "the image is in use".into(),
            });
        };
        let allocated: BTreeSet<u64> = frozen
            .data
            .chunks(BLOCK_BYTES as usize)
            .enumerate()
            .filter(|(_, c)| c.iter().any(|b| *b != 0))
            .map(|(i, _)| i as u64)
            .collect();
        let _ = name;
        let file = vhdx_image(frozen.data.len() as u64, &allocated, frozen.guid);
        let start = (offset as usize).min(file.len());
        let end = (start + len).min(file.len());
        Ok(file[start..end].to_vec())
    }

    fn open_for_read(&self, path: &str) -> Result<Box<dyn DiskReader>, HostError> {
        let s = self.enter("open_for_read", path)?;
        match Self::which(&s, path) {
            Some((_, Some(frozen))) => Ok(Box::new(FakeReader {
                data: frozen.data,
                state: Arc::clone(&self.state),
            })),
            Some((_, None)) => Err(HostError::VirtualDisk {
                action: "AttachVirtualDisk",
                path: path.to_owned(),
                code: codes::ERROR_SHARING_VIOLATION,
                message: "the image is in use".into(),
            }),
            None => Err(Self::not_found(path)),
        }
    }
}
