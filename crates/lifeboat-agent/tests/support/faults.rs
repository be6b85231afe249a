//! Wrappers that observe or break the real components, for tests: a store that can be taken
//! down (a test double of an outage, around the real local store), a store that can lose
//! what was never flushed (a test double of a power cut) and a hypervisor that
//! records what every view shows (around the real QEMU backend), so that a recovery point
//! can be compared with the source's point-in-time view even under a concurrent guest load.

#![allow(dead_code, clippy::unwrap_used)]

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lifeboat_engine::backend::{
    BackendError, CloseView, DiskInfo, DiskRef, Hypervisor, Quiesce, Tracking, View,
};
use lifeboat_store::{At, Manifest, NewPoint, RecoveryPoint, ReplicaStore, StoreError, VmKey};

/// A store that fails like an unreachable remote one while `down` is set, or after
/// `writes_left` more writes.
#[derive(Debug)]
pub struct FaultInjectingStore<S> {
    pub inner: S,
    pub down: AtomicBool,
    pub writes_left: AtomicU64,
}

impl<S> FaultInjectingStore<S> {
    pub fn new(inner: S) -> Self {
        FaultInjectingStore {
            inner,
            down: AtomicBool::new(false),
            writes_left: AtomicU64::new(u64::MAX),
        }
    }

    fn check(&self, action: &str) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unreachable {
                store: "test".into(),
                action: action.into(),
                detail: "injected outage".into(),
            });
        }
        Ok(())
    }

    fn check_write(&self) -> Result<(), StoreError> {
        self.check("write")?;
        let left = self.writes_left.load(Ordering::SeqCst);
        if left == 0 {
            self.down.store(true, Ordering::SeqCst);
            return self.check("write");
        }
        if left != u64::MAX {
            self.writes_left.store(left - 1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[async_trait]
impl<S: ReplicaStore> ReplicaStore for FaultInjectingStore<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn check_writable(&self) -> Result<(), StoreError> {
        self.check("check")?;
        self.inner.check_writable().await
    }
    async fn create_disk(&self, vm: &VmKey, disk: &str, size: u64) -> Result<(), StoreError> {
        self.check("create disk")?;
        self.inner.create_disk(vm, disk, size).await
    }
    async fn resize_disk(&self, vm: &VmKey, disk: &str, size: u64) -> Result<(), StoreError> {
        self.check("resize")?;
        self.inner.resize_disk(vm, disk, size).await
    }
    async fn delete_disk(&self, vm: &VmKey, disk: &str) -> Result<(), StoreError> {
        self.check("delete disk")?;
        self.inner.delete_disk(vm, disk).await
    }
    async fn write(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        self.check_write()?;
        self.inner.write(vm, disk, offset, data).await
    }
    async fn zero(&self, vm: &VmKey, disk: &str, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_write()?;
        self.inner.zero(vm, disk, offset, len).await
    }
    async fn read(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        self.check("read")?;
        self.inner.read(vm, disk, at, offset, len).await
    }
    async fn data_ranges(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        self.check("list ranges")?;
        self.inner.data_ranges(vm, disk, at).await
    }
    async fn flush(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.check("flush")?;
        self.inner.flush(vm).await
    }
    async fn cut_point(&self, vm: &VmKey, point: NewPoint) -> Result<RecoveryPoint, StoreError> {
        self.check("cut point")?;
        self.inner.cut_point(vm, point).await
    }
    async fn delete_point(&self, vm: &VmKey, id: &str) -> Result<(), StoreError> {
        self.check("delete point")?;
        self.inner.delete_point(vm, id).await
    }
    async fn revert_to_latest_point(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.check("revert")?;
        self.inner.revert_to_latest_point(vm).await
    }
    async fn manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        self.check("read manifest")?;
        self.inner.manifest(vm).await
    }
    async fn put_block_map(
        &self,
        vm: &VmKey,
        disk: &str,
        encoded: Bytes,
    ) -> Result<(), StoreError> {
        self.check("put map")?;
        self.inner.put_block_map(vm, disk, encoded).await
    }
    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError> {
        self.check("get map")?;
        self.inner.block_map(vm, disk).await
    }
    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.check("delete vm")?;
        self.inner.delete_vm(vm).await
    }
}

