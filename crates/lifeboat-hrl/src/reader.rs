//! Reading a log: validating it and yielding its writes in order.
//!
//! ```text
//! sealed (EOLLocation != 0):            unsealed (EOLLocation == 0):
//!   last = EOLLocation - MetadataSize     from 4096, find the next block whose back-link,
//!   walk back-links to the first block    checksums, data lengths and data checksums hold;
//!   every link must describe the file     stop at the first gap: a `Recovery` says where
//!   then read forward                     then read forward
//! ```
//!
//! [`HrlReader::open`] validates everything before a single write is handed out: the header,
//! every metadata block and entry checksum, the layout of the chain, and the DataChecksum of
//! every entry (streamed, without holding the data). [`HrlReader::writes`] then reads each
//! write's data and checks its DataChecksum again, because the source may have changed.
//!
//! # Guarantees
//!
//! - A write is yielded only if its block, its entry and its data checksum hold, and every
//!   earlier block of the log does too.
//! - A sealed log whose chain fails validation is an error, never silently cut.
//! - Hostile input cannot make the reader panic, loop forever, or allocate more than the size
//!   of the input: every offset and length is checked against the file length before use,
//!   back-links must strictly decrease, and entry counts are bounded by the block capacity.
//!
//! # Caveats
//!
//! - DataChecksum 0 means "not computed" by default (Hyper-V's logs print 0), so such writes
//!   are unverified; see [`DataChecksumPolicy`]. Lifeboat's writer always fills it.
//! - Recovery of an unsealed log works per metadata block: a batch spanning several blocks may
//!   be recovered in part.
//! - Recovery scans the bytes after the last good block for the next one. Data that happens to
//!   contain a well-formed metadata block at exactly the right offset, with the right
//!   back-link, lengths and data checksums, would be taken for one; only sealed logs are free
//!   of that (weak) ambiguity. Worst-case scan time on hostile input is quadratic in its size.

use std::io::{Read, Seek, SeekFrom};

use crate::error::{HrlError, Problem, Result};
use crate::format::{
    DataChecksum, FileHeader, HEADER_SIZE, HrlTime, METADATA_ENTRY_SIZE, METADATA_HEADER_SIZE,
    MetadataBlockHeader, MetadataEntry, block_field, checksum, entries_per_block,
    peek_previous_metadata_location,
};

/// Bytes read at a time when streaming data checksums and scanning for blocks.
const CHUNK_BYTES: usize = 64 * 1024;
/// Entries decoded per read of a block's entry table.
const ENTRIES_PER_READ: u32 = 128;

/// How the reader treats an entry's DataChecksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataChecksumPolicy {
    /// DataChecksum 0 means "not computed" and is not checked; any other value must match.
    /// The specification's example (written by Hyper-V) prints 0, so this reads such logs.
    /// A real checksum of 0 (a byte sum of 0xFFFFFFFF, which needs over 16 MiB of data) is
    /// then merely not checked.
    #[default]
    ZeroMeansUnverified,
    /// Every DataChecksum must match, 0 included. For logs known to come from Lifeboat's
    /// writer, which always fills it.
    VerifyAll,
}

impl DataChecksumPolicy {
    fn accepts(self, stored: u32, computed: u32) -> bool {
        stored == computed || (self == Self::ZeroMeansUnverified && stored == 0)
    }
}

/// Options of [`HrlReader::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOptions {
    /// How DataChecksum is checked.
    pub data_checksums: DataChecksumPolicy,
}

/// One write recorded in the log, without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    /// Where on the virtual disk the data goes.
    pub disk_offset: u64,
    /// Length of the data.
    pub data_length: u32,
    /// TimeStamp of the entry.
    pub timestamp: HrlTime,
    /// DataChecksum as stored.
    pub data_checksum: u32,
    /// Log offset of the data.
    pub data_offset: u64,
    /// Log offset of the metadata block holding the entry.
    pub block_offset: u64,
    /// Index of the entry within its block.
    pub entry_index: u32,
}

/// One write read from the log, with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogWrite {
    /// Where on the virtual disk the data goes.
    pub disk_offset: u64,
    /// TimeStamp of the entry.
    pub timestamp: HrlTime,
    /// DataChecksum as stored (verified per the reader's policy).
    pub data_checksum: u32,
    /// The data.
    pub data: Vec<u8>,
}

/// Why recovery of an unsealed log stopped where it did.
#[derive(Debug)]
#[non_exhaustive]
pub enum CutReason {
    /// The last valid block ends exactly at the end of the file: nothing was lost, the log
    /// was only not sealed.
    EndOfFile,
    /// Bytes follow the last valid block but hold no block that links back to it: a batch
    /// whose metadata block was never (fully) written.
    NoFurtherBlock,
    /// A block links back to the last valid block but fails validation.
    InvalidBlock(Box<HrlError>),
}

