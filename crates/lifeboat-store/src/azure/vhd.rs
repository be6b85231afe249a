//! The fixed-VHD layout of a replica disk blob, so that after failover a managed disk can be
//! created from the blob as it is (Azure accepts only fixed VHDs whose virtual size is a whole
//! number of MiB).
//!
//! ```text
//!   offset 0                        data_size_bytes        blob_size_bytes
//!   | virtual disk (reads, writes) | padding (zeros) | footer (512 bytes) |
//!   '------ disk size_bytes -------'                 ^ data_size = size rounded up to 1 MiB
//! ```
//!
//! The footer follows the "Virtual Hard Disk Image Format Specification" (Microsoft, 2006):
//! every field big-endian; the checksum is the one's complement of the byte sum of the footer
//! with the checksum field zeroed. Pure functions only: the store writes the bytes.

use crate::PAGE_SIZE_BYTES;

/// Size of the footer at the end of a fixed VHD.
pub const FOOTER_SIZE_BYTES: u64 = 512;
/// Azure wants the virtual size of a VHD to be a whole number of MiB.
pub const VHD_ALIGNMENT_BYTES: u64 = 1024 * 1024;

const COOKIE: &[u8; 8] = b"conectix";
const FEATURES_RESERVED: u32 = 2;
const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
const FIXED_DATA_OFFSET: u64 = u64::MAX;
const CREATOR_APPLICATION: &[u8; 4] = b"lfbt";
const CREATOR_VERSION: u32 = 0x0001_0000;
const CREATOR_HOST_OS_WINDOWS: &[u8; 4] = b"Wi2k";
/// Disk type of a fixed VHD.
pub const DISK_TYPE_FIXED: u32 = 2;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01T00:00:00Z).
const VHD_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// The virtual size a disk of `size_bytes` is stored with: rounded up to a whole MiB.
pub fn data_size_bytes(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(VHD_ALIGNMENT_BYTES) * VHD_ALIGNMENT_BYTES
}

/// The page blob's size for a disk of `size_bytes`: its data size and the footer.
pub fn blob_size_bytes(size_bytes: u64) -> u64 {
    data_size_bytes(size_bytes) + FOOTER_SIZE_BYTES
}

/// Cylinders, heads and sectors per track of a disk, by the algorithm of the VHD
/// specification (appendix "CHS calculation").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

/// The CHS geometry of a disk of `size_bytes`.
pub fn geometry(size_bytes: u64) -> Geometry {
    const MAX_SECTORS: u64 = 65_535 * 16 * 255;
    let total_sectors = (size_bytes / PAGE_SIZE_BYTES).min(MAX_SECTORS);
    let (sectors_per_track, heads, cylinder_times_heads) = if total_sectors >= 65_535 * 16 * 63 {
        (255, 16, total_sectors / 255)
    } else {
        let mut spt = 17;
        let mut cth = total_sectors / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total_sectors / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total_sectors / spt;
        }
        (spt, heads, cth)
    };
    // NB: every value is bounded by the clamps above (cylinders <= 65535, heads <= 16,
    // sectors <= 255), so these conversions never saturate in practice.
    Geometry {
        cylinders: u16::try_from(cylinder_times_heads / heads).unwrap_or(u16::MAX),
        heads: u8::try_from(heads).unwrap_or(u8::MAX),
        sectors_per_track: u8::try_from(sectors_per_track).unwrap_or(u8::MAX),
    }
}

/// What a footer says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// The virtual disk's size (original and current are the same for a fixed disk).
    pub current_size_bytes: u64,
    /// Its geometry.
    pub geometry: Geometry,
    /// The disk type ([`DISK_TYPE_FIXED`] for ours).
    pub disk_type: u32,
    /// Creation time, in seconds since 2000-01-01T00:00:00Z.
    pub timestamp_vhd_secs: u32,
    /// The disk's unique id.
    pub unique_id: [u8; 16],
}

