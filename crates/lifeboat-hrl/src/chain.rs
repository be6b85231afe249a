//! Checking that logs form a chain: each log's PreviousUniqueId is the UniqueId of the log
//! before it.
//!
//! ```text
//! [log A: id A, prev nil, sealed] <- [log B: id B, prev A, sealed] <- [log C: id C, prev B]
//! ```

use std::collections::HashSet;

use crate::error::{HrlError, Problem, Result};
use crate::format::FileHeader;

/// Checks that `headers`, oldest first, form a chain: every log after the first names the one
/// before it as PreviousUniqueId, every log but the last is sealed (only the newest log may
/// still be open), and no UniqueId repeats (a repeat would be a cycle). The first log's
/// PreviousUniqueId is not checked: it points at a log already shipped and deleted.
pub fn validate_chain(headers: &[FileHeader]) -> Result<()> {
    let mut seen = HashSet::with_capacity(headers.len());
    for (index, header) in headers.iter().enumerate() {
        if !seen.insert(header.unique_id) {
            return Err(HrlError::ValidateLogChain {
                log_index: index,
                problem: Problem::RepeatedUniqueId {
                    unique_id: header.unique_id,
                },
            });
        }
        if let Some(previous) = index.checked_sub(1).and_then(|i| headers.get(i))
            && header.previous_unique_id != previous.unique_id
        {
            return Err(HrlError::ValidateLogChain {
                log_index: index,
                problem: Problem::ChainLinkMismatch {
                    expected: previous.unique_id,
                    found: header.previous_unique_id,
                },
            });
        }
        if index + 1 < headers.len() && !header.is_sealed() {
            return Err(HrlError::ValidateLogChain {
                log_index: index,
                // Only the newest log of a chain may still be open.
                problem: Problem::NotSealed,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::format::{
        CREATOR_APPLICATION_LIFEBOAT, FILE_TYPE_HRL, FLAGS_NONE, HrlTime, LOG_FORMAT_VERSION_2,
    };

    fn log(id: u128, previous: u128, sealed: bool) -> FileHeader {
        FileHeader {
            log_format_version: LOG_FORMAT_VERSION_2,
            created_at: HrlTime(0),
            creator_application: CREATOR_APPLICATION_LIFEBOAT,
            creator_version: 1,
            original_size: 8192,
            current_size: 8192,
            eol_location: if sealed { 8192 } else { 0 },
            error_code: 0,
            metadata_size: 4096,
            unique_id: Uuid::from_u128(id),
            previous_unique_id: Uuid::from_u128(previous),
            last_modified: HrlTime(0),
            total_metadata_entries: 0,
            file_type: FILE_TYPE_HRL,
            flags: FLAGS_NONE,
            vhd2_data_write_guid: Uuid::nil(),
        }
    }

    #[test]
    fn accepts_a_linked_chain_with_an_open_tail() {
        assert!(validate_chain(&[]).is_ok());
        assert!(validate_chain(&[log(1, 0, false)]).is_ok());
        assert!(validate_chain(&[log(1, 99, true), log(2, 1, true), log(3, 2, false)]).is_ok());
    }

    #[test]
    fn rejects_a_broken_link() {
        let err = validate_chain(&[log(1, 0, true), log(2, 1, true), log(3, 1, true)])
            .err()
            .unwrap();
        assert!(matches!(
            err,
            HrlError::ValidateLogChain {
                log_index: 2,
                problem: Problem::ChainLinkMismatch { .. }
            }
        ));
        assert!(err.is_recoverable_by_resync());
    }

    #[test]
    fn rejects_an_open_log_before_the_newest() {
        let err = validate_chain(&[log(1, 0, false), log(2, 1, true)])
            .err()
            .unwrap();
        assert!(matches!(
            err,
            HrlError::ValidateLogChain {
                log_index: 0,
                problem: Problem::NotSealed
            }
        ));
    }

    #[test]
    fn rejects_a_cycle() {
        let err = validate_chain(&[log(1, 2, true), log(2, 1, true), log(1, 2, true)])
            .err()
            .unwrap();
        assert!(matches!(
            err,
            HrlError::ValidateLogChain { log_index: 2, .. }
        ));
    }
}
