//! Initial replication: copy every disk from a point-in-time view, one disk after another,
//! skipping unallocated and all-zero ranges, with the policy's requests in flight, progress
//! as it goes, and a cursor so that an interrupted copy resumes instead of starting over.
//!
//! ```text
//!  disk 0 [##########] done      cursor = (view cycle c, disk 1, offset)
//!  disk 1 [#####-----] copying   resume: open view c'; bring [0, offset) of disks 0..=1 up
//!  disk 2 [----------]           to c' with the changes since c; copy the rest from c'
//! ```

use std::time::Instant;

use lifeboat_blockmap::{BlockMap, HashAlgorithm, digest_blocks, is_zero};
use lifeboat_store::At;

use super::maps::{self, TAG_COPY};
use super::upload::Uploader;
use super::{Progress, ProgressSink, Replicator, Report, VIEW_CHUNK_BYTES, throughput};
use crate::backend::{CloseView, Quiesce, Tracking, View};
use crate::error::EngineError;
use crate::state::{CopyCursor, EnginePhase};

impl Replicator {
    /// Run (or resume) the initial copy. Afterwards the VM is `Copied`: the next
    /// [`Replicator::run_cycle`] ships what changed meanwhile and cuts the first point.
    ///
    /// # Errors
    ///
    /// Hypervisor and store failures; the cursor keeps what was done.
    pub async fn initial_copy(
        &mut self,
        progress: ProgressSink<'_>,
    ) -> Result<Report, EngineError> {
        if self.state.phase != EnginePhase::Enabled {
            return Err(EngineError::NotReady {
                what: format!("VM {} is not waiting for its initial copy", self.vm),
            });
        }
        let started = Instant::now();
        let mut resume = self.state.copy.clone();
        let tracking = self.hypervisor.tracking(&self.disks).await?;
        if tracking.iter().any(|t| *t != Tracking::Active) {
            // NB: tracking lost since the copy started (a crash of the host) no longer knows
            // what changed in what was copied: start tracking anew and copy everything
            // again, rewriting what is there. The cursor is forgotten durably before the
            // tracking restarts: a crash in between must not resume from it on tracking
            // that looks whole.
            resume = None;
            if self.state.copy.take().is_some() {
                self.save()?;
            }
            self.hypervisor.start_tracking(&self.disks).await?;
        }
        let cycle = self.next_cycle();
        self.save()?;
        let view = self
            .hypervisor
            .open_view(&self.disks, cycle, Quiesce::None)
            .await?;
        let result = self.copy_from(view.as_ref(), resume, progress).await;
        match result {
            Ok(mut report) => {
                view.close(CloseView::Commit).await?;
                self.state.copy = None;
                self.set_phase(EnginePhase::Copied)?;
                report.duration = started.elapsed();
                Ok(report)
            }
            Err(e) => {
                // The changes frozen by this view belong to the copy's next attempt.
                if let Err(close) = view.close(CloseView::Abandon).await {
                    tracing::warn!(vm = %self.vm, error = %close, "closing the copy's view failed");
                }
                Err(e)
            }
        }
    }

