//! The on-disk layout of an HRL file, format version 2 ([MS-HRL] revision 6.0), and its
//! checksum. Every constant of the format is named here; nothing else in the crate knows a
//! byte offset.
//!
//! ```text
//! offset 0      +---------------------------+
//!               | file header (4096 bytes)  |  cookie "msctlog", version, counters, ids
//! 4096          +---------------------------+
//!               | metadata block #0         |  MetadataSize bytes; our writer leaves it empty
//!               +---------------------------+
//!               | data of batch 1           |  entries' data back to back, in entry order
//!               +---------------------------+
//!               | metadata block #1         |  32-byte header + N x 32-byte entries
//!               |  PreviousMetadataLocation |---> distance back to block #0's start
//!               +---------------------------+
//!               | ... (data, metadata) ...  |
//! EOLLocation   +---------------------------+  end of the last metadata block (0 while open)
//! ```
//!
//! All integers are little-endian and every structure is packed; fields are read and written
//! at explicit byte offsets.

use uuid::Uuid;

use crate::error::{HrlError, Problem, Result};

/// Size of the file header; the first metadata block starts right after it.
pub const HEADER_SIZE: u64 = 4096;
/// The first 7 bytes of a log: ASCII "msctlog". The 8th byte is padding, written as 0 and
/// not checked.
pub const COOKIE: [u8; 7] = *b"msctlog";
/// LogFormatVersion of version 2 (major 2, minor 0), the only one this crate reads.
pub const LOG_FORMAT_VERSION_2: u32 = 0x0002_0000;
/// LogFormatVersion of version 1, which is local-only and rejected.
pub const LOG_FORMAT_VERSION_1: u32 = 0x0001_0000;
/// FileType of an HRL file.
pub const FILE_TYPE_HRL: u32 = 0;
/// The only Flags value allowed.
pub const FLAGS_NONE: u16 = 0;
/// MetadataSize must be a multiple of this (a sector).
pub const METADATA_SIZE_UNIT: u32 = 512;
/// Default MetadataSize: holds a header and 127 entries.
pub const DEFAULT_METADATA_SIZE: u32 = 4096;
/// Size of a metadata block's header.
pub const METADATA_HEADER_SIZE: u32 = 32;
/// Size of one metadata entry.
pub const METADATA_ENTRY_SIZE: u32 = 32;
/// MetaOperation of a write: the only operation the format defines.
pub const META_OPERATION_WRITE: u8 = 1;
/// The only Location value defined.
pub const LOCATION_DEFAULT: u8 = 0;
/// CreatorApplication written by Lifeboat ("lfbt"); Hyper-V writes "ct".
pub const CREATOR_APPLICATION_LIFEBOAT: [u8; 4] = *b"lfbt";
/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the epoch of every HRL timestamp.
pub const HRL_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

/// Byte offsets of the file header's fields (sizes in the comments).
pub mod header_field {
    /// Cookie, 8 bytes.
    pub const COOKIE: usize = 0;
    /// LogFormatVersion, 4 bytes.
    pub const LOG_FORMAT_VERSION: usize = 8;
    /// TimeStamp (creation), 4 bytes.
    pub const TIME_STAMP: usize = 12;
    /// CreatorApplication, 4 bytes.
    pub const CREATOR_APPLICATION: usize = 16;
    /// CreatorVersion, 4 bytes.
    pub const CREATOR_VERSION: usize = 20;
    /// OriginalSize, 8 bytes.
    pub const ORIGINAL_SIZE: usize = 24;
    /// CurrentSize, 8 bytes.
    pub const CURRENT_SIZE: usize = 32;
    /// Checksum, 4 bytes.
    pub const CHECKSUM: usize = 40;
    /// EOLLocation, 8 bytes.
    pub const EOL_LOCATION: usize = 44;
    /// ErrorCode, 4 bytes, signed.
    pub const ERROR_CODE: usize = 52;
    /// MetadataSize, 4 bytes.
    pub const METADATA_SIZE: usize = 56;
    /// UniqueId, 16 bytes.
    pub const UNIQUE_ID: usize = 60;
    /// PreviousUniqueId, 16 bytes.
    pub const PREVIOUS_UNIQUE_ID: usize = 76;
    /// LastModifiedTimeStamp, 4 bytes.
    pub const LAST_MODIFIED_TIME_STAMP: usize = 92;
    /// TotalMetadataEntries, 8 bytes.
    pub const TOTAL_METADATA_ENTRIES: usize = 96;
    /// FileType, 4 bytes.
    pub const FILE_TYPE: usize = 104;
    /// Flags, 2 bytes.
    pub const FLAGS: usize = 108;
    /// Vhd2DataWriteGuid, 16 bytes.
    pub const VHD2_DATA_WRITE_GUID: usize = 110;
    /// Reserved, zero, to the end of the header.
    pub const RESERVED: usize = 126;
}

