//! Images behind positional I/O: hashing them into maps, applying plans, and the file
//! resync driver.
//!
//! ```text
//!            BlockSource (read_at)                      BlockSink (write_at, zeros, resize, sync)
//!   source ──────────────┐                      ┌──────────────────────────────► target
//!                        ▼                      │
//!        hash_image: 2 threads, each            │ apply_plan: Copy ranges read from the
//!        "claim chunk → pread into an aligned   │ source and written in chunks, Zero ranges
//!        buffer → digest its blocks"            │ written as zeros; the cursor advances per
//!                        │                      │ chunk and is checkpointed after a sync
//!                        ▼                      │
//!              source map ──► plan_resync ◄── target map (stored beside the replica,
//!                                               or re-hashed from the target)
//! ```
//!
//! [`resync_files`] ties these together for two files and keeps the replica's map and the
//! resume cursor in files beside it.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::ResyncError;
use crate::hash::{BlockDigest, HashAlgorithm, digest_block};
use crate::map::{BlockMap, DEFAULT_BLOCK_SIZE_BYTES, block_count_for, validate_block_size};
use crate::plan::{PlannedRange, RangeOp, ResyncCursor, ResyncPlan, plan_resync};

/// Alignment of I/O buffers: one page.
pub const BUFFER_ALIGN_BYTES: usize = 4096;

