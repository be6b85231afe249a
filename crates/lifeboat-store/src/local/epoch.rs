//! The local store's epoch (see [`crate::fence`]): `epoch.json` in the VM's folder, replaced
//! atomically, and `epoch.lock`, held exclusively by a fence and by every manifest write of a
//! writer that holds an epoch, so that the two never interleave. The lock is held for one
//! small file's write at a time, never across data writes: a fence waits for at most that.

use std::fs::{File, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

use super::io::{open_lock_file, read_if_exists, write_atomic};
use crate::{Epoch, StoreError};

const EPOCH_FILE: &str = "epoch.json";
const EPOCH_LOCK: &str = "epoch.lock";
/// How long to wait for the epoch lock: it is held for one small file's write, so a holder
/// past this is stopped (a paused process) and the caller should hear so.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The VM's epoch in `dir` (the initial one when the file does not exist).
pub(super) fn read(dir: &Path) -> Result<Epoch, StoreError> {
    let path = dir.join(EPOCH_FILE);
    match read_if_exists(&path, "read epoch")? {
        None => Ok(Epoch::default()),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            detail: e.to_string(),
        }),
    }
}

/// Replace the VM's epoch in `dir` (durably), under [`lock`].
pub(super) fn write(dir: &Path, epoch: &Epoch) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(epoch).map_err(|e| StoreError::InvalidRequest {
        what: format!("encode epoch: {e}"),
    })?;
    write_atomic(&dir.join(EPOCH_FILE), &json)
}

/// The epoch lock of `dir`, held until the file is dropped.
pub(super) fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(EPOCH_LOCK);
    let file = open_lock_file(&path, "open epoch lock")?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Io {
                    action: "lock epoch",
                    source: std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "another process has held the epoch lock for over {LOCK_WAIT:?} (stopped while writing the manifest?)"
                        ),
                    ),
                    path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::io("lock epoch", &path)(e)),
        }
    }
}
