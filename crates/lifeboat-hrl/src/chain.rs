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
                problem: Problem::UnexpectedValue {
                    found: 0,
                    expected: "a UniqueId not used by an earlier log of the chain",
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
                problem: Problem::UnexpectedValue {
                    found: 0,
                    expected: "EOLLocation set: only the newest log of a chain may be open",
                },
            });
        }
    }
    Ok(())
}
