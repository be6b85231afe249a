//! Writes to the store with the policy's concurrency and bandwidth: up to N requests in
//! flight per VM, each at most one Put Page (4 MiB), paced by the throttle.

use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use lifeboat_store::{MAX_WRITE_BYTES, ReplicaStore, StoreError, VmKey};

use crate::error::EngineError;
use crate::throttle::Throttle;

/// A bounded set of store writes in flight.
pub(super) struct Uploader {
    store: Arc<dyn ReplicaStore>,
    vm: VmKey,
    throttle: Arc<Throttle>,
    slots: Arc<Semaphore>,
    tasks: JoinSet<Result<(), StoreError>>,
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
            self.reap()?;
            let permit =
                self.slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| EngineError::NotReady {
                        what: e.to_string(),
                    })?;
            self.throttle.take(piece.len() as u64).await;
            self.bytes_sent += piece.len() as u64;
            let (store, vm, disk, piece_offset) = (
                self.store.clone(),
                self.vm.clone(),
                disk.to_owned(),
                offset + at as u64,
            );
            at += piece.len();
            self.tasks.spawn(async move {
                let result = store.write(&vm, &disk, piece_offset, piece).await;
                drop(permit);
                result
            });
        }
        Ok(())
    }

    /// Queue making `len` bytes at `offset` read as zeros (no data sent).
    pub(super) async fn zero(
        &mut self,
        disk: &str,
        offset: u64,
        len: u64,
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
        self.bytes_zeroed += len;
        let (store, vm, disk) = (self.store.clone(), self.vm.clone(), disk.to_owned());
        self.tasks.spawn(async move {
            let result = store.zero(&vm, &disk, offset, len).await;
            drop(permit);
            result
        });
        Ok(())
    }

    /// Wait for every queued request; the first failure is returned.
    pub(super) async fn finish(&mut self) -> Result<(), EngineError> {
        let mut first = Ok(());
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