/// A test double simulating a power cut of the store: it keeps exactly the durability the
/// [`ReplicaStore`] contract promises, and no more.
///
/// Every call passes through to `inner` (so reads see the writes), but before each `write`
/// or `zero` the pre-image of its range is read from the live replica and kept in an undo
/// list. [`ReplicaStore::flush`] and [`ReplicaStore::cut_point`] make everything before them
/// durable: once the inner call succeeded, the VM's pre-images are dropped.
/// [`PowerCutStore::power_cut`] is the power cut: the pre-images still kept are written back
/// in reverse order, so what was written and never flushed is gone.
///
/// Everything else is treated as durable at once: block maps and the manifest (separate
/// small objects the real stores replace atomically), creating, resizing and deleting disks,
/// deleting points, putting the live replica back to its latest point (which ends with the
/// live replica equal to a durable point: it drops the VM's pre-images too) and deleting the
/// VM.
#[derive(Debug)]
pub struct PowerCutStore<S> {
    pub inner: S,
    undo: Mutex<Vec<PreImage>>,
}

/// What a range of the live replica held before a write that was not flushed yet.
#[derive(Debug)]
struct PreImage {
    vm: VmKey,
    disk: String,
    offset: u64,
    data: Bytes,
}

impl<S: ReplicaStore> PowerCutStore<S> {
    pub fn new(inner: S) -> Self {
        PowerCutStore {
            inner,
            undo: Mutex::new(Vec::new()),
        }
    }

    /// Bytes written (or zeroed) since the last flush or cut: what a power cut now would lose.
    pub fn unflushed_bytes(&self) -> u64 {
        self.undo
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.data.len() as u64)
            .sum()
    }

    /// Cut the power: every write and zero not made durable by a flush or a cut since is
    /// undone, the latest first. Returns the bytes put back.
    pub async fn power_cut(&self) -> Result<u64, StoreError> {
        let undo = std::mem::take(&mut *self.undo.lock().unwrap());
        let mut restored = 0;
        for pre in undo.iter().rev() {
            let mut at = 0usize;
            while at < pre.data.len() {
                let end = pre
                    .data
                    .len()
                    .min(at + lifeboat_store::MAX_WRITE_BYTES as usize);
                let piece = pre.data.slice(at..end);
                let offset = pre.offset + at as u64;
                if piece.iter().all(|&b| b == 0) {
                    self.inner
                        .zero(&pre.vm, &pre.disk, offset, piece.len() as u64)
                        .await?;
                } else {
                    self.inner.write(&pre.vm, &pre.disk, offset, piece).await?;
                }
                at = end;
            }
            restored += pre.data.len() as u64;
        }
        Ok(restored)
    }

    async fn keep_pre_image(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let data = self.inner.read(vm, disk, &At::Live, offset, len).await?;
        self.undo.lock().unwrap().push(PreImage {
            vm: vm.clone(),
            disk: disk.to_owned(),
            offset,
            data,
        });
        Ok(())
    }

    /// Everything of `vm` so far is durable.
    fn durable(&self, vm: &VmKey) {
        self.undo.lock().unwrap().retain(|p| &p.vm != vm);
    }
}

