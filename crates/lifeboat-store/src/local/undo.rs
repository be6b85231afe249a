//! Undo segments: the on-disk pre-images of one recovery point, and their reader and writer.
//!
//! A segment (`undo/<disk>/<seq>.undo`, `<seq>` the point's sequence number, zero-padded to
//! 12 digits) holds the content, as of point `<seq>`, of every granule ([`GRANULE_BYTES`])
//! overwritten after that point was cut. It is a run of records, each appended (and synced
//! before the live write it protects) and never rewritten in place:
//!
//! ```text
//!   offset  size  field (integers little-endian)
//!        0     4  UNDO_MAGIC, "LBU1"
//!        4     4  data length n, u32: GRANULE_BYTES, or less for the last granule of a
//!                 point whose size is not a multiple of it
//!        8     8  the granule's offset on the disk, u64 (a multiple of GRANULE_BYTES)
//!       16     8  XXH3-64 of the data, u64
//!       24     8  XXH3-64 of bytes 0..24 of this header, u64
//!       32     n  the data            (UNDO_HEADER_BYTES = 32)
//! ```
//!
//! XXH3-64 is XXH3 with the default seed (0) and secret, as [`XxHash3_64::oneshot`] computes
//! it; earlier segments were written with `xxhash-rust`'s `xxh3_64`, the same function (the
//! tests below check both against reference values and each other).
//!
//! A segment is indexed on open. Only its last record can be torn by a crash (appended,
//! synced, then the live write), in any segment (the latest one by a write, an older one by a
//! point's deletion, which moves granules into it): a bad record within a record's worth of
//! the end of a segment is cut off (tolerated, and left as it is, by a read-only open); a bad
//! record anywhere else is reported as corruption.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use twox_hash::XxHash3_64;

use super::Access;
use super::io::PositionalIo;
use crate::StoreError;

/// Size of the unit of copy-on-write: a granule's old content is saved once per point.
pub(super) const GRANULE_BYTES: u64 = 4096;
/// Magic of an undo record.
const UNDO_MAGIC: &[u8; 4] = b"LBU1";
/// Size of an undo record's header.
pub(super) const UNDO_HEADER_BYTES: u64 = 32;

/// One undo segment: the pre-images of the granules overwritten after one point.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Granule offset on the disk -> offset of the record's data in the file, and its length.
    pub(super) index: BTreeMap<u64, (u64, u64)>,
    pub(super) end: u64,
    /// Records were appended since the last successful sync. A batch that failed halfway
    /// leaves indexed records that nothing made durable: the next write must sync them
    /// before it overwrites anything, even if it appends none of its own.
    pub(super) unsynced: bool,
}

impl Segment {
    /// Open and index a segment. Any segment can end in a torn record (the latest, by a crash
    /// while saving pre-images; an older one, by a crash while a point's deletion moved
    /// granules into it): with [`Access::Write`] it is cut off (and the segment is created if
    /// missing); with [`Access::ReadOnly`] the file is opened for reading only, and the index
    /// simply stops before the torn record.
    pub(super) fn open(path: PathBuf, access: Access) -> Result<Segment, StoreError> {
        let mut options = OpenOptions::new();
        options.read(true);
        if access == Access::Write {
            options.append(true).create(true);
        }
        let file = options
            .open(&path)
            .map_err(StoreError::io("open undo segment", &path))?;
        let len = file
            .metadata()
            .map_err(StoreError::io("stat undo segment", &path))?
            .len();
        let mut index = BTreeMap::new();
        let mut pos = 0;
        let mut header = [0u8; UNDO_HEADER_BYTES as usize];
        while pos < len {
            let torn = |why: &str| format!("bad undo record at byte {pos} ({why})");
            let record = (|| {
                if len - pos < UNDO_HEADER_BYTES {
                    return Err(torn("short header"));
                }
                file.read_exact_at(&mut header, pos)
                    .map_err(|e| torn(&e.to_string()))?;
                let sum = u64::from_le_bytes(header[24..32].try_into().unwrap_or_default());
                if &header[0..4] != UNDO_MAGIC || XxHash3_64::oneshot(&header[..24]) != sum {
                    return Err(torn("header checksum"));
                }
                let data_len = u64::from(u32::from_le_bytes(
                    header[4..8].try_into().unwrap_or_default(),
                ));
                let disk_offset = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
                let data_sum = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
                if data_len > GRANULE_BYTES || len - pos - UNDO_HEADER_BYTES < data_len {
                    return Err(torn("length"));
                }
                let mut data = vec![0u8; data_len as usize];
                file.read_exact_at(&mut data, pos + UNDO_HEADER_BYTES)
                    .map_err(|e| torn(&e.to_string()))?;
                if XxHash3_64::oneshot(&data) != data_sum {
                    return Err(torn("data checksum"));
                }
                Ok((disk_offset, data_len))
            })();
            match record {
                Ok((disk_offset, data_len)) => {
                    index.insert(disk_offset, (pos + UNDO_HEADER_BYTES, data_len));
                    pos += UNDO_HEADER_BYTES + data_len;
                }
                // NB: only the last record can be torn by a crash (it is appended and synced
                // before the live write it protects); more than a record's worth after a bad
                // one means the file was damaged, and guessing would serve wrong data.
                Err(_) if len - pos < UNDO_HEADER_BYTES + GRANULE_BYTES => {
                    if access == Access::Write {
                        file.set_len(pos)
                            .map_err(StoreError::io("cut torn undo record", &path))?;
                        file.sync_all()
                            .map_err(StoreError::io("sync undo segment", &path))?;
                    }
                    break;
                }
                Err(detail) => {
                    return Err(StoreError::Corrupt {
                        path: path.display().to_string(),
                        detail,
                    });
                }
            }
        }
        let end = pos.min(len);
        Ok(Segment {
            path,
            file,
            index,
            end,
            // NB: what an open finds was synced, or is cut above as torn.
            unsynced: false,
        })
    }

