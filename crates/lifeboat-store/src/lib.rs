//! The replica store: where replica disks, recovery points and each VM's manifest live.
//!
//! One trait, [`ReplicaStore`], two implementations with the same semantics: [`local`] (a
//! folder of the machine: the embedded default) and `azure` (one page blob per disk, recovery
//! points as blob snapshots). The same conformance suite runs against both.
//!
//! ```text
//!   VM "ns/web-01"
//!   ├── manifest          disks, points (time, cycle, consistency, per-disk digest): atomic
//!   ├── disk "root"       the live replica: deltas are applied here
//!   │     ├── point A     immutable once cut; readable until pruned
//!   │     └── point B
//!   └── block map "root"  the live replica's block hashes, so a resync never downloads it
//! ```
//!
//! # Guarantees
//!
//! - A recovery point, once cut, never changes: later writes to the live disk do not alter
//!   what it reads.
//! - The manifest is replaced atomically: a crash leaves the old or the new one.
//! - A point appears in the manifest only after every disk's data for it is durable, so the
//!   store never holds a point that claims data it does not have.
//!
//! # Limits (Azure's, enforced by both implementations)
//!
//! Offsets and lengths are multiples of [`PAGE_SIZE_BYTES`]; one write carries at most
//! [`MAX_WRITE_BYTES`]; a disk is at most [`MAX_DISK_SIZE_BYTES`].

pub mod azure;
pub mod error;
pub mod fence;
pub mod files;
pub mod local;
pub mod manifest;

#[cfg(test)]
mod conformance;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::StoreError;
pub use fence::Epoch;
pub use manifest::{Consistency, DiskDigest, Manifest, ManifestDisk, PointDisk, RecoveryPoint};

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// Page size of Azure page blobs: every offset and length is a multiple of it.
pub const PAGE_SIZE_BYTES: u64 = 512;
/// The most one Put Page may carry.
pub const MAX_WRITE_BYTES: u64 = 4 * 1024 * 1024;
/// The largest page blob.
pub const MAX_DISK_SIZE_BYTES: u64 = 8 * 1024 * 1024 * 1024 * 1024;
/// The alignment of buffer, offset and length that a store may write with direct I/O (the
/// local store does): 4096 covers 512-byte and 4K-native devices.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Sort ranges, drop the empty ones and merge those that overlap or touch (pure).
pub(crate) fn merge_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
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

/// A zeroed buffer of `len` bytes that starts on a [`DIRECT_IO_ALIGN`] boundary, for data
/// that goes to a store: the sender fills it, and whole pages of it at page offsets can be
/// written without a copy into the page cache.
pub fn aligned_buffer(len: usize) -> bytes::BytesMut {
    let mut buffer = bytes::BytesMut::zeroed(len + DIRECT_IO_ALIGN);
    let pad = buffer
        .as_ptr()
        .align_offset(DIRECT_IO_ALIGN)
        .min(DIRECT_IO_ALIGN);
    let _ = buffer.split_to(pad);
    buffer.truncate(len);
    buffer
}

/// Which protected VM a call is about: its namespace and name, both DNS labels or subdomains
/// (so they are safe as path and blob-name segments).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmKey {
    namespace: String,
    name: String,
}