/// Where the reader cut a log that was not closed cleanly (EOLLocation 0).
#[derive(Debug)]
pub struct Recovery {
    /// End of the last valid metadata block: every write before it is yielded, none after.
    pub valid_end_offset: u64,
    /// Length of the file.
    pub file_len: u64,
    /// Why the log ends there.
    pub reason: CutReason,
}

impl Recovery {
    /// Whether bytes were dropped (the log's tail could not be trusted).
    pub fn lost_bytes(&self) -> bool {
        self.valid_end_offset < self.file_len
    }
}

/// A validated metadata block, its entries decoded.
struct Block {
    offset: u64,
    previous_metadata_location: u64,
    entries: Vec<MetadataEntry>,
    data_bytes: u64,
}

/// Reads and validates an HRL log over a `Read + Seek` source.
#[derive(Debug)]
pub struct HrlReader<R> {
    source: R,
    options: ReadOptions,
    header: FileHeader,
    file_len: u64,
    entries: Vec<LogEntry>,
    recovery: Option<Recovery>,
    buf: Vec<u8>,
}

impl<R: Read + Seek> HrlReader<R> {
    /// Opens and validates a log with the default options.
    pub fn open(source: R) -> Result<Self> {
        Self::open_with(source, ReadOptions::default())
    }

    /// Opens and validates a log: the header, every block and entry, the chain's layout and
    /// every write's data checksum. A sealed log must validate entirely, and its
    /// TotalMetadataEntries must count its entries; bytes after its EOLLocation are ignored.
    /// An unsealed log is cut after its last valid block (see [`Self::recovery`]); its header
    /// counters are not checked, since a crash may leave them behind the blocks.
    pub fn open_with(mut source: R, options: ReadOptions) -> Result<Self> {
        let file_len = source
            .seek(SeekFrom::End(0))
            .map_err(|source| HrlError::ReadLog {
                offset: 0,
                len: 0,
                source,
            })?;
        if file_len < HEADER_SIZE {
            return Err(HrlError::ValidateHeader {
                field: "file",
                problem: Problem::Truncated {
                    needed: HEADER_SIZE,
                    available: file_len,
                },
            });
        }
        let mut raw = [0u8; HEADER_SIZE as usize];
        read_exact_at(&mut source, 0, &mut raw)?;
        let header = FileHeader::decode(&raw)?;
        let mut reader = Self {
            source,
            options,
            header,
            file_len,
            entries: Vec::new(),
            recovery: None,
            buf: Vec::new(),
        };
        let blocks = if reader.header.is_sealed() {
            reader.walk_sealed()?
        } else {
            let (blocks, recovery) = reader.scan_unsealed()?;
            reader.recovery = Some(recovery);
            blocks
        };
        reader.index_entries(&blocks);
        Ok(reader)
    }

    /// The validated file header.
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// Length of the source.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Where and why an unsealed log was cut; `None` for a sealed log.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// Every write of the log, in order, without data.
    pub fn entries(&self) -> &[LogEntry] {
        &self.entries
    }

    /// Reads the data of one entry and checks its DataChecksum.
    pub fn read_write(&mut self, entry: &LogEntry) -> Result<LogWrite> {
        let end = entry
            .data_offset
            .checked_add(entry.data_length.into())
            .filter(|end| *end <= self.file_len);
        if end.is_none() {
            return Err(HrlError::VerifyWriteData {
                block_offset: entry.block_offset,
                entry_index: entry.entry_index,
                data_offset: entry.data_offset,
                problem: Problem::Truncated {
                    needed: entry.data_offset.saturating_add(entry.data_length.into()),
                    available: self.file_len,
                },
            });
        }
        let mut data = vec![0u8; entry.data_length as usize];
        self.read_exact_at(entry.data_offset, &mut data)?;
        let computed = DataChecksum::of(&data);
        if !self
            .options
            .data_checksums
            .accepts(entry.data_checksum, computed)
        {
            return Err(data_mismatch(entry, computed));
        }
        Ok(LogWrite {
            disk_offset: entry.disk_offset,
            timestamp: entry.timestamp,
            data_checksum: entry.data_checksum,
            data,
        })
    }

