//! The crate's one error type.
//!
//! Variants are named after the action that failed and carry what a reader needs to act:
//! which image (a path or a store's name), which offset, which block. Every error answers
//! [`ResyncError::is_recoverable`]: `true` means "the same call may succeed later" (the agent
//! retries with backoff), `false` means "retrying cannot help" (health Critical, an
//! administrator or a fresh full resync must act).

use std::io;
use std::path::PathBuf;

/// Why a serialized map or cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatProblem {
    /// The first bytes are not the expected magic.
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// A hash algorithm id this build does not know.
    UnknownAlgorithm {
        /// The id found.
        id: u8,
    },
    /// Fewer or more bytes than the header announces.
    WrongLength {
        /// Bytes the header implies.
        expected_bytes: u64,
        /// Bytes present.
        actual_bytes: u64,
    },
    /// The trailing checksum does not match the content: the bytes were corrupted.
    ChecksumMismatch {
        /// Checksum stored in the trailer.
        stored: u64,
        /// Checksum of the bytes read.
        computed: u64,
    },
    /// The header is self-contradictory (named field).
    InvalidField {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl std::fmt::Display for FormatProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatProblem::BadMagic => f.write_str("bad magic bytes"),
            FormatProblem::UnsupportedVersion { version } => {
                write!(f, "unsupported format version {version}")
            }
            FormatProblem::UnknownAlgorithm { id } => write!(f, "unknown hash algorithm id {id}"),
            FormatProblem::WrongLength {
                expected_bytes,
                actual_bytes,
            } => write!(
                f,
                "length {actual_bytes} bytes, the header implies {expected_bytes}"
            ),
            FormatProblem::ChecksumMismatch { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): corrupted"
            ),
            FormatProblem::InvalidField { field, reason } => write!(f, "field {field}: {reason}"),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// Opening an image (source or target) failed.
    #[error("opening image {path}: {source}")]
    OpenImage {
        /// The image's path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading a block of an image failed.
    #[error("reading {image} at offset {offset_bytes} (block {block_index}): {source}")]
    ReadBlock {
        /// The image's name (path or store name).
        image: String,
        /// Byte offset of the read.
        offset_bytes: u64,
        /// Index of the first block read.
        block_index: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing a range into the target failed.
    #[error("writing {len_bytes} bytes into {image} at offset {offset_bytes}: {source}")]
    WriteRange {
        /// The target's name.
        image: String,
        /// Byte offset of the write.
        offset_bytes: u64,
        /// Length of the write.
        len_bytes: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// Querying an image's size failed.
    #[error("reading the size of {image}: {source}")]
    ReadSize {
        /// The image's name.
        image: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Growing or shrinking the target to the source's size failed.
    #[error("resizing {image} to {size_bytes} bytes: {source}")]
    ResizeTarget {
        /// The target's name.
        image: String,
        /// The size asked for.
        size_bytes: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// Making the target's writes durable failed.
    #[error("syncing {image} to stable storage: {source}")]
    SyncTarget {
        /// The target's name.
        image: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Reading a stored map or cursor file failed.
    #[error("loading {path}: {source}")]
    LoadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing a map or cursor file failed.
    #[error("storing {path}: {source}")]
    StoreFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A serialized block map was refused.
    #[error("decoding block map{}: {problem}", describe_origin(origin))]
    DecodeMap {
        /// Where the bytes came from, when known.
        origin: Option<PathBuf>,
        /// What is wrong.
        problem: FormatProblem,
    },
    /// A serialized resync cursor was refused.
    #[error("decoding resync cursor{}: {problem}", describe_origin(origin))]
    DecodeCursor {
        /// Where the bytes came from, when known.
        origin: Option<PathBuf>,
        /// What is wrong.
        problem: FormatProblem,
    },
    /// Two maps cannot be compared (different block size or hash algorithm).
    #[error("comparing block maps: {field} differs (source {source_value}, target {target_value})")]
    CompareMaps {
        /// The field that differs.
        field: &'static str,
        /// The source map's value.
        source_value: String,
        /// The target map's value.
        target_value: String,
    },
    /// A cursor belongs to another resync (another source map or block size).
    #[error(
        "resuming from cursor: it was made for source map {cursor_fingerprint:#034x}, this resync's source map is {source_fingerprint:#034x}; drop the cursor and start over"
    )]
    ResumeCursor {
        /// Fingerprint recorded in the cursor.
        cursor_fingerprint: u128,
        /// Fingerprint of this resync's source map.
        source_fingerprint: u128,
    },
    /// `BlockMap::update_range` or `BlockMap::resize` was given data that does not fit.
    #[error("updating block map at offset {offset_bytes} (block {block_index}): {reason}")]
    UpdateMap {
        /// Byte offset given.
        offset_bytes: u64,
        /// The block concerned.
        block_index: u64,
        /// What does not fit.
        reason: String,
    },
    /// An image changed size while it was being read or resynced.
    #[error(
        "{image} changed size during the resync: expected {expected_bytes} bytes, found {actual_bytes}"
    )]
    ImageChanged {
        /// The image's name.
        image: String,
        /// Size when the resync started.
        expected_bytes: u64,
        /// Size now.
        actual_bytes: u64,
    },
    /// An option is out of range.
    #[error("invalid option {field}: {reason}")]
    InvalidOption {
        /// The option's name.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
}

fn describe_origin(origin: &Option<PathBuf>) -> String {
    match origin {
        Some(path) => format!(" from {}", path.display()),
        None => String::new(),
    }
}

/// Whether an I/O error may go away by itself (network, space, memory) or needs a person
/// (missing file, permissions, invalid arguments).
fn io_is_recoverable(error: &io::Error) -> bool {
    !matches!(
        error.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidData
            | io::ErrorKind::Unsupported
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::IsADirectory
    )
}

impl ResyncError {
    /// Whether retrying the same call later may succeed.
    ///
    /// I/O errors are recoverable unless their kind says a person must act (not found,
    /// permission denied, invalid input, read-only file system). Format, comparison,
    /// cursor and option errors never are: the same bytes fail the same way. Note that a
    /// corrupt stored target map is not the end of a resync: the caller re-hashes the
    /// target instead.
    pub fn is_recoverable(&self) -> bool {
        match self {
            ResyncError::OpenImage { source, .. }
            | ResyncError::ReadBlock { source, .. }
            | ResyncError::WriteRange { source, .. }
            | ResyncError::ReadSize { source, .. }
            | ResyncError::ResizeTarget { source, .. }
            | ResyncError::SyncTarget { source, .. }
            | ResyncError::LoadFile { source, .. }
            | ResyncError::StoreFile { source, .. } => io_is_recoverable(source),
            // NB: an image that changes size under us is a live source, not a broken one:
            // the next attempt, from a new snapshot, can succeed.
            ResyncError::ImageChanged { .. } => true,
            ResyncError::DecodeMap { .. }
            | ResyncError::DecodeCursor { .. }
            | ResyncError::CompareMaps { .. }
            | ResyncError::ResumeCursor { .. }
            | ResyncError::UpdateMap { .. }
            | ResyncError::InvalidOption { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified_by_kind() {
        let transient = ResyncError::ReadBlock {
            image: "a".into(),
            offset_bytes: 0,
            block_index: 0,
            source: io::Error::new(io::ErrorKind::TimedOut, "slow"),
        };
        assert!(transient.is_recoverable());
        let missing = ResyncError::OpenImage {
            path: "/nope".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "gone"),
        };
        assert!(!missing.is_recoverable());
        assert!(missing.to_string().contains("/nope"));
    }

    #[test]
    fn format_errors_name_their_origin_and_are_final() {
        let error = ResyncError::DecodeMap {
            origin: Some("/replica/disk0.map".into()),
            problem: FormatProblem::ChecksumMismatch {
                stored: 1,
                computed: 2,
            },
        };
        assert!(!error.is_recoverable());
        let text = error.to_string();
        assert!(
            text.contains("/replica/disk0.map") && text.contains("corrupted"),
            "{text}"
        );
    }
}
