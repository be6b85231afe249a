//! Wrappers that observe or break the real components, for tests: a store that can be taken
//! down (a test double of an outage, around the real local store; a store that loses what
//! was never flushed is the simulation's, `lifeboat_sim::store::SimStore`) and a hypervisor that
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
    BackendError, CloseView, DiskInfo, DiskRef, Hypervisor, Quiesce, Stopped, Tracking, View,
};
use lifeboat_store::{At, Manifest, NewPoint, RecoveryPoint, ReplicaStore, StoreError, VmKey};

/// A store that fails like an unreachable remote one while `down` is set, or after
/// `writes_left` more writes; after `maps_left` more block maps read, it answers each with one
/// that describes no point (as the live map does once the writer has cut a newer point); its
/// next `hide_newest` manifests leave out the newest point (as read just before the writer
/// cut it, its live maps already describing it). `ranges_listed` counts the data ranges asked
/// for (what a replica disk's hashing from the store starts with).
#[derive(Debug)]
pub struct FaultInjectingStore<S> {
    pub inner: S,
    pub down: AtomicBool,
    pub writes_left: AtomicU64,
    pub maps_left: AtomicU64,
    pub hide_newest: AtomicU64,
    pub ranges_listed: AtomicU64,
}

impl<S> FaultInjectingStore<S> {
    pub fn new(inner: S) -> Self {
        FaultInjectingStore {
            inner,
            down: AtomicBool::new(false),
            writes_left: AtomicU64::new(u64::MAX),
            maps_left: AtomicU64::new(u64::MAX),
            hide_newest: AtomicU64::new(0),
            ranges_listed: AtomicU64::new(0),
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

    // NB: the inner store's batch size, so that the engine gathers writes as it would for
    // it; `write_many` is the trait's default, one `write` (and its faults) at a time.
    fn write_batch_bytes(&self) -> u64 {
        self.inner.write_batch_bytes()
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
        self.ranges_listed.fetch_add(1, Ordering::SeqCst);
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
        let mut manifest = self.inner.manifest(vm).await?;
        let hide = self.hide_newest.load(Ordering::SeqCst);
        if hide > 0 {
            self.hide_newest.store(hide - 1, Ordering::SeqCst);
            if let Some(m) = manifest.as_mut() {
                m.points.pop();
            }
        }
        Ok(manifest)
    }
    async fn list_vms(&self) -> Result<Vec<VmKey>, StoreError> {
        self.check("list VMs")?;
        self.inner.list_vms().await
    }
    async fn put_definition(&self, vm: &VmKey, encoded: Bytes) -> Result<(), StoreError> {
        self.check("put definition")?;
        self.inner.put_definition(vm, encoded).await
    }
    async fn definition(&self, vm: &VmKey) -> Result<Option<Bytes>, StoreError> {
        self.check("get definition")?;
        self.inner.definition(vm).await
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
        let left = self.maps_left.load(Ordering::SeqCst);
        if left == 0 {
            return Ok(Some(Bytes::from_static(b"moved on")));
        }
        if left != u64::MAX {
            self.maps_left.store(left - 1, Ordering::SeqCst);
        }
        self.inner.block_map(vm, disk).await
    }
    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        self.check("delete vm")?;
        self.inner.delete_vm(vm).await
    }
    fn hold_epoch(&self, vm: &VmKey, epoch: u64) {
        self.inner.hold_epoch(vm, epoch);
    }
    async fn epoch(&self, vm: &VmKey) -> Result<lifeboat_store::Epoch, StoreError> {
        self.check("epoch")?;
        self.inner.epoch(vm).await
    }
    async fn fence(
        &self,
        vm: &VmKey,
        holder: &str,
        now_unix_ms: u64,
    ) -> Result<lifeboat_store::Epoch, StoreError> {
        self.check("fence")?;
        self.inner.fence(vm, holder, now_unix_ms).await
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
    async fn stop_vm(
        &self,
        disks: &[DiskRef],
        grace: std::time::Duration,
    ) -> Result<Stopped, BackendError> {
        self.inner.stop_vm(disks, grace).await
    }
}

/// Keep `CloseView` in the public surface the tests use.
pub const _COMMIT: CloseView = CloseView::Commit;
