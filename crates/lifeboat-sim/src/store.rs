//! The replica store with exactly the durability [`ReplicaStore`] promises, around the real
//! local store: every call can fail before or after it takes effect, and at a power cut the
//! writes and zeros not made durable by a flush or a cut are dropped or torn, 512-byte sector
//! by sector, in any order.
//!
//! The local store's own files (its manifest, undo segments, block maps) stay on the real file
//! system and keep their own guarantees (the local store's crash tests check them): here the
//! manifest, the maps, points, reverts and deletions are durable when they return, as the
//! contract says.

use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lifeboat_store::{
    At, MAX_WRITE_BYTES, Manifest, NewPoint, PAGE_SIZE_BYTES, RecoveryPoint, ReplicaStore,
    StoreError, VmKey,
};

use crate::fs::SECTOR_BYTES;
use crate::world::{Fault, World};

/// What a range of the live replica held before a write not yet durable.
#[derive(Debug)]
struct PreImage {
    vm: VmKey,
    disk: String,
    offset: u64,
    data: Bytes,
}

/// The simulated store.
#[derive(Debug)]
pub struct SimStore {
    inner: Arc<dyn ReplicaStore>,
    world: Arc<World>,
    undo: Mutex<Vec<PreImage>>,
    in_flight: Arc<AtomicUsize>,
}

fn injected(action: &str) -> StoreError {
    StoreError::Unreachable {
        store: "simulated".into(),
        action: action.into(),
        detail: "injected failure".into(),
    }
}

