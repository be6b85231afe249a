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
//! # Reading and hashing at once
//!
//! A disk compared in full is read through [`maps::hash_ranges`] in batches
//! ([`maps::read_batches`]: a long range [`VIEW_CHUNK_BYTES`] at a time, scattered blocks many
//! to one pipelined read): the next batch's read is in flight while the current one is
//! hashed on a blocking thread, long pieces spread over the cores, so a resync costs about
//! what reading the view costs. The blocks that differ are then sent by the same overlapped
//! reader as the initial copy ([`Replicator::copy_ranges`]), which also does the one-pass
//! compare-and-send of a disk whose changed blocks are known (below). This is the only
//! resync Lifeboat has: the agent's job, `lifeboat resync` and the `resync` benchmark all
//! run it.
//!
//! # Only the disks that need it
//!
//! A resync due only to lost tracking, with nothing unshipped pending, compares in full only
//! the disks whose tracking was lost (a raw disk after QEMU restarted, say). The others'
//! changes since the latest point are all in the view's dirty bitmap: just those blocks are
//! read, once, each compared with the stored map as it arrives and sent if it differs
//! ([`Sending::IfDiffers`]), so they cost what a cycle costs. The set is decided when the resync starts and kept in the state for a resumed
//! attempt, because a lost disk's new bitmap knows nothing of what was lost. Any other cause
//! (logs over the threshold, a corrupt log, a request) compares every disk.
//!
//! A re-protect's resync goes further when its disks carry a seed bitmap (a qcow2 failover
//! disk's, or one a planned failover left on the stopped source's disks) or, raw, a reflinked
//! twin of the point ([`crate::twin`]: a failover's or a failback's): the view freezes it,
//! and it names every block written since the point the replica was put back to, so only
//! those blocks are read, compared and sent, in the same one pass ([`View::changed_since`]).
//! The twins go when the re-protect ends.
//!
//! # Resuming
//!
//! The target map is saved with the `resync` tag at every checkpoint, after the writes
//! before it completed, together with the ranges about to be written (the intent: up to
//! `checkpoint_bytes` of them). An interrupted resync (a crash, a store outage) opens a new
//! view, rewrites the intent's ranges unconditionally, and plans again against the saved map:
//! what was already sent matches and is not sent again.

use std::ops::Range;
use std::time::{Instant, SystemTime};

use lifeboat_blockmap::{BlockMap, HashAlgorithm, RangeOp, plan_resync};
use lifeboat_store::Consistency;

use super::copy::Sending;
use super::maps::{self, TAG_RESYNC};
use super::{Progress, ProgressSink, Replicator, Report, VIEW_CHUNK_BYTES, throughput, unix_ms};
use crate::backend::{CloseView, DiskRef, Quiesce, Tracking, View};
use crate::error::EngineError;
use crate::state::EnginePhase;

/// The reason a cycle gives when a disk's tracking was lost or never started: the one cause of
/// a resync that can spare the disks whose tracking still holds.
pub(crate) const TRACKING_LOST: &str = "TrackingLost";

/// The disks a resync must compare in full (pure): only those whose tracking is not active
/// when the resync is due to lost tracking alone and nothing unshipped is pending (no sealed
/// log, no half-applied one); every disk otherwise.
pub(crate) fn disks_to_compare_in_full(
    phase: &EnginePhase,
    unshipped: bool,
    disks: &[DiskRef],
    tracking: &[Tracking],
) -> Vec<String> {
    let lost_only = matches!(phase, EnginePhase::ResyncRequired { reason } if reason.starts_with(TRACKING_LOST));
    disks
        .iter()
        .zip(tracking)
        .filter(|(_, t)| unshipped || !lost_only || **t != Tracking::Active)
        .map(|(d, _)| d.name.clone())
        .collect()
}

/// The most ranges one checkpoint window of a resync declares (they go into the state file).
const MAX_INTENT_RANGES: usize = 1024;

/// What a resync does with a range of its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Read it and send it: its blocks differ from the map's (the source hashed in full).
    Copy,
    /// Make it read as zeros in the store: the source reads zeros there, the replica not.
    Zero,
    /// Read it and send the blocks whose digest differs from the map's: the blocks tracking
    /// (or a seed bitmap) says were written, compared as they are read.
    Compare,
}

