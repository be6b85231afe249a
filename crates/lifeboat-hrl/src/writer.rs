//! Appending writes to a log, keeping its header true, and sealing it.
//!
//! ```text
//! create:   [header][block #0, empty]
//! write*:   [header][block #0][data a][data b]...            data streamed as it comes
//! commit:   [header'][block #0][data a][data b][block #1]    block, then header counters
//! seal:     [header''(EOLLocation = end)][...][block #n]
//! ```
//!
//! A batch with more writes than a block holds spans several blocks: when a block is full the
//! writer emits it and starts the next, so the data of each block sits just before it, as the
//! format requires.
//!
//! # Guarantees
//!
//! - After every [`HrlWriter::commit`] the header is true: TotalMetadataEntries counts every
//!   entry written, CurrentSize is the end of the last metadata block, LastModifiedTimeStamp
//!   is the commit's time, and the checksum holds. Between commits the header describes the
//!   last commit, so header counters always land on a batch boundary.
//! - Every entry's DataChecksum is filled in.
//! - The writer writes at absolute offsets (it seeks before each write), so it may share the
//!   sink with nothing else, and the sink should start empty.
//!
//! # Caveats
//!
//! Durability is the caller's: [`HrlWriter::get_ref`] gives access to the file for an fsync
//! after a commit. After any I/O error the writer refuses further use
//! ([`HrlError::UseFailedWriter`]) because the tail of the log is in an unknown state.

use std::io::{Seek, SeekFrom, Write};

use uuid::Uuid;

use crate::error::{HrlError, Problem, Result};
use crate::format::{
    CREATOR_APPLICATION_LIFEBOAT, DEFAULT_METADATA_SIZE, DataChecksum, FILE_TYPE_HRL, FLAGS_NONE,
    FileHeader, HEADER_SIZE, HrlTime, LOG_FORMAT_VERSION_2, METADATA_ENTRY_SIZE,
    METADATA_HEADER_SIZE, METADATA_SIZE_UNIT, MetadataBlockHeader, MetadataEntry,
    entries_per_block,
};

/// Largest MetadataSize this writer agrees to use. The format allows any multiple of 512; the
/// writer builds each block in memory, so it keeps blocks to a sane size.
pub const MAX_WRITER_METADATA_SIZE: u32 = 1 << 20;

/// Version written in CreatorVersion by this crate.
pub const CREATOR_VERSION: u32 = 1;

/// How to create a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// UniqueId of the new log.
    pub unique_id: Uuid,
    /// UniqueId of the previous log of the chain; nil when this log starts a chain.
    pub previous_unique_id: Uuid,
    /// The VHDX data write GUID of the disk when tracking started; nil when not known.
    pub vhd2_data_write_guid: Uuid,
    /// Creation time (TimeStamp and the first LastModifiedTimeStamp).
    pub created_at: HrlTime,
    /// Bytes per metadata block: a multiple of 512, at least 512.
    pub metadata_size: u32,
}

impl WriterOptions {
    /// Options for a log that starts a chain, with the default MetadataSize (4096).
    pub fn new(unique_id: Uuid, created_at: HrlTime) -> Self {
        Self {
            unique_id,
            previous_unique_id: Uuid::nil(),
            vhd2_data_write_guid: Uuid::nil(),
            created_at,
            metadata_size: DEFAULT_METADATA_SIZE,
        }
    }

    /// Options for the log that follows `sealed` in its chain: PreviousUniqueId is the sealed
    /// log's UniqueId; MetadataSize and Vhd2DataWriteGuid are carried over.
    pub fn following(sealed: &FileHeader, unique_id: Uuid, created_at: HrlTime) -> Self {
        Self {
            unique_id,
            previous_unique_id: sealed.unique_id,
            vhd2_data_write_guid: sealed.vhd2_data_write_guid,
            created_at,
            metadata_size: sealed.metadata_size,
        }
    }

    /// Sets the MetadataSize.
    pub fn with_metadata_size(mut self, metadata_size: u32) -> Self {
        self.metadata_size = metadata_size;
        self
    }

