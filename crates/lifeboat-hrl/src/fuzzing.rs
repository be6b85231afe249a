//! The body of the `reader` fuzz target, shared with the property tests so that the same
//! check runs under `cargo fuzz` and under `cargo test`.
//!
//! ```text
//! arbitrary bytes -> HrlReader::open (both checksum policies) -> every write
//!                    must not panic      each yielded write's data checksum must hold
//! ```

use std::io::Cursor;

use crate::format::DataChecksum;
use crate::reader::{DataChecksumPolicy, HrlReader, ReadOptions};

/// Runs the reader over `bytes` and checks what it yields.
///
/// # Panics
///
/// On purpose, when the reader misbehaves: a yielded write whose data is not the bytes its
/// entry points at, or whose DataChecksum does not hold under the policy in force, or a
/// recovery cut that lies outside the file. Any panic from inside the reader is a bug too.
pub fn check_reader(bytes: &[u8]) {
    for policy in [
        DataChecksumPolicy::ZeroMeansUnverified,
        DataChecksumPolicy::VerifyAll,
    ] {
        let options = ReadOptions {
            data_checksums: policy,
        };
        let Ok(mut reader) = HrlReader::open_with(Cursor::new(bytes), options) else {
            continue;
        };
        let file_len = bytes.len() as u64;
        assert_eq!(reader.file_len(), file_len);
        if let Some(recovery) = reader.recovery() {
            assert!(recovery.valid_end_offset <= file_len);
        } else {
            assert!(reader.header().eol_location <= file_len);
        }
        let entries = reader.entries().to_vec();
        let writes: Vec<_> = reader.writes().collect();
        assert_eq!(
            writes.len(),
            entries.len(),
            "an open log must yield every entry"
        );
        for (entry, write) in entries.iter().zip(writes) {
            let write = match write {
                Ok(w) => w,
                Err(e) => panic!("a validated entry failed to read from unchanged bytes: {e}"),
            };
            let start = usize::try_from(entry.data_offset).unwrap_or(usize::MAX);
            let stored = bytes.get(start..).and_then(|b| b.get(..write.data.len()));
            assert_eq!(
                stored,
                Some(write.data.as_slice()),
                "data is not the log's bytes"
            );
            assert_eq!(write.data.len() as u64, u64::from(entry.data_length));
            assert_eq!(write.disk_offset, entry.disk_offset);
            let computed = DataChecksum::of(&write.data);
            let verified = write.data_checksum == computed
                || (policy == DataChecksumPolicy::ZeroMeansUnverified && write.data_checksum == 0);
            assert!(
                verified,
                "yielded a write whose data checksum does not hold"
            );
        }
    }
}
