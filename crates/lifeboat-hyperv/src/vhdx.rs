//! The VHDX file format ([MS-VHDX]) as far as the backend reads it itself: the header that
//! carries the *data write GUID*, and the block allocation table (BAT) that tells which
//! blocks of a disk hold data. Pure parsing over bytes; the bytes come from the host.
//!
//! ```text
//!  0        64 KiB    128 KiB   192 KiB   256 KiB          region table → BAT, metadata
//!  │file id │header 1 │header 2 │regions 1│regions 2│ ... log ... BAT ... metadata ... blocks
//!           └ the valid header with the higher SequenceNumber is current:
//!             FileWriteGuid, DataWriteGuid (changes before the first write of user-visible
//!             data after an open), LogGuid (non-nil: a log not yet replayed)
//! ```
//!
//! # Caveats
//! - A file whose current header names a log (`LogGuid` not nil) may have BAT updates only in
//!   the log: [`read_layout`] refuses it ([`VhdxError::PendingLog`]) rather than report too
//!   little data. A checkpoint's files are closed cleanly before Hyper-V reopens them
//!   read-only, so their logs are empty.
//! - Allocation is reported per payload block (1 to 256 MiB); a block partially present in a
//!   differencing disk counts as data.
//!
//! [MS-VHDX]: https://learn.microsoft.com/openspecs/windows_protocols/ms-vhdx

use std::ops::Range;
use uuid::Uuid;

/// KiB.
const KIB: u64 = 1024;
/// MiB.
const MIB: u64 = 1024 * 1024;
/// The file type identifier: the first 8 bytes of every VHDX file.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Where the two headers are.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// The size of a header (its checksum covers all of it).
pub const HEADER_BYTES: usize = 4096;
/// Where the two region tables are.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// The size of a region table (its checksum covers all of it).
pub const REGION_TABLE_BYTES: usize = 64 * 1024;
/// The region of the block allocation table.
pub const BAT_REGION: Uuid = Uuid::from_u128(0x2dc27766_f623_4200_9d64_115e9bfd4a08);
/// The metadata region.
pub const METADATA_REGION: Uuid = Uuid::from_u128(0x8b7ca206_4790_4b9a_b8fe_575f050f886e);
/// Metadata item: block size and flags (has a parent).
pub const FILE_PARAMETERS_ITEM: Uuid = Uuid::from_u128(0xcaa16737_fa36_4d43_b3b6_33f0aa44e76b);
/// Metadata item: the virtual size.
pub const VIRTUAL_DISK_SIZE_ITEM: Uuid = Uuid::from_u128(0x2fa54224_cd1b_4876_b211_5dbed83bf4b8);
/// Metadata item: the virtual disk's identity.
pub const VIRTUAL_DISK_ID_ITEM: Uuid = Uuid::from_u128(0xbeca12ab_b2e6_4523_93ef_c309e000c746);
/// Metadata item: the logical sector size.
pub const LOGICAL_SECTOR_SIZE_ITEM: Uuid = Uuid::from_u128(0x8141bf1d_a96f_4709_ba47_f233a8faab5f);

/// BAT state: not in this file (zeros, or the parent's data in a differencing disk).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u8 = 0;
/// BAT state: contents undefined.
pub const PAYLOAD_BLOCK_UNDEFINED: u8 = 1;
/// BAT state: reads as zeros.
pub const PAYLOAD_BLOCK_ZERO: u8 = 2;
/// BAT state: unmapped (trimmed): may read as zeros or as the old data.
pub const PAYLOAD_BLOCK_UNMAPPED: u8 = 3;
/// BAT state: all of the block is in this file.
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u8 = 6;
/// BAT state: some sectors are here, the rest in the parent (differencing disks).
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u8 = 7;

