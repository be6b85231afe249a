//! Writes to the store with the policy's concurrency and bandwidth: up to N requests in
//! flight per VM, each at most one Put Page (4 MiB), paced by the throttle. Where the store
//! asks for it ([`ReplicaStore::write_batch_bytes`]), small writes to one disk are gathered
//! into one [`ReplicaStore::write_many`] request.

use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use lifeboat_store::{MAX_WRITE_BYTES, ReplicaStore, StoreError, VmKey};

use crate::error::EngineError;
use crate::throttle::Throttle;

/// Writes shorter than this are gathered into batches when the store wants them; longer
/// ones amortize the store's cost per request themselves.
const SMALL_WRITE_BYTES: u64 = 1024 * 1024;

/// Writes gathered for one [`ReplicaStore::write_many`].
struct Batch {
    disk: String,
    writes: Vec<(u64, Bytes)>,
    bytes: u64,
}

/// A bounded set of store writes in flight.
pub(super) struct Uploader {
    store: Arc<dyn ReplicaStore>,
    vm: VmKey,
    throttle: Arc<Throttle>,
    slots: Arc<Semaphore>,
    tasks: JoinSet<Result<(), StoreError>>,
    /// The store's batch size; 0: no batches.
    batch_bytes: u64,
    /// Writes gathered for the next batch.
    batch: Option<Batch>,
    pub(super) bytes_sent: u64,
    pub(super) bytes_zeroed: u64,
}

impl Uploader {
    pub(super) fn new(
        store: Arc<dyn ReplicaStore>,
        vm: VmKey,
        throttle: Arc<Throttle>,
        concurrency: usize,
    ) -> Uploader {
        Uploader {
            batch_bytes: store.write_batch_bytes(),
            batch: None,
            store,
            vm,
            throttle,
            slots: Arc::new(Semaphore::new(concurrency.clamp(1, 32))),
            tasks: JoinSet::new(),
            bytes_sent: 0,
            bytes_zeroed: 0,
        }
    }

    fn reap(&mut self) -> Result<(), EngineError> {
        while let Some(done) = self.tasks.try_join_next() {
            flatten(done)?;
        }
        Ok(())
    }

    /// Queue a write of `data` at `offset` (page-aligned), split into Put Page sized pieces.
    pub(super) async fn write(
        &mut self,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), EngineError> {
        let mut at = 0usize;
        while at < data.len() {
            let piece = data.slice(at..data.len().min(at + MAX_WRITE_BYTES as usize));
            let piece_at = at;
            at += piece.len();
            let piece_offset = offset + piece_at as u64;
            if self.batch_bytes > 0 && (piece.len() as u64) < SMALL_WRITE_BYTES {
                self.gather(disk, piece_offset, piece).await?;
                continue;
            }
            let len = piece.len() as u64;
            let (store, vm, disk) = (self.store.clone(), self.vm.clone(), disk.to_owned());
            self.queue(len, async move {
                store.write(&vm, &disk, piece_offset, piece).await
            })
            .await?;
            self.bytes_sent += len;
        }
        Ok(())
    }

    /// Queue one store request once a slot is free, first paced by the throttle for
    /// `paced_bytes` (0: not paced); a failure of a request already done is returned first.
    async fn queue(
        &mut self,
        paced_bytes: u64,
        request: impl Future<Output = Result<(), StoreError>> + Send + 'static,
    ) -> Result<(), EngineError> {
        self.reap()?;
        let permit =
            self.slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| EngineError::NotReady {
                    what: e.to_string(),
                })?;
        if paced_bytes > 0 {
            self.throttle.take(paced_bytes).await;
        }
        self.tasks.spawn(async move {
            let result = request.await;
            drop(permit);
            result
        });
        Ok(())
    }

    /// Add a write to the batch; a full batch (or one of another disk) is queued first.
    async fn gather(&mut self, disk: &str, offset: u64, piece: Bytes) -> Result<(), EngineError> {
        if self.batch.as_ref().is_some_and(|b| b.disk != disk) {
            self.send_batch().await?;
        }
        self.throttle.take(piece.len() as u64).await;
        self.bytes_sent += piece.len() as u64;
        let batch = self.batch.get_or_insert_with(|| Batch {
            disk: disk.to_owned(),
            writes: Vec::new(),
            bytes: 0,
        });
        batch.bytes += piece.len() as u64;
        batch.writes.push((offset, piece));
        if batch.bytes >= self.batch_bytes {
            self.send_batch().await?;
        }
        Ok(())
    }

    /// Queue the gathered writes as one request.
    async fn send_batch(&mut self) -> Result<(), EngineError> {
        let Some(Batch { disk, writes, .. }) = self.batch.take() else {
            return Ok(());
        };
        let (store, vm) = (self.store.clone(), self.vm.clone());
        self.queue(0, async move { store.write_many(&vm, &disk, writes).await })
            .await
    }

    /// Queue making `len` bytes at `offset` read as zeros (no data sent).
    pub(super) async fn zero(
        &mut self,
        disk: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        // NB: the gathered writes are queued first, in the order they were asked for; the
        // store may still run queued requests in any order (callers never zero a range they
        // are also writing before the next finish).
        self.send_batch().await?;
        let (store, vm, disk) = (self.store.clone(), self.vm.clone(), disk.to_owned());
        self.queue(0, async move { store.zero(&vm, &disk, offset, len).await })
            .await?;
        self.bytes_zeroed += len;
        Ok(())
    }

    /// Wait for every queued request; the first failure is returned.
    pub(super) async fn finish(&mut self) -> Result<(), EngineError> {
        let mut first = self.send_batch().await;
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = flatten(done)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

fn flatten(
    done: Result<Result<(), StoreError>, tokio::task::JoinError>,
) -> Result<(), EngineError> {
    match done {
        Ok(result) => result.map_err(EngineError::from),
        Err(e) => Err(EngineError::NotReady {
            what: format!("a store request ended abnormally: {e}"),
        }),
    }
}