/// How many ranges of lengths `lens` (at least one) the next checkpoint window takes: ranges
/// until they hold `checkpoint_bytes`, at most [`MAX_INTENT_RANGES`] (pure). A window is
/// counted in the bytes it may write, not in the address space they span, so that blocks
/// scattered over a large disk (a re-protect's, a tracked resync's) cost one checkpoint, not
/// one per region they touch; a resumed resync sends the window's ranges again, only them.
fn intent_window(lens: impl IntoIterator<Item = u64>, checkpoint_bytes: u64) -> usize {
    let mut bytes = 0u64;
    let mut taken = 0;
    for len in lens.into_iter().take(MAX_INTENT_RANGES) {
        if taken > 0 && bytes >= checkpoint_bytes {
            break;
        }
        bytes = bytes.saturating_add(len);
        taken += 1;
    }
    taken
}

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
        let half_applied = self.state.applying;
        if half_applied {
            // NB: a cycle half applied (its logs may be gone already) left the live replica
            // ahead of the latest point: the latest point's block map does not describe it,
            // and comparing against that map would keep whatever the cycle wrote where the
            // source now differs. Put it back first, as `open` does after a crash.
            self.store.revert_to_latest_point(&self.vm).await?;
            self.state.applying = false;
            // A resync's saved map and intent described the replica before the revert (its
            // choice of disks to compare in full stands: it is about the tracking).
            if self.state.resync_cycle.take().is_some() {
                self.state.resync_intent = None;
                self.state.resync_intent_ranges.clear();
            }
            self.save()?;
        }
        let resuming = self.state.resync_cycle.is_some();
        // NB: decided before anything changes (the pending logs, the tracking), and only once
        // per resync: every later attempt keeps the first attempt's choice, even one that
        // failed before its view (the first attempt dropped the logs and restarted the
        // tracking, which then vouches for nothing before it).
        let full = match (resuming, self.state.resync_full_disks.take()) {
            (_, Some(full)) => full,
            (true, None) => self.disks.iter().map(|d| d.name.clone()).collect(),
            (false, None) => {
                let tracking = self.hypervisor.tracking(&self.disks).await?;
                let unshipped = !self.state.pending.is_empty() || half_applied;
                disks_to_compare_in_full(&self.state.phase, unshipped, &self.disks, &tracking)
            }
        };
        self.state.resync_full_disks = Some(full.clone());
        // Pending logs are superseded: the resync brings everything they hold (and a crash
        // from here on finds a resync to finish, not cycles to ship).
        if !matches!(self.state.phase, EnginePhase::ResyncRequired { .. }) {
            self.state.phase = EnginePhase::ResyncRequired {
                reason: "a resync was started".to_owned(),
            };
        }
        self.drop_pending()?;
        // The choice is durable before the tracking it was made from is restarted.
        self.save()?;
        self.hypervisor.start_tracking(&self.disks).await?;
        let maps_before = self.current_maps().await?;
        let cycle = self.next_cycle();
        self.state.resync_cycle = Some(cycle);
        self.save()?;
        let view = self
            .hypervisor
            .open_view(&self.disks, cycle, Quiesce::None)
            .await?;
        match self
            .resync_from(
                view.as_ref(),
                maps_before,
                &full,
                resuming,
                unix_ms(now),
                progress,
            )
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
        full: &[String],
        resuming: bool,
        time_unix_ms: u64,
        progress: ProgressSink<'_>,
    ) -> Result<Report, EngineError> {
        let block = u64::from(self.settings.block_size_bytes);
        let chunk = (VIEW_CHUNK_BYTES / block).max(1) * block;
        let mut report = Report::default();
        let mut uploader = self.uploader();
        if resuming && let Some((disk, start, end)) = self.state.resync_intent.clone() {
            // NB: the window in flight when an earlier attempt stopped may hold writes its
            // disk's saved map does not know: it is sent again first, whatever the map says,
            // and its map saved. Not when its disk comes round: the disks before it are
            // compared again, and their checkpoints would replace the mark. A disk whose map
            // is not trusted is re-hashed from the replica and needs nothing.
            let size = view
                .disks()
                .iter()
                .find(|d| d.name == disk)
                .map(|d| d.size_bytes);
            let ranges = match std::mem::take(&mut self.state.resync_intent_ranges) {
                ranges if ranges.is_empty() => vec![(start, end)],
                ranges => ranges,
            };
            if let (Some(size), Some(target)) = (size, targets.get_mut(&disk))
                && target.image_size_bytes() == size
            {
                let ranges: Vec<_> = ranges
                    .into_iter()
                    .map(|(start, end)| start..end.min(size))
                    .filter(|r| !r.is_empty())
                    .collect();
                self.copy_ranges(
                    view,
                    &disk,
                    &ranges,
                    chunk,
                    Sending::AllRewritingZeros,
                    target,
                    &mut uploader,
                    &mut report,
                )
                .await?;
                self.save_map_durably(&mut uploader, &disk, TAG_RESYNC, target)
                    .await?;
            }
            self.state.resync_intent = None;
            self.save()?;
        }
        // NB: a re-protect's first attempt may use the seed bitmaps its view froze (the
        // writes since its point); a resumed one compares in full (the first view removed them).
        let seed_point = super::reprotect::reprotecting_from(&self.state.phase)
            .filter(|_| !resuming)
            .map(str::to_owned);
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
            let stored = targets
                .remove(disk)
                .filter(|map| map.image_size_bytes() == info.size_bytes);
            let seeded = match &seed_point {
                Some(point) if stored.is_some() => view.changed_since(disk, point).await?,
                _ => None,
            };
            let incremental =
                stored.is_some() && (seeded.is_some() || !full.iter().any(|d| d == disk));
            let mut target = match stored {
                Some(map) => map,
                None => {
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
            // What to send. Where tracking (or a seed bitmap) vouches for every change since
            // the map, the changed blocks are the candidates: each is read once, compared with
            // the map and sent if it differs, in the same pass. Otherwise what the view holds
            // is read and hashed (unallocated space is zeros), compared with the map, and the
            // blocks that differ are read again to be sent.
            let steps: Vec<(Range<u64>, Step)> = if incremental {
                let changed = match seeded {
                    Some(changed) => {
                        tracing::info!(vm = %self.vm, disk, "re-protect: the disk's record of its writes since the point holds (a seed bitmap, or a raw file's twin); comparing only those blocks");
                        changed
                    }
                    None => {
                        tracing::info!(vm = %self.vm, disk, "resync: tracking holds; comparing only the changed blocks");
                        view.changed_extents(disk).await?
                    }
                };
                report_progress(info.size_bytes);
                maps::align(&changed, block, info.size_bytes)
                    .into_iter()
                    .map(|range| (range, Step::Compare))
                    .collect()
            } else {
                report.disks_compared_in_full.push(disk.to_owned());
                let mut source = BlockMap::new_zeroed(
                    HashAlgorithm::default(),
                    self.settings.block_size_bytes,
                    info.size_bytes,
                )
                .map_err(map_error)?;
                let ranges =
                    maps::align(&view.allocated_extents(disk).await?, block, info.size_bytes);
                report.bytes_read += maps::hash_ranges(
                    &mut source,
                    disk,
                    &ranges,
                    chunk,
                    |pieces| async move { Ok(view.read_many(disk, &pieces).await?) },
                    |hashed| report_progress(hashed.min(info.size_bytes)),
                )
                .await?;
                let plan = plan_resync(&source, &target).map_err(map_error)?;
                plan.ranges()
                    .iter()
                    .map(|planned| {
                        let step = match planned.op {
                            RangeOp::Copy => Step::Copy,
                            RangeOp::Zero => Step::Zero,
                        };
                        (planned.offset_bytes..planned.end_bytes(), step)
                    })
                    .collect()
            };
            let mut done = 0;
            let mut index = 0;
            while index < steps.len() {
                // Checkpoint: what is in flight lands, the map is saved, and the next window
                // of the disk (its ranges to write) is declared before anything in it is
                // written.
                self.save_map_durably(&mut uploader, disk, TAG_RESYNC, &target)
                    .await?;
                let window_end = index
                    + intent_window(
                        steps[index..]
                            .iter()
                            .map(|(range, _)| range.end - range.start),
                        self.settings.checkpoint_bytes,
                    );
                let window = &steps[index..window_end];
                let (first, last) = (&window[0].0, &window[window.len() - 1].0);
                self.state.resync_intent = Some((disk.to_owned(), first.start, last.end));
                self.state.resync_intent_ranges = window
                    .iter()
                    .map(|(range, _)| (range.start, range.end))
                    .collect();
                self.save()?;
                let (mut copies, mut compares) = (Vec::new(), Vec::new());
                for (range, step) in window {
                    match step {
                        Step::Copy => copies.push(range.clone()),
                        Step::Compare => compares.push(range.clone()),
                        // NB: before the window's reads are queued, which never overlap it.
                        Step::Zero => {
                            let len = range.end - range.start;
                            uploader.zero(disk, range.start, len).await?;
                            target.zero_range(range.start, len).map_err(map_error)?;
                        }
                    }
                    done += range.end - range.start;
                }
                for (ranges, sending) in [
                    (copies, Sending::AllRewritingZeros),
                    (compares, Sending::IfDiffers),
                ] {
                    if !ranges.is_empty() {
                        self.copy_ranges(
                            view,
                            disk,
                            &ranges,
                            chunk,
                            sending,
                            &mut target,
                            &mut uploader,
                            &mut report,
                        )
                        .await?;
                    }
                }
                report_progress(info.size_bytes + done.min(info.size_bytes));
                index = window_end;
            }
            self.save_map_durably(&mut uploader, disk, TAG_RESYNC, &target)
                .await?;
            self.state.resync_intent = None;
            self.state.resync_intent_ranges.clear();
            self.save()?;
            report_progress(info.size_bytes * 2);
            targets.insert(disk.to_owned(), target);
        }
        report.bytes_sent = uploader.bytes_sent;
        report.bytes_zeroed = uploader.bytes_zeroed;
        let point = self
            .cut_point_with_maps(
                &targets,
                time_unix_ms,
                view.cycle(),
                Consistency::CrashConsistent,
            )
            .await?;
        report.pruned = self
            .store
            .prune(
                &self.vm,
                self.settings.retention.as_millis() as u64,
                time_unix_ms,
            )
            .await?;
        report.point = Some(point);
        let reprotected = super::reprotect::reprotecting_from(&self.state.phase).is_some();
        self.state.resync_cycle = None;
        self.state.resync_full_disks = None;
        self.state.phase = EnginePhase::Protected;
        self.save()?;
        if reprotected {
            // NB: a raw disk's twin held the point the re-protect started from; tracking
            // records the writes from here on.
            self.drop_twins();
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_window_counts_the_bytes_to_write_not_the_span() {
        use lifeboat_blockmap::PlannedRange;
        fn lens(planned: &[PlannedRange]) -> impl Iterator<Item = u64> + '_ {
            planned.iter().map(|r| r.len_bytes)
        }
        let block = 65_536;
        // Scattered blocks far apart: one window holds them until it holds the bytes.
        let scattered: Vec<PlannedRange> = (0..100u64)
            .map(|i| PlannedRange {
                offset_bytes: i * 1024 * block,
                len_bytes: block,
                op: if i % 2 == 0 {
                    RangeOp::Copy
                } else {
                    RangeOp::Zero
                },
            })
            .collect();
        assert_eq!(intent_window(lens(&scattered), 10 * block), 10);
        assert_eq!(intent_window(lens(&scattered), 1000 * block), 100);
        // A range larger than the window is a window alone; a window is never empty.
        let large = [
            PlannedRange {
                offset_bytes: 0,
                len_bytes: 50 * block,
                op: RangeOp::Copy,
            },
            PlannedRange {
                offset_bytes: 60 * block,
                len_bytes: block,
                op: RangeOp::Copy,
            },
        ];
        assert_eq!(intent_window(lens(&large), 10 * block), 1);
        assert_eq!(intent_window(lens(&large), 0), 1);
        // The range count bound keeps the state file small.
        let tiny: Vec<PlannedRange> = (0..5000u64)
            .map(|i| PlannedRange {
                offset_bytes: i * 2 * block,
                len_bytes: block,
                op: RangeOp::Copy,
            })
            .collect();
        assert_eq!(intent_window(lens(&tiny), u64::MAX), MAX_INTENT_RANGES);
    }

    fn disks() -> Vec<DiskRef> {
        ["root", "data"]
            .iter()
            .map(|n| DiskRef {
                name: (*n).into(),
                path: format!("/vm/{n}"),
                node: Some((*n).into()),
            })
            .collect()
    }

    fn lost() -> EnginePhase {
        EnginePhase::ResyncRequired {
            reason: format!("{TRACKING_LOST}: disk \"root\": the bitmap is gone"),
        }
    }

    #[test]
    fn lost_tracking_alone_spares_the_disks_whose_tracking_holds() {
        let tracking = [Tracking::Lost("gone".into()), Tracking::Active];
        assert_eq!(
            disks_to_compare_in_full(&lost(), false, &disks(), &tracking),
            ["root"]
        );
        let absent = [Tracking::Active, Tracking::Absent];
        assert_eq!(
            disks_to_compare_in_full(&lost(), false, &disks(), &absent),
            ["data"]
        );
    }

    #[test]
    fn anything_else_compares_every_disk() {
        let tracking = [Tracking::Lost("gone".into()), Tracking::Active];
        // Unshipped changes are in logs the resync drops, not in any bitmap.
        assert_eq!(
            disks_to_compare_in_full(&lost(), true, &disks(), &tracking),
            ["root", "data"]
        );
        for phase in [
            EnginePhase::Protected,
            EnginePhase::ResyncRequired {
                reason: "LogThreshold: 51 % of the disk".into(),
            },
            EnginePhase::ResyncRequired {
                reason: "CorruptLog: disk \"data\"".into(),
            },
        ] {
            assert_eq!(
                disks_to_compare_in_full(&phase, false, &disks(), &tracking),
                ["root", "data"],
                "{phase:?}"
            );
        }
    }
}
