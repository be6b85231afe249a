//! The local folder store: the embedded default, and what standalone mode uses.
//!
//! ```text
//!  ROOT/<namespace>/<vm>/
//!    manifest.json              replaced atomically (write, fsync, rename, fsync folder)
//!    disks/<disk>.img           the live replica, a sparse file
//!    maps/<disk>.map            the live replica's block map
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
//! # Guarantees
//!
//! - A pre-image is durable before the live granule is overwritten, so a crash at any moment
//!   leaves every point readable; [`ReplicaStore::revert_to_latest_point`] puts the live
//!   file back to the latest point.
//! - A torn record at the end of the open segment (a crash while appending, before the live
//!   write) is cut off on open; a bad record anywhere else is reported as corruption.

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use xxhash_rust::xxh3::xxh3_64;

use crate::files;
use crate::manifest::{Manifest, PointDisk, RecoveryPoint, point_id};
use crate::{
    At, DIRECT_IO_ALIGN, NewPoint, ReplicaStore, StoreError, VmKey, check_disk_name,
    check_disk_size, check_range,
};

/// Size of the unit of copy-on-write: a granule's old content is saved once per point.
const GRANULE_BYTES: u64 = 4096;
/// Magic of an undo record.
const UNDO_MAGIC: &[u8; 4] = b"LBU1";
/// Size of an undo record's header.
const UNDO_HEADER_BYTES: u64 = 32;

/// A replica store in a folder of this machine.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    vms: Mutex<HashMap<VmKey, Arc<Mutex<Option<VmState>>>>>,
}