/// Byte offsets of a metadata block header's fields.
pub mod block_field {
    /// PreviousMetadataLocation, 8 bytes: distance back from this block's start to the
    /// previous block's start; 0 for the first block.
    pub const PREVIOUS_METADATA_LOCATION: usize = 0;
    /// ValidMetadataEntries, 4 bytes.
    pub const VALID_METADATA_ENTRIES: usize = 8;
    /// Checksum, 4 bytes.
    pub const CHECKSUM: usize = 12;
    /// Reserved, 16 bytes, zero.
    pub const RESERVED: usize = 16;
}

/// Byte offsets of a metadata entry's fields.
pub mod entry_field {
    /// ByteOffset on the virtual disk, 8 bytes.
    pub const BYTE_OFFSET: usize = 0;
    /// Checksum, 4 bytes.
    pub const CHECKSUM: usize = 8;
    /// DataLength, 4 bytes.
    pub const DATA_LENGTH: usize = 12;
    /// TimeStamp, 4 bytes.
    pub const TIME_STAMP: usize = 16;
    /// MetaOperation, 1 byte.
    pub const META_OPERATION: usize = 20;
    /// DataChecksum, 4 bytes (unaligned).
    pub const DATA_CHECKSUM: usize = 21;
    /// Location, 1 byte.
    pub const LOCATION: usize = 25;
    /// Reserved, 6 bytes, zero.
    pub const RESERVED: usize = 26;
}

/// A time in HRL's unit: whole seconds since 2000-01-01T00:00:00Z.
///
/// The core never reads a clock: callers pass times in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HrlTime(pub u32);

impl HrlTime {
    /// Converts Unix seconds; `None` before 2000 or after the year 2136 (u32 overflow).
    pub fn from_unix_seconds(unix_seconds: u64) -> Option<Self> {
        let since_2000 = unix_seconds.checked_sub(HRL_EPOCH_UNIX_SECONDS)?;
        u32::try_from(since_2000).ok().map(Self)
    }

    /// The same instant in Unix seconds.
    pub fn to_unix_seconds(self) -> u64 {
        u64::from(self.0) + HRL_EPOCH_UNIX_SECONDS
    }
}

/// The HRL checksum: the bitwise NOT of the unsigned 32-bit (wrapping) sum of every byte of
/// `bytes`, skipping the 4 bytes of the checksum field at `checksum_field_offset`.
pub fn checksum(bytes: &[u8], checksum_field_offset: usize) -> u32 {
    let field = checksum_field_offset..checksum_field_offset.saturating_add(4);
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !field.contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    !sum
}

/// Streaming form of the checksum over data (no field to skip), used for DataChecksum.
#[derive(Debug, Clone, Copy, Default)]
pub struct DataChecksum {
    sum: u32,
}

impl DataChecksum {
    /// Adds bytes to the running sum.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sum = bytes
            .iter()
            .fold(self.sum, |acc, b| acc.wrapping_add(u32::from(*b)));
    }

    /// The checksum of every byte added so far.
    pub fn finish(self) -> u32 {
        !self.sum
    }

    /// The checksum of one buffer.
    pub fn of(bytes: &[u8]) -> u32 {
        let mut c = Self::default();
        c.update(bytes);
        c.finish()
    }
}