/// Why a VHDX file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VhdxError {
    /// The file does not start with the VHDX signature.
    #[error("not a VHDX file (no \"vhdxfile\" signature)")]
    NotVhdx,
    /// Neither header has a valid signature and checksum.
    #[error("neither VHDX header is valid")]
    NoValidHeader,
    /// Neither region table is valid, or one lacks a required region.
    #[error("region table: {0}")]
    RegionTable(String),
    /// The metadata region does not parse.
    #[error("metadata: {0}")]
    Metadata(String),
    /// The current header names a log that was not replayed.
    #[error("the file has a log not replayed yet (LogGuid {0}): its BAT may be stale")]
    PendingLog(Uuid),
    /// The BAT does not cover the disk.
    #[error("BAT: {0}")]
    Bat(String),
    /// Reading the file failed.
    #[error("read {len} bytes at {offset}: {detail}")]
    Read {
        /// Where.
        offset: u64,
        /// How much.
        len: usize,
        /// The cause.
        detail: String,
    },
}

/// Positional reads of a file's raw bytes (the image file, not the virtual disk).
pub trait FileBytes {
    /// `len` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String>;
}

fn read_exact(f: &dyn FileBytes, offset: u64, len: usize) -> Result<Vec<u8>, VhdxError> {
    let fail = |detail: String| VhdxError::Read {
        offset,
        len,
        detail,
    };
    let bytes = f.read_at(offset, len).map_err(fail)?;
    if bytes.len() < len {
        return Err(fail(format!("the file ends after {} bytes", bytes.len())));
    }
    Ok(bytes)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of VHDX structures.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A structure's checksum: CRC-32C over `bytes` with the 4 checksum bytes at `at` as zeros.
fn checksum_with_field_zeroed(bytes: &[u8], at: usize) -> u32 {
    let mut copy = bytes.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn guid_at(b: &[u8], at: usize) -> Uuid {
    let mut v = [0u8; 16];
    v.copy_from_slice(&b[at..at + 16]);
    // NB: GUIDs on disk are Microsoft's mixed-endian layout (the first three fields LE).
    Uuid::from_bytes_le(v)
}

/// One VHDX header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VhdxHeader {
    /// Which of the two headers is current: the higher.
    pub sequence_number: u64,
    /// Changes when the file is first opened for writing.
    pub file_write_guid: Uuid,
    /// Changes before the first write of user-visible data after the file is opened.
    pub data_write_guid: Uuid,
    /// Non-nil when the log holds entries to replay.
    pub log_guid: Uuid,
    /// The format version (1).
    pub version: u16,
}

/// Parse one 4 KiB header; `None` when its signature or checksum is wrong.
pub fn parse_header(block: &[u8]) -> Option<VhdxHeader> {
    if block.len() < HEADER_BYTES || &block[0..4] != b"head" {
        return None;
    }
    let block = &block[..HEADER_BYTES];
    if u32_at(block, 4) != checksum_with_field_zeroed(block, 4) {
        return None;
    }
    Some(VhdxHeader {
        sequence_number: u64_at(block, 8),
        file_write_guid: guid_at(block, 16),
        data_write_guid: guid_at(block, 32),
        log_guid: guid_at(block, 48),
        version: u16_at(block, 66),
    })
}

/// The current header of a file: the valid one with the higher sequence number.
pub fn read_current_header(f: &dyn FileBytes) -> Result<VhdxHeader, VhdxError> {
    let signature = read_exact(f, 0, 8)?;
    if signature != FILE_SIGNATURE {
        return Err(VhdxError::NotVhdx);
    }
    let mut best: Option<VhdxHeader> = None;
    for offset in HEADER_OFFSETS {
        let block = read_exact(f, offset, HEADER_BYTES)?;
        if let Some(h) = parse_header(&block)
            && best.is_none_or(|b| h.sequence_number > b.sequence_number)
        {
            best = Some(h);
        }
    }
    best.ok_or(VhdxError::NoValidHeader)
}

/// What [`read_layout`] learns of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhdxLayout {
    /// The current header.
    pub header: VhdxHeader,
    /// Payload block size.
    pub block_size_bytes: u32,
    /// The virtual disk's size.
    pub virtual_size_bytes: u64,
    /// The logical sector size (512 or 4096).
    pub logical_sector_bytes: u32,
    /// A differencing disk.
    pub has_parent: bool,
    /// The virtual disk's identity (the same in a differencing chain made by checkpoints).
    pub virtual_disk_id: Option<Uuid>,
    /// Where the BAT is, and its length.
    pub bat: Range<u64>,
}