/// Default read size of the hashing workers. Measured (docs/benchmarks.md): 1 MiB reads
/// keep the data in L2 between the copy out of the page cache and the hash.
pub const DEFAULT_READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Default copy size when applying a plan (also the cursor's step).
pub const DEFAULT_COPY_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Positional reads from an image (a file, a block device, a page blob).
pub trait BlockSource: Sync {
    /// A name for errors and logs (a path, a blob URL without credentials).
    fn name(&self) -> &str;
    /// The image's current size.
    fn size_bytes(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset_bytes`; short images are an error (`UnexpectedEof`).
    fn read_exact_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()>;
}

/// Positional writes to an image.
pub trait BlockSink: BlockSource {
    /// Writes all of `data` at `offset_bytes`.
    fn write_all_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()>;

    /// Makes `[offset_bytes, offset_bytes + len_bytes)` read as zeros. The default writes
    /// zeros; a store may trim or clear pages instead.
    fn write_zeros_at(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done_bytes = 0;
        while done_bytes < len_bytes {
            let step = (len_bytes - done_bytes).min(ZEROS.len() as u64) as usize;
            self.write_all_at(&ZEROS[..step], offset_bytes + done_bytes)?;
            done_bytes += step as u64;
        }
        Ok(())
    }

    /// Grows (zero-filled) or shrinks the image.
    fn set_size_bytes(&self, size_bytes: u64) -> io::Result<()>;

    /// Makes every write so far durable.
    fn sync(&self) -> io::Result<()>;
}

/// An image in a local file (or block device) read and written with `pread`/`pwrite`.
#[derive(Debug)]
pub struct FileImage {
    file: File,
    name: String,
}

impl FileImage {
    /// Opens an image read-only (a resync source).
    pub fn open(path: &Path) -> Result<FileImage, ResyncError> {
        let file = File::open(path).map_err(|source| ResyncError::OpenImage {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FileImage {
            file,
            name: path.display().to_string(),
        })
    }

    /// Opens an image for reading and writing, creating an empty one if it does not exist
    /// (a resync target).
    pub fn open_writable(path: &Path) -> Result<FileImage, ResyncError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| ResyncError::OpenImage {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(FileImage {
            file,
            name: path.display().to_string(),
        })
    }
}

impl BlockSource for FileImage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        positional::read_exact_at(&self.file, buf, offset_bytes)
    }
}

impl BlockSink for FileImage {
    fn write_all_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        positional::write_all_at(&self.file, data, offset_bytes)
    }

    fn set_size_bytes(&self, size_bytes: u64) -> io::Result<()> {
        self.file.set_len(size_bytes)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// An image held in memory: for tests, and for callers that already hold the bytes.
#[derive(Debug, Default)]
pub struct MemoryImage {
    name: String,
    bytes: Mutex<Vec<u8>>,
}

impl MemoryImage {
    /// An image named `name` holding `bytes`.
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> MemoryImage {
        MemoryImage {
            name: name.into(),
            bytes: Mutex::new(bytes),
        }
    }

    /// A copy of the current content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // NB: a panic while holding the lock leaves bytes that are still bytes; carry on.
        self.bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl BlockSource for MemoryImage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let bytes = self.lock();
        let start = usize::try_from(offset_bytes).unwrap_or(usize::MAX);
        let source = start
            .checked_add(buf.len())
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        buf.copy_from_slice(source);
        Ok(())
    }
}

impl BlockSink for MemoryImage {
    fn write_all_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        let start = usize::try_from(offset_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let end = start + data.len();
        if end > bytes.len() {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }

    fn set_size_bytes(&self, size_bytes: u64) -> io::Result<()> {
        let size = usize::try_from(size_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size too large"))?;
        self.lock().resize(size, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A byte buffer whose start is aligned to [`BUFFER_ALIGN_BYTES`].
///
/// NB: copying out of the page cache into a buffer that is not page-aligned measured about
/// 4 times slower on this machine's CPU. A `Vec<u8>` is only 16-byte aligned, so this
/// over-allocates by one page and starts at the first aligned byte (found with the safe
/// `pointer::align_offset`); the heap block never moves, so the alignment holds.
#[derive(Debug)]
pub struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len_bytes: usize,
}

impl AlignedBuffer {
    /// A zeroed buffer of `len_bytes`.
    pub fn new(len_bytes: usize) -> AlignedBuffer {
        let storage = vec![0u8; len_bytes + BUFFER_ALIGN_BYTES];
        let start = match storage.as_ptr().align_offset(BUFFER_ALIGN_BYTES) {
            offset if offset < BUFFER_ALIGN_BYTES => offset,
            // Cannot happen for bytes; stay correct (if slower) if it ever did.
            _ => 0,
        };
        AlignedBuffer {
            storage,
            start,
            len_bytes,
        }
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len_bytes]
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len_bytes]
    }
}

/// How to hash an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashOptions {
    /// Block size of the map.
    pub block_size_bytes: u32,
    /// Hash of non-zero blocks.
    pub algorithm: HashAlgorithm,
    /// Worker threads (each reads and hashes; 2 on this machine's 2 cores).
    pub threads: usize,
    /// Bytes read per `pread` (rounded to whole blocks, at least one block).
    pub read_chunk_bytes: usize,
}

impl Default for HashOptions {
    fn default() -> Self {
        HashOptions {
            block_size_bytes: DEFAULT_BLOCK_SIZE_BYTES,
            algorithm: HashAlgorithm::default(),
            threads: std::thread::available_parallelism().map_or(2, |threads| threads.get()),
            read_chunk_bytes: DEFAULT_READ_CHUNK_BYTES,
        }
    }
}

/// Reads a whole image and builds its map, on `options.threads` threads.
///
/// `progress(bytes_done, bytes_total)` is called on the calling thread after each chunk it
/// hashes (the calling thread is one of the workers).
///
/// # Guarantees
/// The result equals [`BlockMap::from_image`] of the image's bytes, whatever the thread
/// count or chunk size. The first read error stops every worker and is returned.
///
/// NB: each worker claims the next chunk, reads it, then hashes it, so while one thread
/// waits for its copy out of the page cache the other hashes: reads and hashing overlap
/// without a separate reader thread, which on two cores would only add hand-offs.
pub fn hash_image(
    image: &dyn BlockSource,
    options: &HashOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BlockMap, ResyncError> {
    validate_block_size(options.block_size_bytes)?;
    let image_size_bytes = image.size_bytes().map_err(|source| ResyncError::ReadSize {
        image: image.name().to_owned(),
        source,
    })?;
    let block_len = options.block_size_bytes as usize;
    let blocks_per_chunk = (options.read_chunk_bytes / block_len).max(1);
    let block_count = usize::try_from(block_count_for(image_size_bytes, options.block_size_bytes))
        .map_err(|_| ResyncError::InvalidOption {
            field: "image_size_bytes",
            reason: format!("{image_size_bytes} bytes is too many blocks"),
        })?;
    let mut digests = vec![BlockDigest::Zero; block_count];
    let chunks = Mutex::new(digests.chunks_mut(blocks_per_chunk).enumerate());
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<ResyncError>> = Mutex::new(None);
    let done_bytes = AtomicU64::new(0);
    let chunk_bytes = blocks_per_chunk * block_len;

    let worker = |report: &mut dyn FnMut(u64, u64)| {
        let mut buffer = AlignedBuffer::new(chunk_bytes);
        loop {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            let next = chunks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .next();
            let Some((chunk_index, slots)) = next else {
                return;
            };
            let offset_bytes = (chunk_index * chunk_bytes) as u64;
            let len_bytes = (image_size_bytes - offset_bytes).min(chunk_bytes as u64) as usize;
            let data = &mut buffer.as_mut_slice()[..len_bytes];
            if let Err(source) = image.read_exact_at(data, offset_bytes) {
                failed.store(true, Ordering::Relaxed);
                let mut slot = first_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                slot.get_or_insert(ResyncError::ReadBlock {
                    image: image.name().to_owned(),
                    offset_bytes,
                    block_index: offset_bytes / block_len as u64,
                    source,
                });
                return;
            }
            for (slot, block) in slots.iter_mut().zip(data.chunks(block_len)) {
                *slot = digest_block(options.algorithm, block);
            }
            let done = done_bytes.fetch_add(len_bytes as u64, Ordering::Relaxed) + len_bytes as u64;
            report(done, image_size_bytes);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..options.threads.max(1) {
            scope.spawn(|| worker(&mut |_, _| {}));
        }
        worker(progress);
    });
    if let Some(error) = first_error
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
    {
        return Err(error);
    }
    Ok(BlockMap::from_digests(
        options.algorithm,
        options.block_size_bytes,
        image_size_bytes,
        digests,
    ))
}

/// How to apply a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Bytes read from the source and written to the target per step.
    pub copy_chunk_bytes: usize,
    /// A checkpoint (sync, then hand the cursor to the caller) every this many bytes of
    /// planned ranges applied.
    pub checkpoint_interval_bytes: u64,
    /// Sync the target before each checkpoint and at the end.
    pub sync_target: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            copy_chunk_bytes: DEFAULT_COPY_CHUNK_BYTES,
            checkpoint_interval_bytes: 256 * 1024 * 1024,
            sync_target: true,
        }
    }
}

/// What applying a plan did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyReport {
    /// Bytes of source data written into the target.
    pub copied_bytes: u64,
    /// Bytes zeroed in the target.
    pub zeroed_bytes: u64,
    /// Where the run started (0, or the resumed cursor's offset).
    pub started_at_bytes: u64,
}

/// Applies `plan` to `target`, reading `Copy` ranges from `source`, starting after `cursor`.
///
/// `checkpoint(cursor)` is called every `options.checkpoint_interval_bytes` of applied
/// ranges, after the target was synced (if `options.sync_target`), and once at the end with
/// a cursor at the source's end: persist it to resume an interrupted run. `progress(done,
/// total)` counts bytes of ranges applied in this run.
///
/// # Guarantees
/// Writes happen in offset order, so a cursor at offset `x` means every planned byte below
/// `x` has been written; a cursor handed to `checkpoint` was preceded by a sync. On success
/// the target equals the source.
///
/// # Caveats
/// The source must not change during the run (read a snapshot); its size is checked at the
/// start.
pub fn apply_plan(
    plan: &ResyncPlan,
    source: &dyn BlockSource,
    target: &dyn BlockSink,
    cursor: Option<&ResyncCursor>,
    options: &ApplyOptions,
    checkpoint: &mut dyn FnMut(&ResyncCursor) -> Result<(), ResyncError>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ApplyReport, ResyncError> {
    if options.copy_chunk_bytes == 0 {
        return Err(ResyncError::InvalidOption {
            field: "copy_chunk_bytes",
            reason: "must be positive".into(),
        });
    }
    let source_size = source
        .size_bytes()
        .map_err(|source_error| ResyncError::ReadSize {
            image: source.name().to_owned(),
            source: source_error,
        })?;
    if source_size != plan.source_size_bytes() {
        return Err(ResyncError::ImageChanged {
            image: source.name().to_owned(),
            expected_bytes: plan.source_size_bytes(),
            actual_bytes: source_size,
        });
    }
    let start = cursor.copied().unwrap_or_else(|| plan.start_cursor());
    let ranges: Vec<PlannedRange> = plan.remaining(&start)?;
    let total_bytes: u64 = ranges.iter().map(|range| range.len_bytes).sum();
    let mut report = ApplyReport {
        started_at_bytes: start.done_up_to_bytes,
        ..ApplyReport::default()
    };

    let target_size = target
        .size_bytes()
        .map_err(|source_error| ResyncError::ReadSize {
            image: target.name().to_owned(),
            source: source_error,
        })?;
    if target_size != plan.source_size_bytes() {
        // NB: resize even when the plan's target map claims the right size: a target
        // whose real size differs from its map's would otherwise end up the wrong size.
        target
            .set_size_bytes(plan.source_size_bytes())
            .map_err(|source_error| ResyncError::ResizeTarget {
                image: target.name().to_owned(),
                size_bytes: plan.source_size_bytes(),
                source: source_error,
            })?;
    }

    let sync = |target: &dyn BlockSink| {
        target
            .sync()
            .map_err(|source_error| ResyncError::SyncTarget {
                image: target.name().to_owned(),
                source: source_error,
            })
    };
    let mut buffer = AlignedBuffer::new(options.copy_chunk_bytes);
    let mut done_bytes = 0u64;
    let mut since_checkpoint_bytes = 0u64;
    let block_size = u64::from(plan.block_size_bytes());
    for range in &ranges {
        let mut offset_bytes = range.offset_bytes;
        while offset_bytes < range.end_bytes() {
            let step = (range.end_bytes() - offset_bytes).min(options.copy_chunk_bytes as u64);
            match range.op {
                RangeOp::Copy => {
                    let data = &mut buffer.as_mut_slice()[..step as usize];
                    source
                        .read_exact_at(data, offset_bytes)
                        .map_err(|source_error| ResyncError::ReadBlock {
                            image: source.name().to_owned(),
                            offset_bytes,
                            block_index: offset_bytes / block_size,
                            source: source_error,
                        })?;
                    target
                        .write_all_at(data, offset_bytes)
                        .map_err(|source_error| ResyncError::WriteRange {
                            image: target.name().to_owned(),
                            offset_bytes,
                            len_bytes: step,
                            source: source_error,
                        })?;
                    report.copied_bytes += step;
                }
                RangeOp::Zero => {
                    target
                        .write_zeros_at(offset_bytes, step)
                        .map_err(|source_error| ResyncError::WriteRange {
                            image: target.name().to_owned(),
                            offset_bytes,
                            len_bytes: step,
                            source: source_error,
                        })?;
                    report.zeroed_bytes += step;
                }
            }
            offset_bytes += step;
            done_bytes += step;
            since_checkpoint_bytes += step;
            progress(done_bytes, total_bytes);
            if since_checkpoint_bytes >= options.checkpoint_interval_bytes {
                if options.sync_target {
                    sync(target)?;
                }
                checkpoint(&ResyncCursor {
                    done_up_to_bytes: offset_bytes,
                    ..start
                })?;
                since_checkpoint_bytes = 0;
            }
        }
    }
    if options.sync_target {
        sync(target)?;
    }
    checkpoint(&ResyncCursor {
        done_up_to_bytes: plan.source_size_bytes(),
        ..start
    })?;
    Ok(report)
}

/// Options of [`resync_files`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResyncOptions {
    /// Block size, hash, threads and read size for hashing both images.
    pub hash: HashOptions,
    /// Copy size, checkpoint interval and syncing.
    pub apply: ApplyOptions,
    /// Where the target's map is stored beside it. When the file exists and is trusted,
    /// the target is not read; it is rewritten after a successful resync.
    pub target_map_path: Option<PathBuf>,
    /// Where the resume cursor is kept during a resync (removed at the end).
    pub cursor_path: Option<PathBuf>,
    /// Re-hash the target even when its stored map is trusted, and use the fresh map
    /// (reporting how many blocks the stored one got wrong).
    pub verify_target: bool,
}

/// Which step a resync is in, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncPhase {
    /// Reading and hashing the source.
    HashSource,
    /// Reading and hashing the target (no trusted stored map, or verifying).
    HashTarget,
    /// Copying and zeroing the planned ranges.
    Apply,
}

/// One progress report: `bytes_done` of `bytes_total` in `phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncProgress {
    /// The current step.
    pub phase: ResyncPhase,
    /// Bytes done in this step.
    pub bytes_done: u64,
    /// Bytes this step will do.
    pub bytes_total: u64,
}

/// Where the target's map came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetMapOrigin {
    /// The stored map was trusted; the target was not read.
    Stored,
    /// The stored map was trusted but verified against a fresh hash of the target;
    /// `mismatched_blocks` blocks differed (the fresh map was used).
    Verified {
        /// Blocks whose stored digest was wrong.
        mismatched_blocks: u64,
    },
    /// The target was hashed, for this reason.
    Rehashed {
        /// Why the stored map was not used.
        reason: String,
    },
}

/// What [`resync_files`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncReport {
    /// The source's size (the target's size now).
    pub image_size_bytes: u64,
    /// Number of ranges in the plan.
    pub planned_ranges: usize,
    /// Bytes of source data the plan sends in total.
    pub planned_copy_bytes: u64,
    /// What this run applied.
    pub applied: ApplyReport,
    /// Where the target map came from.
    pub target_map: TargetMapOrigin,
    /// Whether a cursor from an interrupted run was used.
    pub resumed: bool,
    /// Time spent hashing the source.
    pub hash_source_duration: Duration,
    /// Time spent hashing the target (zero when the stored map was used).
    pub hash_target_duration: Duration,
    /// Time spent planning and applying.
    pub apply_duration: Duration,
}