/// Capacity in entries of a metadata block of `metadata_size` bytes (127 for 4096).
pub fn entries_per_block(metadata_size: u32) -> u32 {
    metadata_size.saturating_sub(METADATA_HEADER_SIZE) / METADATA_ENTRY_SIZE
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

// NB: GUIDs are stored the Microsoft way (Data1..Data3 little-endian), as in VHDX and the
// rest of Hyper-V's formats; `Uuid::{from,to}_bytes_le` is exactly that layout.
fn get_guid(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes_le(a)
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Reads the little-endian PreviousMetadataLocation of a block header at the start of `b`
/// (which must hold at least 8 bytes). Used by the recovery scan as a cheap first filter.
pub(crate) fn peek_previous_metadata_location(b: &[u8]) -> u64 {
    get_u64(b, block_field::PREVIOUS_METADATA_LOCATION)
}

/// The file header of a log, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    /// LogFormatVersion; always [`LOG_FORMAT_VERSION_2`] once validated.
    pub log_format_version: u32,
    /// TimeStamp: when the log was created.
    pub created_at: HrlTime,
    /// CreatorApplication: left-justified single-byte text.
    pub creator_application: [u8; 4],
    /// CreatorVersion: the writer's version, not verified.
    pub creator_version: u32,
    /// OriginalSize: file size at creation.
    pub original_size: u64,
    /// CurrentSize: file size after the last committed batch.
    pub current_size: u64,
    /// EOLLocation: end of the last metadata block once sealed; 0 while open.
    pub eol_location: u64,
    /// ErrorCode, signed.
    pub error_code: i32,
    /// MetadataSize: bytes per metadata block, a multiple of 512.
    pub metadata_size: u32,
    /// UniqueId of this log.
    pub unique_id: Uuid,
    /// PreviousUniqueId: UniqueId of the log before this one in the chain (nil for none).
    pub previous_unique_id: Uuid,
    /// LastModifiedTimeStamp.
    pub last_modified: HrlTime,
    /// TotalMetadataEntries: write entries in the file.
    pub total_metadata_entries: u64,
    /// FileType; always [`FILE_TYPE_HRL`] once validated.
    pub file_type: u32,
    /// Flags; always [`FLAGS_NONE`] once validated.
    pub flags: u16,
    /// Vhd2DataWriteGuid: the VHDX data write GUID when the log was opened.
    pub vhd2_data_write_guid: Uuid,
}

impl FileHeader {
    /// Whether the log was closed cleanly (EOLLocation set).
    pub fn is_sealed(&self) -> bool {
        self.eol_location != 0
    }

    /// Capacity in entries of one of this log's metadata blocks.
    pub fn entries_per_block(&self) -> u32 {
        entries_per_block(self.metadata_size)
    }

    /// Encodes the header, computing its checksum; reserved bytes are zero.
    pub fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        use header_field as f;
        let mut b = [0u8; HEADER_SIZE as usize];
        put(&mut b, f::COOKIE, &COOKIE);
        put(
            &mut b,
            f::LOG_FORMAT_VERSION,
            &self.log_format_version.to_le_bytes(),
        );
        put(&mut b, f::TIME_STAMP, &self.created_at.0.to_le_bytes());
        put(&mut b, f::CREATOR_APPLICATION, &self.creator_application);
        put(
            &mut b,
            f::CREATOR_VERSION,
            &self.creator_version.to_le_bytes(),
        );
        put(&mut b, f::ORIGINAL_SIZE, &self.original_size.to_le_bytes());
        put(&mut b, f::CURRENT_SIZE, &self.current_size.to_le_bytes());
        put(&mut b, f::EOL_LOCATION, &self.eol_location.to_le_bytes());
        put(&mut b, f::ERROR_CODE, &self.error_code.to_le_bytes());
        put(&mut b, f::METADATA_SIZE, &self.metadata_size.to_le_bytes());
        put(&mut b, f::UNIQUE_ID, &self.unique_id.to_bytes_le());
        put(
            &mut b,
            f::PREVIOUS_UNIQUE_ID,
            &self.previous_unique_id.to_bytes_le(),
        );
        put(
            &mut b,
            f::LAST_MODIFIED_TIME_STAMP,
            &self.last_modified.0.to_le_bytes(),
        );
        put(
            &mut b,
            f::TOTAL_METADATA_ENTRIES,
            &self.total_metadata_entries.to_le_bytes(),
        );
        put(&mut b, f::FILE_TYPE, &self.file_type.to_le_bytes());
        put(&mut b, f::FLAGS, &self.flags.to_le_bytes());
        put(
            &mut b,
            f::VHD2_DATA_WRITE_GUID,
            &self.vhd2_data_write_guid.to_bytes_le(),
        );
        let sum = checksum(&b, f::CHECKSUM);
        put(&mut b, f::CHECKSUM, &sum.to_le_bytes());
        b
    }

    /// Decodes and validates a header: cookie, version, checksum, FileType, Flags and
    /// MetadataSize (a non-zero multiple of 512). Reserved bytes and the cookie's padding
    /// byte are not checked; the checksum covers them.
    pub fn decode(b: &[u8; HEADER_SIZE as usize]) -> Result<Self> {
        use header_field as f;
        let invalid = |field, problem| HrlError::ValidateHeader { field, problem };
        if b[f::COOKIE..f::COOKIE + COOKIE.len()] != COOKIE {
            return Err(invalid(
                "Cookie",
                Problem::UnexpectedValue {
                    found: get_u64(b, f::COOKIE),
                    expected: "\"msctlog\"",
                },
            ));
        }
        let log_format_version = get_u32(b, f::LOG_FORMAT_VERSION);
        if log_format_version != LOG_FORMAT_VERSION_2 {
            return Err(invalid(
                "LogFormatVersion",
                Problem::UnexpectedValue {
                    found: log_format_version.into(),
                    expected: "0x00020000 (version 2)",
                },
            ));
        }
        let stored = get_u32(b, f::CHECKSUM);
        let computed = checksum(b, f::CHECKSUM);
        if stored != computed {
            return Err(invalid(
                "Checksum",
                Problem::ChecksumMismatch { stored, computed },
            ));
        }
        let file_type = get_u32(b, f::FILE_TYPE);
        if file_type != FILE_TYPE_HRL {
            return Err(invalid(
                "FileType",
                Problem::UnexpectedValue {
                    found: file_type.into(),
                    expected: "0 (HRL)",
                },
            ));
        }
        let flags = get_u16(b, f::FLAGS);
        if flags != FLAGS_NONE {
            return Err(invalid(
                "Flags",
                Problem::UnexpectedValue {
                    found: flags.into(),
                    expected: "0",
                },
            ));
        }
        let metadata_size = get_u32(b, f::METADATA_SIZE);
        if metadata_size == 0 || !metadata_size.is_multiple_of(METADATA_SIZE_UNIT) {
            return Err(invalid(
                "MetadataSize",
                Problem::UnexpectedValue {
                    found: metadata_size.into(),
                    expected: "a non-zero multiple of 512",
                },
            ));
        }
        let mut creator_application = [0u8; 4];
        creator_application.copy_from_slice(&b[f::CREATOR_APPLICATION..f::CREATOR_APPLICATION + 4]);
        Ok(Self {
            log_format_version,
            created_at: HrlTime(get_u32(b, f::TIME_STAMP)),
            creator_application,
            creator_version: get_u32(b, f::CREATOR_VERSION),
            original_size: get_u64(b, f::ORIGINAL_SIZE),
            current_size: get_u64(b, f::CURRENT_SIZE),
            eol_location: get_u64(b, f::EOL_LOCATION),
            error_code: i32::from_le_bytes(get_u32(b, f::ERROR_CODE).to_le_bytes()),
            metadata_size,
            unique_id: get_guid(b, f::UNIQUE_ID),
            previous_unique_id: get_guid(b, f::PREVIOUS_UNIQUE_ID),
            last_modified: HrlTime(get_u32(b, f::LAST_MODIFIED_TIME_STAMP)),
            total_metadata_entries: get_u64(b, f::TOTAL_METADATA_ENTRIES),
            file_type,
            flags,
            vhd2_data_write_guid: get_guid(b, f::VHD2_DATA_WRITE_GUID),
        })
    }
}