/// The footer of a fixed VHD whose virtual disk is `data_size_bytes` (a whole number of MiB:
/// [`data_size_bytes`]), created at `created_unix_secs`, with `unique_id`.
pub fn footer(data_size_bytes: u64, created_unix_secs: u64, unique_id: [u8; 16]) -> [u8; 512] {
    let mut f = [0u8; 512];
    let timestamp =
        u32::try_from(created_unix_secs.saturating_sub(VHD_EPOCH_UNIX_SECS)).unwrap_or(u32::MAX);
    let g = geometry(data_size_bytes);
    f[0..8].copy_from_slice(COOKIE);
    f[8..12].copy_from_slice(&FEATURES_RESERVED.to_be_bytes());
    f[12..16].copy_from_slice(&FILE_FORMAT_VERSION.to_be_bytes());
    f[16..24].copy_from_slice(&FIXED_DATA_OFFSET.to_be_bytes());
    f[24..28].copy_from_slice(&timestamp.to_be_bytes());
    f[28..32].copy_from_slice(CREATOR_APPLICATION);
    f[32..36].copy_from_slice(&CREATOR_VERSION.to_be_bytes());
    f[36..40].copy_from_slice(CREATOR_HOST_OS_WINDOWS);
    f[40..48].copy_from_slice(&data_size_bytes.to_be_bytes());
    f[48..56].copy_from_slice(&data_size_bytes.to_be_bytes());
    f[56..58].copy_from_slice(&g.cylinders.to_be_bytes());
    f[58] = g.heads;
    f[59] = g.sectors_per_track;
    f[60..64].copy_from_slice(&DISK_TYPE_FIXED.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    // f[84]: saved state 0; the rest is reserved zeros.
    let sum = checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The footer checksum: the one's complement of the sum of every byte except the checksum
/// field's own.
pub fn checksum(footer: &[u8; 512]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    !sum
}

/// Parse a footer, checking its cookie and checksum.
///
/// # Errors
///
/// A message saying what is wrong (the caller names the blob).
pub fn parse_footer(bytes: &[u8]) -> Result<Footer, String> {
    let f: &[u8; 512] = bytes
        .try_into()
        .map_err(|_| format!("a VHD footer is 512 bytes, not {}", bytes.len()))?;
    if &f[0..8] != COOKIE {
        return Err("no \"conectix\" cookie: not a VHD footer".to_owned());
    }
    let be32 = |at: usize| u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]);
    let mut be64 = [0u8; 8];
    be64.copy_from_slice(&f[48..56]);
    let stored = be32(64);
    let computed = checksum(f);
    if stored != computed {
        return Err(format!(
            "footer checksum {stored:#010x} does not match its bytes ({computed:#010x})"
        ));
    }
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&f[68..84]);
    Ok(Footer {
        current_size_bytes: u64::from_be_bytes(be64),
        geometry: Geometry {
            cylinders: u16::from_be_bytes([f[56], f[57]]),
            heads: f[58],
            sectors_per_track: f[59],
        },
        disk_type: be32(60),
        timestamp_vhd_secs: be32(24),
        unique_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn sizes_round_up_to_a_mib_and_add_the_footer() {
        assert_eq!(data_size_bytes(512), MIB);
        assert_eq!(data_size_bytes(MIB), MIB);
        assert_eq!(data_size_bytes(MIB + 512), 2 * MIB);
        assert_eq!(blob_size_bytes(10 * MIB), 10 * MIB + 512);
        assert_eq!(blob_size_bytes(3 * MIB - 512) % MIB, 512);
    }

    /// Geometries that `qemu-img create -f vpc -o subformat=fixed` (an independent
    /// implementation) wrote for these sizes (it rounds the size up to whole cylinders).
    #[test]
    fn geometry_matches_qemu_img() {
        let cases = [
            (0x00a0_7000u64, (302u16, 4u8, 17u8)),     // 10M
            (0x4003_e000, (2081, 16, 63)),             // 1G
            (0x1f_c000_2000, (65279, 16, 255)),        // 127G
            (8 * 1024 * 1024 * MIB, (65535, 16, 255)), // 8 TiB: clamped
        ];
        for (size, (cylinders, heads, sectors_per_track)) in cases {
            assert_eq!(
                geometry(size),
                Geometry {
                    cylinders,
                    heads,
                    sectors_per_track
                },
                "size {size:#x}"
            );
        }
    }

    /// A footer `qemu-img create -f vpc -o subformat=fixed d.vhd 10M` wrote: our parser reads
    /// it and our checksum agrees with qemu's.
    #[test]
    fn parses_a_footer_written_by_qemu_img() {
        let hex = "636f6e65637469780000000200010000ffffffffffffffff329dda5a71656d75000500035769326b\
                   0000000000a070000000000000a07000012e041100000002ffffe64afb5a17b2570642b6b5905438\
                   e0077834";
        let mut bytes = [0u8; 512];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).expect("test value");
            bytes[i] = u8::from_str_radix(s, 16).expect("test value");
        }
        let f = parse_footer(&bytes).expect("test value");
        assert_eq!(f.current_size_bytes, 0x00a0_7000);
        assert_eq!(
            f.geometry,
            Geometry {
                cylinders: 302,
                heads: 4,
                sectors_per_track: 17
            }
        );
        assert_eq!(f.disk_type, DISK_TYPE_FIXED);
        assert_eq!(checksum(&bytes), 0xffff_e64a);
    }

    #[test]
    fn our_footer_has_every_field_and_parses_back() {
        let id = *b"0123456789abcdef";
        // 2026-01-01T00:00:00Z
        let created = 1_767_225_600;
        let f = footer(10 * MIB, created, id);
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(&f[8..12], &[0, 0, 0, 2]);
        assert_eq!(&f[12..16], &[0, 1, 0, 0]);
        assert_eq!(&f[16..24], &[0xff; 8]);
        assert_eq!(&f[36..40], b"Wi2k");
        assert_eq!(&f[40..48], &(10 * MIB).to_be_bytes());
        assert_eq!(&f[48..56], &(10 * MIB).to_be_bytes());
        assert_eq!(&f[60..64], &[0, 0, 0, 2]);
        assert!(f[84..].iter().all(|b| *b == 0));
        let sum: u32 = f.iter().map(|b| u32::from(*b)).sum::<u32>()
            - f[64..68].iter().map(|b| u32::from(*b)).sum::<u32>();
        assert_eq!(u32::from_be_bytes([f[64], f[65], f[66], f[67]]), !sum);

        let parsed = parse_footer(&f).expect("test value");
        assert_eq!(parsed.current_size_bytes, 10 * MIB);
        assert_eq!(parsed.geometry, geometry(10 * MIB));
        assert_eq!(parsed.disk_type, DISK_TYPE_FIXED);
        assert_eq!(
            u64::from(parsed.timestamp_vhd_secs),
            created - VHD_EPOCH_UNIX_SECS
        );
        assert_eq!(parsed.unique_id, id);
    }

    #[test]
    fn a_damaged_footer_is_refused() {
        let mut f = footer(MIB, 1_767_225_600, [7; 16]);
        f[45] ^= 1;
        assert!(parse_footer(&f).expect_err("an error").contains("checksum"));
        f[0] = b'x';
        assert!(parse_footer(&f).expect_err("an error").contains("cookie"));
        assert!(parse_footer(&f[..100]).is_err());
    }
}