    /// The writes of the log, in order, each with its data. Stops after the first error.
    pub fn writes(&mut self) -> Writes<'_, R> {
        Writes {
            reader: self,
            next: 0,
            failed: false,
        }
    }

    /// All writes of the log, in order.
    pub fn read_all(&mut self) -> Result<Vec<LogWrite>> {
        self.writes().collect()
    }

    /// Gives the source back.
    pub fn into_inner(self) -> R {
        self.source
    }

    fn metadata_size(&self) -> u64 {
        self.header.metadata_size.into()
    }

    /// Walks a sealed log from EOLLocation back to the first block; every step must hold.
    fn walk_sealed(&mut self) -> Result<Vec<Block>> {
        let m = self.metadata_size();
        let eol = self.header.eol_location;
        let first_block_end = HEADER_SIZE + m;
        if eol < first_block_end {
            return Err(HrlError::ValidateHeader {
                field: "EOLLocation",
                problem: Problem::UnexpectedValue {
                    found: eol,
                    expected: "at least 4096 + MetadataSize",
                },
            });
        }
        if eol > self.file_len {
            return Err(HrlError::ValidateHeader {
                field: "EOLLocation",
                problem: Problem::Truncated {
                    needed: eol,
                    available: self.file_len,
                },
            });
        }
        let mut blocks = Vec::new();
        let mut offset = eol - m;
        loop {
            let block = self.read_block(offset)?;
            let link_error = |problem| HrlError::WalkMetadataChain {
                block_offset: offset,
                problem,
            };
            // The block's data sits right before it.
            let data_start = offset
                .checked_sub(block.data_bytes)
                .filter(|start| *start >= HEADER_SIZE)
                .ok_or(link_error(Problem::OutOfBounds {
                    value: block.data_bytes,
                    limit: offset - HEADER_SIZE,
                }))?;
            let back = block.previous_metadata_location;
            if back == 0 {
                if data_start != HEADER_SIZE {
                    return Err(link_error(Problem::UnexpectedValue {
                        found: data_start,
                        expected: "the first block's data to start at offset 4096",
                    }));
                }
                blocks.push(block);
                break;
            }
            // NB: back-links strictly decrease (back >= MetadataSize), so this loop ends.
            let previous = offset
                .checked_sub(back)
                .filter(|p| *p >= HEADER_SIZE && back >= m)
                .ok_or(link_error(Problem::OutOfBounds {
                    value: back,
                    limit: offset - HEADER_SIZE,
                }))?;
            if previous + m != data_start {
                return Err(link_error(Problem::UnexpectedValue {
                    found: back,
                    expected: "PreviousMetadataLocation = MetadataSize + the block's data length",
                }));
            }
            blocks.push(block);
            offset = previous;
        }
        blocks.reverse();
        let total: u64 = blocks.iter().map(|b| b.entries.len() as u64).sum();
        if total != self.header.total_metadata_entries {
            return Err(HrlError::ValidateHeader {
                field: "TotalMetadataEntries",
                problem: Problem::UnexpectedValue {
                    found: self.header.total_metadata_entries,
                    expected: "the number of entries in the log's metadata blocks",
                },
            });
        }
        let mut data_offset = HEADER_SIZE;
        for block in &blocks {
            self.verify_block_data(block, data_offset)?;
            data_offset = block.offset + m;
        }
        Ok(blocks)
    }

    /// Recovers an unsealed log: follows blocks forward from offset 4096 while they validate.
    fn scan_unsealed(&mut self) -> Result<(Vec<Block>, Recovery)> {
        let m = self.metadata_size();
        let mut blocks: Vec<Block> = Vec::new();
        let mut data_start = HEADER_SIZE;
        let mut search_from = HEADER_SIZE;
        let mut rejected: Option<HrlError> = None;
        loop {
            let previous = blocks.last().map(|b| b.offset);
            let Some(candidate) = self.find_candidate(search_from, previous)? else {
                break;
            };
            match self.try_next_block(candidate, data_start) {
                Ok(block) => {
                    data_start = candidate + m;
                    search_from = data_start;
                    rejected = None;
                    blocks.push(block);
                }
                Err(e) if e.is_corruption() => {
                    // NB: keep scanning: the candidate may be data that looks like a block,
                    // with the real block further on.
                    rejected.get_or_insert(e);
                    search_from = candidate + 1;
                }
                Err(e) => return Err(e),
            }
        }
        let valid_end_offset = blocks.last().map_or(HEADER_SIZE, |b| b.offset + m);
        let reason = match rejected {
            Some(e) => CutReason::InvalidBlock(Box::new(e)),
            None if valid_end_offset == self.file_len => CutReason::EndOfFile,
            None => CutReason::NoFurtherBlock,
        };
        let recovery = Recovery {
            valid_end_offset,
            file_len: self.file_len,
            reason,
        };
        Ok((blocks, recovery))
    }

    /// Finds the first offset from `from` where a block could start: its PreviousMetadataLocation
    /// links back to `previous` (0 for the first block), its header checksum holds, and a whole
    /// block fits in the file.
    fn find_candidate(&mut self, from: u64, previous: Option<u64>) -> Result<Option<u64>> {
        let header_len = METADATA_HEADER_SIZE as usize;
        let Some(last) = self.file_len.checked_sub(self.metadata_size()) else {
            return Ok(None);
        };
        let mut window = std::mem::take(&mut self.buf);
        let mut at = from;
        let mut found = None;
        while at <= last {
            // NB: the window holds a whole block header for every candidate offset it covers.
            let end = (at + CHUNK_BYTES as u64).min(last + header_len as u64);
            window.resize((end - at) as usize, 0);
            if let Err(e) = self.read_exact_at(at, &mut window) {
                self.buf = window;
                return Err(e);
            }
            let mut i = 0usize;
            while i + header_len <= window.len() {
                let pos = at + i as u64;
                let expected_link = previous.map_or(0, |p| pos - p);
                let head = &window[i..i + header_len];
                if peek_previous_metadata_location(head) == expected_link
                    && checksum(head, block_field::CHECKSUM).to_le_bytes()
                        == head[block_field::CHECKSUM..block_field::CHECKSUM + 4]
                {
                    found = Some(pos);
                    break;
                }
                i += 1;
            }
            if found.is_some() {
                break;
            }
            at += i as u64;
        }
        self.buf = window;
        Ok(found)
    }

    /// Validates the candidate block at `offset` whose data starts at `data_start`.
    fn try_next_block(&mut self, offset: u64, data_start: u64) -> Result<Block> {
        let block = self.read_block(offset)?;
        if data_start + block.data_bytes != offset {
            return Err(HrlError::WalkMetadataChain {
                block_offset: offset,
                problem: Problem::UnexpectedValue {
                    found: block.data_bytes,
                    expected: "the entries' lengths to add up to the bytes before the block",
                },
            });
        }
        self.verify_block_data(&block, data_start)?;
        Ok(block)
    }

    /// Reads and validates the block at `offset`: header checksum, entry count within the
    /// block's capacity, and every valid entry.
    fn read_block(&mut self, offset: u64) -> Result<Block> {
        let m = self.metadata_size();
        let end = offset.saturating_add(m);
        if end > self.file_len {
            return Err(HrlError::ValidateMetadataBlock {
                block_offset: offset,
                field: "block",
                problem: Problem::Truncated {
                    needed: end,
                    available: self.file_len,
                },
            });
        }
        let mut raw = [0u8; METADATA_HEADER_SIZE as usize];
        self.read_exact_at(offset, &mut raw)?;
        let head = MetadataBlockHeader::decode(&raw, offset)?;
        let capacity = entries_per_block(self.header.metadata_size);
        if head.valid_metadata_entries > capacity {
            return Err(HrlError::ValidateMetadataBlock {
                block_offset: offset,
                field: "ValidMetadataEntries",
                problem: Problem::OutOfBounds {
                    value: head.valid_metadata_entries.into(),
                    limit: capacity.into(),
                },
            });
        }
        let mut entries =
            Vec::with_capacity(head.valid_metadata_entries.min(ENTRIES_PER_READ) as usize);
        let mut data_bytes = 0u64;
        let mut raw_entries = std::mem::take(&mut self.buf);
        let mut index = 0u32;
        while index < head.valid_metadata_entries {
            let count = (head.valid_metadata_entries - index).min(ENTRIES_PER_READ);
            raw_entries.resize((count * METADATA_ENTRY_SIZE) as usize, 0);
            let at = offset
                + u64::from(METADATA_HEADER_SIZE)
                + u64::from(index) * u64::from(METADATA_ENTRY_SIZE);
            if let Err(e) = self.read_exact_at(at, &mut raw_entries) {
                self.buf = raw_entries;
                return Err(e);
            }
            for chunk in raw_entries.chunks_exact(METADATA_ENTRY_SIZE as usize) {
                let mut one = [0u8; METADATA_ENTRY_SIZE as usize];
                one.copy_from_slice(chunk);
                match MetadataEntry::decode(&one, offset, index) {
                    Ok(entry) => {
                        // Cannot overflow: at most 2^27 entries of at most 2^32 bytes.
                        data_bytes += u64::from(entry.data_length);
                        entries.push(entry);
                    }
                    Err(e) => {
                        self.buf = raw_entries;
                        return Err(e);
                    }
                }
                index += 1;
            }
        }
        self.buf = raw_entries;
        Ok(Block {
            offset,
            previous_metadata_location: head.previous_metadata_location,
            entries,
            data_bytes,
        })
    }

    /// Streams the data of every entry of `block` (starting at `data_start`) and checks the
    /// DataChecksums.
    fn verify_block_data(&mut self, block: &Block, data_start: u64) -> Result<()> {
        let mut chunk = std::mem::take(&mut self.buf);
        let result = (|| {
            let mut data_offset = data_start;
            for (index, entry) in block.entries.iter().enumerate() {
                let mut sum = DataChecksum::default();
                let mut remaining = u64::from(entry.data_length);
                let mut at = data_offset;
                while remaining > 0 {
                    let n = remaining.min(CHUNK_BYTES as u64) as usize;
                    chunk.resize(n, 0);
                    self.read_exact_at(at, &mut chunk)?;
                    sum.update(&chunk);
                    at += n as u64;
                    remaining -= n as u64;
                }
                let computed = sum.finish();
                if !self
                    .options
                    .data_checksums
                    .accepts(entry.data_checksum, computed)
                {
                    let described = describe(block, index, data_offset);
                    return Err(data_mismatch(&described, computed));
                }
                data_offset += u64::from(entry.data_length);
            }
            Ok(())
        })();
        self.buf = chunk;
        result
    }

    fn index_entries(&mut self, blocks: &[Block]) {
        let m = self.metadata_size();
        let mut data_offset = HEADER_SIZE;
        for block in blocks {
            for index in 0..block.entries.len() {
                let entry = describe(block, index, data_offset);
                data_offset += u64::from(entry.data_length);
                self.entries.push(entry);
            }
            data_offset = block.offset + m;
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; callers have checked the range against
    /// the file length.
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_exact_at(&mut self.source, offset, buf)
    }
}