/// The 32-byte header of a metadata block, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataBlockHeader {
    /// Distance back from this block's start to the previous block's start; 0 for the first.
    pub previous_metadata_location: u64,
    /// How many of the block's entries are in use.
    pub valid_metadata_entries: u32,
}

impl MetadataBlockHeader {
    /// Encodes the block header with its checksum.
    pub fn encode(&self) -> [u8; METADATA_HEADER_SIZE as usize] {
        use block_field as f;
        let mut b = [0u8; METADATA_HEADER_SIZE as usize];
        put(
            &mut b,
            f::PREVIOUS_METADATA_LOCATION,
            &self.previous_metadata_location.to_le_bytes(),
        );
        put(
            &mut b,
            f::VALID_METADATA_ENTRIES,
            &self.valid_metadata_entries.to_le_bytes(),
        );
        let sum = checksum(&b, f::CHECKSUM);
        put(&mut b, f::CHECKSUM, &sum.to_le_bytes());
        b
    }

    /// Decodes a block header of the block at `block_offset`, checking its checksum.
    pub fn decode(b: &[u8; METADATA_HEADER_SIZE as usize], block_offset: u64) -> Result<Self> {
        use block_field as f;
        let stored = get_u32(b, f::CHECKSUM);
        let computed = checksum(b, f::CHECKSUM);
        if stored != computed {
            return Err(HrlError::ValidateMetadataBlock {
                block_offset,
                field: "Checksum",
                problem: Problem::ChecksumMismatch { stored, computed },
            });
        }
        Ok(Self {
            previous_metadata_location: get_u64(b, f::PREVIOUS_METADATA_LOCATION),
            valid_metadata_entries: get_u32(b, f::VALID_METADATA_ENTRIES),
        })
    }
}