    /// Sets the Vhd2DataWriteGuid.
    pub fn with_vhd2_data_write_guid(mut self, guid: Uuid) -> Self {
        self.vhd2_data_write_guid = guid;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.metadata_size < METADATA_SIZE_UNIT
            || !self.metadata_size.is_multiple_of(METADATA_SIZE_UNIT)
            || self.metadata_size > MAX_WRITER_METADATA_SIZE
        {
            return Err(HrlError::ConfigureWriter {
                field: "metadata_size",
                problem: Problem::UnexpectedValue {
                    found: self.metadata_size.into(),
                    expected: "a multiple of 512 from 512 to 1 MiB",
                },
            });
        }
        Ok(())
    }
}

/// A log sealed by [`HrlWriter::seal`]: its final header and the sink it was written to.
#[derive(Debug)]
pub struct SealedLog<W> {
    /// The header as written, with EOLLocation set.
    pub header: FileHeader,
    /// The sink, for the caller to sync, close or ship.
    pub sink: W,
}

/// Writes one HRL log over a `Write + Seek` sink (a file, a `Cursor<Vec<u8>>` …).
#[derive(Debug)]
pub struct HrlWriter<W> {
    sink: W,
    header: FileHeader,
    /// Log offset of the last metadata block written (the back-link target).
    last_block_offset: u64,
    /// Where the next byte goes.
    write_pos: u64,
    /// Entries whose data is written but whose metadata block is not.
    pending: Vec<MetadataEntry>,
    /// Entries in blocks written since the last commit (not yet in the header).
    uncommitted_entries: u64,
    failed: bool,
}

impl<W: Write + Seek> HrlWriter<W> {
    /// Creates a log: writes the header and an empty first metadata block at offset 4096.
    pub fn create(sink: W, options: &WriterOptions) -> Result<Self> {
        options.validate()?;
        let metadata_size = u64::from(options.metadata_size);
        let initial_size = HEADER_SIZE + metadata_size;
        let header = FileHeader {
            log_format_version: LOG_FORMAT_VERSION_2,
            created_at: options.created_at,
            creator_application: CREATOR_APPLICATION_LIFEBOAT,
            creator_version: CREATOR_VERSION,
            original_size: initial_size,
            current_size: initial_size,
            eol_location: 0,
            error_code: 0,
            metadata_size: options.metadata_size,
            unique_id: options.unique_id,
            previous_unique_id: options.previous_unique_id,
            last_modified: options.created_at,
            total_metadata_entries: 0,
            file_type: FILE_TYPE_HRL,
            flags: FLAGS_NONE,
            vhd2_data_write_guid: options.vhd2_data_write_guid,
        };
        let mut writer = Self {
            sink,
            header,
            last_block_offset: HEADER_SIZE,
            write_pos: HEADER_SIZE,
            pending: Vec::new(),
            uncommitted_entries: 0,
            failed: false,
        };
        // NB: the empty first block gives every later block a back-link target, and lets a
        // recovering reader find the start of the chain at a known offset.
        writer.write_at(0, &writer.header.encode())?;
        let first = writer.encode_block(0)?;
        writer.write_at(HEADER_SIZE, &first)?;
        writer.write_pos = initial_size;
        writer.flush()?;
        Ok(writer)
    }

    /// The header as last written (or to be written by the next commit for EOLLocation).
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// The sink, e.g. to fsync a file after a commit.
    pub fn get_ref(&self) -> &W {
        &self.sink
    }

    /// Bytes in the log so far, including data not yet committed.
    pub fn len_bytes(&self) -> u64 {
        self.write_pos
    }