impl VmKey {
    /// A key for `namespace/name`.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRequest`] when either part is not a lowercase RFC 1123 name.
    pub fn new(namespace: &str, name: &str) -> Result<VmKey, StoreError> {
        for (what, value) in [("namespace", namespace), ("name", name)] {
            if !is_dns_name(value) {
                return Err(StoreError::InvalidRequest {
                    what: format!("VM {what} {value:?} is not a lowercase RFC 1123 name"),
                });
            }
        }
        Ok(VmKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The VM's resource name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for VmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Whether `value` is a lowercase RFC 1123 subdomain (which includes labels).
pub(crate) fn is_dns_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Check a disk name: a DNS label, as the ProtectedVM schema requires.
pub(crate) fn check_disk_name(disk: &str) -> Result<(), StoreError> {
    if is_dns_name(disk) && !disk.contains('.') {
        Ok(())
    } else {
        Err(StoreError::InvalidRequest {
            what: format!("disk name {disk:?} is not a DNS label"),
        })
    }
}

/// Which state of a disk to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum At {
    /// The live replica, as the last writes left it (possibly ahead of the latest point).
    Live,
    /// A recovery point, by id.
    Point(String),
}

/// What a new recovery point records.
#[derive(Clone, Debug, PartialEq)]
pub struct NewPoint {
    /// The instant the point captures, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The replication cycle it came from.
    pub cycle: u64,
    /// Crash- or app-consistent.
    pub consistency: Consistency,
    /// Each disk's digest at this point, by disk name (from its block map). Every disk of the
    /// manifest must have one.
    pub digests: BTreeMap<String, DiskDigest>,
    /// Who wrote it: the agent (`<node>/<pod>`, or `standalone/<host>`), for the record.
    pub written_by: String,
}

/// Where replicas live. Every method is idempotent where its effect allows (creating a disk
/// that exists with the same size, deleting what is gone), so that a caller can retry after
/// any error.
#[async_trait]
pub trait ReplicaStore: Send + Sync + fmt::Debug {
    /// What the store is, for messages: a folder, or an account and container. Never a
    /// credential.
    fn describe(&self) -> String;

    /// Check that the store is reachable and writable (a prerequisite of enabling protection).
    async fn check_writable(&self) -> Result<(), StoreError>;

    /// Create a replica disk of `size_bytes` (a multiple of [`PAGE_SIZE_BYTES`]), reading as
    /// zeros, and record it in the manifest.
    async fn create_disk(&self, vm: &VmKey, disk: &str, size_bytes: u64) -> Result<(), StoreError>;

    /// Grow or shrink a replica disk. Points keep the size they had.
    async fn resize_disk(&self, vm: &VmKey, disk: &str, size_bytes: u64) -> Result<(), StoreError>;

    /// Delete a replica disk and its block map; points that include it keep it until pruned.
    async fn delete_disk(&self, vm: &VmKey, disk: &str) -> Result<(), StoreError>;

    /// Write `data` at `offset` on the live replica. Offset and length are page-aligned; the
    /// length is at most [`MAX_WRITE_BYTES`]. Not durable until [`ReplicaStore::flush`] or
    /// [`ReplicaStore::cut_point`].
    async fn write(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError>;

    /// Write several pieces of one disk, each as [`ReplicaStore::write`] would, in order.
    /// The default writes them one by one; a store that makes a write durable at a cost per
    /// request (the local store syncs the pre-images a write destroys) does them together.
    async fn write_many(
        &self,
        vm: &VmKey,
        disk: &str,
        writes: Vec<(u64, Bytes)>,
    ) -> Result<(), StoreError> {
        for (offset, data) in writes {
            self.write(vm, disk, offset, data).await?;
        }
        Ok(())
    }

    /// How many bytes of writes a writer should gather into one
    /// [`ReplicaStore::write_many`]; 0 (the default): none, every write is its own request
    /// (a remote store gains more from requests in parallel).
    fn write_batch_bytes(&self) -> u64 {
        0
    }

    /// Make `len` bytes at `offset` read as zeros on the live replica, freeing their space.
    async fn zero(&self, vm: &VmKey, disk: &str, offset: u64, len: u64) -> Result<(), StoreError>;

    /// Read `len` bytes at `offset` of a disk, live or at a point.
    async fn read(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError>;

    /// Read each of `pieces` (`(offset, len)`) of a disk, live or at a point: their data, in
    /// order. The default reads them one by one; a store may serve them together.
    async fn read_many(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        pieces: &[(u64, u64)],
    ) -> Result<Vec<Bytes>, StoreError> {
        let mut out = Vec::with_capacity(pieces.len());
        for &(offset, len) in pieces {
            out.push(self.read(vm, disk, at, offset, len).await?);
        }
        Ok(out)
    }

    /// The ranges of a disk that may hold data, live or at a point, sorted and disjoint;
    /// everything outside them reads as zeros.
    async fn data_ranges(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
    ) -> Result<Vec<Range<u64>>, StoreError>;

    /// Make every write so far durable.
    async fn flush(&self, vm: &VmKey) -> Result<(), StoreError>;

    /// Cut a recovery point of every disk of the VM at once, from the live replicas as they
    /// are now, and record it in the manifest.
    async fn cut_point(&self, vm: &VmKey, point: NewPoint) -> Result<RecoveryPoint, StoreError>;

    /// Delete a recovery point. The live replica and the other points read as before.
    async fn delete_point(&self, vm: &VmKey, point_id: &str) -> Result<(), StoreError>;

    /// Put every live disk back to the latest point (after a crash in the middle of applying
    /// a cycle), so that the live replica equals what the manifest says. Without a point, the
    /// live disks are left as they are.
    async fn revert_to_latest_point(&self, vm: &VmKey) -> Result<(), StoreError>;

    /// The VM's manifest, or `None` when the store holds nothing for it.
    async fn manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError>;

    /// Every VM the store holds a manifest for, sorted: what a recovery that has nothing but
    /// the store starts from.
    async fn list_vms(&self) -> Result<Vec<VmKey>, StoreError>;

    /// Store the VM's definition beside its replica (opaque bytes: the agent writes the
    /// ProtectedVM and its policy as applied), so that a recovery with nothing but the store
    /// knows what the VM was. Replaced whole; the VM must exist in the store.
    async fn put_definition(&self, vm: &VmKey, encoded: Bytes) -> Result<(), StoreError>;

    /// The VM's definition, if one was stored.
    async fn definition(&self, vm: &VmKey) -> Result<Option<Bytes>, StoreError>;

    /// Store the live replica's block map (opaque bytes: `lifeboat_blockmap::BlockMap::encode`).
    async fn put_block_map(&self, vm: &VmKey, disk: &str, encoded: Bytes)
    -> Result<(), StoreError>;

    /// The live replica's block map, if one was stored.
    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError>;

    /// Delete everything the store holds for the VM.
    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError>;

    /// Write the VM's replica under `epoch` from now on: every change this store makes to it
    /// is refused with [`StoreError::Fenced`] once the replica is at another epoch (see
    /// [`fence`]). Without a held epoch a VM is written unchecked.
    fn hold_epoch(&self, vm: &VmKey, epoch: u64);

    /// The epoch the VM's replica is at now (the initial one when never fenced).
    async fn epoch(&self, vm: &VmKey) -> Result<Epoch, StoreError>;

    /// Move the VM's replica to the next epoch, taken by `holder`, with a conditional write,
    /// and hold it: every other writer is fenced from then on. The VM must exist in the store.
    /// The only change a read-only local store makes (a recovery with nothing but the store
    /// fences the old primary while its writer may still hold the VM).
    async fn fence(&self, vm: &VmKey, holder: &str, now_unix_ms: u64) -> Result<Epoch, StoreError>;

    /// Delete the points older than `retention_ms` before `now_unix_ms`, always keeping the
    /// latest. Returns the ids deleted.
    async fn prune(
        &self,
        vm: &VmKey,
        retention_ms: u64,
        now_unix_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let Some(manifest) = self.manifest(vm).await? else {
            return Ok(Vec::new());
        };
        let doomed = manifest.points_to_prune(retention_ms, now_unix_ms);
        for id in &doomed {
            self.delete_point(vm, id).await?;
        }
        Ok(doomed)
    }
}

/// Check a write or read request against Azure's page-blob rules and the disk's size.
///
/// # Errors
///
/// [`StoreError::InvalidRequest`] naming the disk and what is wrong.
pub fn check_range(
    disk: &str,
    offset: u64,
    len: u64,
    disk_size_bytes: u64,
    is_write: bool,
) -> Result<(), StoreError> {
    let bad = |what: String| {
        Err(StoreError::InvalidRequest {
            what: format!("disk {disk:?}: {what}"),
        })
    };
    if !offset.is_multiple_of(PAGE_SIZE_BYTES) || !len.is_multiple_of(PAGE_SIZE_BYTES) {
        return bad(format!(
            "range {offset}+{len} is not aligned to {PAGE_SIZE_BYTES}-byte pages"
        ));
    }
    if is_write && len > MAX_WRITE_BYTES {
        return bad(format!(
            "a write of {len} bytes is over the {MAX_WRITE_BYTES}-byte limit of one Put Page"
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= disk_size_bytes => Ok(()),
        _ => bad(format!(
            "range {offset}+{len} runs past the end of the disk ({disk_size_bytes} bytes)"
        )),
    }
}

/// Check a disk size against Azure's page-blob rules.
///
/// # Errors
///
/// [`StoreError::InvalidRequest`] naming the disk and what is wrong.
pub fn check_disk_size(disk: &str, size_bytes: u64) -> Result<(), StoreError> {
    if size_bytes == 0
        || !size_bytes.is_multiple_of(PAGE_SIZE_BYTES)
        || size_bytes > MAX_DISK_SIZE_BYTES
    {
        return Err(StoreError::InvalidRequest {
            what: format!(
                "disk {disk:?}: size {size_bytes} must be a non-zero multiple of {PAGE_SIZE_BYTES} bytes, at most {MAX_DISK_SIZE_BYTES}"
            ),
        });
    }
    Ok(())
}

/// `cut_point` of a point whose id (its time and cycle) exists already: the same point when
/// the digests are the same (a retry after a failure that hid the first cut's success: the
/// cut is idempotent, as the engine's re-apply of a cycle is), refused when they differ (the
/// id would vouch for other data).
///
/// # Errors
///
/// [`StoreError::InvalidRequest`] naming the point and the first disk whose digest differs.
pub(crate) fn existing_point(
    existing: &RecoveryPoint,
    asked: &NewPoint,
    vm: &str,
) -> Result<RecoveryPoint, StoreError> {
    let differs = existing
        .disks
        .iter()
        .find(|d| asked.digests.get(&d.name) != Some(&d.digest));
    match differs {
        None if existing.disks.len() == asked.digests.len() => Ok(existing.clone()),
        _ => Err(StoreError::InvalidRequest {
            what: format!(
                "recovery point {} of VM {vm} exists already with other digests (disk {:?})",
                existing.id,
                differs.map_or("", |d| d.name.as_str())
            ),
        }),
    }
}
