//! Resynchronization: make the replica equal to a fresh view of the source by comparing
//! fixed-block checksums and sending only the blocks that differ.
//!
//! ```text
//!  source map  <- hash the view (unallocated ranges are zero blocks, never read)
//!  target map  <- the map stored beside the replica (re-hashed from the replica if untrusted)
//!  plan_resync(source, target) -> Copy / Zero ranges -> store, target map updated as it goes
//!  done -> cut a point; the changes made meanwhile are in the new tracking epoch
//! ```
//!
//! # Resuming
//!
//! The target map is saved with the `resync` tag at every checkpoint, after the writes
//! before it completed, together with the range about to be written (the intent). An
//! interrupted resync (a crash, a store outage) opens a new view, rewrites the intent range
//! unconditionally, and plans again against the saved map: what was already sent matches and
//! is not sent again.

use bytes::Bytes;
use std::time::{Instant, SystemTime};

use lifeboat_blockmap::{BlockMap, HashAlgorithm, RangeOp, plan_resync};
use lifeboat_store::{Consistency, NewPoint};

use super::maps::{self, TAG_RESYNC};
use super::upload::Uploader;
use super::{Progress, ProgressSink, Replicator, Report, logs, throughput, unix_ms};
use crate::backend::{CloseView, Quiesce, View};
use crate::error::EngineError;
use crate::state::EnginePhase;

/// Bytes read from the view at a time when hashing or copying (a whole number of blocks).
const READ_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// The span of a disk between two checkpoints of the target map.
const CHECKPOINT_BYTES: u64 = 256 * 1024 * 1024;

impl Replicator {
    /// Resynchronize every disk now and cut a point. Tracking is (re)started first, so the
    /// changes made during the resync go to the next cycle.
    ///
    /// # Errors
    ///
    /// Hypervisor and store failures; the saved target map keeps what was done.
    pub async fn resync(
        &mut self,
        now: SystemTime,
        progress: ProgressSink<'_>,
    ) -> Result<Report, EngineError> {
        match &self.state.phase {
            EnginePhase::Copied | EnginePhase::Protected | EnginePhase::ResyncRequired { .. } => {}
            other => {
                return Err(EngineError::NotReady {
                    what: format!("VM {} cannot resynchronize while {other:?}", self.vm),
                });
            }
        }
        let started = Instant::now();
        // Pending logs are superseded: the resync brings everything they hold.
        logs::delete_pending(&mut self.state)?;
        self.hypervisor.start_tracking(&self.disks).await?;
        let resuming = self.state.resync_cycle.is_some();
        let maps_before = self.current_maps().await?;
        let cycle = self.next_cycle();
        self.state.resync_cycle = Some(cycle);
        self.save()?;
        let view = self
            .hypervisor
            .open_view(&self.disks, cycle, Quiesce::None)
            .await?;
        match self
            .resync_from(view.as_ref(), maps_before, resuming, unix_ms(now), progress)
            .await
        {
            Ok(mut report) => {
                view.close(CloseView::Commit).await?;
                report.duration = started.elapsed();
                Ok(report)
            }
            Err(e) => {
                if let Err(close) = view.close(CloseView::Abandon).await {
                    tracing::warn!(vm = %self.vm, error = %close, "closing the resync's view failed");
                }
                Err(e)
            }
        }
    }

