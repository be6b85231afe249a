//! The change logs of a VM's state folder: one sealed HRL per disk per cycle, written from a
//! view and read back to apply.
//!
//! ```text
//!  <state>/logs/<disk>/<cycle, 12 digits>.hrl
//! ```
//!
//! Writes are recorded whole blocks at a time (the extents a view reports, widened to the
//! block map's block size), so that applying a log can update the replica's block map from
//! the log's own data.

use bytes::Bytes;
use std::io::BufWriter;
use std::ops::Range;
use std::path::{Path, PathBuf};

use lifeboat_blockmap::BlockMap;
use lifeboat_hrl::{HrlReader, HrlTime, HrlWriter, ReadOptions, WriterOptions};

use super::maps::{align, check_read, read_batches};
use super::upload::Uploader;
use crate::backend::View;
use crate::error::EngineError;
use crate::fs::StateFs;
use crate::state::{AgentState, PendingLog};

/// The largest write one log entry carries (the view is read in pieces of this size).
const LOG_WRITE_BYTES: u64 = 1024 * 1024;

/// The most bytes of pieces one read of the view asks for.
const READ_BATCH_BYTES: u64 = 16 * 1024 * 1024;

fn logs_dir(dir: &Path) -> PathBuf {
    dir.join("logs")
}

pub(super) fn log_path(dir: &Path, disk: &str, cycle: u64) -> PathBuf {
    logs_dir(dir).join(disk).join(format!("{cycle:012}.hrl"))
}

fn hrl_time(unix_ms: u64) -> HrlTime {
    HrlTime::from_unix_seconds(unix_ms / 1000).unwrap_or(HrlTime(0))
}

/// Write and seal the log of `disk` for the view's cycle: its changed extents, widened to
/// whole blocks of `block_size_bytes`. The file is synced before this returns.
pub(super) async fn write_log(
    fs: &dyn StateFs,
    dir: &Path,
    view: &dyn View,
    disk: &str,
    size_bytes: u64,
    block_size_bytes: u32,
    time_unix_ms: u64,
) -> Result<(PendingLog, u64), EngineError> {
    let path = log_path(dir, disk, view.cycle());
    let folder = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.to_path_buf());
    fs.create_dir_all(&folder)
        .map_err(EngineError::state("create log folder", &folder))?;
    let file = fs
        .create(&path)
        .map_err(EngineError::state("create change log", &path))?;
    let t = hrl_time(time_unix_ms);
    let log_error = |source| EngineError::WriteLog {
        path: path.clone(),
        source,
    };
    let id = uuid::Uuid::new_v4();
    let mut writer =
        HrlWriter::create(BufWriter::new(file), &WriterOptions::new(id, t)).map_err(log_error)?;
    let (extents, batches) = changed_batches(view, disk, size_bytes, block_size_bytes).await?;
    let mut bytes_read = 0;
    // NB: each extent is its own transaction in the log.
    // NB: collected: an iterator with a closure over references, held across an await, would
    // make the cycle's future not Send.
    let ends: Vec<u64> = extents.iter().map(|e| e.end).collect();
    let mut ends = ends.into_iter().peekable();
    for batch in batches {
        let data = read_batch(view, disk, &batch).await?;
        for ((offset, len), data) in batch.into_iter().zip(data) {
            writer.write(offset, &data, t).map_err(log_error)?;
            bytes_read += len;
            if ends.next_if_eq(&(offset + len)).is_some() {
                writer.commit(t).map_err(log_error)?;
            }
        }
    }
    let sealed = writer.seal(t).map_err(log_error)?;
    let mut file = sealed
        .sink
        .into_inner()
        .map_err(|e| EngineError::state("flush change log", &path)(e.into_error()))?;
    let size_bytes = file
        .sync()
        .map_err(EngineError::state("sync change log", &path))?;
    fs.sync_folder(&folder)
        .map_err(EngineError::state("sync log folder", &folder))?;
    Ok((
        PendingLog {
            disk: disk.to_owned(),
            path,
            size_bytes,
        },
        bytes_read,
    ))
}

/// The changes `view` froze on `disk`, widened to whole blocks of `block_size_bytes`: the
/// extents, and the batches of pieces to read them in (scattered blocks go many to one
/// pipelined request; a piece is whole blocks, so that applying it can update the block map).
async fn changed_batches(
    view: &dyn View,
    disk: &str,
    size_bytes: u64,
    block_size_bytes: u32,
) -> Result<(Vec<Range<u64>>, Vec<Vec<(u64, u64)>>), EngineError> {
    let block = u64::from(block_size_bytes);
    let extents = align(&view.changed_extents(disk).await?, block, size_bytes);
    let piece = (LOG_WRITE_BYTES / block).max(1) * block;
    let batches = read_batches(&extents, piece, READ_BATCH_BYTES);
    Ok((extents, batches))
}