    async fn copy_from(
        &mut self,
        view: &dyn View,
        resume: Option<CopyCursor>,
        progress: ProgressSink<'_>,
    ) -> Result<Report, EngineError> {
        let block = u64::from(self.settings.block_size_bytes);
        let chunk = (VIEW_CHUNK_BYTES / block).max(1) * block;
        let mut uploader = self.uploader();
        let mut report = Report::default();
        let disks = view.disks().to_vec();
        let start = resume.clone().unwrap_or_default();
        for (index, info) in disks.iter().enumerate() {
            let disk = info.name.as_str();
            let map_error = |source| EngineError::BlockMap {
                disk: disk.to_owned(),
                source,
            };
            let resumed = resume.is_some();
            if index < start.disk_index {
                // An earlier view copied this disk whole: bring it up to this view (the
                // changes since are in this view's changed extents, and only there: closing
                // this view forgets them). Without a trusted map, copy it again.
                let trusted = maps::load_trusted(
                    self.store.as_ref(),
                    &self.vm,
                    disk,
                    info.size_bytes,
                    self.settings.block_size_bytes,
                    &[TAG_COPY],
                )
                .await?;
                if let Some(mut map) = trusted {
                    self.copy_changed(
                        view,
                        disk,
                        info.size_bytes,
                        chunk,
                        &mut map,
                        &mut uploader,
                        &mut report,
                    )
                    .await?;
                    self.save_map_durably(&mut uploader, disk, TAG_COPY, &map)
                        .await?;
                    continue;
                }
            }
            let mut map = if resumed {
                maps::load_trusted(
                    self.store.as_ref(),
                    &self.vm,
                    disk,
                    info.size_bytes,
                    self.settings.block_size_bytes,
                    &[TAG_COPY],
                )
                .await?
            } else {
                None
            };
            let mut from = if index == start.disk_index {
                start.offset
            } else {
                0
            };
            if map.is_none() {
                // Without the map of what was copied, start this disk over.
                from = 0;
            }
            let mut map = match map.take() {
                Some(map) => map,
                None => BlockMap::new_zeroed(
                    HashAlgorithm::default(),
                    self.settings.block_size_bytes,
                    info.size_bytes,
                )
                .map_err(map_error)?,
            };
            if resumed && from > 0 {
                // Bring what an earlier view copied up to this view.
                self.copy_changed(
                    view,
                    disk,
                    from,
                    chunk,
                    &mut map,
                    &mut uploader,
                    &mut report,
                )
                .await?;
            }
            // A resumed copy may find stale data past its cursor, and a fresh copy into a
            // replica kept from an earlier protection (disabled with the replica kept, then
            // enabled again) finds that protection's data: either rewrites every range,
            // zeros included. Decided before anything of this disk is written. A brand-new
            // replica has no data ranges and reads as zeros already: its copy keeps skipping
            // zeros and gaps, at no extra cost (one listing of its ranges).
            let rewrite = resumed
                || !self
                    .store
                    .data_ranges(&self.vm, disk, &At::Live)
                    .await?
                    .is_empty();
            let allocated =
                maps::align(&view.allocated_extents(disk).await?, block, info.size_bytes);
            let disk_started = Instant::now();
            let mut last_checkpoint = from;
            let mut next = from;
            for range in allocated.iter().filter(|r| r.end > from) {
                let range = range.start.max(from)..range.end;
                if rewrite && next < range.start {
                    // NB: the map too: a resumed copy's map may hold what an earlier copy
                    // found there.
                    uploader.zero(disk, next, range.start - next).await?;
                    map.zero_range(next, range.start - next)
                        .map_err(map_error)?;
                }
                self.copy_ranges(
                    view,
                    disk,
                    std::slice::from_ref(&range),
                    chunk,
                    if rewrite {
                        Sending::AllRewritingZeros
                    } else {
                        Sending::All
                    },
                    &mut map,
                    &mut uploader,
                    &mut report,
                )
                .await?;
                next = range.end;
                let position = range.end;
                progress(&Progress {
                    operation: "InitialReplication",
                    disk: disk.to_owned(),
                    bytes_done: position,
                    bytes_total: info.size_bytes,
                    throughput_bytes_per_second: throughput(position - from, disk_started),
                });
                if position - last_checkpoint >= self.settings.checkpoint_bytes {
                    // NB: durable before the map and the cursor claim it: a resumed copy
                    // skips what they claim.
                    self.save_map_durably(&mut uploader, disk, TAG_COPY, &map)
                        .await?;
                    self.state.copy = Some(CopyCursor {
                        cycle: view.cycle(),
                        disk_index: index,
                        offset: position,
                    });
                    self.save()?;
                    last_checkpoint = position;
                }
            }
            if rewrite && next < info.size_bytes {
                uploader.zero(disk, next, info.size_bytes - next).await?;
                map.zero_range(next, info.size_bytes - next)
                    .map_err(map_error)?;
            }
            self.save_map_durably(&mut uploader, disk, TAG_COPY, &map)
                .await?;
            self.state.copy = Some(CopyCursor {
                cycle: view.cycle(),
                disk_index: index + 1,
                offset: 0,
            });
            self.save()?;
            progress(&Progress {
                operation: "InitialReplication",
                disk: disk.to_owned(),
                bytes_done: info.size_bytes,
                bytes_total: info.size_bytes,
                throughput_bytes_per_second: throughput(info.size_bytes - from, disk_started),
            });
        }
        self.store.flush(&self.vm).await?;
        report.bytes_sent = uploader.bytes_sent;
        report.bytes_zeroed = uploader.bytes_zeroed;
        Ok(report)
    }