impl LocalStore {
    /// A store rooted at `root` (created if missing).
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the folder cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalStore, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(StoreError::io("create store folder", &root))?;
        Ok(LocalStore {
            root,
            vms: Mutex::new(HashMap::new()),
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
        let run = move || {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(VmState::load(dir, key, describe)?);
            }
            match guard.as_mut() {
                Some(state) => f(state),
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

/// One undo segment: the pre-images of the granules overwritten after one point.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    /// Granule offset on the disk -> offset of the record's data in the file, and its length.
    index: BTreeMap<u64, (u64, u64)>,
    end: u64,
}

impl Segment {
    fn open(path: PathBuf, may_have_torn_tail: bool) -> Result<Segment, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(StoreError::io("open undo segment", &path))?;
        let len = file
            .metadata()
            .map_err(StoreError::io("stat undo segment", &path))?
            .len();
        let mut index = BTreeMap::new();
        let mut pos = 0;
        let mut header = [0u8; UNDO_HEADER_BYTES as usize];
        while pos < len {
            let torn = |why: &str| format!("bad undo record at byte {pos} ({why})");
            let record = (|| {
                if len - pos < UNDO_HEADER_BYTES {
                    return Err(torn("short header"));
                }
                file.read_exact_at(&mut header, pos)
                    .map_err(|e| torn(&e.to_string()))?;
                let sum = u64::from_le_bytes(header[24..32].try_into().unwrap_or_default());
                if &header[0..4] != UNDO_MAGIC || xxh3_64(&header[..24]) != sum {
                    return Err(torn("header checksum"));
                }
                let data_len = u64::from(u32::from_le_bytes(
                    header[4..8].try_into().unwrap_or_default(),
                ));
                let disk_offset = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
                let data_sum = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
                if data_len > GRANULE_BYTES || len - pos - UNDO_HEADER_BYTES < data_len {
                    return Err(torn("length"));
                }
                let mut data = vec![0u8; data_len as usize];
                file.read_exact_at(&mut data, pos + UNDO_HEADER_BYTES)
                    .map_err(|e| torn(&e.to_string()))?;
                if xxh3_64(&data) != data_sum {
                    return Err(torn("data checksum"));
                }
                Ok((disk_offset, data_len))
            })();
            match record {
                Ok((disk_offset, data_len)) => {
                    index.insert(disk_offset, (pos + UNDO_HEADER_BYTES, data_len));
                    pos += UNDO_HEADER_BYTES + data_len;
                }
                // NB: only the last record can be torn by a crash (it is appended and synced
                // before the live write it protects); more than a record's worth after a bad
                // one means the file was damaged, and guessing would serve wrong data.
                Err(_) if may_have_torn_tail && len - pos < UNDO_HEADER_BYTES + GRANULE_BYTES => {
                    file.set_len(pos)
                        .map_err(StoreError::io("cut torn undo record", &path))?;
                    file.sync_all()
                        .map_err(StoreError::io("sync undo segment", &path))?;
                    break;
                }
                Err(detail) => {
                    return Err(StoreError::Corrupt {
                        path: path.display().to_string(),
                        detail,
                    });
                }
            }
        }
        let end = pos.min(len);
        Ok(Segment {
            path,
            file,
            index,
            end,
        })
    }

    fn append(&mut self, disk_offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut record = Vec::with_capacity(UNDO_HEADER_BYTES as usize + data.len());
        record.extend_from_slice(UNDO_MAGIC);
        record.extend_from_slice(&(data.len() as u32).to_le_bytes());
        record.extend_from_slice(&disk_offset.to_le_bytes());
        record.extend_from_slice(&xxh3_64(data).to_le_bytes());
        let sum = xxh3_64(&record);
        record.extend_from_slice(&sum.to_le_bytes());
        record.extend_from_slice(data);
        self.file
            .write_all(&record)
            .map_err(StoreError::io("append undo record", &self.path))?;
        self.index.insert(
            disk_offset,
            (self.end + UNDO_HEADER_BYTES, data.len() as u64),
        );
        self.end += record.len() as u64;
        Ok(())
    }

    fn read_granule(&self, disk_offset: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(&(pos, len)) = self.index.get(&disk_offset) else {
            return Ok(None);
        };
        let mut data = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut data, pos)
            .map_err(StoreError::io("read undo record", &self.path))?;
        let mut header = [0u8; 8];
        self.file
            .read_exact_at(&mut header, pos - UNDO_HEADER_BYTES + 16)
            .map_err(StoreError::io("read undo record", &self.path))?;
        if xxh3_64(&data) != u64::from_le_bytes(header) {
            return Err(StoreError::Corrupt {
                path: self.path.display().to_string(),
                detail: format!("undo record for disk offset {disk_offset} fails its checksum"),
            });
        }
        Ok(Some(data))
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(StoreError::io("sync undo segment", &self.path))
    }
}

/// One replica disk: its live file and its undo segments by point sequence number.
#[derive(Debug)]
struct Disk {
    path: PathBuf,
    file: File,
    /// The same file opened for direct I/O (bypassing the page cache), where the file
    /// system supports it: aligned bulk writes go there.
    direct: Option<File>,
    size_bytes: u64,
    undo_dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
}

impl Disk {
    fn open(
        path: PathBuf,
        undo_dir: PathBuf,
        create_size: Option<u64>,
    ) -> Result<Disk, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create_size.is_some())
            .truncate(false)
            .open(&path)
            .map_err(StoreError::io("open replica disk", &path))?;
        if let Some(size) = create_size {
            file.set_len(size)
                .map_err(StoreError::io("size replica disk", &path))?;
        }
        let size_bytes = file
            .metadata()
            .map_err(StoreError::io("stat replica disk", &path))?
            .len();
        let direct = open_direct(&path);
        Ok(Disk {
            path,
            file,
            direct,
            size_bytes,
            undo_dir,
            segments: BTreeMap::new(),
        })
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        self.undo_dir.join(format!("{seq:012}.undo"))
    }

    fn segment(&mut self, seq: u64) -> Result<&mut Segment, StoreError> {
        if !self.segments.contains_key(&seq) {
            std::fs::create_dir_all(&self.undo_dir)
                .map_err(StoreError::io("create undo folder", &self.undo_dir))?;
            let segment = Segment::open(self.segment_path(seq), true)?;
            self.segments.insert(seq, segment);
        }
        self.segments
            .get_mut(&seq)
            .ok_or_else(|| StoreError::InvalidRequest {
                what: "segment vanished".into(),
            })
    }

    /// Write `data` at `offset` of the live file: straight to the device when the buffer,
    /// offset and length suit direct I/O, through the page cache otherwise. Either way the
    /// data is durable at the next [`ReplicaStore::flush`] (its fsync flushes the device's
    /// cache and the file's metadata), and later reads through `file` see it (the kernel
    /// drops cached pages of a range written directly).
    fn write_live(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        if let Some(direct) = &self.direct
            && direct_aligned(data, offset)
        {
            match direct.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // NB: a device with a logical block larger than DIRECT_IO_ALIGN, or a file
                // system that opens O_DIRECT files and then refuses their writes.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(StoreError::io("write replica disk", &self.path)(e)),
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(StoreError::io("write replica disk", &self.path))
    }

    fn read_live(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        // Past the live end (a point larger than the disk is now) reads as zeros.
        let live = self.size_bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[live..].fill(0);
        if live > 0 {
            self.file
                .read_exact_at(&mut buf[..live], offset)
                .map_err(StoreError::io("read replica disk", &self.path))?;
        }
        Ok(())
    }

    /// Save the pre-images of the granules in `range` that point `seq` (of size
    /// `point_size_bytes`) still reads from the live file, then sync them.
    fn preserve(
        &mut self,
        seq: u64,
        point_size_bytes: u64,
        range: Range<u64>,
    ) -> Result<(), StoreError> {
        let end = range.end.min(point_size_bytes);
        let mut granule = range.start / GRANULE_BYTES * GRANULE_BYTES;
        let mut appended = false;
        while granule < end {
            let len = GRANULE_BYTES.min(point_size_bytes - granule);
            if !self.segment(seq)?.index.contains_key(&granule) {
                let mut old = vec![0u8; len as usize];
                self.read_live(granule, &mut old)?;
                self.segment(seq)?.append(granule, &old)?;
                appended = true;
            }
            granule += GRANULE_BYTES;
        }
        if appended {
            self.segment(seq)?.sync()?;
        }
        Ok(())
    }

    /// Read at a point: `from_seq` is the point's own segment; later segments hold what it
    /// saw of granules overwritten after later points.
    fn read_at(&mut self, from_seq: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let granule = at / GRANULE_BYTES * GRANULE_BYTES;
            let within = (at - granule) as usize;
            let take = ((GRANULE_BYTES as usize - within).min(buf.len() - pos)) as u64;
            let mut found = None;
            for (_, segment) in self.segments.range(from_seq..) {
                if let Some(data) = segment.read_granule(granule)? {
                    found = Some(data);
                    break;
                }
            }
            let out = &mut buf[pos..pos + take as usize];
            match found {
                Some(data) => {
                    out.fill(0);
                    let have = data.len().saturating_sub(within).min(out.len());
                    out[..have].copy_from_slice(&data[within..within + have]);
                }
                None => self.read_live(at, out)?,
            }
            pos += take as usize;
        }
        Ok(())
    }

    #[cfg(unix)]
    fn live_data_ranges(&self) -> Result<Vec<Range<u64>>, StoreError> {
        use rustix::fs::{SeekFrom, seek};
        let mut ranges = Vec::new();
        let mut pos = 0;
        while pos < self.size_bytes {
            let start = match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(start) => start,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => {
                    return Err(StoreError::io("find data in replica disk", &self.path)(
                        e.into(),
                    ));
                }
            };
            let end = seek(&self.file, SeekFrom::Hole(start))
                .map_err(|e| StoreError::io("find holes in replica disk", &self.path)(e.into()))?
                .min(self.size_bytes);
            if start >= end {
                break;
            }
            ranges.push(start..end);
            pos = end;
        }
        Ok(ranges)
    }
}