fn read_exact_at<R: Read + Seek>(source: &mut R, offset: u64, buf: &mut [u8]) -> Result<()> {
    source
        .seek(SeekFrom::Start(offset))
        .and_then(|_| source.read_exact(buf))
        .map_err(|source| HrlError::ReadLog {
            offset,
            len: buf.len() as u64,
            source,
        })
}

fn describe(block: &Block, index: usize, data_offset: u64) -> LogEntry {
    let e = &block.entries[index];
    LogEntry {
        disk_offset: e.byte_offset,
        data_length: e.data_length,
        timestamp: e.timestamp,
        data_checksum: e.data_checksum,
        data_offset,
        block_offset: block.offset,
        // Bounded by the block capacity, itself a u32.
        entry_index: u32::try_from(index).unwrap_or(u32::MAX),
    }
}

fn data_mismatch(entry: &LogEntry, computed: u32) -> HrlError {
    HrlError::VerifyWriteData {
        block_offset: entry.block_offset,
        entry_index: entry.entry_index,
        data_offset: entry.data_offset,
        problem: Problem::ChecksumMismatch {
            stored: entry.data_checksum,
            computed,
        },
    }
}

/// Iterator over a log's writes with their data; see [`HrlReader::writes`].
#[derive(Debug)]
pub struct Writes<'a, R> {
    reader: &'a mut HrlReader<R>,
    next: usize,
    failed: bool,
}