    /// Bring the first `end` bytes of `disk`, which an earlier view copied, up to `view`:
    /// the blocks `view` changed there are copied again, whole, zeros written.
    #[allow(clippy::too_many_arguments)]
    async fn copy_changed(
        &self,
        view: &dyn View,
        disk: &str,
        end: u64,
        chunk: u64,
        map: &mut BlockMap,
        uploader: &mut Uploader,
        report: &mut Report,
    ) -> Result<(), EngineError> {
        let block = u64::from(map.block_size_bytes());
        let ranges = maps::align(&view.changed_extents(disk).await?, block, end);
        self.copy_ranges(
            view,
            disk,
            &ranges,
            chunk,
            Sending::AllRewritingZeros,
            map,
            uploader,
            report,
        )
        .await
    }

    /// Copy `ranges` (whole blocks, sorted) of `disk` from the view, in batches of pieces
    /// of at most `chunk` ([`maps::read_batches`]: a large range a chunk at a time, scattered
    /// blocks many to one pipelined read): the blocks `sending` picks are sent, runs of
    /// non-zero blocks written, runs of zero blocks skipped, or zeroed in the store where
    /// stale data may be there; `map` follows what was read.
    ///
    /// The read of the next batch is in flight while a batch is hashed and queued for the
    /// store: queueing waits for a free upload slot whenever the store falls behind, and the
    /// source would otherwise sit idle meanwhile (one batch's buffers more in memory).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn copy_ranges(
        &self,
        view: &dyn View,
        disk: &str,
        ranges: &[std::ops::Range<u64>],
        chunk: u64,
        sending: Sending,
        map: &mut BlockMap,
        uploader: &mut Uploader,
        report: &mut Report,
    ) -> Result<(), EngineError> {
        let block = map.block_size_bytes() as usize;
        let map_error = |source| EngineError::BlockMap {
            disk: disk.to_owned(),
            source,
        };
        let mut batches = maps::read_batches(ranges, chunk, chunk).into_iter();
        let mut current = read_batch(view, disk, batches.next()).await?;
        while let Some(batch) = current.take() {
            let process = async {
                for ((offset, len), data) in batch {
                    report.bytes_read += len;
                    let runs = if sending == Sending::IfDiffers {
                        let digests = digest_blocks(map.algorithm(), block as u32, &data, 1);
                        let runs = differing_runs(map, offset, data.len(), &digests, block);
                        for run in &runs {
                            let first = run.start / block;
                            let blocks = &digests[first..first + run.len().div_ceil(block)];
                            map.set_digests(offset + run.start as u64, run.len() as u64, blocks)
                                .map_err(map_error)?;
                        }
                        runs
                    } else {
                        map.update_range(offset, &data).map_err(map_error)?;
                        std::iter::once(0..data.len()).collect()
                    };
                    for run in runs {
                        for (piece, zero) in zero_runs(&data[run.clone()], block) {
                            let piece = run.start + piece.start..run.start + piece.end;
                            let at = offset + piece.start as u64;
                            if !zero {
                                uploader.write(disk, at, data.slice(piece)).await?;
                            } else if sending != Sending::All {
                                uploader.zero(disk, at, piece.len() as u64).await?;
                            }
                        }
                    }
                }
                Ok::<(), EngineError>(())
            };
            // NB: the read first, so that its requests go out before the hashing starts.
            let (next, processed) = tokio::join!(read_batch(view, disk, batches.next()), process);
            processed?;
            current = next?;
        }
        Ok(())
    }
}

/// Read `batch` of `disk` from the view, if there is one: each piece with its data.
async fn read_batch(
    view: &dyn View,
    disk: &str,
    batch: Option<Vec<(u64, u64)>>,
) -> Result<Option<Vec<((u64, u64), bytes::Bytes)>>, EngineError> {
    let Some(batch) = batch else {
        return Ok(None);
    };
    let data = view.read_many(disk, &batch).await?;
    maps::check_read(disk, &batch, &data)?;
    Ok(Some(batch.into_iter().zip(data).collect()))
}

