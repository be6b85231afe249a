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
    /// every write's data checksum. A sealed log must validate entirely; an unsealed one is
    /// cut after its last valid block (see [`Self::recovery`]).
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
