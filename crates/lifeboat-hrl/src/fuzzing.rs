//! The body of the `reader` fuzz target, shared with the property tests so that the same
//! check runs under `cargo fuzz` and under `cargo test`.
//!
//! ```text
//! arbitrary bytes -> HrlReader::open (both checksum policies) -> every write
//!                    must not panic      each yielded write's data checksum must hold
//!
//! recipe bytes -> HrlWriter (valid log) -> byte flips, truncation -> check_reader
//!                 (reaches deep into the block walk, which raw bytes rarely do)
//! ```

use std::io::Cursor;

use uuid::Uuid;

use crate::format::{DataChecksum, HrlTime};
use crate::reader::{DataChecksumPolicy, HrlReader, ReadOptions};
use crate::writer::{HrlWriter, WriterOptions};

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

/// Builds a valid log from `recipe`, damages it as the recipe says, and runs
/// [`check_reader`] on the result. With no damage, the reader must yield exactly the writes.
///
/// Recipe: byte 0 picks MetadataSize (512, 1024, 4096), byte 1 bit 0 seals the log and bit 1
/// truncates it, byte 2 counts writes; then 3 bytes per write (u16 disk offset whose top bit
/// starts a new batch, length); then 3 bytes per damage (u16 position scaled to the log,
/// XOR mask); a truncation cuts at the last damage position.
///
/// # Panics
///
/// As [`check_reader`], and when an undamaged log does not read back as written.
pub fn check_mutated_log(recipe: &[u8]) {
    let [size_pick, flags, count, rest @ ..] = recipe else {
        return;
    };
    let metadata_size = [512u32, 1024, 4096][usize::from(*size_pick % 3)];
    let seal = flags & 1 == 1;
    let truncate = flags & 2 == 2;
    let write_count = usize::from(*count % 64).min(rest.len() / 3);
    let (write_recipe, damage_recipe) = rest.split_at(write_count * 3);

    let options =
        WriterOptions::new(Uuid::from_u128(0x1f), HrlTime(1)).with_metadata_size(metadata_size);
    let Ok(mut writer) = HrlWriter::create(Cursor::new(Vec::new()), &options) else {
        panic!("creating a log in memory failed");
    };
    let mut expected = Vec::new();
    for (i, w) in write_recipe.chunks_exact(3).enumerate() {
        let raw_offset = u16::from_le_bytes([w[0], w[1]]);
        if raw_offset & 0x8000 != 0 {
            assert!(writer.commit(HrlTime(2)).is_ok(), "commit to memory failed");
        }
        let disk_offset = u64::from(raw_offset & 0x7fff) * 7;
        let data: Vec<u8> = (0..usize::from(w[2])).map(|j| (i * 31 + j) as u8).collect();
        assert!(
            writer.write(disk_offset, &data, HrlTime(3)).is_ok(),
            "write to memory failed"
        );
        expected.push((disk_offset, data));
    }
    let mut bytes = if seal {
        match writer.seal(HrlTime(4)) {
            Ok(sealed) => sealed.sink.into_inner(),
            Err(e) => panic!("sealing a log in memory failed: {e}"),
        }
    } else {
        assert!(writer.commit(HrlTime(4)).is_ok(), "commit to memory failed");
        writer.get_ref().get_ref().clone()
    };

    if damage_recipe.len() < 3 {
        let mut reader = match HrlReader::open(Cursor::new(bytes.as_slice())) {
            Ok(r) => r,
            Err(e) => panic!("an undamaged log failed to open: {e}"),
        };
        let got: Vec<_> = reader
            .writes()
            .map(|w| w.map(|w| (w.disk_offset, w.data)))
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        assert_eq!(
            got, expected,
            "an undamaged log did not read back as written"
        );
        return;
    }
    let len = bytes.len();
    let mut last = 0;
    for d in damage_recipe.chunks_exact(3) {
        let scaled = usize::from(u16::from_le_bytes([d[0], d[1]])) * len / 0x1_0000;
        last = scaled;
        if let Some(b) = bytes.get_mut(scaled) {
            *b ^= d[2];
        }
    }
    if truncate {
        bytes.truncate(last);
    }
    check_reader(&bytes);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn short_recipes_are_ignored_and_empty_ones_round_trip() {
        check_mutated_log(&[]);
        check_mutated_log(&[0, 0, 0]);
        check_mutated_log(&[2, 1, 0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn mutated_logs_never_break_the_reader(recipe in prop::collection::vec(any::<u8>(), 0..200)) {
            check_mutated_log(&recipe);
        }

        #[test]
        fn random_bytes_never_break_the_reader(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
            check_reader(&bytes);
        }
    }
}