    /// Appends one write: its data goes to the log now; its entry goes into the current
    /// metadata block, which is written when full or at the next [`Self::commit`].
    pub fn write(&mut self, disk_offset: u64, data: &[u8], timestamp: HrlTime) -> Result<()> {
        self.check_usable()?;
        let len = data.len() as u64;
        let reject = |problem| HrlError::AppendWrite {
            disk_offset,
            len,
            problem,
        };
        let data_length = u32::try_from(data.len()).map_err(|_| {
            reject(Problem::OutOfBounds {
                value: len,
                limit: u32::MAX.into(),
            })
        })?;
        if disk_offset.checked_add(len).is_none() {
            return Err(reject(Problem::Overflow));
        }
        if self.pending.len() as u64 >= u64::from(self.capacity()) {
            self.write_pending_block()?;
        }
        self.write_at(self.write_pos, data)?;
        self.write_pos += len;
        self.pending.push(MetadataEntry {
            byte_offset: disk_offset,
            data_length,
            timestamp,
            data_checksum: DataChecksum::of(data),
        });
        Ok(())
    }

    /// Appends a batch of writes, all stamped `timestamp`, and commits it.
    pub fn append_batch<'a, I>(&mut self, writes: I, timestamp: HrlTime) -> Result<()>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        for (disk_offset, data) in writes {
            self.write(disk_offset, data, timestamp)?;
        }
        self.commit(timestamp)
    }

    /// Ends the current batch: writes the metadata block of the pending writes (if any), then
    /// rewrites the header with true counters and `timestamp` as LastModifiedTimeStamp.
    pub fn commit(&mut self, timestamp: HrlTime) -> Result<()> {
        self.check_usable()?;
        if !self.pending.is_empty() {
            self.write_pending_block()?;
        }
        self.header.total_metadata_entries += self.uncommitted_entries;
        self.uncommitted_entries = 0;
        self.header.current_size = self.write_pos;
        self.header.last_modified = timestamp;
        let encoded = self.header.encode();
        self.write_at(0, &encoded)?;
        self.flush()
    }

    /// Commits what is pending and seals the log: EOLLocation = end of the last block.
    pub fn seal(mut self, timestamp: HrlTime) -> Result<SealedLog<W>> {
        self.check_usable()?;
        if !self.pending.is_empty() {
            self.write_pending_block()?;
        }
        self.header.eol_location = self.write_pos;
        self.commit(timestamp)?;
        Ok(SealedLog {
            header: self.header,
            sink: self.sink,
        })
    }

    fn capacity(&self) -> u32 {
        entries_per_block(self.header.metadata_size)
    }

    fn check_usable(&self) -> Result<()> {
        if self.failed {
            Err(HrlError::UseFailedWriter)
        } else {
            Ok(())
        }
    }

    /// Encodes a metadata block holding the pending entries, linked back `back_link` bytes.
    fn encode_block(&self, back_link: u64) -> Result<Vec<u8>> {
        let mut block = vec![0u8; self.header.metadata_size as usize];
        let valid = u32::try_from(self.pending.len()).map_err(|_| HrlError::ConfigureWriter {
            field: "metadata_size",
            problem: Problem::Overflow,
        })?;
        let head = MetadataBlockHeader {
            previous_metadata_location: back_link,
            valid_metadata_entries: valid,
        };
        block[..METADATA_HEADER_SIZE as usize].copy_from_slice(&head.encode());
        let entries =
            block[METADATA_HEADER_SIZE as usize..].chunks_exact_mut(METADATA_ENTRY_SIZE as usize);
        for (slot, entry) in entries.zip(&self.pending) {
            slot.copy_from_slice(&entry.encode());
        }
        Ok(block)
    }

    fn write_pending_block(&mut self) -> Result<()> {
        let block_offset = self.write_pos;
        let block = self.encode_block(block_offset - self.last_block_offset)?;
        self.write_at(block_offset, &block)?;
        self.write_pos += block.len() as u64;
        self.last_block_offset = block_offset;
        self.uncommitted_entries += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let result = self
            .sink
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.sink.write_all(bytes));
        result.map_err(|source| {
            self.failed = true;
            HrlError::WriteLog {
                offset,
                len: bytes.len() as u64,
                source,
            }
        })
    }

    fn flush(&mut self) -> Result<()> {
        self.sink.flush().map_err(|source| {
            self.failed = true;
            HrlError::WriteLog {
                offset: self.write_pos,
                len: 0,
                source,
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use std::io::{self, Cursor};

    use super::*;
    use crate::error::Remedy;
    use crate::format::{MetadataBlockHeader, MetadataEntry};
    use crate::reader::HrlReader;

    fn header_of(bytes: &[u8]) -> FileHeader {
        let mut raw = [0u8; HEADER_SIZE as usize];
        raw.copy_from_slice(&bytes[..HEADER_SIZE as usize]);
        FileHeader::decode(&raw).unwrap()
    }

    fn options() -> WriterOptions {
        WriterOptions::new(Uuid::from_u128(0xA), HrlTime(100))
    }

    #[test]
    fn create_writes_header_and_empty_first_block() {
        let w = HrlWriter::create(Cursor::new(Vec::new()), &options()).unwrap();
        let bytes = w.get_ref().get_ref().clone();
        assert_eq!(bytes.len(), 8192);
        let h = header_of(&bytes);
        assert_eq!(h.original_size, 8192);
        assert_eq!(h.current_size, 8192);
        assert_eq!(h.eol_location, 0);
        assert_eq!(h.total_metadata_entries, 0);
        assert_eq!(h.metadata_size, 4096);
        assert_eq!(h.creator_application, CREATOR_APPLICATION_LIFEBOAT);
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&bytes[4096..4128]);
        let first = MetadataBlockHeader::decode(&raw, 4096).unwrap();
        assert_eq!(first.previous_metadata_location, 0);
        assert_eq!(first.valid_metadata_entries, 0);
    }

    #[test]
    fn batch_larger_than_a_block_spans_blocks_and_counters_stay_true() {
        let mut w = HrlWriter::create(Cursor::new(Vec::new()), &options()).unwrap();
        let data = vec![7u8; 512];
        w.append_batch(
            (0..300u64).map(|i| (i * 512, data.as_slice())),
            HrlTime(200),
        )
        .unwrap();
        let bytes = w.get_ref().get_ref().clone();
        // 127 + 127 + 46 entries: three blocks after the empty first one.
        assert_eq!(bytes.len() as u64, 8192 + 300 * 512 + 3 * 4096);
        let h = header_of(&bytes);
        assert_eq!(h.total_metadata_entries, 300);
        assert_eq!(h.current_size, bytes.len() as u64);
        assert_eq!(h.last_modified, HrlTime(200));
        // The second block sits right after the first 127 writes' data and links back.
        let second = 8192 + 127 * 512;
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&bytes[second..second + 32]);
        let head = MetadataBlockHeader::decode(&raw, second as u64).unwrap();
        assert_eq!(head.valid_metadata_entries, 127);
        assert_eq!(head.previous_metadata_location, (second - 4096) as u64);
        let mut raw_entry = [0u8; 32];
        raw_entry.copy_from_slice(&bytes[second + 32..second + 64]);
        let entry = MetadataEntry::decode(&raw_entry, second as u64, 0).unwrap();
        assert_eq!(entry.data_checksum, DataChecksum::of(&data));
        assert_eq!(entry.timestamp, HrlTime(200));

        let sealed = w.seal(HrlTime(300)).unwrap();
        let bytes = sealed.sink.into_inner();
        let h = header_of(&bytes);
        assert_eq!(h, sealed.header);
        assert_eq!(h.eol_location, bytes.len() as u64);
        assert_eq!(h.last_modified, HrlTime(300));
        let mut reader = HrlReader::open(Cursor::new(&bytes)).unwrap();
        assert_eq!(reader.read_all().unwrap().len(), 300);
    }

    #[test]
    fn header_describes_the_last_commit_between_commits() {
        let mut w = HrlWriter::create(Cursor::new(Vec::new()), &options()).unwrap();
        w.append_batch([(0, &b"abc"[..])], HrlTime(101)).unwrap();
        let committed = header_of(w.get_ref().get_ref());
        for i in 0..200u64 {
            w.write(i, b"x", HrlTime(102)).unwrap();
        }
        // A full block was written mid-batch, but the header still tells the last commit.
        assert_eq!(header_of(w.get_ref().get_ref()), committed);
        w.commit(HrlTime(103)).unwrap();
        let h = header_of(w.get_ref().get_ref());
        assert_eq!(h.total_metadata_entries, 201);
        assert_eq!(h.current_size, w.len_bytes());
    }

    #[test]
    fn next_log_of_a_chain_links_to_the_sealed_one() {
        let opts = options()
            .with_metadata_size(1024)
            .with_vhd2_data_write_guid(Uuid::from_u128(0xD));
        let w = HrlWriter::create(Cursor::new(Vec::new()), &opts).unwrap();
        let sealed = w.seal(HrlTime(150)).unwrap();
        let next = WriterOptions::following(&sealed.header, Uuid::from_u128(0xB), HrlTime(151));
        let w2 = HrlWriter::create(Cursor::new(Vec::new()), &next).unwrap();
        assert_eq!(w2.header().previous_unique_id, Uuid::from_u128(0xA));
        assert_eq!(w2.header().metadata_size, 1024);
        assert_eq!(w2.header().vhd2_data_write_guid, Uuid::from_u128(0xD));
        let h2 = w2.seal(HrlTime(152)).unwrap().header;
        assert!(crate::chain::validate_chain(&[sealed.header, h2]).is_ok());
    }

    #[test]
    fn rejects_bad_metadata_sizes() {
        for size in [0, 256, 1000, 4095, MAX_WRITER_METADATA_SIZE + 512] {
            let err =
                HrlWriter::create(Cursor::new(Vec::new()), &options().with_metadata_size(size))
                    .err()
                    .unwrap();
            assert!(matches!(
                err,
                HrlError::ConfigureWriter {
                    field: "metadata_size",
                    ..
                }
            ));
            assert_eq!(err.remedy(), Remedy::FixCaller);
        }
        assert!(
            HrlWriter::create(Cursor::new(Vec::new()), &options().with_metadata_size(512)).is_ok()
        );
    }

    #[test]
    fn rejects_writes_past_the_end_of_the_address_space() {
        let mut w = HrlWriter::create(Cursor::new(Vec::new()), &options()).unwrap();
        let err = w.write(u64::MAX, b"ab", HrlTime(1)).err().unwrap();
        assert!(matches!(
            err,
            HrlError::AppendWrite {
                problem: Problem::Overflow,
                ..
            }
        ));
        // The writer is still usable after a rejected argument.
        w.write(0, b"ab", HrlTime(1)).unwrap();
    }

    /// A sink that fails every write once `budget` bytes have been written.
    #[derive(Debug)]
    struct FailingSink {
        inner: Cursor<Vec<u8>>,
        budget: usize,
    }

    impl Write for FailingSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if buf.len() > self.budget {
                return Err(io::Error::other("disk full"));
            }
            self.budget -= buf.len();
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Seek for FailingSink {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn io_failure_poisons_the_writer_and_asks_for_resync() {
        let sink = FailingSink {
            inner: Cursor::new(Vec::new()),
            budget: 8192 + 100,
        };
        let mut w = HrlWriter::create(sink, &options()).unwrap();
        let err = w.write(0, &[1u8; 200], HrlTime(1)).err().unwrap();
        assert!(matches!(
            err,
            HrlError::WriteLog {
                offset: 8192,
                len: 200,
                ..
            }
        ));
        assert!(err.is_recoverable_by_resync());
        assert!(matches!(
            w.write(0, b"a", HrlTime(1)),
            Err(HrlError::UseFailedWriter)
        ));
        assert!(matches!(
            w.commit(HrlTime(1)),
            Err(HrlError::UseFailedWriter)
        ));
        assert!(matches!(w.seal(HrlTime(1)), Err(HrlError::UseFailedWriter)));
    }
}