/// Makes the file at `target_path` equal to the file at `source_path`, sending only the
/// blocks that differ, and keeps the target's map and a resume cursor beside it.
///
/// Steps: hash the source; take the target's map from `target_map_path` if it is trusted
/// (else hash the target); plan; write a cursor at the starting point; apply, checkpointing
/// the cursor; store the target's new map (the source's map: the images are now equal);
/// remove the cursor.
///
/// # Guarantees
/// * On success the target equals the source and the stored map describes it.
/// * Interrupted at any point (error, kill, crash), a later call with the same options
///   and the same source finishes the job without re-sending what was completed (ranges
///   below the last checkpointed cursor).
/// * A stored map is trusted only when no cursor file is present, or the cursor file is
///   valid and belongs to this source. NB: a cursor file is written before the first
///   byte of the target changes and removed only after the new map is stored, so a run
///   that died halfway (target partly rewritten, stored map stale) never lets a later run
///   against another source trust the stale map: that run re-hashes the target.
///
/// # Caveats
/// The source must be a stable snapshot during the call. With `apply.sync_target` off, a
/// machine crash (not a process kill) can lose writes that a cursor already counts.
pub fn resync_files(
    source_path: &Path,
    target_path: &Path,
    options: &ResyncOptions,
    progress: &mut dyn FnMut(&ResyncProgress),
) -> Result<ResyncReport, ResyncError> {
    let source = FileImage::open(source_path)?;
    let target = FileImage::open_writable(target_path)?;

    // A cursor left by an interrupted run, if it can be read.
    let (mut cursor, mut map_untrusted_because) = match &options.cursor_path {
        Some(path) => match load_cursor(path) {
            Ok(cursor) => (cursor, None),
            Err(error) => (None, Some(format!("unreadable cursor file: {error}"))),
        },
        None => (None, None),
    };

    let started = Instant::now();
    let source_map = hash_image(&source, &options.hash, &mut |done, total| {
        progress(&ResyncProgress {
            phase: ResyncPhase::HashSource,
            bytes_done: done,
            bytes_total: total,
        });
    })?;
    let hash_source_duration = started.elapsed();
    let source_fingerprint = source_map.fingerprint();
    if let Some(found) = cursor
        && found.source_fingerprint != source_fingerprint
    {
        // The interrupted run copied from another source: neither its cursor nor the
        // stored map (stale where it wrote) can be trusted.
        cursor = None;
        map_untrusted_because = Some("an interrupted resync from another source".into());
    }

    let started = Instant::now();
    let (target_map, target_map_origin) = load_or_hash_target(
        &target,
        &source_map,
        options,
        map_untrusted_because,
        cursor.is_some(),
        progress,
    )?;
    let hash_target_duration = started.elapsed();

    let started = Instant::now();
    let plan = plan_resync(&source_map, &target_map)?;
    let start = cursor.unwrap_or_else(|| plan.start_cursor());
    if let Some(path) = &options.cursor_path {
        store_atomically(path, &start.encode(), options.apply.sync_target)?;
    }
    let applied = apply_plan(
        &plan,
        &source,
        &target,
        Some(&start),
        &options.apply,
        &mut |cursor| match &options.cursor_path {
            Some(path) => store_atomically(path, &cursor.encode(), options.apply.sync_target),
            None => Ok(()),
        },
        &mut |done, total| {
            progress(&ResyncProgress {
                phase: ResyncPhase::Apply,
                bytes_done: done,
                bytes_total: total,
            });
        },
    )?;
    if let Some(path) = &options.target_map_path {
        store_atomically(path, &source_map.encode(), options.apply.sync_target)?;
    }
    if let Some(path) = &options.cursor_path {
        std::fs::remove_file(path).map_err(|source| ResyncError::StoreFile {
            path: path.clone(),
            source,
        })?;
    }
    Ok(ResyncReport {
        image_size_bytes: source_map.image_size_bytes(),
        planned_ranges: plan.ranges().len(),
        planned_copy_bytes: plan.copy_bytes(),
        applied,
        target_map: target_map_origin,
        resumed: cursor.is_some(),
        hash_source_duration,
        hash_target_duration,
        apply_duration: started.elapsed(),
    })
}