#[cfg(not(unix))]
impl Disk {
    /// NB: no SEEK_DATA/SEEK_HOLE here: the whole live disk counts as data (a hole reads as
    /// zeros, so this costs reads, never correctness).
    fn live_data_ranges(&self) -> Result<Vec<Range<u64>>, StoreError> {
        Ok(std::iter::once(0..self.size_bytes)
            .filter(|r| !r.is_empty())
            .collect())
    }
}

/// Sort and merge ranges.
fn merge_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges.into_iter().filter(|r| r.start < r.end) {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

/// Everything the store knows of one VM, loaded once and kept in step with the files.
#[derive(Debug)]
struct VmState {
    dir: PathBuf,
    describe: String,
    manifest: Option<Manifest>,
    disks: HashMap<String, Disk>,
}

fn seq_of(point: &PointDisk) -> u64 {
    point.store_ref.parse().unwrap_or(0)
}

impl VmState {
    fn manifest_path(dir: &Path) -> PathBuf {
        dir.join("manifest.json")
    }

    fn load(dir: PathBuf, key: String, describe: String) -> Result<VmState, StoreError> {
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

    fn points(&self) -> &[RecoveryPoint] {
        self.manifest
            .as_ref()
            .map(|m| m.points.as_slice())
            .unwrap_or_default()
    }

    fn latest(&self) -> Option<&RecoveryPoint> {
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

    fn disk_path(&self, disk: &str) -> PathBuf {
        self.dir.join("disks").join(format!("{disk}.img"))
    }

    fn undo_dir(&self, disk: &str) -> PathBuf {
        self.dir.join("undo").join(disk)
    }

    fn map_path(&self, disk: &str) -> PathBuf {
        self.dir.join("maps").join(format!("{disk}.map"))
    }

    fn not_found(&self, what: String) -> StoreError {
        StoreError::NotFound {
            what,
            store: self.describe.clone(),
        }
    }

    fn vm_name(&self) -> String {
        self.manifest
            .as_ref()
            .map(|m| m.vm.clone())
            .unwrap_or_default()
    }

    /// A live disk of the manifest, for writing.
    fn live_disk(&mut self, disk: &str) -> Result<&mut Disk, StoreError> {
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

    fn save_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
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
    fn preserve(&mut self, disk: &str, range: Range<u64>) -> Result<(), StoreError> {
        if let Some((seq, size)) = self.latest_of(disk) {
            self.live_disk(disk)?.preserve(seq, size, range)?;
        }
        Ok(())
    }
}

/// [`files::write_atomic`], its failure as a store error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    files::write_atomic(path, bytes).map_err(|e| StoreError::io(e.action, e.path)(e.source))
}

fn direct_aligned(data: &[u8], offset: u64) -> bool {
    data.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0
        && data.len().is_multiple_of(DIRECT_IO_ALIGN)
        && offset.is_multiple_of(DIRECT_IO_ALIGN as u64)
}

/// `path` opened again for writing with `O_DIRECT`, or `None` where the file system has no
/// direct I/O (tmpfs before Linux 6.6, some FUSE file systems): replica data written in
/// bulk (an initial copy, a resync) then skips the page cache, which saves a copy of every
/// byte, leaves the cache to the host's other work, and leaves almost nothing for the flush
/// that makes the data durable.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Make `[offset, offset + len)` of `file` read as zeros, freeing its space.
#[cfg(unix)]
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(std::io::Error::from)
}

/// NB: without hole punching (Windows) the range is written with zeros: the same reads,
/// without the space saving.
#[cfg(not(unix))]
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (GRANULE_BYTES * 16) as usize];
    let mut done = 0;
    while done < len {
        let step = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..step], offset + done)?;
        done += step as u64;
    }
    Ok(())
}

