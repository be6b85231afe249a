//! The file I/O the local store needs, on every platform: positional reads and writes
//! ([`PositionalIo`]), direct I/O ([`open_direct`], [`direct_aligned`]; see the module docs
//! of [`super`]), freeing a range ([`punch_hole`]), and atomic replacement and removal of
//! files, their failures as store errors.

use std::fs::File;
use std::path::Path;

#[cfg(not(unix))]
use super::undo::GRANULE_BYTES;
use crate::{DIRECT_IO_ALIGN, StoreError, files};

/// The ranges of the first `size` bytes of `file` that may hold data, sorted: holes of a sparse
/// file read as zeros and are left out (SEEK_DATA/SEEK_HOLE). Without them (not unix), or on a
/// file system that does not tell, the whole file counts as data: that costs reads, never
/// correctness.
///
/// # Errors
///
/// The file cannot be searched.
pub fn data_ranges(file: &File, size: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
    #[cfg(unix)]
    {
        use rustix::fs::{SeekFrom, seek};
        let mut ranges = Vec::new();
        let mut pos = 0;
        while pos < size {
            let start = match seek(file, SeekFrom::Data(pos)) {
                Ok(start) => start,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let end = seek(file, SeekFrom::Hole(start))?.min(size);
            if start >= end {
                break;
            }
            ranges.push(start..end);
            pos = end;
        }
        Ok(ranges)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(std::iter::once(0..size).filter(|r| !r.is_empty()).collect())
    }
}

/// How many requests the local store has in flight at once when it reads the pre-images of
/// a batch of writes ([`super::disk::Disk::preserve_unsynced`]) and when it writes the batch:
/// a thread each. Virtual and solid-state disks serve several requests at a time; one at a
/// time, a batch of scattered 64 KiB writes (a cycle's, a re-protect's) waits a round trip to
/// the device for each of its reads and writes.
pub(super) const IO_DEPTH: usize = 8;

/// `f` applied to every item of `items`, on up to [`IO_DEPTH`] threads at once (each takes a
/// run of neighbouring items, so each thread's requests stay in order on the device); in this
/// thread for a single item. The results in the order of `items`, or the first error.
///
/// # Errors
///
/// The first error of `f`, in the order of `items`; the other threads' work is done first.
pub(super) fn on_threads<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, StoreError> + Sync,
) -> Result<Vec<R>, StoreError> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let per_thread = items.len().div_ceil(IO_DEPTH.min(items.len()));
    let f = &f;
    let parts: Vec<Result<Vec<R>, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per_thread)
            .map(|part| {
                let work = move || part.iter().map(f).collect::<Result<Vec<R>, StoreError>>();
                // NB: a thread that cannot be started (a process at its limit) does its part
                // in this one, after the others have started.
                std::thread::Builder::new()
                    .name("lifeboat-store-io".into())
                    .spawn_scoped(scope, work)
                    .map_err(|_| work)
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| match handle {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(work) => work(),
            })
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// [`files::write_atomic`], its failure as a store error.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    files::write_atomic(path, bytes).map_err(|e| StoreError::io(e.action, e.path)(e.source))
}

pub(super) fn direct_aligned(data: &[u8], offset: u64) -> bool {
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
pub(super) fn open_direct(path: &Path) -> Option<File> {
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
pub(super) fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Make `[offset, offset + len)` of `file` read as zeros, freeing its space.
#[cfg(unix)]
pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
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
pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
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
pub trait PositionalIo {
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

/// Remove the file at `path` if it is there, and make the removal durable (its folder
/// synced), its failure as a store error.
pub(super) fn remove_if_exists(path: &Path, action: &'static str) -> Result<(), StoreError> {
    files::remove_file_durable(path)
        .map(|_| ())
        .map_err(StoreError::io(action, path))
}

/// The whole file at `path`, or `None` if it is not there; its failure as a store error.
pub(super) fn read_if_exists(
    path: &Path,
    action: &'static str,
) -> Result<Option<bytes::Bytes>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes::Bytes::from(bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(action, path)(e)),
    }
}

/// [`files::create_dir_all_durable`], its failure as a store error.
pub(super) fn create_dir_durable(dir: &Path, action: &'static str) -> Result<(), StoreError> {
    files::create_dir_all_durable(dir).map_err(StoreError::io(action, dir))
}

/// [`files::sync_folder`], its failure as a store error.
pub(super) fn sync_folder(dir: &Path) -> Result<(), StoreError> {
    files::sync_folder(dir).map_err(StoreError::io("sync folder", dir))
}

/// Open (create if missing, never truncate) a lock file, for `File::try_lock`.
pub(super) fn open_lock_file(
    path: &Path,
    action: &'static str,
) -> Result<std::fs::File, StoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(StoreError::io(action, path))
}
