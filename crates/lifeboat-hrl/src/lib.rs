//! Hyper-V Replica Log (HRL) change logs, format version 2: writing, reading, recovering,
//! coalescing, and the accounting that decides when pending logs force a resync.
//!
//! ```text
//!   agent cycle:  HrlWriter::create -> write/commit ... -> seal ──┐
//!                 HrlWriter::create(WriterOptions::following(..)) │  (next log of the chain)
//!                                                                 v
//!   shipper:      HrlReader::open -> writes() -> ChangeMap -> changed ranges, each byte once
//!   policy:       validate_chain(headers), ResyncThreshold::is_reached(pending, disk)
//! ```
//!
//! The core is pure and synchronous: it takes `Read + Seek` / `Write + Seek`, never reads a
//! clock (timestamps come from the caller) and never touches the file system itself. The
//! on-disk layout lives in [`mod@format`]; see `docs/hrl-format.md` in the shared docs.

pub mod accounting;
pub mod chain;
pub mod coalesce;
pub mod error;
pub mod format;
pub mod fuzzing;
pub mod reader;
pub mod writer;

pub use accounting::{DEFAULT_RESYNC_THRESHOLD_PERCENT, ResyncThreshold, pending_log_bytes};
pub use chain::validate_chain;
pub use coalesce::ChangeMap;
pub use error::{HrlError, Problem, Remedy, Result};
pub use format::{FileHeader, HrlTime};
pub use reader::{
    CutReason, DataChecksumPolicy, HrlReader, LogEntry, LogWrite, ReadOptions, Recovery, Writes,
    read_log_bytes,
};
pub use writer::{HrlWriter, SealedLog, WriterOptions};

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod test_support;