/// Positional I/O on every platform: `pread`/`pwrite` on unix, `seek_read`/`seek_write` in
/// a loop on Windows.
// NB: on Windows these move the file cursor; replica files are only read and written
// positionally, and undo segments are opened for append, which ignores the cursor.
trait PositionalIo {
    /// Fill `buf` from `offset`; a file that ends first is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Write all of `data` at `offset`.
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()>;
}

#[cfg(unix)]
impl PositionalIo for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }
}

#[cfg(windows)]
impl PositionalIo for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match self.seek_read(&mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < data.len() {
            match self.seek_write(&data[done..], offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn remove_if_exists(path: &Path, action: &'static str) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(action, path)(e)),
        _ => Ok(()),
    }
}

#[async_trait]
impl ReplicaStore for LocalStore {
    fn describe(&self) -> String {
        format!("local folder {}", self.root.display())
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let probe = root.join(format!(".lifeboat-probe-{}", std::process::id()));
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
        self.with_vm(vm, move |state| {
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
            std::fs::create_dir_all(state.dir.join("disks")).map_err(StoreError::io("create disks folder", &state.dir))?;
            // A leftover file from a create cut short by a crash starts over as zeros.
            remove_if_exists(&path, "remove leftover replica disk")?;
            let file = Disk::open(path, state.undo_dir(&disk), Some(size_bytes))?;
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
        self.with_vm(vm, move |state| {
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
        self.with_vm(vm, move |state| {
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
        let disk = disk.to_owned();
        self.with_vm(vm, move |state| {
            let size = state.live_disk(&disk)?.size_bytes;
            check_range(&disk, offset, data.len() as u64, size, true)?;
            state.preserve(&disk, offset..offset + data.len() as u64)?;
            let d = state.live_disk(&disk)?;
            d.write_live(&data, offset)
        })
        .await
    }

    async fn zero(&self, vm: &VmKey, disk: &str, offset: u64, len: u64) -> Result<(), StoreError> {
        let disk = disk.to_owned();
        self.with_vm(vm, move |state| {
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
        let (disk, at) = (disk.to_owned(), at.clone());
        self.with_vm(vm, move |state| {
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
            match &at {
                At::Live => {
                    let d = state.live_disk(&disk)?;
                    check_range(&disk, offset, len, d.size_bytes, false)?;
                    d.read_live(offset, &mut buf)?;
                }
                At::Point(id) => {
                    let vm = state.vm_name();
                    let point = state.points().iter().find(|p| &p.id == id).cloned();
                    let Some(point) = point else { return Err(state.not_found(format!("recovery point {id} of VM {vm}"))) };
                    let Some(pd) = point.disks.iter().find(|d| d.name == disk) else {
                        return Err(state.not_found(format!("disk {disk:?} at recovery point {id} of VM {vm}")));
                    };
                    check_range(&disk, offset, len, pd.size_bytes, false)?;
                    let seq = seq_of(pd);
                    let d = state.disks.get_mut(&disk).ok_or_else(|| StoreError::Corrupt {
                        path: disk.clone(),
                        detail: format!("recovery point {id} names disk {disk:?}, whose replica file is gone"),
                    })?;
                    d.read_at(seq, offset, &mut buf)?;
                }
            }
            Ok(Bytes::from(buf))
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
                let d = state
                    .disks
                    .get(&disk)
                    .ok_or_else(|| state.not_found(format!("replica file of disk {disk:?}")))?;
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
        self.with_vm(vm, move |state| {
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
            if manifest.point(&id).is_some() {
                return Err(StoreError::InvalidRequest {
                    what: format!("recovery point {id} of VM {key} exists already"),
                });
            }
            let cut = RecoveryPoint {
                id,
                time_unix_ms: point.time_unix_ms,
                cycle: point.cycle,
                consistency: point.consistency,
                disks,
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
        self.with_vm(vm, move |state| {
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
                    d.segments.remove(&seq);
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
        self.with_vm(vm, |state| {
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
        self.with_vm(vm, |state| Ok(state.manifest.clone())).await
    }

    async fn put_block_map(
        &self,
        vm: &VmKey,
        disk: &str,
        encoded: Bytes,
    ) -> Result<(), StoreError> {
        let disk = disk.to_owned();
        self.with_vm(vm, move |state| {
            state.live_disk(&disk)?;
            write_atomic(&state.map_path(&disk), &encoded)
        })
        .await
    }

    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError> {
        let disk = disk.to_owned();
        self.with_vm(vm, move |state| {
            let path = state.map_path(&disk);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(Bytes::from(bytes))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::io("read block map", &path)(e)),
            }
        })
        .await
    }

    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.with_vm(vm, |state| {
            // The manifest goes first: without it, nothing claims the rest.
            remove_if_exists(&VmState::manifest_path(&state.dir), "remove manifest")?;
            state.manifest = None;
            state.disks.clear();
            match std::fs::remove_dir_all(&state.dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StoreError::io("remove VM folder", &state.dir)(e))
                }
                _ => Ok(()),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    #[tokio::test]
    async fn local_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        conformance::run_all(&store, "conformance").await;
    }

    /// Direct writes, buffered writes over the same pages, undo pre-images read through the
    /// page cache, and a reopen: every read sees the last write, and the point keeps its own.
    #[tokio::test]
    async fn direct_and_buffered_writes_agree() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let vm = VmKey::new("ns", "direct").unwrap_or_else(|e| panic!("{e}"));
        let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let ok = |r: Result<(), StoreError>| r.unwrap_or_else(|e| panic!("{e}"));
        ok(store.create_disk(&vm, "root", 1 << 20).await);
        let direct = store
            .with_vm(&vm, |state| Ok(state.live_disk("root")?.direct.is_some()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            direct,
            "{} has no direct I/O: this test would not reach the direct path",
            dir.path().display()
        );
        let page = |byte: u8, len: usize| conformance::page_aligned(&vec![byte; len]);
        let mut model = vec![0u8; 1 << 20];
        fn put(model: &mut [u8], at: usize, data: Bytes) -> (u64, Bytes) {
            model[at..at + data.len()].copy_from_slice(&data);
            (at as u64, data)
        }
        // Direct, then a point, then buffered over part of it (the pre-image is read through
        // the cache after a direct write), then direct over the dirty cached page.
        let (at, data) = put(&mut model, 0, page(0xAA, 64 * 1024));
        ok(store.write(&vm, "root", at, data).await);
        let point = store
            .cut_point(
                &vm,
                conformance::Model {
                    disks: [("root".to_owned(), model.clone())].into(),
                }
                .point(1, 1, crate::Consistency::CrashConsistent),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let at_point = model.clone();
        let (at, data) = put(&mut model, 4096 + 512, page(0xBB, 4096).slice(..1024));
        ok(store.write(&vm, "root", at, data).await);
        let (at, data) = put(&mut model, 8192, page(0xCC, 8192));
        ok(store.write(&vm, "root", at, data).await);
        let (at, data) = put(&mut model, 4096, page(0xDD, 4096));
        ok(store.write(&vm, "root", at, data).await);
        ok(store.flush(&vm).await);
        conformance::assert_disk(&store, &vm, "root", &At::Live, &model).await;
        conformance::assert_disk(&store, &vm, "root", &At::Point(point.id.clone()), &at_point)
            .await;
        drop(store);
        let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        conformance::assert_disk(&store, &vm, "root", &At::Live, &model).await;
        conformance::assert_disk(&store, &vm, "root", &At::Point(point.id), &at_point).await;
    }

    #[tokio::test]
    async fn state_survives_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        conformance::survives_reopen(|| {
            LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"))
        })
        .await;
    }

    #[tokio::test]
    async fn a_torn_undo_record_is_cut_and_a_damaged_one_reported() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let vm = VmKey::new("ns", "torn").unwrap_or_else(|e| panic!("{e}"));
        let point = {
            let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            conformance::write_and_cut_then_overwrite(&store, &vm).await
        };
        let segment = dir.path().join("ns/torn/undo/root/000000000001.undo");
        let len = std::fs::metadata(&segment).map(|m| m.len()).unwrap_or(0);
        assert!(len > UNDO_HEADER_BYTES, "the overwrite saved pre-images");

        // A crash while appending leaves a partial record at the end: cut on open, the point
        // still reads what it held for the granules whose records are whole.
        let file = OpenOptions::new()
            .append(true)
            .open(&segment)
            .unwrap_or_else(|e| panic!("{e}"));
        (&file)
            .write_all(b"LBU1 torn")
            .unwrap_or_else(|e| panic!("{e}"));
        drop(file);
        let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let data = store
            .read(&vm, "root", &At::Point(point.clone()), 0, 4096)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(data.iter().all(|&b| b == 0xAA));
        assert_eq!(
            std::fs::metadata(&segment).map(|m| m.len()).unwrap_or(0),
            len
        );
        drop(store);

        // Damage inside a record is corruption, reported, never served.
        let mut bytes = std::fs::read(&segment).unwrap_or_default();
        bytes[UNDO_HEADER_BYTES as usize + 10] ^= 0xFF;
        bytes.extend_from_slice(&[0u8; 8192]);
        std::fs::write(&segment, &bytes).unwrap_or_else(|e| panic!("{e}"));
        let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let error = store
            .read(&vm, "root", &At::Point(point), 0, 4096)
            .await
            .err();
        assert!(
            matches!(error, Some(StoreError::Corrupt { .. })),
            "{error:?}"
        );
        assert!(!error.is_some_and(|e| e.is_recoverable()));
    }
}