/// Read one batch of [`changed_batches`] from the view, checked.
async fn read_batch(
    view: &dyn View,
    disk: &str,
    batch: &[(u64, u64)],
) -> Result<Vec<Bytes>, EngineError> {
    let data = view.read_many(disk, batch).await?;
    check_read(disk, batch, &data)?;
    Ok(data)
}

/// Send the changes `view` froze on `disk` straight to the store, without a log (a stopped
/// VM's last cycle): whole blocks, `map` updated from each piece's data. The bytes read; the
/// writes are queued on `uploader` (the caller waits for them).
pub(super) async fn ship_changes(
    view: &dyn View,
    disk: &str,
    size_bytes: u64,
    block_size_bytes: u32,
    map: &mut BlockMap,
    uploader: &mut Uploader,
) -> Result<u64, EngineError> {
    let (_, batches) = changed_batches(view, disk, size_bytes, block_size_bytes).await?;
    let mut bytes = 0;
    for batch in batches {
        let data = read_batch(view, disk, &batch).await?;
        for ((offset, len), data) in batch.into_iter().zip(data) {
            map.update_range(offset, &data)
                .map_err(|source| EngineError::BlockMap {
                    disk: disk.to_owned(),
                    source,
                })?;
            bytes += len;
            uploader.write(disk, offset, data).await?;
        }
    }
    Ok(bytes)
}

/// Apply a sealed log to the replica disk and to its block map. Every entry's checksums are
/// verified before its data is sent.
pub(super) async fn apply_log(
    fs: &dyn StateFs,
    log: &PendingLog,
    map: &mut BlockMap,
    uploader: &mut Uploader,
) -> Result<u64, EngineError> {
    let path = log.path.clone();
    let corrupt = |source| EngineError::CorruptLog {
        path: path.clone(),
        source,
    };
    let file = fs
        .open(&log.path)
        .map_err(EngineError::state("open change log", &log.path))?;
    let options = ReadOptions {
        data_checksums: lifeboat_hrl::DataChecksumPolicy::VerifyAll,
    };
    let mut reader =
        HrlReader::open_with(std::io::BufReader::new(file), options).map_err(corrupt)?;
    if reader.recovery().is_some() {
        // NB: our logs are sealed before they are recorded; an unsealed one was damaged.
        return Err(EngineError::CorruptLog {
            path: log.path.clone(),
            source: lifeboat_hrl::HrlError::ValidateLogChain {
                log_index: 0,
                problem: lifeboat_hrl::Problem::NotSealed,
            },
        });
    }
    let mut bytes = 0;
    for write in reader.writes() {
        let write = write.map_err(corrupt)?;
        map.update_range(write.disk_offset, &write.data)
            .map_err(|source| EngineError::BlockMap {
                disk: log.disk.clone(),
                source,
            })?;
        bytes += write.data.len() as u64;
        uploader
            .write(&log.disk, write.disk_offset, Bytes::from(write.data))
            .await?;
    }
    Ok(bytes)
}

/// Remove log files that no pending cycle names (a crash between sealing a log and
/// recording its cycle, or between dropping a cycle and deleting its logs): the hypervisor
/// still tracks their changes, or a resync supersedes them.
pub(super) fn remove_unrecorded(
    fs: &dyn StateFs,
    dir: &Path,
    state: &AgentState,
) -> Result<(), EngineError> {
    let logs = logs_dir(dir);
    let disks = fs
        .list(&logs)
        .map_err(EngineError::state("list change logs", &logs))?;
    for disk in disks {
        // NB: a name that is not a folder lists as empty or fails: nothing of ours is there.
        let Ok(files) = fs.list(&disk) else {
            continue;
        };
        let mut removed = false;
        for path in files {
            let recorded = state
                .pending
                .iter()
                .flat_map(|c| c.logs.iter())
                .any(|l| l.path == path);
            if !recorded {
                removed |= fs
                    .remove(&path)
                    .map_err(EngineError::state("remove unrecorded change log", &path))?;
            }
        }
        if removed {
            fs.sync_folder(&disk)
                .map_err(EngineError::state("sync log folder", &disk))?;
        }
    }
    Ok(())
}

/// Delete the files of logs that are no longer needed, durably.
pub(super) fn delete_files(fs: &dyn StateFs, logs: &[PendingLog]) -> Result<(), EngineError> {
    let mut folders = std::collections::BTreeSet::new();
    for log in logs {
        if fs
            .remove(&log.path)
            .map_err(EngineError::state("delete shipped change log", &log.path))?
        {
            folders.extend(log.path.parent().map(Path::to_path_buf));
        }
    }
    for folder in folders {
        fs.sync_folder(&folder)
            .map_err(EngineError::state("sync log folder", &folder))?;
    }
    Ok(())
}