impl<R: Read + Seek> Iterator for Writes<'_, R> {
    type Item = Result<LogWrite>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let entry = *self.reader.entries.get(self.next)?;
        self.next += 1;
        let result = self.reader.read_write(&entry);
        self.failed = result.is_err();
        Some(result)
    }
}

/// Reads every write of a log held in memory, with the default options.
pub fn read_log_bytes(bytes: &[u8]) -> Result<(FileHeader, Vec<LogWrite>, Option<Recovery>)> {
    let mut reader = HrlReader::open(std::io::Cursor::new(bytes))?;
    let writes = reader.read_all()?;
    let HrlReader {
        header, recovery, ..
    } = reader;
    Ok((header, writes, recovery))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use std::io::Cursor;

    use proptest::prelude::*;

    use super::*;
    use crate::format::{FileHeader, HrlTime, MetadataBlockHeader, entry_field, header_field};
    use crate::test_support::{TestWrite, apply, build_log};

    const DISK_BYTES: u64 = 4096;

    fn open(bytes: &[u8]) -> Result<HrlReader<Cursor<&[u8]>>> {
        HrlReader::open(Cursor::new(bytes))
    }

    fn written(batches: &[Vec<TestWrite>]) -> Vec<TestWrite> {
        batches.iter().flatten().cloned().collect()
    }

    fn yielded(bytes: &[u8]) -> Result<Vec<TestWrite>> {
        let mut reader = open(bytes)?;
        Ok(reader
            .read_all()?
            .into_iter()
            .map(|w| (w.disk_offset, w.data))
            .collect())
    }

    fn sample_batches() -> Vec<Vec<TestWrite>> {
        vec![
            vec![(0, vec![1; 100]), (50, vec![2; 30])],
            (0..20u64).map(|i| (i * 7, vec![i as u8; 9])).collect(), // spans 2 blocks at 512
            vec![],
            vec![(4000, vec![3; 96]), (17, vec![])],
        ]
    }

    /// Rewrites the header of `bytes` after `mutate`, with a correct checksum.
    fn patch_header(bytes: &mut [u8], mutate: impl FnOnce(&mut FileHeader)) {
        let mut raw = [0u8; HEADER_SIZE as usize];
        raw.copy_from_slice(&bytes[..HEADER_SIZE as usize]);
        let mut h = FileHeader::decode(&raw).unwrap();
        mutate(&mut h);
        bytes[..HEADER_SIZE as usize].copy_from_slice(&h.encode());
    }

    /// Rewrites entry `index` of the block at `block` after `mutate`, with a correct checksum.
    fn patch_entry(
        bytes: &mut [u8],
        block: usize,
        index: usize,
        mutate: impl FnOnce(&mut MetadataEntry),
    ) {
        let at = block + 32 + index * 32;
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&bytes[at..at + 32]);
        let mut e = MetadataEntry::decode(&raw, 0, 0).unwrap();
        mutate(&mut e);
        bytes[at..at + 32].copy_from_slice(&e.encode());
    }

    fn patch_block(bytes: &mut [u8], block: usize, head: MetadataBlockHeader) {
        bytes[block..block + 32].copy_from_slice(&head.encode());
    }

    #[test]
    fn sealed_log_round_trips() {
        let batches = sample_batches();
        let bytes = build_log(&batches, 512, true);
        let reader = open(&bytes).unwrap();
        assert!(reader.recovery().is_none());
        assert_eq!(reader.header().total_metadata_entries, 24);
        assert_eq!(yielded(&bytes).unwrap(), written(&batches));
        let (_, writes, recovery) = read_log_bytes(&bytes).unwrap();
        assert_eq!(writes.len(), 24);
        assert!(recovery.is_none());
        assert_eq!(writes[2].timestamp, HrlTime(1002));
    }

    #[test]
    fn empty_logs_read_as_no_writes() {
        let sealed = build_log(&[], 4096, true);
        assert_eq!(yielded(&sealed).unwrap(), vec![]);
        let open_log = build_log(&[], 4096, false);
        let reader = open(&open_log).unwrap();
        let recovery = reader.recovery().unwrap();
        assert!(matches!(recovery.reason, CutReason::EndOfFile));
        assert_eq!(recovery.valid_end_offset, 8192);
        assert!(!recovery.lost_bytes());
    }

    #[test]
    fn unsealed_intact_log_recovers_everything() {
        let batches = sample_batches();
        let bytes = build_log(&batches, 512, false);
        let reader = open(&bytes).unwrap();
        let recovery = reader.recovery().unwrap();
        assert!(matches!(recovery.reason, CutReason::EndOfFile));
        assert_eq!(recovery.valid_end_offset, bytes.len() as u64);
        assert_eq!(yielded(&bytes).unwrap(), written(&batches));
    }

    #[test]
    fn truncation_at_every_byte() {
        let batches = sample_batches();
        let unsealed = build_log(&batches, 512, false);
        let sealed = build_log(&batches, 512, true);
        assert_eq!(unsealed.len(), sealed.len());
        let full = open(&unsealed).unwrap();
        let block_ends: Vec<(u64, u64)> = full
            .entries()
            .iter()
            .map(|e| (e.block_offset + 512, e.disk_offset))
            .collect();
        let all = written(&batches);
        for cut in 0..unsealed.len() {
            let prefix = &unsealed[..cut];
            if cut < (HEADER_SIZE + 512) as usize {
                // No complete first block: nothing to yield (or no header at all).
                match open(prefix) {
                    Ok(r) => assert!(r.entries().is_empty(), "cut {cut}"),
                    Err(e) => assert!(cut < HEADER_SIZE as usize && e.is_corruption(), "cut {cut}"),
                }
            } else {
                // Exactly the writes of the blocks that end at or before the cut.
                let expected = block_ends
                    .iter()
                    .filter(|(end, _)| *end <= cut as u64)
                    .count();
                let reader = open(prefix).unwrap();
                let recovery = reader.recovery().unwrap();
                assert!(recovery.valid_end_offset <= cut as u64);
                assert_eq!(
                    yielded(prefix).unwrap(),
                    all[..expected].to_vec(),
                    "cut {cut}"
                );
            }
            let err = open(&sealed[..cut]).err();
            assert!(
                err.is_some_and(|e| e.is_recoverable_by_resync()),
                "sealed cut {cut}"
            );
        }
    }

    #[test]
    fn data_checksum_zero_is_unverified_unless_asked() {
        let mut bytes = build_log(&[vec![(0, vec![5; 10])]], 4096, true);
        patch_entry(&mut bytes, 8192 + 10, 0, |e| e.data_checksum = 0);
        assert_eq!(yielded(&bytes).unwrap(), vec![(0, vec![5; 10])]);
        let strict = ReadOptions {
            data_checksums: DataChecksumPolicy::VerifyAll,
        };
        let err = HrlReader::open_with(Cursor::new(&bytes), strict)
            .err()
            .unwrap();
        assert!(matches!(
            err,
            HrlError::VerifyWriteData {
                entry_index: 0,
                data_offset: 8192,
                ..
            }
        ));
    }

    #[test]
    fn altered_data_is_never_yielded() {
        let mut bytes = build_log(&[vec![(0, vec![5; 10])], vec![(9, vec![6; 3])]], 4096, true);
        bytes[8192 + 4] ^= 1;
        let err = open(&bytes).err().unwrap();
        assert!(matches!(
            err,
            HrlError::VerifyWriteData {
                block_offset: 8202,
                ..
            }
        ));
        // Unsealed, the same damage cuts the log before the damaged batch.
        patch_header(&mut bytes, |h| h.eol_location = 0);
        let reader = open(&bytes).unwrap();
        assert!(reader.entries().is_empty());
        let recovery = reader.recovery().unwrap();
        assert_eq!(recovery.valid_end_offset, 8192);
        assert!(
            matches!(&recovery.reason, CutReason::InvalidBlock(e) if matches!(**e, HrlError::VerifyWriteData { .. }))
        );
    }

    #[test]
    fn writes_iterator_rechecks_data_that_changed_after_open() {
        let bytes = build_log(&[vec![(0, vec![5; 10]), (10, vec![6; 10])]], 4096, true);
        let mut reader = open(&bytes).unwrap();
        let mut changed = bytes.clone();
        changed[8192 + 12] ^= 0xFF;
        let mut reader2 = HrlReader::open(Cursor::new(changed.as_slice())).err();
        assert!(reader2.take().is_some());
        // Swap the source under an open reader: the second write now fails, the first passes.
        reader.source = Cursor::new(changed.as_slice());
        let results: Vec<_> = reader.writes().collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(HrlError::VerifyWriteData { entry_index: 1, .. })
        ));
    }

    #[test]
    fn hostile_fields_are_rejected_without_panics() {
        let base = build_log(&[vec![(0, vec![5; 10])]], 4096, true);
        let block = 8192 + 10;

        // EOLLocation past the end of the file, and before the first block.
        let mut b = base.clone();
        patch_header(&mut b, |h| h.eol_location = u64::MAX);
        assert!(matches!(
            open(&b),
            Err(HrlError::ValidateHeader {
                field: "EOLLocation",
                ..
            })
        ));
        patch_header(&mut b, |h| h.eol_location = 4097);
        assert!(matches!(
            open(&b),
            Err(HrlError::ValidateHeader {
                field: "EOLLocation",
                ..
            })
        ));

        // More entries than a block holds.
        let mut b = base.clone();
        patch_block(
            &mut b,
            block,
            MetadataBlockHeader {
                previous_metadata_location: block as u64 - 4096,
                valid_metadata_entries: 128,
            },
        );
        assert!(matches!(
            open(&b),
            Err(HrlError::ValidateMetadataBlock {
                field: "ValidMetadataEntries",
                ..
            })
        ));

        // A huge DataLength: data would start before the header.
        let mut b = base.clone();
        patch_entry(&mut b, block, 0, |e| e.data_length = u32::MAX);
        assert!(matches!(open(&b), Err(HrlError::WalkMetadataChain { .. })));

        // Back-links that point before the header, at the block itself, or past the data.
        for link in [u64::MAX, 0, 1, 4096, block as u64] {
            let mut b = base.clone();
            patch_block(
                &mut b,
                block,
                MetadataBlockHeader {
                    previous_metadata_location: link,
                    valid_metadata_entries: 1,
                },
            );
            assert!(
                matches!(open(&b), Err(HrlError::WalkMetadataChain { .. })),
                "link {link}"
            );
        }

        // A write whose end overflows the disk address space.
        let mut b = base.clone();
        patch_entry(&mut b, block, 0, |e| e.byte_offset = u64::MAX - 3);
        assert!(matches!(
            open(&b),
            Err(HrlError::ValidateEntry {
                problem: Problem::Overflow,
                ..
            })
        ));

        // Header counters that lie.
        let mut b = base.clone();
        patch_header(&mut b, |h| h.total_metadata_entries = 2);
        assert!(matches!(
            open(&b),
            Err(HrlError::ValidateHeader {
                field: "TotalMetadataEntries",
                ..
            })
        ));

        // Unknown operation with a valid checksum.
        let mut b = base.clone();
        b[block + 32 + entry_field::META_OPERATION] = 2;
        let raw: [u8; 32] = b[block + 32..block + 64].try_into().unwrap();
        let sum = crate::format::checksum(&raw, entry_field::CHECKSUM);
        b[block + 32 + 8..block + 32 + 12].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(
            open(&b),
            Err(HrlError::ValidateEntry {
                field: "MetaOperation",
                ..
            })
        ));

        // Version 1, and a header torn mid-write.
        let mut b = base.clone();
        b[header_field::LOG_FORMAT_VERSION + 2] = 1;
        assert!(matches!(
            open(&b),
            Err(HrlError::ValidateHeader {
                field: "LogFormatVersion",
                ..
            })
        ));
        assert!(matches!(
            open(&base[..100]),
            Err(HrlError::ValidateHeader { field: "file", .. })
        ));
    }

    #[test]
    fn metadata_size_larger_than_the_file_is_handled() {
        let mut b = build_log(&[], 512, false);
        patch_header(&mut b, |h| h.metadata_size = 512 * (1 << 22));
        let reader = open(&b).unwrap();
        assert!(reader.entries().is_empty());
        patch_header(&mut b, |h| h.eol_location = 1 << 40);
        assert!(open(&b).is_err());
    }

    fn batches_strategy() -> impl Strategy<Value = Vec<Vec<TestWrite>>> {
        let write = (0..DISK_BYTES).prop_flat_map(|offset| {
            let max_len = (DISK_BYTES - offset).min(300) as usize;
            prop::collection::vec(any::<u8>(), 0..=max_len).prop_map(move |data| (offset, data))
        });
        prop::collection::vec(prop::collection::vec(write, 0..40), 0..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn replaying_the_log_equals_applying_the_writes(
            batches in batches_strategy(),
            metadata_size in prop::sample::select(vec![512u32, 1024, 4096]),
            seal in any::<bool>(),
            original in prop::collection::vec(any::<u8>(), DISK_BYTES as usize),
        ) {
            let bytes = build_log(&batches, metadata_size, seal);
            let mut direct = original.clone();
            for (offset, data) in batches.iter().flatten() {
                apply(&mut direct, *offset, data);
            }
            let mut replayed = original.clone();
            let mut reader = open(&bytes).unwrap();
            prop_assert_eq!(reader.recovery().is_some(), !seal);
            for w in reader.writes() {
                let w = w.unwrap();
                apply(&mut replayed, w.disk_offset, &w.data);
            }
            prop_assert_eq!(&replayed, &direct);
            // The coalesced view ships the same final bytes.
            let writes = open(&bytes).unwrap().read_all().unwrap();
            let map = crate::coalesce::ChangeMap::from_writes(&writes).unwrap();
            let mut coalesced = original.clone();
            for (offset, data) in map.ranges() {
                apply(&mut coalesced, offset, data);
            }
            prop_assert_eq!(coalesced, direct);
        }

        #[test]
        fn a_flipped_byte_never_yields_an_altered_write(
            batches in batches_strategy(),
            seal in any::<bool>(),
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            // NB: one flip, because the format's byte-sum checksum cannot see compensating
            // changes (+1 here, -1 there); any single changed byte changes the sum.
            let original = build_log(&batches, 512, seal);
            let mut bytes = original.clone();
            let n = bytes.len();
            bytes[at.index(n)] ^= mask;
            crate::fuzzing::check_reader(&bytes);
            let all = written(&batches);
            if let Ok(got) = yielded(&bytes) {
                if seal {
                    // A sealed log yields all of it or nothing: damage that passes is damage to
                    // bytes no checksum covers (unused entry slots).
                    prop_assert_eq!(got, all);
                } else {
                    prop_assert!(got.len() <= all.len());
                    prop_assert_eq!(&got[..], &all[..got.len()]);
                }
            }
        }

        #[test]
        fn reader_survives_random_and_mutated_input(
            batches in batches_strategy(),
            seal in any::<bool>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            noise in prop::collection::vec(any::<u8>(), 0..9000),
        ) {
            let mut bytes = build_log(&batches, 512, seal);
            let n = bytes.len();
            for (at, value) in &flips {
                bytes[at.index(n)] = *value;
            }
            crate::fuzzing::check_reader(&bytes);
            crate::fuzzing::check_reader(&bytes[..cut.index(n + 1)]);
            crate::fuzzing::check_reader(&noise);
            // Noise behind a valid header exercises the block scan and walk.
            let mut framed = bytes[..HEADER_SIZE as usize].to_vec();
            framed.extend_from_slice(&noise);
            crate::fuzzing::check_reader(&framed);
        }
    }
}