impl SimStore {
    /// Around `inner` (a real store, opened afresh after every power cut).
    pub fn new(inner: Arc<dyn ReplicaStore>, world: Arc<World>) -> SimStore {
        SimStore {
            inner,
            world,
            undo: Mutex::new(Vec::new()),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The real store underneath (for the checks, which must not draw faults).
    pub fn inner(&self) -> &Arc<dyn ReplicaStore> {
        &self.inner
    }

    fn undo(&self) -> std::sync::MutexGuard<'_, Vec<PreImage>> {
        self.undo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes written since the last flush or cut: what a power cut now may lose.
    pub fn volatile_bytes(&self) -> u64 {
        self.undo().iter().map(|p| p.data.len() as u64).sum()
    }

    /// Run `call` on the real store to its end even if the caller goes away (an engine
    /// dropped at a power cut), so that a cut never races a write still in flight.
    async fn detached<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let in_flight = self.in_flight.clone();
        in_flight.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(async move {
            let out = call.await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            out
        });
        task.await.map_err(|e| StoreError::Unreachable {
            store: "simulated".into(),
            action: "join".into(),
            detail: e.to_string(),
        })?
    }

    /// Wait until no call is running on the real store.
    pub async fn quiesce(&self) {
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Ask the world about `action`; `Ok(true)`: act, then fail.
    fn call(&self, action: &str) -> Result<bool, StoreError> {
        match self.world.call(action) {
            Fault::None => Ok(false),
            Fault::Before => Err(injected(action)),
            Fault::After => Ok(true),
        }
    }

    fn ended<T>(fail_after: bool, action: &str, out: T) -> Result<T, StoreError> {
        if fail_after {
            Err(injected(action))
        } else {
            Ok(out)
        }
    }

    async fn keep_pre_image(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let data = self.inner.read(vm, disk, &At::Live, offset, len).await?;
        self.undo().push(PreImage {
            vm: vm.clone(),
            disk: disk.to_owned(),
            offset,
            data,
        });
        Ok(())
    }

    fn durable(&self, vm: &VmKey) {
        self.undo().retain(|p| &p.vm != vm);
    }

    /// The power cut: each write not made durable, the latest first, loses each of its
    /// sectors or keeps it, as the world decides. Returns the bytes put back.
    ///
    /// # Errors
    ///
    /// The real store failed putting a pre-image back.
    pub async fn power_cut(&self) -> Result<u64, StoreError> {
        let world = self.world.clone();
        self.undo_unflushed(move || world.below(2) == 0).await
    }

    /// The worst power cut: every write and zero not made durable is lost whole. Returns
    /// the bytes put back.
    ///
    /// # Errors
    ///
    /// The real store failed putting a pre-image back.
    pub async fn lose_unflushed(&self) -> Result<u64, StoreError> {
        self.undo_unflushed(|| true).await
    }

    /// Put back, latest write first, each unflushed sector for which `lose` says so.
    async fn undo_unflushed(&self, mut lose: impl FnMut() -> bool) -> Result<u64, StoreError> {
        self.quiesce().await;
        let undo = std::mem::take(&mut *self.undo());
        let mut restored = 0;
        for pre in undo.iter().rev() {
            let mut at = 0usize;
            while at < pre.data.len() {
                let end = pre.data.len().min(at + MAX_WRITE_BYTES as usize);
                let offset = pre.offset + at as u64;
                let mut page = self
                    .inner
                    .read(&pre.vm, &pre.disk, &At::Live, offset, (end - at) as u64)
                    .await?
                    .to_vec();
                for sector in (0..page.len()).step_by(SECTOR_BYTES) {
                    if lose() {
                        let old = &pre.data[at + sector..at + sector + SECTOR_BYTES];
                        page[sector..sector + SECTOR_BYTES].copy_from_slice(old);
                        restored += SECTOR_BYTES as u64;
                    }
                }
                write_or_zero(self.inner.as_ref(), &pre.vm, &pre.disk, offset, page).await?;
                at = end;
            }
        }
        Ok(restored)
    }
}

/// Write `data` at `offset`, as zeros (freeing the space) where whole pages are zero.
async fn write_or_zero(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    disk: &str,
    offset: u64,
    data: Vec<u8>,
) -> Result<(), StoreError> {
    let page = PAGE_SIZE_BYTES as usize;
    for (i, piece) in data.chunks(page).enumerate() {
        let at = offset + (i * page) as u64;
        if piece.iter().all(|&b| b == 0) {
            store.zero(vm, disk, at, piece.len() as u64).await?;
        } else {
            store
                .write(vm, disk, at, Bytes::copy_from_slice(piece))
                .await?;
        }
    }
    Ok(())
}

macro_rules! durable_call {
    ($self:ident, $action:literal, $call:expr) => {{
        let fail_after = $self.call($action)?;
        let out = $call.await?;
        Self::ended(fail_after, $action, out)
    }};
}

#[async_trait]
impl ReplicaStore for SimStore {
    fn describe(&self) -> String {
        format!("simulated {}", self.inner.describe())
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        durable_call!(self, "check", self.inner.check_writable())
    }

    async fn create_disk(&self, vm: &VmKey, disk: &str, size: u64) -> Result<(), StoreError> {
        durable_call!(self, "create disk", self.inner.create_disk(vm, disk, size))
    }

    async fn resize_disk(&self, vm: &VmKey, disk: &str, size: u64) -> Result<(), StoreError> {
        durable_call!(self, "resize disk", self.inner.resize_disk(vm, disk, size))
    }

    // NB: the inner store's batch size, so that the engine gathers writes as it would for
    // it; `write_many` is the trait's default, one simulated `write` at a time.
    fn write_batch_bytes(&self) -> u64 {
        self.inner.write_batch_bytes()
    }

    async fn delete_disk(&self, vm: &VmKey, disk: &str) -> Result<(), StoreError> {
        let fail_after = self.call("delete disk")?;
        self.inner.delete_disk(vm, disk).await?;
        self.undo().retain(|p| !(&p.vm == vm && p.disk == disk));
        Self::ended(fail_after, "delete disk", ())
    }

    async fn write(
        &self,
        vm: &VmKey,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        let fail_after = self.call("write")?;
        self.keep_pre_image(vm, disk, offset, data.len() as u64)
            .await?;
        let (inner, vm2, disk2) = (self.inner.clone(), vm.clone(), disk.to_owned());
        self.detached(async move { inner.write(&vm2, &disk2, offset, data).await })
            .await?;
        Self::ended(fail_after, "write", ())
    }

    async fn zero(&self, vm: &VmKey, disk: &str, offset: u64, len: u64) -> Result<(), StoreError> {
        let fail_after = self.call("zero")?;
        self.keep_pre_image(vm, disk, offset, len).await?;
        let (inner, vm2, disk2) = (self.inner.clone(), vm.clone(), disk.to_owned());
        self.detached(async move { inner.zero(&vm2, &disk2, offset, len).await })
            .await?;
        Self::ended(fail_after, "zero", ())
    }

    async fn read(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        self.call("read")
            .and_then(|after| if after { Err(injected("read")) } else { Ok(()) })?;
        self.inner.read(vm, disk, at, offset, len).await
    }

    async fn data_ranges(
        &self,
        vm: &VmKey,
        disk: &str,
        at: &At,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        durable_call!(self, "list ranges", self.inner.data_ranges(vm, disk, at))
    }

    async fn flush(&self, vm: &VmKey) -> Result<(), StoreError> {
        let fail_after = self.call("flush")?;
        self.inner.flush(vm).await?;
        self.durable(vm);
        Self::ended(fail_after, "flush", ())
    }

    async fn cut_point(&self, vm: &VmKey, point: NewPoint) -> Result<RecoveryPoint, StoreError> {
        let fail_after = self.call("cut point")?;
        let point = self.inner.cut_point(vm, point).await?;
        self.durable(vm);
        Self::ended(fail_after, "cut point", point)
    }

    async fn delete_point(&self, vm: &VmKey, id: &str) -> Result<(), StoreError> {
        durable_call!(self, "delete point", self.inner.delete_point(vm, id))
    }

    async fn revert_to_latest_point(&self, vm: &VmKey) -> Result<(), StoreError> {
        let fail_after = self.call("revert")?;
        self.inner.revert_to_latest_point(vm).await?;
        self.durable(vm);
        Self::ended(fail_after, "revert", ())
    }

    async fn manifest(&self, vm: &VmKey) -> Result<Option<Manifest>, StoreError> {
        durable_call!(self, "read manifest", self.inner.manifest(vm))
    }

    async fn list_vms(&self) -> Result<Vec<VmKey>, StoreError> {
        durable_call!(self, "list VMs", self.inner.list_vms())
    }

    async fn put_definition(&self, vm: &VmKey, encoded: Bytes) -> Result<(), StoreError> {
        durable_call!(
            self,
            "put definition",
            self.inner.put_definition(vm, encoded)
        )
    }

    async fn definition(&self, vm: &VmKey) -> Result<Option<Bytes>, StoreError> {
        durable_call!(self, "get definition", self.inner.definition(vm))
    }

    async fn put_block_map(
        &self,
        vm: &VmKey,
        disk: &str,
        encoded: Bytes,
    ) -> Result<(), StoreError> {
        durable_call!(
            self,
            "put block map",
            self.inner.put_block_map(vm, disk, encoded)
        )
    }

    async fn block_map(&self, vm: &VmKey, disk: &str) -> Result<Option<Bytes>, StoreError> {
        durable_call!(self, "get block map", self.inner.block_map(vm, disk))
    }

    fn hold_epoch(&self, vm: &VmKey, epoch: u64) {
        self.inner.hold_epoch(vm, epoch);
    }

    async fn epoch(&self, vm: &VmKey) -> Result<lifeboat_store::Epoch, StoreError> {
        self.inner.epoch(vm).await
    }

    async fn fence(
        &self,
        vm: &VmKey,
        holder: &str,
        now_unix_ms: u64,
    ) -> Result<lifeboat_store::Epoch, StoreError> {
        self.inner.fence(vm, holder, now_unix_ms).await
    }

    async fn delete_vm(&self, vm: &VmKey) -> Result<(), StoreError> {
        let fail_after = self.call("delete vm")?;
        self.inner.delete_vm(vm).await?;
        self.durable(vm);
        Self::ended(fail_after, "delete vm", ())
    }
}
