//! The crate's one error type.
//!
//! Variants are named after the action that failed and carry what a reader needs to act:
//! which offset, which block, which field. The crate does no I/O, so none of them goes away
//! by retrying: the same bytes fail the same way (the agent treats them as not recoverable;
//! a stored map that does not decode is not trusted and the replica is hashed again).

/// Why a serialized map was refused.
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
    /// A serialized block map was refused.
    #[error("decoding block map: {problem}")]
    DecodeMap {
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
    /// An option is out of range.
    #[error("invalid option {field}: {reason}")]
    InvalidOption {
        /// The option's name.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_errors_say_what_is_wrong() {
        let error = ResyncError::DecodeMap {
            problem: FormatProblem::ChecksumMismatch {
                stored: 1,
                computed: 2,
            },
        };
        let text = error.to_string();
        assert!(
            text.contains("block map") && text.contains("corrupted"),
            "{text}"
        );
    }
}
