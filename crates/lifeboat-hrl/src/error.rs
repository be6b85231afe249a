//! The crate's one error type.
//!
//! Variants are named after the action that failed (`ValidateHeader`, `WalkMetadataChain`,
//! `VerifyWriteData` …) and carry where it failed: the log offset, the on-disk field, the
//! entry index. [`HrlError::remedy`] tells a caller what to do about it, so that the agent can
//! decide between retrying, resynchronizing the disk, and reporting its own bug.

use std::io;

use uuid::Uuid;

/// What exactly was wrong with a value read from (or offered for) a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// A stored checksum differs from the one computed over the bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The value found in the checksum field.
        stored: u32,
        /// The value computed from the bytes.
        computed: u32,
    },
    /// A field holds a value the format does not allow.
    #[error("unexpected value {found:#x}, expected {expected}")]
    UnexpectedValue {
        /// The value found.
        found: u64,
        /// What the format requires, in words.
        expected: &'static str,
    },
    /// A value is larger than the limit that applies to it.
    #[error("value {value} exceeds the limit {limit}")]
    OutOfBounds {
        /// The value found.
        value: u64,
        /// The largest acceptable value.
        limit: u64,
    },
    /// Offset or length arithmetic on the field's value overflows 64 bits.
    #[error("offset arithmetic overflows")]
    Overflow,
    /// The file ends before the structure does.
    #[error("truncated: {needed} bytes needed, the file has {available}")]
    Truncated {
        /// File length the structure needs.
        needed: u64,
        /// Actual file length.
        available: u64,
    },
    /// A UniqueId appears twice in a sequence of logs (a cycle).
    #[error("UniqueId {unique_id} appears more than once")]
    RepeatedUniqueId {
        /// The repeated id.
        unique_id: Uuid,
    },
    /// A log that must be sealed (EOLLocation set) is still open.
    #[error("the log is not sealed")]
    NotSealed,
    /// A log's PreviousUniqueId is not the UniqueId of the log before it.
    #[error("chain link mismatch: expected previous log {expected}, found {found}")]
    ChainLinkMismatch {
        /// UniqueId of the log before this one.
        expected: Uuid,
        /// PreviousUniqueId recorded in this log.
        found: Uuid,
    },
}

/// What a caller should do about an [`HrlError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remedy {
    /// The operation may succeed if tried again (a transient read failure).
    Retry,
    /// The log cannot be trusted or written: mark the disk for resynchronization.
    Resync,
    /// The caller passed something invalid; retrying or resyncing will not help.
    FixCaller,
}

/// Everything that can go wrong while writing, reading or combining HRL logs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HrlError {
    /// Reading bytes of the log failed at the I/O level.
    #[error("reading {len} bytes at log offset {offset}")]
    ReadLog {
        /// Log offset of the read.
        offset: u64,
        /// Bytes requested.
        len: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing bytes of the log failed at the I/O level.
    #[error("writing {len} bytes at log offset {offset}")]
    WriteLog {
        /// Log offset of the write.
        offset: u64,
        /// Bytes being written.
        len: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The 4096-byte file header is invalid.
    #[error("validating the file header field {field}: {problem}")]
    ValidateHeader {
        /// On-disk field name, as in the specification.
        field: &'static str,
        /// What was wrong.
        problem: Problem,
    },
    /// A metadata block header is invalid.
    #[error("validating the metadata block at log offset {block_offset}, field {field}: {problem}")]
    ValidateMetadataBlock {
        /// Log offset of the block.
        block_offset: u64,
        /// On-disk field name.
        field: &'static str,
        /// What was wrong.
        problem: Problem,
    },
    /// A metadata entry is invalid.
    #[error(
        "validating entry {entry_index} of the metadata block at log offset {block_offset}, \
         field {field}: {problem}"
    )]
    ValidateEntry {
        /// Log offset of the block holding the entry.
        block_offset: u64,
        /// Index of the entry within its block.
        entry_index: u32,
        /// On-disk field name.
        field: &'static str,
        /// What was wrong.
        problem: Problem,
    },
    /// The data of a write does not match its entry's DataChecksum.
    #[error(
        "verifying the data of entry {entry_index} of the metadata block at log offset \
         {block_offset} (data at log offset {data_offset}): {problem}"
    )]
    VerifyWriteData {
        /// Log offset of the block holding the entry.
        block_offset: u64,
        /// Index of the entry within its block.
        entry_index: u32,
        /// Log offset of the entry's data.
        data_offset: u64,
        /// What was wrong.
        problem: Problem,
    },
    /// The back-links between metadata blocks of a sealed log do not describe the file.
    #[error("walking the metadata chain at the block at log offset {block_offset}: {problem}")]
    WalkMetadataChain {
        /// Log offset of the block whose links are wrong.
        block_offset: u64,
        /// What was wrong.
        problem: Problem,
    },
    /// A sequence of logs does not form a chain.
    #[error("validating the log chain at log #{log_index}: {problem}")]
    ValidateLogChain {
        /// Position of the offending log in the sequence given.
        log_index: usize,
        /// What was wrong.
        problem: Problem,
    },
    /// The writer's options are invalid.
    #[error("configuring the writer, option {field}: {problem}")]
    ConfigureWriter {
        /// Option name.
        field: &'static str,
        /// What was wrong.
        problem: Problem,
    },
    /// A write offered to the writer cannot be recorded.
    #[error("appending a write of {len} bytes at disk offset {disk_offset}: {problem}")]
    AppendWrite {
        /// Disk offset of the write.
        disk_offset: u64,
        /// Length of the write.
        len: u64,
        /// What was wrong.
        problem: Problem,
    },
    /// The writer hit an I/O error earlier; the log's tail is in an unknown state.
    #[error("using a writer whose earlier write failed")]
    UseFailedWriter,
    /// A write offered to the coalescing view cannot be recorded.
    #[error("coalescing a write of {len} bytes at disk offset {disk_offset}: {problem}")]
    CoalesceWrite {
        /// Disk offset of the write.
        disk_offset: u64,
        /// Length of the write.
        len: u64,
        /// What was wrong.
        problem: Problem,
    },
}

impl HrlError {
    /// What a caller should do about this error.
    pub fn remedy(&self) -> Remedy {
        match self {
            // NB: reads are retried: a read error says nothing about the log's content.
            Self::ReadLog { .. } => Remedy::Retry,
            // "A log cannot be written" is one of the resync triggers of the design.
            Self::WriteLog { .. } | Self::UseFailedWriter => Remedy::Resync,
            Self::ValidateHeader { .. }
            | Self::ValidateMetadataBlock { .. }
            | Self::ValidateEntry { .. }
            | Self::VerifyWriteData { .. }
            | Self::WalkMetadataChain { .. }
            | Self::ValidateLogChain { .. } => Remedy::Resync,
            Self::ConfigureWriter { .. }
            | Self::AppendWrite { .. }
            | Self::CoalesceWrite { .. } => Remedy::FixCaller,
        }
    }

    /// Whether resynchronizing the disk recovers from this error.
    pub fn is_recoverable_by_resync(&self) -> bool {
        self.remedy() == Remedy::Resync
    }

    /// Whether the error says the log's bytes are corrupt (as opposed to I/O or caller errors).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Self::ValidateHeader { .. }
                | Self::ValidateMetadataBlock { .. }
                | Self::ValidateEntry { .. }
                | Self::VerifyWriteData { .. }
                | Self::WalkMetadataChain { .. }
                | Self::ValidateLogChain { .. }
        )
    }
}

/// Result alias of this crate.
pub type Result<T, E = HrlError> = std::result::Result<T, E>;