impl VhdxLayout {
    /// Payload blocks in the virtual disk.
    pub fn payload_blocks(&self) -> u64 {
        self.virtual_size_bytes
            .div_ceil(u64::from(self.block_size_bytes))
    }

    /// Payload blocks per sector bitmap block: 2^23 sectors' worth.
    pub fn chunk_ratio(&self) -> u64 {
        ((1u64 << 23) * u64::from(self.logical_sector_bytes)) / u64::from(self.block_size_bytes)
    }

    /// The BAT entry of payload block `block` (sector bitmap entries are interleaved).
    pub fn bat_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio().max(1)
    }
}

/// The entries of a valid region table: (GUID, file offset, length).
fn parse_region_table(table: &[u8]) -> Option<Vec<(Uuid, u64, u32)>> {
    if table.len() < REGION_TABLE_BYTES || &table[0..4] != b"regi" {
        return None;
    }
    let table = &table[..REGION_TABLE_BYTES];
    if u32_at(table, 4) != checksum_with_field_zeroed(table, 4) {
        return None;
    }
    let count = u32_at(table, 8) as usize;
    if count > 2047 {
        return None;
    }
    Some(
        (0..count)
            .map(|i| {
                let at = 16 + i * 32;
                (
                    guid_at(table, at),
                    u64_at(table, at + 16),
                    u32_at(table, at + 24),
                )
            })
            .collect(),
    )
}

/// Read the current header, the region table and the metadata a BAT walk needs.
pub fn read_layout(f: &dyn FileBytes) -> Result<VhdxLayout, VhdxError> {
    let header = read_current_header(f)?;
    if !header.log_guid.is_nil() {
        return Err(VhdxError::PendingLog(header.log_guid));
    }
    let mut regions = None;
    for offset in REGION_TABLE_OFFSETS {
        if let Some(r) = parse_region_table(&read_exact(f, offset, REGION_TABLE_BYTES)?) {
            regions = Some(r);
            break;
        }
    }
    let regions =
        regions.ok_or_else(|| VhdxError::RegionTable("neither copy is valid".to_owned()))?;
    let find = |id: Uuid, name: &str| {
        regions
            .iter()
            .find(|(g, _, _)| *g == id)
            .map(|&(_, offset, len)| (offset, len))
            .ok_or_else(|| VhdxError::RegionTable(format!("no {name} region")))
    };
    let (bat_offset, bat_len) = find(BAT_REGION, "BAT")?;
    let (meta_offset, meta_len) = find(METADATA_REGION, "metadata")?;
    let meta = read_exact(f, meta_offset, meta_len as usize)?;
    if meta.len() < 32 || &meta[0..8] != b"metadata" {
        return Err(VhdxError::Metadata("no \"metadata\" signature".to_owned()));
    }
    let count = usize::from(u16_at(&meta, 10));
    let item = |id: Uuid, min_len: usize| -> Result<Option<&[u8]>, VhdxError> {
        for i in 0..count {
            let at = 32 + i * 32;
            if at + 32 > meta.len() {
                return Err(VhdxError::Metadata(format!("entry {i} is past the region")));
            }
            if guid_at(&meta, at) == id {
                let offset = u32_at(&meta, at + 16) as usize;
                let len = u32_at(&meta, at + 20) as usize;
                if len < min_len || offset + len > meta.len() {
                    return Err(VhdxError::Metadata(format!(
                        "item {id} at {offset}+{len} does not fit"
                    )));
                }
                return Ok(Some(&meta[offset..offset + len]));
            }
        }
        Ok(None)
    };
    let params = item(FILE_PARAMETERS_ITEM, 8)?
        .ok_or_else(|| VhdxError::Metadata("no file parameters".to_owned()))?;
    let block_size_bytes = u32_at(params, 0);
    let has_parent = u32_at(params, 4) & 2 != 0;
    let virtual_size_bytes = u64_at(
        item(VIRTUAL_DISK_SIZE_ITEM, 8)?
            .ok_or_else(|| VhdxError::Metadata("no virtual disk size".to_owned()))?,
        0,
    );
    let logical_sector_bytes = item(LOGICAL_SECTOR_SIZE_ITEM, 4)?
        .map(|b| u32_at(b, 0))
        .unwrap_or(512);
    let virtual_disk_id = item(VIRTUAL_DISK_ID_ITEM, 16)?.map(|b| guid_at(b, 0));
    if !(MIB..=256 * MIB).contains(&u64::from(block_size_bytes))
        || !block_size_bytes.is_power_of_two()
    {
        return Err(VhdxError::Metadata(format!(
            "block size {block_size_bytes} is not a power of two in 1..=256 MiB"
        )));
    }
    if logical_sector_bytes != 512 && logical_sector_bytes != 4096 {
        return Err(VhdxError::Metadata(format!(
            "logical sector size {logical_sector_bytes}"
        )));
    }
    Ok(VhdxLayout {
        header,
        block_size_bytes,
        virtual_size_bytes,
        logical_sector_bytes,
        has_parent,
        virtual_disk_id,
        bat: bat_offset..bat_offset + u64::from(bat_len),
    })
}