/// The target's map: the stored one when trusted (and verified if asked), else a fresh hash.
fn load_or_hash_target(
    target: &FileImage,
    source_map: &BlockMap,
    options: &ResyncOptions,
    untrusted_because: Option<String>,
    resuming: bool,
    progress: &mut dyn FnMut(&ResyncProgress),
) -> Result<(BlockMap, TargetMapOrigin), ResyncError> {
    let stored = match (&options.target_map_path, untrusted_because) {
        (None, _) => Err("no stored map configured".to_owned()),
        (Some(_), Some(reason)) => Err(reason),
        (Some(path), None) => match load_map(path) {
            Ok(None) => Err("no stored map yet".to_owned()),
            Ok(Some(map)) => check_stored_map(map, target, source_map, resuming),
            Err(error) => Err(format!("unusable stored map: {error}")),
        },
    };
    let mut hash_target = || {
        hash_image(target, &options.hash, &mut |done, total| {
            progress(&ResyncProgress {
                phase: ResyncPhase::HashTarget,
                bytes_done: done,
                bytes_total: total,
            });
        })
    };
    match stored {
        Ok(map) if options.verify_target => {
            let fresh = hash_target()?;
            let mismatched_blocks = map.mismatched_blocks(&fresh)?.len() as u64;
            Ok((fresh, TargetMapOrigin::Verified { mismatched_blocks }))
        }
        Ok(map) => Ok((map, TargetMapOrigin::Stored)),
        Err(reason) => Ok((hash_target()?, TargetMapOrigin::Rehashed { reason })),
    }
}