/// One 32-byte metadata entry (a write), decoded. MetaOperation is always a write and
/// Location always 0, so neither is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// ByteOffset: where on the virtual disk the data goes.
    pub byte_offset: u64,
    /// DataLength in bytes.
    pub data_length: u32,
    /// TimeStamp of the write.
    pub timestamp: HrlTime,
    /// DataChecksum over the entry's data; see [`crate::reader::DataChecksumPolicy`].
    pub data_checksum: u32,
}

impl MetadataEntry {
    /// Encodes the entry with its checksum.
    pub fn encode(&self) -> [u8; METADATA_ENTRY_SIZE as usize] {
        use entry_field as f;
        let mut b = [0u8; METADATA_ENTRY_SIZE as usize];
        put(&mut b, f::BYTE_OFFSET, &self.byte_offset.to_le_bytes());
        put(&mut b, f::DATA_LENGTH, &self.data_length.to_le_bytes());
        put(&mut b, f::TIME_STAMP, &self.timestamp.0.to_le_bytes());
        b[f::META_OPERATION] = META_OPERATION_WRITE;
        put(&mut b, f::DATA_CHECKSUM, &self.data_checksum.to_le_bytes());
        b[f::LOCATION] = LOCATION_DEFAULT;
        let sum = checksum(&b, f::CHECKSUM);
        put(&mut b, f::CHECKSUM, &sum.to_le_bytes());
        b
    }