    async fn resync_from(
        &mut self,
        view: &dyn View,
        mut targets: std::collections::BTreeMap<String, BlockMap>,
        resuming: bool,
        time_unix_ms: u64,
        progress: ProgressSink<'_>,
    ) -> Result<Report, EngineError> {
        let block = u64::from(self.settings.block_size_bytes);
        let chunk = (READ_CHUNK_BYTES / block).max(1) * block;
        let mut report = Report::default();
        let mut uploader = Uploader::new(
            self.store.clone(),
            self.vm.clone(),
            self.throttle.clone(),
            self.settings.upload_concurrency,
        );
        for info in view.disks().to_vec() {
            let disk = info.name.as_str();
            let map_error = |source| EngineError::BlockMap {
                disk: disk.to_owned(),
                source,
            };
            let disk_started = Instant::now();
            let report_progress = |done: u64| {
                progress(&Progress {
                    operation: "Resynchronize",
                    disk: disk.to_owned(),
                    bytes_done: done,
                    bytes_total: info.size_bytes * 2,
                    throughput_bytes_per_second: throughput(done, disk_started),
                })
            };
            let mut target = match targets.remove(disk) {
                Some(map) if map.image_size_bytes() == info.size_bytes => map,
                _ => {
                    self.store
                        .resize_disk(&self.vm, disk, info.size_bytes)
                        .await?;
                    maps::hash_replica(
                        self.store.as_ref(),
                        &self.vm,
                        disk,
                        &lifeboat_store::At::Live,
                        info.size_bytes,
                        self.settings.block_size_bytes,
                    )
                    .await?
                }
            };
            // Source map: read and hash what the view holds; unallocated space is zeros.
            let mut source = BlockMap::new_zeroed(
                HashAlgorithm::default(),
                self.settings.block_size_bytes,
                info.size_bytes,
            )
            .map_err(map_error)?;
            let mut hashed = 0;
            for range in maps::align(&view.allocated_extents(disk).await?, block, info.size_bytes) {
                let mut offset = range.start;
                while offset < range.end {
                    let len = chunk.min(range.end - offset);
                    let data = view.read(disk, offset, len).await?;
                    report.bytes_read += len;
                    source.update_range(offset, &data).map_err(map_error)?;
                    offset += len;
                    hashed += len;
                }
                report_progress(hashed.min(info.size_bytes));
            }
            if resuming {
                // NB: the range in flight when an earlier attempt stopped may hold writes
                // the saved map does not know: send it again, whatever the map says.
                if let Some((_, start, end)) = self
                    .state
                    .resync_intent
                    .clone()
                    .filter(|(d, _, _)| d == disk)
                {
                    let end = end.min(info.size_bytes);
                    if start < end {
                        self.copy_range(
                            view,
                            disk,
                            start..end,
                            chunk,
                            true,
                            &mut target,
                            &mut uploader,
                            &mut report,
                        )
                        .await?;
                    }
                }
            }
            let plan = plan_resync(&source, &target).map_err(map_error)?;
            let mut intent_end = 0;
            let mut done = 0;
            for planned in plan.ranges() {
                let (start, end) = (planned.offset_bytes, planned.end_bytes());
                if end > intent_end {
                    // Checkpoint: what is in flight lands, the map is saved, and the next
                    // window of the disk is declared before anything in it is written.
                    uploader.finish().await?;
                    self.store
                        .put_block_map(&self.vm, disk, maps::encode(TAG_RESYNC, &target))
                        .await?;
                    intent_end = end
                        .max(start.saturating_add(CHECKPOINT_BYTES))
                        .min(info.size_bytes);
                    self.state.resync_intent = Some((disk.to_owned(), start, intent_end));
                    self.save()?;
                }
                match planned.op {
                    RangeOp::Copy => {
                        let mut offset = start;
                        while offset < end {
                            let len = chunk.min(end - offset);
                            let data: Bytes = view.read(disk, offset, len).await?;
                            report.bytes_read += len;
                            target.update_range(offset, &data).map_err(map_error)?;
                            uploader.write(disk, offset, data).await?;
                            offset += len;
                        }
                    }
                    RangeOp::Zero => {
                        uploader.zero(disk, start, end - start).await?;
                        target
                            .update_range(start, &vec![0u8; (end - start) as usize])
                            .map_err(map_error)?;
                    }
                }
                done += end - start;
                report_progress(info.size_bytes + done.min(info.size_bytes));
            }
            uploader.finish().await?;
            self.store
                .put_block_map(&self.vm, disk, maps::encode(TAG_RESYNC, &target))
                .await?;
            self.state.resync_intent = None;
            self.save()?;
            report_progress(info.size_bytes * 2);
            targets.insert(disk.to_owned(), target);
        }
        report.bytes_sent = uploader.bytes_sent;
        report.bytes_zeroed = uploader.bytes_zeroed;
        self.store.flush(&self.vm).await?;
        let digests = targets
            .iter()
            .map(|(disk, map)| (disk.clone(), maps::digest(map)))
            .collect();
        let point = self
            .store
            .cut_point(
                &self.vm,
                NewPoint {
                    time_unix_ms,
                    cycle: view.cycle(),
                    consistency: Consistency::CrashConsistent,
                    digests,
                },
            )
            .await?;
        for (disk, map) in &targets {
            self.store
                .put_block_map(&self.vm, disk, maps::encode(&point.id, map))
                .await?;
        }
        report.pruned = self
            .store
            .prune(
                &self.vm,
                self.settings.retention.as_millis() as u64,
                time_unix_ms,
            )
            .await?;
        report.point = Some(point);
        self.state.resync_cycle = None;
        self.state.phase = EnginePhase::Protected;
        self.save()?;
        Ok(report)
    }
}