/// Which of the blocks [`Replicator::copy_ranges`] reads it sends to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sending {
    /// Every block; runs of zero blocks are skipped (the replica reads zeros there).
    All,
    /// Every block; runs of zero blocks are zeroed in the store (stale data may be there).
    AllRewritingZeros,
    /// Only the blocks whose digest differs from the map's (zero ones among them zeroed in
    /// the store): a resync's candidate blocks compared and sent in the one read.
    IfDiffers,
}

/// The byte ranges of a piece of `len` bytes at `offset` (whose blocks of `block` bytes have
/// `digests`) that cover the maximal runs of blocks whose digest differs from `map`'s, in
/// order (pure).
fn differing_runs(
    map: &BlockMap,
    offset: u64,
    len: usize,
    digests: &[lifeboat_blockmap::BlockDigest],
    block: usize,
) -> Vec<std::ops::Range<usize>> {
    let block = block.max(1);
    let first = offset / block as u64;
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, digest) in digests.iter().enumerate() {
        if map.digest(first + i as u64) == Some(*digest) {
            continue;
        }
        let (start, end) = (i * block, ((i + 1) * block).min(len));
        match runs.last_mut() {
            Some(run) if run.end == start => run.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

/// `data` cut into maximal runs of whole `block`s (the last one may be short) that are all
/// zeros or all not, in order: `(range, zero)`.
fn zero_runs(data: &[u8], block: usize) -> Vec<(std::ops::Range<usize>, bool)> {
    let block = block.max(1);
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    for (i, piece) in data.chunks(block).enumerate() {
        let start = i * block;
        let zero = is_zero(piece);
        match runs.last_mut() {
            Some((run, z)) if *z == zero => run.end = start + piece.len(),
            _ => runs.push((start..start + piece.len(), zero)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::{differing_runs, zero_runs};
    use lifeboat_blockmap::{BlockMap, HashAlgorithm, digest_blocks};

    #[test]
    fn differing_runs_cover_the_blocks_whose_digest_changed_and_merge_neighbours() {
        const B: usize = 4096;
        // A 10-block image whose last block is half a block.
        let old: Vec<u8> = (0..9 * B + B / 2).map(|i| (i % 251) as u8 + 1).collect();
        let mut map = BlockMap::new_zeroed(HashAlgorithm::default(), B as u32, old.len() as u64)
            .unwrap_or_else(|e| panic!("{e}"));
        map.update_range(0, &old).unwrap_or_else(|e| panic!("{e}"));
        let mut new = old.clone();
        new[2 * B + 1] ^= 0xFF; // block 2
        new[3 * B + 5] ^= 0xFF; // block 3
        new[7 * B..8 * B].fill(0); // block 7, now zeros
        new[9 * B + 7] ^= 0xFF; // the short last block
        // A piece of blocks 2..10.
        let piece = &new[2 * B..];
        let digests = digest_blocks(HashAlgorithm::default(), B as u32, piece, 1);
        assert_eq!(
            differing_runs(&map, 2 * B as u64, piece.len(), &digests, B),
            vec![0..2 * B, 5 * B..6 * B, 7 * B..7 * B + B / 2]
        );
        // The same bytes again: nothing differs.
        let same = digest_blocks(HashAlgorithm::default(), B as u32, &old[2 * B..], 1);
        assert!(differing_runs(&map, 2 * B as u64, piece.len(), &same, B).is_empty());
    }

    #[test]
    fn zero_runs_merge_neighbouring_blocks_of_a_kind() {
        let mut data = vec![0u8; 10];
        data[4] = 1; // block 2 of 2-byte blocks
        data[6] = 1; // block 3
        assert_eq!(
            zero_runs(&data, 2),
            vec![(0..4, true), (4..8, false), (8..10, true)]
        );
        assert_eq!(zero_runs(&data[..5], 2), vec![(0..4, true), (4..5, false)]);
        assert_eq!(zero_runs(&[], 4), vec![]);
        assert_eq!(zero_runs(&[7; 8], 4), vec![(0..8, false)]);
    }
}