    /// Decodes entry `entry_index` of the block at `block_offset`: checks the checksum, that
    /// the operation is a write at Location 0, and that ByteOffset + DataLength fits in u64.
    pub fn decode(
        b: &[u8; METADATA_ENTRY_SIZE as usize],
        block_offset: u64,
        entry_index: u32,
    ) -> Result<Self> {
        use entry_field as f;
        let invalid = |field, problem| HrlError::ValidateEntry {
            block_offset,
            entry_index,
            field,
            problem,
        };
        let stored = get_u32(b, f::CHECKSUM);
        let computed = checksum(b, f::CHECKSUM);
        if stored != computed {
            return Err(invalid(
                "Checksum",
                Problem::ChecksumMismatch { stored, computed },
            ));
        }
        if b[f::META_OPERATION] != META_OPERATION_WRITE {
            return Err(invalid(
                "MetaOperation",
                Problem::UnexpectedValue {
                    found: b[f::META_OPERATION].into(),
                    expected: "1 (write)",
                },
            ));
        }
        if b[f::LOCATION] != LOCATION_DEFAULT {
            return Err(invalid(
                "Location",
                Problem::UnexpectedValue {
                    found: b[f::LOCATION].into(),
                    expected: "0",
                },
            ));
        }
        let byte_offset = get_u64(b, f::BYTE_OFFSET);
        let data_length = get_u32(b, f::DATA_LENGTH);
        if byte_offset.checked_add(data_length.into()).is_none() {
            return Err(invalid("ByteOffset", Problem::Overflow));
        }
        Ok(Self {
            byte_offset,
            data_length,
            timestamp: HrlTime(get_u32(b, f::TIME_STAMP)),
            data_checksum: get_u32(b, f::DATA_CHECKSUM),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;

    fn entry(byte_offset: u64, data_length: u32, timestamp: u32) -> MetadataEntry {
        MetadataEntry {
            byte_offset,
            data_length,
            timestamp: HrlTime(timestamp),
            data_checksum: 0,
        }
    }

    fn stored_entry_checksum(e: &MetadataEntry) -> u32 {
        let b = e.encode();
        u32::from_le_bytes([b[8], b[9], b[10], b[11]])
    }

    #[test]
    fn vector_all_zero_metadata_header() {
        assert_eq!(checksum(&[0u8; 32], block_field::CHECKSUM), 4_294_967_295);
        let h = MetadataBlockHeader {
            previous_metadata_location: 0,
            valid_metadata_entries: 0,
        };
        assert_eq!(&h.encode()[12..16], &0xFFFF_FFFFu32.to_le_bytes());
    }

    #[test]
    fn vector_metadata_header_324096_58() {
        let h = MetadataBlockHeader {
            previous_metadata_location: 324_096,
            valid_metadata_entries: 58,
        };
        let b = h.encode();
        assert_eq!(
            u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            4_294_966_991
        );
        assert_eq!(MetadataBlockHeader::decode(&b, 0).ok(), Some(h));
    }

    #[test]
    fn vector_entries() {
        assert_eq!(
            stored_entry_checksum(&entry(3_626_348_544, 4096, 539_842_381)),
            4_294_966_608
        );
        assert_eq!(
            stored_entry_checksum(&entry(8_026_886_144, 4096, 539_842_381)),
            4_294_966_558
        );
        assert_eq!(
            stored_entry_checksum(&entry(3_673_764_352, 31_232, 539_842_382)),
            4_294_966_413
        );
    }

    #[test]
    fn entry_round_trips_and_rejects_flips() {
        let e = MetadataEntry {
            byte_offset: 123_456,
            data_length: 512,
            timestamp: HrlTime(77),
            data_checksum: 0xDEAD_BEEF,
        };
        let b = e.encode();
        assert_eq!(MetadataEntry::decode(&b, 4096, 3).ok(), Some(e));
        for i in 0..b.len() {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(
                MetadataEntry::decode(&c, 4096, 3).is_err(),
                "flip at {i} accepted"
            );
        }
    }

    #[test]
    fn entry_rejects_other_operations_even_with_good_checksum() {
        let mut b = entry(0, 1, 0).encode();
        b[entry_field::META_OPERATION] = 2;
        let sum = checksum(&b, entry_field::CHECKSUM);
        b[8..12].copy_from_slice(&sum.to_le_bytes());
        let err = MetadataEntry::decode(&b, 0, 0).err();
        assert!(matches!(
            err,
            Some(HrlError::ValidateEntry {
                field: "MetaOperation",
                ..
            })
        ));
    }

    #[test]
    fn entry_rejects_offset_overflow() {
        let b = entry(u64::MAX - 10, 100, 0).encode();
        assert!(matches!(
            MetadataEntry::decode(&b, 0, 0),
            Err(HrlError::ValidateEntry {
                problem: Problem::Overflow,
                ..
            })
        ));
    }

    fn sample_header() -> FileHeader {
        FileHeader {
            log_format_version: LOG_FORMAT_VERSION_2,
            created_at: HrlTime(10),
            creator_application: CREATOR_APPLICATION_LIFEBOAT,
            creator_version: 1,
            original_size: 8192,
            current_size: 9000,
            eol_location: 0,
            error_code: -5,
            metadata_size: 4096,
            unique_id: Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff),
            previous_unique_id: Uuid::from_u128(7),
            last_modified: HrlTime(11),
            total_metadata_entries: 3,
            file_type: FILE_TYPE_HRL,
            flags: FLAGS_NONE,
            vhd2_data_write_guid: Uuid::from_u128(9),
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample_header();
        let b = h.encode();
        assert_eq!(&b[0..7], b"msctlog");
        assert_eq!(&b[8..12], &[0, 0, 2, 0]);
        assert_eq!(FileHeader::decode(&b).ok(), Some(h));
    }

    #[test]
    fn header_validation_names_the_field() {
        let field_of = |mutate: &dyn Fn(&mut FileHeader)| {
            let mut h = sample_header();
            mutate(&mut h);
            match FileHeader::decode(&h.encode()) {
                Err(HrlError::ValidateHeader { field, .. }) => field,
                other => panic!("expected a header error, got {other:?}"),
            }
        };
        assert_eq!(
            field_of(&|h| h.log_format_version = LOG_FORMAT_VERSION_1),
            "LogFormatVersion"
        );
        assert_eq!(field_of(&|h| h.file_type = 1), "FileType");
        assert_eq!(field_of(&|h| h.flags = 1), "Flags");
        assert_eq!(field_of(&|h| h.metadata_size = 1000), "MetadataSize");
        assert_eq!(field_of(&|h| h.metadata_size = 0), "MetadataSize");
        let mut b = sample_header().encode();
        b[200] = 1;
        assert!(matches!(
            FileHeader::decode(&b),
            Err(HrlError::ValidateHeader {
                field: "Checksum",
                ..
            })
        ));
        b[0] = b'M';
        assert!(matches!(
            FileHeader::decode(&b),
            Err(HrlError::ValidateHeader {
                field: "Cookie",
                ..
            })
        ));
    }

    #[test]
    fn capacity_of_default_block_is_127() {
        assert_eq!(entries_per_block(DEFAULT_METADATA_SIZE), 127);
        assert_eq!(entries_per_block(512), 15);
    }

    #[test]
    fn streaming_data_checksum_equals_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut c = DataChecksum::default();
        c.update(&data[..333]);
        c.update(&data[333..]);
        assert_eq!(c.finish(), DataChecksum::of(&data));
        assert_eq!(DataChecksum::of(&[]), u32::MAX);
    }

    #[test]
    fn hrl_time_converts_unix_seconds() {
        assert_eq!(HrlTime::from_unix_seconds(946_684_800), Some(HrlTime(0)));
        assert_eq!(HrlTime::from_unix_seconds(946_684_799), None);
        assert_eq!(HrlTime(5).to_unix_seconds(), 946_684_805);
    }
}