/// A stored map is usable when it was made like the source's and describes a target of the
/// size it has (unless resuming: an interrupted run may have resized the target already).
fn check_stored_map(
    map: BlockMap,
    target: &FileImage,
    source_map: &BlockMap,
    resuming: bool,
) -> Result<BlockMap, String> {
    if map.block_size_bytes() != source_map.block_size_bytes()
        || map.algorithm() != source_map.algorithm()
    {
        return Err(format!(
            "stored map uses {} blocks of {}, this resync {} blocks of {}",
            map.algorithm(),
            map.block_size_bytes(),
            source_map.algorithm(),
            source_map.block_size_bytes()
        ));
    }
    let target_size = target.size_bytes().map_err(|error| error.to_string())?;
    if !resuming && target_size != map.image_size_bytes() {
        return Err(format!(
            "stored map describes {} bytes, the target has {target_size}",
            map.image_size_bytes()
        ));
    }
    Ok(map)
}

/// Reads a stored map; `Ok(None)` when the file does not exist.
pub fn load_map(path: &Path) -> Result<Option<BlockMap>, ResyncError> {
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(None);
    };
    match BlockMap::decode(&bytes) {
        Ok(map) => Ok(Some(map)),
        Err(ResyncError::DecodeMap { problem, .. }) => Err(ResyncError::DecodeMap {
            origin: Some(path.to_path_buf()),
            problem,
        }),
        Err(other) => Err(other),
    }
}

