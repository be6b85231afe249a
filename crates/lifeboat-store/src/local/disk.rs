//! One replica disk of the local store: its live file (a sparse file, opened a second time
//! for direct I/O where the file system allows) and its undo segments by point sequence
//! number. Writes save the pre-images a point still needs ([`Disk::preserve_unsynced`]) before they
//! overwrite the live file; reads at a point take each granule from the first segment, from
//! the point's own onwards, that holds it, and from the live file otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::ops::{Range, RangeBounds};
use std::path::PathBuf;

use super::Access;
use super::io::{
    PositionalIo, create_dir_durable, direct_aligned, on_threads, open_direct, sync_folder,
};
use super::undo::{GRANULE_BYTES, Segment};
#[cfg(doc)]
use crate::ReplicaStore;
use crate::StoreError;

/// The most the pre-images of a write are read from the live file in one request.
const PRESERVE_READ_BYTES: u64 = 1024 * 1024;

/// The most pre-images read (and held in memory) before they are appended to their segment.
const PRESERVE_ROUND_BYTES: u64 = 16 * 1024 * 1024;

/// One replica disk: its live file and its undo segments by point sequence number.
#[derive(Debug)]
pub(super) struct Disk {
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// The same file opened for direct I/O (bypassing the page cache), where the file
    /// system supports it: aligned bulk writes go there.
    pub(super) direct: Option<File>,
    pub(super) size_bytes: u64,
    pub(super) undo_dir: PathBuf,
    /// The segments opened so far (indexed, their torn tails cut).
    pub(super) segments: BTreeMap<u64, Segment>,
    /// The segments on disk that a writing store has not opened yet: it opens each when
    /// first needed ([`Disk::open_segments`]), because opening reads and checks every record,
    /// and the points of a long history would cost a read of all their pre-images before
    /// the VM's first operation. A read-only store opens them all at its load.
    pub(super) unopened: BTreeSet<u64>,
    access: Access,
}