    /// Append the pre-image of the granule at `disk_offset` (unsynced until [`Segment::sync`]).
    pub(super) fn append(&mut self, disk_offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.append_run(disk_offset, data)
    }

    /// [`Segment::append`] for the run of granules from `first` that `data` holds (each
    /// [`GRANULE_BYTES`], the last one maybe less), in one write.
    pub(super) fn append_run(&mut self, first: u64, data: &[u8]) -> Result<(), StoreError> {
        let granules = data.len().div_ceil(GRANULE_BYTES as usize);
        let mut records = Vec::with_capacity(granules * UNDO_HEADER_BYTES as usize + data.len());
        let mut placed = Vec::with_capacity(granules);
        for (i, granule) in data.chunks(GRANULE_BYTES as usize).enumerate() {
            let disk_offset = first + i as u64 * GRANULE_BYTES;
            let start = records.len();
            records.extend_from_slice(UNDO_MAGIC);
            records.extend_from_slice(&(granule.len() as u32).to_le_bytes());
            records.extend_from_slice(&disk_offset.to_le_bytes());
            records.extend_from_slice(&XxHash3_64::oneshot(granule).to_le_bytes());
            let sum = XxHash3_64::oneshot(&records[start..]);
            records.extend_from_slice(&sum.to_le_bytes());
            records.extend_from_slice(granule);
            placed.push((disk_offset, start as u64, granule.len() as u64));
        }
        if let Err(e) = self.file.write_all(&records) {
            // NB: a part of the records may have been written (a full disk): cut it, so that
            // the next record does not follow a bad one (corruption at the next open).
            let _ = self.file.set_len(self.end);
            return Err(StoreError::io("append undo record", &self.path)(e));
        }
        for (disk_offset, start, len) in placed {
            self.index
                .insert(disk_offset, (self.end + start + UNDO_HEADER_BYTES, len));
        }
        self.end += records.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// The granule at `disk_offset` as this segment saved it, if it did. The whole record is
    /// checked again (header checksum, the disk offset and length it names, data checksum):
    /// a record that is not the one the index points at is corruption, never served.
    pub(super) fn read_granule(&self, disk_offset: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(&(pos, len)) = self.index.get(&disk_offset) else {
            return Ok(None);
        };
        let start = pos - UNDO_HEADER_BYTES;
        let mut record = vec![0u8; (UNDO_HEADER_BYTES + len) as usize];
        self.file
            .read_exact_at(&mut record, start)
            .map_err(StoreError::io("read undo record", &self.path))?;
        let (header, data) = record.split_at(UNDO_HEADER_BYTES as usize);
        let field = |range: std::ops::Range<usize>| {
            let mut bytes = [0u8; 8];
            bytes[..range.len()].copy_from_slice(&header[range]);
            u64::from_le_bytes(bytes)
        };
        let corrupt = |what: String| StoreError::Corrupt {
            path: self.path.display().to_string(),
            detail: format!("undo record at byte {start} for disk offset {disk_offset}: {what}"),
        };
        if &header[0..4] != UNDO_MAGIC || XxHash3_64::oneshot(&header[..24]) != field(24..32) {
            return Err(corrupt("its header fails its checksum".into()));
        }
        let (stored_len, stored_offset) = (field(4..8), field(8..16));
        if stored_offset != disk_offset || stored_len != len {
            return Err(corrupt(format!(
                "the record holds {stored_len} bytes of disk offset {stored_offset}, not {len} of {disk_offset}"
            )));
        }
        if XxHash3_64::oneshot(data) != field(16..24) {
            return Err(corrupt("its data fails its checksum".into()));
        }
        Ok(Some(data.to_vec()))
    }

    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(StoreError::io("sync undo segment", &self.path))?;
        self.unsynced = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that are not a repeating pattern (xorshift), the same for a given seed.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// An undo record as the previous implementation wrote it: the layout of the module docs,
    /// checksummed with `xxhash-rust`.
    fn record_by_xxhash_rust(disk_offset: u64, data: &[u8]) -> Vec<u8> {
        use xxhash_rust::xxh3::xxh3_64;
        let mut record = Vec::new();
        record.extend_from_slice(b"LBU1");
        record.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
        record.extend_from_slice(&disk_offset.to_le_bytes());
        record.extend_from_slice(&xxh3_64(data).to_le_bytes());
        let sum = xxh3_64(&record);
        record.extend_from_slice(&sum.to_le_bytes());
        record.extend_from_slice(data);
        record
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// twox-hash's XXH3-64 is the XXH3-64 that checksummed the segments already on disk: the
    /// reference value of the empty input, and `xxhash-rust` on every length up to two
    /// 1 KiB blocks (each of XXH3's size classes: 0, 1-3, 4-8, 9-16, 17-128, 129-240, and
    /// the striped long input) and on longer ones around a granule and beyond.
    #[test]
    fn twox_hash_xxh3_64_is_the_checksum_of_existing_segments() {
        assert_eq!(XxHash3_64::oneshot(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        let long = noise(1 << 20, 7);
        let lengths = (0..=2048).chain([4095, 4096, 4097, 8192, 65_553, 1 << 20]);
        for len in lengths {
            let data = &long[..len];
            assert_eq!(
                XxHash3_64::oneshot(data),
                xxhash_rust::xxh3::xxh3_64(data),
                "XXH3-64 of {len} bytes"
            );
        }
    }

    /// A segment knows whether it holds records no sync covered: set by an append, cleared
    /// only by a sync that succeeded; a reopened segment has none.
    #[test]
    fn a_segment_knows_its_unsynced_records() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("000000000001.undo");
        let mut segment =
            Segment::open(path.clone(), Access::Write).unwrap_or_else(|e| panic!("{e}"));
        assert!(!segment.unsynced);
        segment
            .append(0, &[7; 4096])
            .unwrap_or_else(|e| panic!("{e}"));
        segment
            .append(4096, &[8; 4096])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(segment.unsynced, "appended records wait for a sync");
        segment.sync().unwrap_or_else(|e| panic!("{e}"));
        assert!(!segment.unsynced);
        segment
            .append(8192, &[9; 4096])
            .unwrap_or_else(|e| panic!("{e}"));
        drop(segment);
        let reopened = Segment::open(path, Access::Write).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reopened.index.len(), 3);
        assert!(!reopened.unsynced);
    }

    /// A run of granules appended in one write is the same records, byte for byte, as the
    /// granules appended one by one, and each reads back after a reopen.
    #[test]
    fn a_run_appended_at_once_is_the_records_of_its_granules() {
        let data: Vec<u8> = (0..3 * 4096 + 1024u32)
            .map(|i| (i * 13 + 1) as u8)
            .collect();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (one, run) = (dir.path().join("1.undo"), dir.path().join("2.undo"));
        let mut by_one =
            Segment::open(one.clone(), Access::Write).unwrap_or_else(|e| panic!("{e}"));
        for (i, granule) in data.chunks(4096).enumerate() {
            by_one
                .append(0x8000 + i as u64 * 4096, granule)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut at_once =
            Segment::open(run.clone(), Access::Write).unwrap_or_else(|e| panic!("{e}"));
        at_once
            .append_run(0x8000, &data)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(at_once.unsynced);
        at_once.sync().unwrap_or_else(|e| panic!("{e}"));
        drop((by_one, at_once));
        let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_else(|e| panic!("{e}"));
        assert!(read(&one) == read(&run), "the run's records differ");
        let reopened = Segment::open(run, Access::Write).unwrap_or_else(|e| panic!("{e}"));
        for (i, granule) in data.chunks(4096).enumerate() {
            let got = reopened
                .read_granule(0x8000 + i as u64 * 4096)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.as_deref(), Some(granule), "granule {i}");
        }
    }

    /// Records appended now are byte for byte the records of the previous implementation
    /// (and of the format in the module docs), and records it wrote read back now.
    #[test]
    fn undo_records_keep_their_on_disk_format() {
        let granule: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        let tail = &granule[..1536];
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));

        let path = dir.path().join("000000000001.undo");
        let mut segment =
            Segment::open(path.clone(), Access::Write).unwrap_or_else(|e| panic!("{e}"));
        segment
            .append(0x1_0000, &granule)
            .unwrap_or_else(|e| panic!("{e}"));
        segment
            .append(0x2_0000, tail)
            .unwrap_or_else(|e| panic!("{e}"));
        segment.sync().unwrap_or_else(|e| panic!("{e}"));
        drop(segment);
        let written = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut expected = record_by_xxhash_rust(0x1_0000, &granule);
        expected.extend(record_by_xxhash_rust(0x2_0000, tail));
        assert_eq!(written, expected);
        // The headers, as the previous implementation (xxhash-rust's xxh3_64) wrote them.
        assert_eq!(
            hex(&written[..32]),
            "4c425531\
             00100000\
             0000010000000000\
             7ee32b84468742d7\
             e0f32869c9cec65d"
        );
        assert_eq!(
            hex(&written[32 + 4096..32 + 4096 + 32]),
            "4c425531\
             00060000\
             0000020000000000\
             8c374722c7b83f94\
             225abf23b1269c48"
        );

        // Records written by the previous implementation open, index and verify.
        let old = dir.path().join("000000000002.undo");
        let mut bytes = record_by_xxhash_rust(0x3000, &noise(4096, 3));
        bytes.extend(record_by_xxhash_rust(0x9000, &noise(512, 4)));
        std::fs::write(&old, &bytes).unwrap_or_else(|e| panic!("{e}"));
        for path in [&path, &old] {
            let segment =
                Segment::open(path.clone(), Access::ReadOnly).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(segment.index.len(), 2);
            assert_eq!(
                segment.end,
                std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
            );
            for (&disk_offset, &(_, len)) in &segment.index {
                let data = segment
                    .read_granule(disk_offset)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(data.map(|d| d.len() as u64), Some(len));
            }
        }
        let segment = Segment::open(old, Access::ReadOnly).unwrap_or_else(|e| panic!("{e}"));
        let read = |at| segment.read_granule(at).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(0x3000), Some(noise(4096, 3)));
        assert_eq!(read(0x9000), Some(noise(512, 4)));
    }

    /// Issue 16, defect 4: a record whose checksums hold but whose stored offset is not the
    /// one asked for (a record moved or overwritten behind the index) is corruption, naming
    /// the segment and both offsets, never served as the asked granule.
    #[test]
    fn a_record_for_another_offset_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("000000000001.undo");
        let data = noise(4096, 9);
        let mut segment =
            Segment::open(path.clone(), Access::Write).unwrap_or_else(|e| panic!("{e}"));
        segment
            .append(0x1000, &data)
            .unwrap_or_else(|e| panic!("{e}"));
        segment
            .append(0x2000, &noise(4096, 10))
            .unwrap_or_else(|e| panic!("{e}"));
        segment.sync().unwrap_or_else(|e| panic!("{e}"));
        // The first record rewritten, whole and valid, for disk offset 0x5000.
        let other = record_by_xxhash_rust(0x5000, &data);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        file.write_all_at(&other, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(file);
        let error = segment.read_granule(0x1000);
        let Err(StoreError::Corrupt {
            path: named,
            detail,
        }) = &error
        else {
            let served = error.map(|d| d.map(|d| d.len()));
            panic!("a record for disk offset 0x5000 served as 0x1000: {served:?}");
        };
        assert_eq!(named, &path.display().to_string());
        assert!(
            detail.contains("4096") && detail.contains("20480"),
            "{detail}"
        );
        assert!(
            segment
                .read_granule(0x2000)
                .is_ok_and(|d| d == Some(noise(4096, 10))),
            "the other record still reads"
        );
    }
}