/// Stores a map atomically (write beside, then rename), syncing it when `sync` is set.
pub fn store_map(path: &Path, map: &BlockMap, sync: bool) -> Result<(), ResyncError> {
    store_atomically(path, &map.encode(), sync)
}

/// Reads a stored cursor; `Ok(None)` when the file does not exist.
pub fn load_cursor(path: &Path) -> Result<Option<ResyncCursor>, ResyncError> {
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(None);
    };
    match ResyncCursor::decode(&bytes) {
        Ok(cursor) => Ok(Some(cursor)),
        Err(ResyncError::DecodeCursor { problem, .. }) => Err(ResyncError::DecodeCursor {
            origin: Some(path.to_path_buf()),
            problem,
        }),
        Err(other) => Err(other),
    }
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, ResyncError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ResyncError::LoadFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn store_atomically(path: &Path, bytes: &[u8], sync: bool) -> Result<(), ResyncError> {
    let fail = |source| ResyncError::StoreFile {
        path: path.to_path_buf(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let file = File::create(&temporary).map_err(fail)?;
    positional::write_all_at(&file, bytes, 0).map_err(fail)?;
    if sync {
        file.sync_all().map_err(fail)?;
    }
    std::fs::rename(&temporary, path).map_err(fail)
}

/// Positional file I/O on every platform: `pread`/`pwrite` on unix, `seek_read`/`seek_write`
/// in a loop on Windows.
///
/// # Caveats
/// On Windows these move the file's cursor: do not mix them with cursor-based reads or
/// writes on the same handle.
pub mod positional {
    use std::fs::File;
    use std::io;

    /// Fills `buf` from `offset_bytes`; a file that ends first is `UnexpectedEof`.
    pub fn read_exact_at(file: &File, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::read_exact_at(file, buf, offset_bytes)
        }
        #[cfg(windows)]
        {
            use std::os::windows::fs::FileExt;
            let mut done = 0;
            while done < buf.len() {
                match file.seek_read(&mut buf[done..], offset_bytes + done as u64) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "failed to fill whole buffer",
                        ));
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }

    /// Writes all of `data` at `offset_bytes`.
    pub fn write_all_at(file: &File, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::write_all_at(file, data, offset_bytes)
        }
        #[cfg(windows)]
        {
            use std::os::windows::fs::FileExt;
            let mut done = 0;
            while done < data.len() {
                match file.seek_write(&data[done..], offset_bytes + done as u64) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "failed to write whole buffer",
                        ));
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const BLOCK: u32 = 4096;

    fn hash_options(threads: usize, read_chunk_bytes: usize) -> HashOptions {
        HashOptions {
            block_size_bytes: BLOCK,
            algorithm: HashAlgorithm::Xxh3_128,
            threads,
            read_chunk_bytes,
        }
    }

    fn options(dir: &Path) -> ResyncOptions {
        ResyncOptions {
            hash: hash_options(2, 3 * BLOCK as usize),
            apply: ApplyOptions {
                copy_chunk_bytes: 2 * BLOCK as usize,
                checkpoint_interval_bytes: 2 * u64::from(BLOCK),
                sync_target: false,
            },
            target_map_path: Some(dir.join("target.map")),
            cursor_path: Some(dir.join("target.cursor")),
            verify_target: false,
        }
    }

    /// Random data with some zero blocks and a short tail.
    fn random_image(rng: &mut StdRng, blocks: usize, tail_bytes: usize) -> Vec<u8> {
        let mut image = vec![0u8; blocks * BLOCK as usize + tail_bytes];
        rng.fill(&mut image[..]);
        for block in image.chunks_mut(BLOCK as usize) {
            if rng.random_ratio(1, 4) {
                block.fill(0);
            }
        }
        image
    }

    /// A sink that fails every write after the first `writes_allowed`.
    struct FailingSink {
        inner: MemoryImage,
        writes_allowed: AtomicU64,
    }

    impl BlockSource for FailingSink {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn size_bytes(&self) -> io::Result<u64> {
            self.inner.size_bytes()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
            self.inner.read_exact_at(buf, offset_bytes)
        }
    }

    impl BlockSink for FailingSink {
        fn write_all_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
            let left = self.writes_allowed.load(Ordering::Relaxed);
            if left == 0 {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "injected"));
            }
            self.writes_allowed.store(left - 1, Ordering::Relaxed);
            self.inner.write_all_at(data, offset_bytes)
        }
        fn set_size_bytes(&self, size_bytes: u64) -> io::Result<()> {
            self.inner.set_size_bytes(size_bytes)
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [1, 4096, 100_000] {
            let mut buffer = AlignedBuffer::new(len);
            assert_eq!(buffer.as_slice().as_ptr() as usize % BUFFER_ALIGN_BYTES, 0);
            assert_eq!(buffer.as_mut_slice().len(), len);
        }
    }

    #[test]
    fn read_errors_name_the_image_and_offset() {
        struct Broken;
        impl BlockSource for Broken {
            fn name(&self) -> &str {
                "broken.img"
            }
            fn size_bytes(&self) -> io::Result<u64> {
                Ok(8 * u64::from(BLOCK))
            }
            fn read_exact_at(&self, _: &mut [u8], offset_bytes: u64) -> io::Result<()> {
                if offset_bytes >= 4 * u64::from(BLOCK) {
                    Err(io::Error::new(io::ErrorKind::PermissionDenied, "no"))
                } else {
                    Ok(())
                }
            }
        }
        let error = hash_image(&Broken, &hash_options(2, BLOCK as usize), &mut |_, _| {})
            .expect_err("must fail");
        assert!(matches!(error, ResyncError::ReadBlock { block_index, .. } if block_index >= 4));
        assert!(error.to_string().contains("broken.img"));
        assert!(!error.is_recoverable());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn hash_image_equals_the_pure_map(
            seed in any::<u64>(),
            blocks in 0usize..20,
            tail in 0usize..4096,
            threads in 1usize..4,
            chunk_blocks in 1usize..5,
        ) {
            let image = random_image(&mut StdRng::seed_from_u64(seed), blocks, tail);
            let hashed = hash_image(
                &MemoryImage::new("m", image.clone()),
                &hash_options(threads, chunk_blocks * BLOCK as usize),
                &mut |_, _| {},
            ).expect("hash");
            prop_assert_eq!(hashed, BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map"));
        }

        /// Fail the target's writes after any number of them, resume from the last
        /// checkpointed cursor with the stale target map: the target ends equal to the
        /// source and no byte is written twice below the cursor.
        #[test]
        fn apply_resumes_after_injected_failures(
            seed in any::<u64>(),
            writes_allowed in 0u64..12,
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let source = random_image(&mut rng, 16, 100);
            let mut target = source.clone();
            for block in target.chunks_mut(BLOCK as usize) {
                if rng.random_ratio(1, 3) {
                    rng.fill(block);
                }
            }
            target.truncate(13 * BLOCK as usize);
            let source_map = BlockMap::from_image(&source, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
            let target_map = BlockMap::from_image(&target, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
            let plan = plan_resync(&source_map, &target_map).expect("plan");
            let source_image = MemoryImage::new("source", source.clone());
            let sink = FailingSink { inner: MemoryImage::new("target", target), writes_allowed: AtomicU64::new(writes_allowed) };
            let apply = ApplyOptions { copy_chunk_bytes: BLOCK as usize, checkpoint_interval_bytes: 1, sync_target: true };
            let mut saved: Option<ResyncCursor> = None;
            let first = apply_plan(&plan, &source_image, &sink, None, &apply, &mut |cursor| { saved = Some(*cursor); Ok(()) }, &mut |_, _| {});
            sink.writes_allowed.store(u64::MAX, Ordering::Relaxed);
            let first_copied = match &first {
                Ok(report) => report.copied_bytes,
                Err(error) => {
                    prop_assert!(error.is_recoverable());
                    saved.map_or(0, |cursor| plan.remaining(&plan.start_cursor()).expect("all")
                        .iter().filter(|range| range.op == RangeOp::Copy)
                        .map(|range| range.end_bytes().min(cursor.done_up_to_bytes).saturating_sub(range.offset_bytes))
                        .sum())
                }
            };
            if first.is_err() {
                let resumed_plan = plan_resync(&source_map, &target_map).expect("plan");
                let second = apply_plan(&resumed_plan, &source_image, &sink, saved.as_ref(), &apply, &mut |_| Ok(()), &mut |_, _| {}).expect("resume");
                prop_assert_eq!(first_copied + second.copied_bytes, plan.copy_bytes());
            }
            prop_assert_eq!(sink.inner.to_vec(), source);
        }
    }

    #[test]
    fn resync_files_copies_only_differences_and_stores_the_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = StdRng::seed_from_u64(7);
        let source = random_image(&mut rng, 40, 123);
        let mut target = source.clone();
        target[5 * 4096 + 9] ^= 0xff;
        target[30 * 4096..31 * 4096].fill(0x55);
        target.extend_from_slice(&[1u8; 9000]);
        let (source_path, target_path) =
            (dir.path().join("source.img"), dir.path().join("target.img"));
        std::fs::write(&source_path, &source).expect("write");
        std::fs::write(&target_path, &target).expect("write");
        let options = options(dir.path());

        let mut phases = Vec::new();
        let report = resync_files(&source_path, &target_path, &options, &mut |progress| {
            phases.push(progress.phase)
        })
        .expect("resync");
        assert_eq!(std::fs::read(&target_path).expect("read"), source);
        assert!(matches!(
            report.target_map,
            TargetMapOrigin::Rehashed { .. }
        ));
        assert!(report.applied.copied_bytes <= 3 * 4096, "{report:?}");
        assert!(phases.contains(&ResyncPhase::HashTarget) && phases.contains(&ResyncPhase::Apply));
        assert!(!dir.path().join("target.cursor").exists());
        let stored = load_map(&dir.path().join("target.map"))
            .expect("load")
            .expect("stored");
        assert_eq!(
            stored,
            BlockMap::from_image(&source, BLOCK, HashAlgorithm::Xxh3_128).expect("map")
        );

        // Second run: the stored map is used, the target is not read, nothing is sent.
        let report = resync_files(&source_path, &target_path, &options, &mut |progress| {
            assert_ne!(progress.phase, ResyncPhase::HashTarget);
        })
        .expect("resync");
        assert_eq!(report.target_map, TargetMapOrigin::Stored);
        assert_eq!(report.applied.copied_bytes + report.applied.zeroed_bytes, 0);

        // Verification finds a target changed behind the map's back.
        let mut changed = source.clone();
        changed[100] ^= 1;
        std::fs::write(&target_path, &changed).expect("write");
        let verify = ResyncOptions {
            verify_target: true,
            ..options.clone()
        };
        let report =
            resync_files(&source_path, &target_path, &verify, &mut |_| {}).expect("resync");
        assert_eq!(
            report.target_map,
            TargetMapOrigin::Verified {
                mismatched_blocks: 1
            }
        );
        assert_eq!(std::fs::read(&target_path).expect("read"), source);

        // A corrupt stored map is not trusted: the target is re-hashed.
        std::fs::write(dir.path().join("target.map"), b"LBBLKMAP garbage").expect("write");
        let report =
            resync_files(&source_path, &target_path, &options, &mut |_| {}).expect("resync");
        assert!(
            matches!(report.target_map, TargetMapOrigin::Rehashed { ref reason } if reason.contains("unusable"))
        );
    }

    #[test]
    fn resync_files_resumes_from_its_cursor_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = StdRng::seed_from_u64(11);
        let source = random_image(&mut rng, 64, 0);
        let mut target = source.clone();
        for block in (0..64).step_by(3) {
            rng.fill(&mut target[block * 4096..(block + 1) * 4096]);
        }
        let (source_path, target_path) =
            (dir.path().join("source.img"), dir.path().join("target.img"));
        std::fs::write(&source_path, &source).expect("write");
        std::fs::write(&target_path, &target).expect("write");
        let options = options(dir.path());
        let target_map =
            BlockMap::from_image(&target, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        store_map(&dir.path().join("target.map"), &target_map, false).expect("store");

        // Simulate a run killed halfway: half the plan applied, its cursor on disk.
        let source_map =
            BlockMap::from_image(&source, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        let plan = plan_resync(&source_map, &target_map).expect("plan");
        let half = 32 * 4096;
        let mut partly = target.clone();
        for range in plan
            .ranges()
            .iter()
            .filter(|range| range.offset_bytes < half)
        {
            let span = range.offset_bytes as usize..range.end_bytes().min(half) as usize;
            partly[span.clone()].copy_from_slice(&source[span]);
        }
        std::fs::write(&target_path, &partly).expect("write");
        let cursor = ResyncCursor {
            done_up_to_bytes: half,
            ..plan.start_cursor()
        };
        std::fs::write(dir.path().join("target.cursor"), cursor.encode()).expect("write");

        let report =
            resync_files(&source_path, &target_path, &options, &mut |_| {}).expect("resume");
        assert!(report.resumed);
        assert_eq!(report.target_map, TargetMapOrigin::Stored);
        assert_eq!(report.applied.started_at_bytes, half);
        let second_half: u64 = plan
            .remaining(&cursor)
            .expect("rest")
            .iter()
            .map(|range| range.len_bytes)
            .sum();
        assert_eq!(
            report.applied.copied_bytes + report.applied.zeroed_bytes,
            second_half
        );
        assert_eq!(std::fs::read(&target_path).expect("read"), source);
    }

    #[test]
    fn a_cursor_from_another_source_distrusts_the_stored_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = StdRng::seed_from_u64(3);
        let source = random_image(&mut rng, 8, 0);
        // The stored map claims the target equals the source, but an interrupted run
        // (from another source) rewrote block 2.
        let mut target = source.clone();
        target[2 * 4096..3 * 4096].fill(0x77);
        let (source_path, target_path) =
            (dir.path().join("source.img"), dir.path().join("target.img"));
        std::fs::write(&source_path, &source).expect("write");
        std::fs::write(&target_path, &target).expect("write");
        let options = options(dir.path());
        let stale = BlockMap::from_image(&source, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        store_map(&dir.path().join("target.map"), &stale, false).expect("store");
        let foreign = ResyncCursor {
            source_fingerprint: 42,
            done_up_to_bytes: 4096,
        };
        std::fs::write(dir.path().join("target.cursor"), foreign.encode()).expect("write");

        let report =
            resync_files(&source_path, &target_path, &options, &mut |_| {}).expect("resync");
        assert!(!report.resumed);
        assert!(matches!(
            report.target_map,
            TargetMapOrigin::Rehashed { .. }
        ));
        assert_eq!(std::fs::read(&target_path).expect("read"), source);
    }
}