#[async_trait]
impl<S: ReplicaStore> ReplicaStore for PowerCutStore<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn check_writable(&self) -> Result<(), StoreError> {
        self.inner.check_writable().await
    }
    async fn create_disk(&self, vm: &VmKey, disk: &str, size: u64) -> Result<(), StoreError> {
        self.inner.create_disk(vm, disk, size).await
    }
    async fn resize_disk(&self, vm: &VmKey, disk: &str, size: u64) -> Result<(), StoreError> {
        self.inner.resize_disk(vm, disk, size).await
    }
    async fn delete_disk(&self, vm: &VmKey, disk: &str) -> Result<(), StoreError> {
        self.inner.delete_disk(vm, disk).await?;
        self.undo
            .lock()
            .unwrap()
            .retain(|p| !(&p.vm == vm && p.disk == disk));
        Ok(())
    }
    async fn write(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        self.keep_pre_image(vm, disk, offset, data.len() as u64)
            .await?;
        self.inner.write(vm, disk, offset, data).await
    }
    async fn zero(&self, vm: &VmKey, disk: &str, offset: u64, len: u64) -> Result<(), StoreError> {
        self.keep_pre_image(vm, disk, offset, len).await?;
        self.inner.zero(vm, disk, offset, len).await
    }
    async fn read(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        self.inner.read(vm, disk, at, offset, len).await
    }
    async fn data_ranges(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        self.inner.data_ranges(vm, disk, at).await
    }
    async fn flush(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.inner.flush(vm).await?;
        self.durable(vm);
        Ok(())
    }
    async fn cut_point(&self, vm: &VmKey, point: NewPoint) -> Result<RecoveryPoint, StoreError> {
        let point = self.inner.cut_point(vm, point).await?;
        self.durable(vm);
        Ok(point)
    }
    async fn delete_point(&self, vm: &VmKey, id: &str) -> Result<(), StoreError> {
        self.inner.delete_point(vm, id).await
    }
    async fn revert_to_latest_point(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.inner.revert_to_latest_point(vm).await?;
        self.durable(vm);
        Ok(())
    }
    async fn manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        self.inner.manifest(vm).await
    }
    async fn put_block_map(
        &self,
        vm: &VmKey,
        disk: &str,
        encoded: Bytes,
    ) -> Result<(), StoreError> {
        self.inner.put_block_map(vm, disk, encoded).await
    }
    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError> {
        self.inner.block_map(vm, disk).await
    }
    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.inner.delete_vm(vm).await?;
        self.durable(vm);
        Ok(())
    }
}

/// What each view showed, by cycle, then disk.
pub type Recorded = Arc<Mutex<BTreeMap<u64, BTreeMap<String, Vec<u8>>>>>;

/// A hypervisor that reads every disk through each view it opens and keeps the bytes.
#[derive(Debug)]
pub struct RecordingHypervisor<H> {
    pub inner: H,
    pub recorded: Recorded,
}

#[async_trait]
impl<H: Hypervisor> Hypervisor for RecordingHypervisor<H> {
    fn vm(&self) -> &str {
        self.inner.vm()
    }
    async fn inspect(&self, disks: &[DiskRef]) -> Result<Vec<DiskInfo>, BackendError> {
        self.inner.inspect(disks).await
    }
    async fn tracking(&self, disks: &[DiskRef]) -> Result<Vec<Tracking>, BackendError> {
        self.inner.tracking(disks).await
    }
    async fn start_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError> {
        self.inner.start_tracking(disks).await
    }
    async fn open_view(
        &self,
        disks: &[DiskRef],
        cycle: u64,
        quiesce: Quiesce,
    ) -> Result<Box<dyn View>, BackendError> {
        let view = self.inner.open_view(disks, cycle, quiesce).await?;
        let mut seen = BTreeMap::new();
        for info in view.disks() {
            let mut bytes = Vec::with_capacity(info.size_bytes as usize);
            let mut offset = 0;
            while offset < info.size_bytes {
                let len = (8 << 20).min(info.size_bytes - offset);
                bytes.extend_from_slice(&view.read(&info.name, offset, len).await?);
                offset += len;
            }
            seen.insert(info.name.clone(), bytes);
        }
        self.recorded.lock().unwrap().insert(cycle, seen);
        Ok(view)
    }
    async fn stop_tracking(&self, disks: &[DiskRef]) -> Result<(), BackendError> {
        self.inner.stop_tracking(disks).await
    }
}

/// Keep `CloseView` in the public surface the tests use.
pub const _COMMIT: CloseView = CloseView::Commit;