/// The state (the low 3 bits of its BAT entry) of every payload block of the file.
pub fn read_block_states(f: &dyn FileBytes, layout: &VhdxLayout) -> Result<Vec<u8>, VhdxError> {
    let blocks = layout.payload_blocks();
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let last_entry = layout.bat_index(blocks - 1);
    let needed = (last_entry + 1) * 8;
    let bat_len = layout.bat.end - layout.bat.start;
    if needed > bat_len {
        return Err(VhdxError::Bat(format!(
            "{blocks} blocks need {needed} bytes of BAT, the region has {bat_len}"
        )));
    }
    let bat = read_exact(
        f,
        layout.bat.start,
        usize::try_from(needed).map_err(|_| VhdxError::Bat("too large".to_owned()))?,
    )?;
    Ok((0..blocks)
        .map(|b| {
            let at = (layout.bat_index(b) * 8) as usize;
            (u64_at(&bat, at) & 7) as u8
        })
        .collect())
}

/// What a read of a block of a chain returns, from the leaf's state down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Zero,
    Data,
}

/// The ranges that may hold data in a chain of files, leaf first, each with its layout and
/// block states; the rest reads as zeros. Sorted, disjoint, merged, within the virtual size.
///
/// # Errors
/// The files of the chain disagree on the virtual size or the block size.
pub fn allocated_ranges(chain: &[(VhdxLayout, Vec<u8>)]) -> Result<Vec<Range<u64>>, VhdxError> {
    let Some((leaf, _)) = chain.first() else {
        return Ok(Vec::new());
    };
    for (layout, states) in chain {
        if layout.virtual_size_bytes != leaf.virtual_size_bytes
            || layout.block_size_bytes != leaf.block_size_bytes
        {
            return Err(VhdxError::Bat(format!(
                "the chain mixes sizes: {} bytes in {} byte blocks vs {} in {}",
                layout.virtual_size_bytes,
                layout.block_size_bytes,
                leaf.virtual_size_bytes,
                leaf.block_size_bytes
            )));
        }
        if states.len() as u64 != layout.payload_blocks() {
            return Err(VhdxError::Bat(format!(
                "{} block states for {} blocks",
                states.len(),
                layout.payload_blocks()
            )));
        }
    }
    let block = u64::from(leaf.block_size_bytes);
    let size = leaf.virtual_size_bytes;
    let mut out: Vec<Range<u64>> = Vec::new();
    for b in 0..leaf.payload_blocks() {
        let mut source = Source::Zero;
        for (layout, states) in chain {
            match states[b as usize] {
                PAYLOAD_BLOCK_NOT_PRESENT if layout.has_parent => continue,
                PAYLOAD_BLOCK_NOT_PRESENT | PAYLOAD_BLOCK_ZERO => source = Source::Zero,
                // NB: undefined and unmapped blocks may read as old data: copy them.
                _ => source = Source::Data,
            }
            break;
        }
        if source == Source::Data {
            let range = b * block..((b + 1) * block).min(size);
            match out.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => out.push(range),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;
    use std::process::Command;

    /// Bytes in memory as a file.
    struct Mem(Vec<u8>);

    impl FileBytes for Mem {
        fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
            let start = (offset as usize).min(self.0.len());
            let end = (start + len).min(self.0.len());
            Ok(self.0[start..end].to_vec())
        }
    }

    /// A 4 KiB header with a valid checksum.
    fn header(seq: u64, data_write: u128, log: u128) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[16..32].copy_from_slice(&Uuid::from_u128(0xF11E).to_bytes_le());
        b[32..48].copy_from_slice(&Uuid::from_u128(data_write).to_bytes_le());
        b[48..64].copy_from_slice(&Uuid::from_u128(log).to_bytes_le());
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        let sum = crc32c(&b);
        b[4..8].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn file_with_headers(h1: Vec<u8>, h2: Vec<u8>) -> Mem {
        let mut f = vec![0u8; 192 * 1024];
        f[0..8].copy_from_slice(FILE_SIGNATURE);
        f[64 * 1024..64 * 1024 + HEADER_BYTES].copy_from_slice(&h1);
        f[128 * 1024..128 * 1024 + HEADER_BYTES].copy_from_slice(&h2);
        Mem(f)
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC catalogue's check value of CRC-32/ISCSI over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn the_valid_header_with_the_higher_sequence_number_is_current() {
        let f = file_with_headers(header(7, 0xA, 0), header(8, 0xB, 0));
        let h = read_current_header(&f).unwrap();
        assert_eq!(h.sequence_number, 8);
        assert_eq!(h.data_write_guid, Uuid::from_u128(0xB));
        assert_eq!(h.version, 1);

        // A torn newer header (bad checksum) leaves the older one current.
        let mut torn = header(9, 0xC, 0);
        torn[100] ^= 1;
        let f = file_with_headers(header(7, 0xA, 0), torn);
        assert_eq!(
            read_current_header(&f).unwrap().data_write_guid,
            Uuid::from_u128(0xA)
        );
    }

    #[test]
    fn files_without_a_valid_header_or_signature_are_refused() {
        let mut bad = header(1, 1, 0);
        bad[0] = b'x';
        let mut torn = header(2, 2, 0);
        torn[5] ^= 0xFF;
        assert_eq!(
            read_current_header(&file_with_headers(bad, torn)),
            Err(VhdxError::NoValidHeader)
        );
        assert_eq!(
            read_current_header(&Mem(vec![0; 300 * 1024])),
            Err(VhdxError::NotVhdx)
        );
        assert!(matches!(
            read_current_header(&Mem(b"vhdxfile".to_vec())),
            Err(VhdxError::Read { .. })
        ));
    }

    fn layout(blocks: u64, has_parent: bool) -> VhdxLayout {
        VhdxLayout {
            header: parse_header(&header(1, 1, 0)).unwrap(),
            block_size_bytes: MIB as u32,
            virtual_size_bytes: blocks * MIB - 512,
            logical_sector_bytes: 512,
            has_parent,
            virtual_disk_id: None,
            bat: 0..0,
        }
    }

    #[test]
    fn a_chain_reads_down_to_the_first_file_that_has_the_block() {
        let base = (
            layout(6, false),
            vec![
                PAYLOAD_BLOCK_FULLY_PRESENT,
                PAYLOAD_BLOCK_NOT_PRESENT,
                PAYLOAD_BLOCK_FULLY_PRESENT,
                PAYLOAD_BLOCK_NOT_PRESENT,
                PAYLOAD_BLOCK_UNMAPPED,
                PAYLOAD_BLOCK_FULLY_PRESENT,
            ],
        );
        let child = (
            layout(6, true),
            vec![
                PAYLOAD_BLOCK_NOT_PRESENT,
                PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                PAYLOAD_BLOCK_ZERO,
                PAYLOAD_BLOCK_NOT_PRESENT,
                PAYLOAD_BLOCK_NOT_PRESENT,
                PAYLOAD_BLOCK_NOT_PRESENT,
            ],
        );
        let size = 6 * MIB - 512;
        // Block 0 from the base, 1 from the child, 2 zeroed by the child, 3 nowhere,
        // 4 unmapped (may hold old data), 5 from the base up to the virtual size.
        assert_eq!(
            allocated_ranges(&[child.clone(), base.clone()]).unwrap(),
            vec![0..2 * MIB, 4 * MIB..size]
        );
        assert_eq!(
            allocated_ranges(&[base]).unwrap(),
            vec![0..MIB, 2 * MIB..3 * MIB, 4 * MIB..size]
        );
        let mut other = layout(6, false);
        other.block_size_bytes = 2 * MIB as u32;
        assert!(allocated_ranges(&[child, (other, vec![0; 3])]).is_err());
    }

    #[test]
    fn bat_entries_skip_the_interleaved_sector_bitmap_entries() {
        // 512-byte sectors, 1 MiB blocks: 4096 payload blocks per bitmap block.
        let l = layout(10_000, false);
        assert_eq!(l.chunk_ratio(), 4096);
        assert_eq!(l.bat_index(0), 0);
        assert_eq!(l.bat_index(4095), 4095);
        assert_eq!(l.bat_index(4096), 4097);
        assert_eq!(l.bat_index(8192), 8194);
    }

    fn qemu_img_available() -> bool {
        let ok = |tool: &str| {
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        ok("qemu-img") && ok("qemu-io")
    }

    fn run(tool: &str, args: &[&str]) {
        let out = Command::new(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cross-check against an independent implementation: QEMU's VHDX driver writes the files.
    #[test]
    fn reads_what_qemu_img_and_qemu_io_write() {
        if !qemu_img_available() {
            eprintln!("skipped: qemu-img and qemu-io (Debian qemu-utils) are not on PATH");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhdx");
        let p = path.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                "subformat=dynamic,block_size=1M",
                p,
                "64M",
            ],
        );
        let read = || Mem(std::fs::read(&path).unwrap());
        let fresh = read_layout(&read()).unwrap();
        assert_eq!(fresh.virtual_size_bytes, 64 * MIB);
        assert_eq!(fresh.block_size_bytes, MIB as u32);
        assert_eq!(fresh.logical_sector_bytes, 512);
        assert!(!fresh.has_parent);
        assert!(fresh.virtual_disk_id.is_some());
        let states = read_block_states(&read(), &fresh).unwrap();
        assert_eq!(states.len(), 64);
        assert_eq!(
            allocated_ranges(&[(fresh.clone(), states)]).unwrap(),
            vec![]
        );

        // Reading does not change the data write GUID.
        run("qemu-io", &["-f", "vhdx", "-r", "-c", "read 0 64k", p]);
        assert_eq!(
            read_current_header(&read()).unwrap().data_write_guid,
            fresh.header.data_write_guid
        );

        // Writes allocate their blocks and change the data write GUID.
        run(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                "write -P 0xab 3M 4k",
                "-c",
                "write -P 0xcd 10M 2M",
                "-c",
                "write -P 0xef 63M 1M",
                p,
            ],
        );
        let written = read_layout(&read()).unwrap();
        assert_ne!(written.header.data_write_guid, fresh.header.data_write_guid);
        assert_eq!(written.virtual_disk_id, fresh.virtual_disk_id);
        let states = read_block_states(&read(), &written).unwrap();
        assert_eq!(
            allocated_ranges(&[(written, states)]).unwrap(),
            vec![3 * MIB..4 * MIB, 10 * MIB..12 * MIB, 63 * MIB..64 * MIB]
        );
    }
}