impl Disk {
    /// Open a replica disk's live file; `create_size` creates it (and syncs its folder) at
    /// that size. [`Access::ReadOnly`] opens it for reading only, without direct I/O.
    pub(super) fn open(
        path: PathBuf,
        undo_dir: PathBuf,
        create_size: Option<u64>,
        access: Access,
    ) -> Result<Disk, StoreError> {
        let writable = access == Access::Write;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable && create_size.is_some())
            .truncate(false)
            .open(&path)
            .map_err(StoreError::io("open replica disk", &path))?;
        if let Some(size) = create_size.filter(|_| writable) {
            file.set_len(size)
                .map_err(StoreError::io("size replica disk", &path))?;
            if let Some(folder) = path.parent() {
                sync_folder(folder)?;
            }
        }
        let size_bytes = file
            .metadata()
            .map_err(StoreError::io("stat replica disk", &path))?
            .len();
        let direct = if writable { open_direct(&path) } else { None };
        Ok(Disk {
            path,
            file,
            direct,
            size_bytes,
            undo_dir,
            segments: BTreeMap::new(),
            unopened: BTreeSet::new(),
            access,
        })
    }

    pub(super) fn segment_path(&self, seq: u64) -> PathBuf {
        self.undo_dir.join(format!("{seq:012}.undo"))
    }

    /// Open the segments in `seqs` that are on disk and not open yet (a torn record at
    /// the end cut off, as [`Segment::open`] does).
    pub(super) fn open_segments(&mut self, seqs: impl RangeBounds<u64>) -> Result<(), StoreError> {
        let due: Vec<u64> = self.unopened.range(seqs).copied().collect();
        for seq in due {
            let segment = Segment::open(self.segment_path(seq), self.access)?;
            self.unopened.remove(&seq);
            self.segments.insert(seq, segment);
        }
        Ok(())
    }

    /// Forget segment `seq` (its file is being removed).
    pub(super) fn drop_segment(&mut self, seq: u64) {
        self.segments.remove(&seq);
        self.unopened.remove(&seq);
    }

    /// Segment `seq`, opened, or created when there is none.
    pub(super) fn segment(&mut self, seq: u64) -> Result<&mut Segment, StoreError> {
        self.open_segments(seq..=seq)?;
        if !self.segments.contains_key(&seq) {
            create_dir_durable(&self.undo_dir, "create undo folder")?;
            let path = self.segment_path(seq);
            let created = !path.exists();
            let segment = Segment::open(path, Access::Write)?;
            // The new segment's name is durable before a pre-image in it protects anything.
            if created {
                sync_folder(&self.undo_dir)?;
            }
            self.segments.insert(seq, segment);
        }
        self.segments
            .get_mut(&seq)
            .ok_or_else(|| StoreError::InvalidRequest {
                what: "segment vanished".into(),
            })
    }

    /// Write `data` at `offset` of the live file: straight to the device when the buffer,
    /// offset and length suit direct I/O, through the page cache otherwise. Either way the
    /// data is durable at the next [`ReplicaStore::flush`] (its fsync flushes the device's
    /// cache and the file's metadata), and later reads through `file` see it (the kernel
    /// drops cached pages of a range written directly).
    pub(super) fn write_live(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        if let Some(direct) = &self.direct
            && direct_aligned(data, offset)
        {
            match direct.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // NB: a device with a logical block larger than DIRECT_IO_ALIGN, or a file
                // system that opens O_DIRECT files and then refuses their writes.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(StoreError::io("write replica disk", &self.path)(e)),
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(StoreError::io("write replica disk", &self.path))
    }

    pub(super) fn read_live(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        // Past the live end (a point larger than the disk is now) reads as zeros.
        let live = self.size_bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[live..].fill(0);
        if live > 0 {
            self.file
                .read_exact_at(&mut buf[..live], offset)
                .map_err(StoreError::io("read replica disk", &self.path))?;
        }
        Ok(())
    }

    /// Save the pre-images of the granules in `ranges` (sorted, not overlapping) that point
    /// `seq` (of size `point_size_bytes`) still reads from the live file, without syncing
    /// them: the caller syncs the segment (it is marked [`Segment::unsynced`]) before
    /// overwriting the ranges.
    ///
    /// Runs of granules are read from the live file at once (up to [`PRESERVE_READ_BYTES`]),
    /// several runs at a time ([`on_threads`]), up to [`PRESERVE_ROUND_BYTES`] of them before
    /// they are appended: the live file was written with direct I/O and is mostly not in the
    /// page cache, so a read per granule, or one read at a time, would cost the device a
    /// request, or a round trip, per piece.
    pub(super) fn preserve_unsynced(
        &mut self,
        seq: u64,
        point_size_bytes: u64,
        ranges: &[Range<u64>],
    ) -> Result<(), StoreError> {
        // NB: opened (or created) once here, not at every granule below; preserve_many
        // syncs it afterwards whatever this appends.
        self.segment(seq)?;
        let held = |disk: &Disk, granule: u64| {
            disk.segments
                .get(&seq)
                .is_some_and(|s| s.index.contains_key(&granule))
        };
        let mut runs: Vec<Range<u64>> = Vec::new();
        let mut round_bytes = 0;
        // NB: two ranges can share a granule (writes are 512-byte aligned): it is saved once.
        let mut planned_to = 0;
        for range in ranges {
            let end = range.end.min(point_size_bytes);
            let mut granule = (range.start / GRANULE_BYTES * GRANULE_BYTES).max(planned_to);
            while granule < end {
                if held(self, granule) {
                    granule += GRANULE_BYTES;
                    continue;
                }
                // The run of granules from here that the segment lacks.
                let mut run_end = granule;
                while run_end < end
                    && run_end - granule < PRESERVE_READ_BYTES
                    && !held(self, run_end)
                {
                    run_end += GRANULE_BYTES;
                }
                let run_end = run_end.min(point_size_bytes);
                round_bytes += run_end - granule;
                runs.push(granule..run_end);
                if round_bytes >= PRESERVE_ROUND_BYTES {
                    self.save_pre_images(seq, &runs)?;
                    runs.clear();
                    round_bytes = 0;
                }
                granule = run_end;
            }
            planned_to = planned_to.max(granule);
        }
        self.save_pre_images(seq, &runs)
    }

    /// Read `runs` of the live file, several at a time, and append them to segment `seq` in
    /// order.
    fn save_pre_images(&mut self, seq: u64, runs: &[Range<u64>]) -> Result<(), StoreError> {
        let images = on_threads(runs, |run| {
            let mut old = vec![0; (run.end - run.start) as usize];
            self.read_live(run.start, &mut old)?;
            Ok(old)
        })?;
        let segment = self.segment(seq)?;
        for (run, old) in runs.iter().zip(&images) {
            segment.append_run(run.start, old)?;
        }
        Ok(())
    }

    /// Read at a point: `from_seq` is the point's own segment; later segments hold what it
    /// saw of granules overwritten after later points. The segments from `from_seq` on must be
    /// open ([`Disk::open_segments`]); it changes nothing, so several reads run at once.
    pub(super) fn read_at(
        &self,
        from_seq: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let mut pos = 0usize;
        // Where the run of granules no segment holds (read from the live file, in one read
        // when the run ends) began.
        let mut live_from: Option<usize> = None;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let granule = at / GRANULE_BYTES * GRANULE_BYTES;
            let within = (at - granule) as usize;
            let take = (GRANULE_BYTES as usize - within).min(buf.len() - pos);
            let mut found = None;
            for (_, segment) in self.segments.range(from_seq..) {
                if let Some(data) = segment.read_granule(granule)? {
                    found = Some(data);
                    break;
                }
            }
            match found {
                Some(data) => {
                    if let Some(from) = live_from.take() {
                        self.read_live(offset + from as u64, &mut buf[from..pos])?;
                    }
                    let out = &mut buf[pos..pos + take];
                    out.fill(0);
                    let have = data.len().saturating_sub(within).min(out.len());
                    out[..have].copy_from_slice(&data[within..within + have]);
                }
                None => {
                    live_from.get_or_insert(pos);
                }
            }
            pos += take;
        }
        if let Some(from) = live_from {
            self.read_live(offset + from as u64, &mut buf[from..])?;
        }
        Ok(())
    }

    pub(super) fn live_data_ranges(&self) -> Result<Vec<Range<u64>>, StoreError> {
        super::io::data_ranges(&self.file, self.size_bytes)
            .map_err(StoreError::io("find data in replica disk", &self.path))
    }
}
