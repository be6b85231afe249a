//! Builders shared by the tests of several modules.

use std::io::Cursor;

use uuid::Uuid;

use crate::format::HrlTime;
use crate::writer::{HrlWriter, WriterOptions};

/// One write of a test batch.
pub type TestWrite = (u64, Vec<u8>);

/// Writes `batches` into a new in-memory log; seals it when `seal`.
pub fn build_log(batches: &[Vec<TestWrite>], metadata_size: u32, seal: bool) -> Vec<u8> {
    let options =
        WriterOptions::new(Uuid::from_u128(1), HrlTime(1000)).with_metadata_size(metadata_size);
    let mut writer = HrlWriter::create(Cursor::new(Vec::new()), &options).unwrap();
    for (i, batch) in batches.iter().enumerate() {
        let time = HrlTime(1001 + i as u32);
        writer
            .append_batch(batch.iter().map(|(o, d)| (*o, d.as_slice())), time)
            .unwrap();
    }
    if seal {
        writer.seal(HrlTime(5000)).unwrap().sink.into_inner()
    } else {
        writer.get_ref().get_ref().clone()
    }
}

/// Applies writes to a disk image, growing it when a write reaches past its end.
pub fn apply(disk: &mut Vec<u8>, disk_offset: u64, data: &[u8]) {
    let end = disk_offset as usize + data.len();
    if disk.len() < end {
        disk.resize(end, 0);
    }
    disk[disk_offset as usize..end].copy_from_slice(data);
}
