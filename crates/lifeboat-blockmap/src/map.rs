//! The block map: one digest per fixed-size block of an image, and its stored form.
//!
//! ```text
//!  image   |<- block 0 ->|<- block 1 ->|<- block 2 ->| ... |<- last (may be short) ->|
//!  map     |  Data(h0)   |    Zero     |  Data(h2)   | ... |        Data(hN)         |
//! ```
//!
//! A map is built once from a whole image ([`BlockMap::from_image`], or
//! [`BlockMap::set_digests`] with digests hashed elsewhere, [`crate::digest_blocks`]), then
//! kept current as writes land on the image:
//! [`BlockMap::update_range`] re-hashes only the blocks a write touched and
//! [`BlockMap::resize`] follows a change of size. That is what lets the map of a replica
//! live beside it in a remote store: a resync then reads only the source.
//!
//! # Serialized form (version 1)
//!
//! All integers little-endian. Zero blocks cost one bit and no hash.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `LBBLKMAP` ([`MAP_MAGIC`]) |
//! | 8 | 2 | format version, `1` ([`MAP_FORMAT_VERSION`]) |
//! | 10 | 1 | hash algorithm id ([`HashAlgorithm::id`]) |
//! | 11 | 1 | reserved, `0` |
//! | 12 | 4 | block size in bytes |
//! | 16 | 8 | image size in bytes |
//! | 24 | 8 | block count, `ceil(image size / block size)` |
//! | 32 | 8 | data block count (blocks that are not all zero) |
//! | 40 | `ceil(block count / 8)` | zero bitmap: bit `i % 8` of byte `i / 8` set when block `i` is all zero; unused high bits `0` |
//! | … | `16 × data block count` | the data blocks' hashes, in block order |
//! | end − 8 | 8 | XXH3-64 of every byte before it |

use crate::error::{FormatProblem, ResyncError};
use crate::hash::{
    BLOCK_HASH_LEN_BYTES, BlockDigest, BlockHash, HashAlgorithm, digest_block, digest_blocks,
};

/// Smallest block size accepted: one page of the page cache, eight Azure pages.
pub const MIN_BLOCK_SIZE_BYTES: u32 = 4096;
/// Largest block size accepted (Azure's Put Page limit is 4 MiB; larger blocks are copied
/// in several writes).
pub const MAX_BLOCK_SIZE_BYTES: u32 = 16 * 1024 * 1024;
/// The default block size, chosen by measurement (docs/benchmarks.md, "Hash choice and
/// block size", block-size sweep): 64 KiB blocks hash as fast as 1 MiB blocks but send 10-15 times
/// less when changes are scattered, and a 4 GiB image's map is about 1 MiB.
pub const DEFAULT_BLOCK_SIZE_BYTES: u32 = 64 * 1024;

/// Magic bytes opening a serialized map.
pub const MAP_MAGIC: [u8; 8] = *b"LBBLKMAP";
/// The serialized map format this build writes and reads.
pub const MAP_FORMAT_VERSION: u16 = 1;
const MAP_HEADER_LEN_BYTES: usize = 40;
const MAP_TRAILER_LEN_BYTES: usize = 8;

/// Checks that `block_size_bytes` is a power of two within the accepted range.
pub fn validate_block_size(block_size_bytes: u32) -> Result<(), ResyncError> {
    if !block_size_bytes.is_power_of_two()
        || !(MIN_BLOCK_SIZE_BYTES..=MAX_BLOCK_SIZE_BYTES).contains(&block_size_bytes)
    {
        return Err(ResyncError::InvalidOption {
            field: "block_size_bytes",
            reason: format!(
                "{block_size_bytes} is not a power of two between {MIN_BLOCK_SIZE_BYTES} and {MAX_BLOCK_SIZE_BYTES}"
            ),
        });
    }
    Ok(())
}

/// Number of blocks of `block_size_bytes` needed to cover `image_size_bytes`.
pub fn block_count_for(image_size_bytes: u64, block_size_bytes: u32) -> u64 {
    image_size_bytes.div_ceil(u64::from(block_size_bytes))
}

/// One digest per fixed-size block of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    algorithm: HashAlgorithm,
    block_size_bytes: u32,
    image_size_bytes: u64,
    digests: Vec<BlockDigest>,
}

impl BlockMap {
    /// The map of an image of `image_size_bytes` that is all zeros (a new sparse replica).
    pub fn new_zeroed(
        algorithm: HashAlgorithm,
        block_size_bytes: u32,
        image_size_bytes: u64,
    ) -> Result<BlockMap, ResyncError> {
        validate_block_size(block_size_bytes)?;
        let block_count = usize_blocks(image_size_bytes, block_size_bytes)?;
        Ok(BlockMap {
            algorithm,
            block_size_bytes,
            image_size_bytes,
            digests: vec![BlockDigest::Zero; block_count],
        })
    }

    /// Hashes a whole in-memory image on the calling thread.
    pub fn from_image(
        image: &[u8],
        block_size_bytes: u32,
        algorithm: HashAlgorithm,
    ) -> Result<BlockMap, ResyncError> {
        Self::from_image_parallel(image, block_size_bytes, algorithm, 1)
    }

    /// Hashes a whole in-memory image on `threads` threads (the image is split into
    /// `threads` contiguous runs of blocks).
    pub fn from_image_parallel(
        image: &[u8],
        block_size_bytes: u32,
        algorithm: HashAlgorithm,
        threads: usize,
    ) -> Result<BlockMap, ResyncError> {
        let mut map = Self::new_zeroed(algorithm, block_size_bytes, image.len() as u64)?;
        map.digests = digest_blocks(algorithm, block_size_bytes, image, threads);
        Ok(map)
    }

    /// The hash algorithm of every digest in this map.
    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The block size in bytes.
    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    /// The size of the image this map describes.
    pub fn image_size_bytes(&self) -> u64 {
        self.image_size_bytes
    }

    /// Number of blocks (the last one may be shorter than the block size).
    pub fn block_count(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Every block's digest, in block order.
    pub fn digests(&self) -> &[BlockDigest] {
        &self.digests
    }

    /// Digest of block `block_index`, if the image has that block.
    pub fn digest(&self, block_index: u64) -> Option<BlockDigest> {
        usize::try_from(block_index)
            .ok()
            .and_then(|index| self.digests.get(index).copied())
    }

    /// Byte offset and length of block `block_index` in this image (the length is short
    /// for the last block of an image whose size is not a multiple of the block size).
    pub fn block_extent(&self, block_index: u64) -> (u64, u64) {
        let offset_bytes = block_index * u64::from(self.block_size_bytes);
        let len_bytes = self
            .image_size_bytes
            .saturating_sub(offset_bytes)
            .min(u64::from(self.block_size_bytes));
        (offset_bytes, len_bytes)
    }

    /// Number of blocks that are not all zero (each costs a stored hash).
    pub fn data_block_count(&self) -> u64 {
        self.digests
            .iter()
            .filter(|digest| !digest.is_zero())
            .count() as u64
    }

    /// Indexes of the blocks whose digests differ between `self` and `other` (blocks present
    /// in only one of them count as differing). Used by verification passes.
    pub fn mismatched_blocks(&self, other: &BlockMap) -> Result<Vec<u64>, ResyncError> {
        check_comparable(self, other)?;
        let longest = self.digests.len().max(other.digests.len());
        Ok((0..longest)
            .filter(|&index| {
                self.digests.get(index) != other.digests.get(index)
                    || self.block_extent(index as u64).1 != other.block_extent(index as u64).1
            })
            .map(|index| index as u64)
            .collect())
    }

    /// Re-hashes the blocks a write touched.
    ///
    /// `blocks_data` is the new content of whole blocks starting at the block-aligned
    /// `offset_bytes`: a writer that changed bytes `[a, b)` passes every block overlapping
    /// `[a, b)`, read back after the write (or merged from the old and new data).
    ///
    /// # Guarantees
    /// After the call the map equals [`BlockMap::from_image`] of the modified image,
    /// provided `blocks_data` is the modified image's content at that place. Only the
    /// blocks covered are hashed; on error the map is unchanged.
    ///
    /// # Caveats
    /// The image size does not change here: call [`BlockMap::resize`] first for a write
    /// past the end. `blocks_data` must be a whole number of blocks, except that it may end
    /// with the image's short last block.
    pub fn update_range(
        &mut self,
        offset_bytes: u64,
        blocks_data: &[u8],
    ) -> Result<(), ResyncError> {
        let blocks = self.blocks_of(offset_bytes, blocks_data.len() as u64)?;
        for (slot, block) in self.digests[blocks]
            .iter_mut()
            .zip(blocks_data.chunks(self.block_size_bytes as usize))
        {
            *slot = digest_block(self.algorithm, block);
        }
        Ok(())
    }

    /// Records digests computed elsewhere ([`digest_blocks`] of the data, on other threads)
    /// for the blocks of `[offset_bytes, offset_bytes + len_bytes)`. The range has the same
    /// shape rules as [`BlockMap::update_range`]'s, and there must be one digest per block
    /// in it; on error the map is unchanged.
    pub fn set_digests(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        digests: &[BlockDigest],
    ) -> Result<(), ResyncError> {
        let blocks = self.blocks_of(offset_bytes, len_bytes)?;
        if blocks.len() != digests.len() {
            return Err(ResyncError::UpdateMap {
                offset_bytes,
                block_index: blocks.start as u64,
                reason: format!(
                    "{} digests for the {} blocks of {len_bytes} bytes",
                    digests.len(),
                    blocks.len()
                ),
            });
        }
        self.digests[blocks].copy_from_slice(digests);
        Ok(())
    }

    /// The indices of the blocks `[offset_bytes, offset_bytes + len_bytes)` covers, when it
    /// is whole blocks inside the image (or ends at its short last block).
    fn blocks_of(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<std::ops::Range<usize>, ResyncError> {
        let block_size = u64::from(self.block_size_bytes);
        let first_block = offset_bytes / block_size;
        let fail = |reason: String| ResyncError::UpdateMap {
            offset_bytes,
            block_index: first_block,
            reason,
        };
        if !offset_bytes.is_multiple_of(block_size) {
            return Err(fail(format!(
                "offset is not a multiple of the block size {block_size}"
            )));
        }
        let end_bytes = offset_bytes
            .checked_add(len_bytes)
            .ok_or_else(|| fail("range overflows".into()))?;
        if end_bytes > self.image_size_bytes {
            return Err(fail(format!(
                "range ends at {end_bytes}, past the image's end {} (resize first)",
                self.image_size_bytes
            )));
        }
        if !len_bytes.is_multiple_of(block_size) && end_bytes != self.image_size_bytes {
            return Err(fail(format!(
                "{len_bytes} bytes is not a whole number of {block_size}-byte blocks"
            )));
        }
        Ok(first_block as usize..end_bytes.div_ceil(block_size) as usize)
    }

    /// Records that the blocks of `[offset_bytes, offset_bytes + len_bytes)` now read as
    /// zeros (a range zeroed or discarded), without hashing zeros. The range has the same
    /// shape rules as [`BlockMap::update_range`]'s; on error the map is unchanged.
    pub fn zero_range(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ResyncError> {
        let blocks = self.blocks_of(offset_bytes, len_bytes)?;
        self.digests[blocks].fill(BlockDigest::Zero);
        Ok(())
    }

    /// Follows a change of the image's size: blocks past the old end are zero (as a file
    /// or page blob grows), blocks past the new end are dropped.
    ///
    /// `boundary_block` is the new content of the one block whose length changes, when
    /// there is one: the old short last block when growing, the new short last block when
    /// shrinking (read back from the resized image). It may be `None` when that block was
    /// all zeros (it stays all zeros) or when no block changes length.
    ///
    /// # Guarantees
    /// After the call the map equals a fresh hash of the resized image; on error the map
    /// is unchanged.
    pub fn resize(
        &mut self,
        new_size_bytes: u64,
        boundary_block: Option<&[u8]>,
    ) -> Result<(), ResyncError> {
        let block_size = u64::from(self.block_size_bytes);
        let new_count = usize_blocks(new_size_bytes, self.block_size_bytes)?;
        // The block (if any) present before and after whose length changes.
        let smaller_size = self.image_size_bytes.min(new_size_bytes);
        let boundary_index = (!smaller_size.is_multiple_of(block_size)
            && smaller_size != new_size_bytes.max(self.image_size_bytes))
        .then_some(smaller_size / block_size);
        let boundary = match boundary_index {
            None => None,
            Some(index) => {
                let new_len = new_size_bytes
                    .saturating_sub(index * block_size)
                    .min(block_size);
                let old_len = self.block_extent(index).1;
                let fail = |reason: String| ResyncError::UpdateMap {
                    offset_bytes: index * block_size,
                    block_index: index,
                    reason,
                };
                if new_len == old_len {
                    None
                } else {
                    match (boundary_block, self.digests[index as usize]) {
                        (Some(data), _) if data.len() as u64 == new_len => {
                            Some((index as usize, digest_block(self.algorithm, data)))
                        }
                        (Some(data), _) => {
                            return Err(fail(format!(
                                "boundary block has {} bytes, the resized block has {new_len}",
                                data.len()
                            )));
                        }
                        (None, BlockDigest::Zero) => Some((index as usize, BlockDigest::Zero)),
                        (None, BlockDigest::Data(_)) => {
                            return Err(fail(
                                "this block holds data and changes length: pass its new content"
                                    .into(),
                            ));
                        }
                    }
                }
            }
        };
        self.digests.resize(new_count, BlockDigest::Zero);
        if let Some((index, digest)) = boundary {
            self.digests[index] = digest;
        }
        self.image_size_bytes = new_size_bytes;
        Ok(())
    }

    /// Serializes the map (see the module docs for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let block_count = self.digests.len();
        let data_count = self.data_block_count() as usize;
        let bitmap_len = block_count.div_ceil(8);
        let mut out = Vec::with_capacity(
            MAP_HEADER_LEN_BYTES
                + bitmap_len
                + data_count * BLOCK_HASH_LEN_BYTES
                + MAP_TRAILER_LEN_BYTES,
        );
        out.extend_from_slice(&MAP_MAGIC);
        out.extend_from_slice(&MAP_FORMAT_VERSION.to_le_bytes());
        out.push(self.algorithm.id());
        out.push(0);
        out.extend_from_slice(&self.block_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.image_size_bytes.to_le_bytes());
        out.extend_from_slice(&(block_count as u64).to_le_bytes());
        out.extend_from_slice(&(data_count as u64).to_le_bytes());
        let bitmap_start = out.len();
        out.resize(bitmap_start + bitmap_len, 0);
        for (index, digest) in self.digests.iter().enumerate() {
            if digest.is_zero() {
                out[bitmap_start + index / 8] |= 1 << (index % 8);
            }
        }
        for digest in &self.digests {
            if let BlockDigest::Data(hash) = digest {
                out.extend_from_slice(&hash.0);
            }
        }
        let checksum = twox_hash::XxHash3_64::oneshot(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Parses a serialized map.
    ///
    /// # Guarantees
    /// Any truncation or corruption is refused with [`ResyncError::DecodeMap`] naming the
    /// problem (the trailing checksum covers every other byte); a map that decodes is one
    /// [`BlockMap::encode`] produced.
    pub fn decode(bytes: &[u8]) -> Result<BlockMap, ResyncError> {
        decode_map(bytes).map_err(|problem| ResyncError::DecodeMap { problem })
    }

    /// A 128-bit fingerprint of the whole map (XXH3-128 of its serialized form): equal maps
    /// have equal fingerprints. Cursors record it to refuse resuming against another source.
    pub fn fingerprint(&self) -> u128 {
        twox_hash::XxHash3_128::oneshot(&self.encode())
    }
}

/// Refuses to compare maps made with another block size or algorithm.
pub(crate) fn check_comparable(source: &BlockMap, target: &BlockMap) -> Result<(), ResyncError> {
    if source.block_size_bytes != target.block_size_bytes {
        return Err(ResyncError::CompareMaps {
            field: "block_size_bytes",
            source_value: source.block_size_bytes.to_string(),
            target_value: target.block_size_bytes.to_string(),
        });
    }
    if source.algorithm != target.algorithm {
        return Err(ResyncError::CompareMaps {
            field: "algorithm",
            source_value: source.algorithm.to_string(),
            target_value: target.algorithm.to_string(),
        });
    }
    Ok(())
}

fn usize_blocks(image_size_bytes: u64, block_size_bytes: u32) -> Result<usize, ResyncError> {
    usize::try_from(block_count_for(image_size_bytes, block_size_bytes)).map_err(|_| {
        ResyncError::InvalidOption {
            field: "image_size_bytes",
            reason: format!("{image_size_bytes} bytes is too many blocks for this platform"),
        }
    })
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn decode_map(bytes: &[u8]) -> Result<BlockMap, FormatProblem> {
    let min_len = MAP_HEADER_LEN_BYTES + MAP_TRAILER_LEN_BYTES;
    if bytes.len() < 8 || bytes[..8] != MAP_MAGIC {
        return Err(FormatProblem::BadMagic);
    }
    if bytes.len() < min_len {
        return Err(FormatProblem::WrongLength {
            expected_bytes: min_len as u64,
            actual_bytes: bytes.len() as u64,
        });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != MAP_FORMAT_VERSION {
        return Err(FormatProblem::UnsupportedVersion { version });
    }
    let algorithm_id = bytes[10];
    let block_size_bytes = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let image_size_bytes = read_u64(bytes, 16);
    let block_count = read_u64(bytes, 24);
    let data_count = read_u64(bytes, 32);
    // Length first, so that a truncated file says so rather than "checksum mismatch".
    let expected_len = (block_count.div_ceil(8) as u128)
        + u128::from(data_count) * BLOCK_HASH_LEN_BYTES as u128
        + min_len as u128;
    if expected_len != bytes.len() as u128 {
        return Err(FormatProblem::WrongLength {
            expected_bytes: u64::try_from(expected_len).unwrap_or(u64::MAX),
            actual_bytes: bytes.len() as u64,
        });
    }
    let body_len = bytes.len() - MAP_TRAILER_LEN_BYTES;
    let stored = read_u64(bytes, body_len);
    let computed = twox_hash::XxHash3_64::oneshot(&bytes[..body_len]);
    if stored != computed {
        return Err(FormatProblem::ChecksumMismatch { stored, computed });
    }
    // The checksum holds: what follows checks that the writer was consistent.
    let algorithm = HashAlgorithm::from_id(algorithm_id)
        .ok_or(FormatProblem::UnknownAlgorithm { id: algorithm_id })?;
    if bytes[11] != 0 {
        return Err(invalid("reserved", format!("is {}, not 0", bytes[11])));
    }
    validate_block_size(block_size_bytes).map_err(|_| {
        invalid(
            "block_size_bytes",
            format!("{block_size_bytes} is out of range"),
        )
    })?;
    if block_count != block_count_for(image_size_bytes, block_size_bytes) {
        return Err(invalid(
            "block_count",
            format!("{block_count} does not cover {image_size_bytes} bytes"),
        ));
    }
    let block_count = block_count as usize;
    let bitmap = &bytes[MAP_HEADER_LEN_BYTES..MAP_HEADER_LEN_BYTES + block_count.div_ceil(8)];
    let zero_count: u64 = bitmap.iter().map(|byte| u64::from(byte.count_ones())).sum();
    if !block_count.is_multiple_of(8) && bitmap[bitmap.len() - 1] >> (block_count % 8) != 0 {
        return Err(invalid(
            "zero_bitmap",
            "bits set past the last block".into(),
        ));
    }
    if zero_count + data_count != block_count as u64 {
        return Err(invalid(
            "data_block_count",
            format!("{data_count} data blocks + {zero_count} zero blocks != {block_count} blocks"),
        ));
    }
    let mut hashes =
        bytes[MAP_HEADER_LEN_BYTES + bitmap.len()..body_len].chunks_exact(BLOCK_HASH_LEN_BYTES);
    let mut digests = Vec::with_capacity(block_count);
    for index in 0..block_count {
        if bitmap[index / 8] & (1 << (index % 8)) != 0 {
            digests.push(BlockDigest::Zero);
        } else {
            let mut hash = [0u8; BLOCK_HASH_LEN_BYTES];
            // The length check above guarantees one hash per data block.
            if let Some(bytes) = hashes.next() {
                hash.copy_from_slice(bytes);
            }
            digests.push(BlockDigest::Data(BlockHash(hash)));
        }
    }
    Ok(BlockMap {
        algorithm,
        block_size_bytes,
        image_size_bytes,
        digests,
    })
}

fn invalid(field: &'static str, reason: String) -> FormatProblem {
    FormatProblem::InvalidField { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BLOCK: u32 = 4096;

    /// An image of `blocks` blocks (+ `tail` bytes) where block i is zero when `zero[i]`.
    fn image_with(zero: &[bool], tail_bytes: usize, seed: u8) -> Vec<u8> {
        let mut image = Vec::new();
        for (index, &is_zero) in zero.iter().enumerate() {
            let fill = if is_zero {
                0
            } else {
                seed.wrapping_add(index as u8) | 1
            };
            image.extend(std::iter::repeat_n(fill, BLOCK as usize));
        }
        image.extend(std::iter::repeat_n(seed | 1, tail_bytes));
        image
    }

    #[test]
    fn a_zeroed_range_maps_as_a_fresh_hash_of_zeros_does() {
        let zero = [false, false, false, false];
        let mut image = image_with(&zero, 100, 9);
        let mut map = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        map.zero_range(u64::from(BLOCK), 2 * u64::from(BLOCK))
            .expect("two whole blocks");
        image[BLOCK as usize..3 * BLOCK as usize].fill(0);
        let fresh = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        assert_eq!(map, fresh);
        // The short last block, to the image's end.
        map.zero_range(3 * u64::from(BLOCK), u64::from(BLOCK) + 100)
            .expect("to the end");
        image[3 * BLOCK as usize..].fill(0);
        let fresh = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        assert_eq!(map, fresh);
        let before = map.clone();
        assert!(
            map.zero_range(1, u64::from(BLOCK)).is_err(),
            "not a block start"
        );
        assert!(map.zero_range(0, 5).is_err(), "not whole blocks");
        assert!(
            map.zero_range(0, 10 * u64::from(BLOCK)).is_err(),
            "past the end"
        );
        assert_eq!(map, before, "unchanged on error");
    }

    #[test]
    fn zero_blocks_cost_one_bit_and_no_hash() {
        let image = vec![0u8; 64 * BLOCK as usize];
        let map = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        assert_eq!(map.data_block_count(), 0);
        assert_eq!(
            map.encode().len(),
            MAP_HEADER_LEN_BYTES + 8 + MAP_TRAILER_LEN_BYTES
        );
        let one_data = image_with(&[false; 1], 0, 5);
        let mut image = image;
        image[..BLOCK as usize].copy_from_slice(&one_data);
        let map = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        assert_eq!(
            map.encode().len(),
            MAP_HEADER_LEN_BYTES + 8 + 16 + MAP_TRAILER_LEN_BYTES
        );
    }

    #[test]
    fn block_size_must_be_a_power_of_two_in_range() {
        for bad in [0, 1000, 2048, 4097, 32 * 1024 * 1024] {
            assert!(
                BlockMap::new_zeroed(HashAlgorithm::Xxh3_128, bad, 1).is_err(),
                "{bad}"
            );
        }
        assert!(BlockMap::new_zeroed(HashAlgorithm::Xxh3_128, 65536, 1).is_ok());
    }

    #[test]
    fn decode_names_each_problem() {
        let image = image_with(&[false, true, false], 100, 9);
        let map = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Blake3_128).expect("map");
        let good = map.encode();
        assert_eq!(BlockMap::decode(&good).expect("decode"), map);

        let problem = |bytes: &[u8]| match BlockMap::decode(bytes) {
            Err(ResyncError::DecodeMap { problem, .. }) => problem,
            other => panic!("expected a decode error, got {other:?}"),
        };
        assert_eq!(problem(b"nonsense"), FormatProblem::BadMagic);
        assert!(matches!(
            problem(&good[..good.len() - 1]),
            FormatProblem::WrongLength { .. }
        ));
        let mut version = good.clone();
        version[8] = 9;
        assert_eq!(
            problem(&version),
            FormatProblem::UnsupportedVersion { version: 9 }
        );
        let mut flipped = good.clone();
        flipped[MAP_HEADER_LEN_BYTES + 3] ^= 0x10;
        assert!(matches!(
            problem(&flipped),
            FormatProblem::ChecksumMismatch { .. }
        ));
    }

    #[test]
    fn update_range_refuses_misfits_and_leaves_the_map_alone() {
        let image = image_with(&[false, false, false], 10, 3);
        let mut map = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        let before = map.clone();
        assert!(map.update_range(1, &[0; 4096]).is_err());
        assert!(map.update_range(0, &[0; 100]).is_err());
        assert!(map.update_range(3 * 4096, &[0; 4096]).is_err());
        assert!(map.update_range(3 * 4096, &[0; 10]).is_ok());
        assert_eq!(map.digest(3), Some(BlockDigest::Zero));
        map.update_range(3 * 4096, &image[3 * 4096..])
            .expect("restore");
        assert_eq!(map, before);
    }

    #[test]
    fn digests_hashed_elsewhere_equal_update_range_and_misfits_are_refused() {
        let image = image_with(&[false, true, false, false, true], 10, 5);
        let whole = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        for threads in [1, 2, 3, 8] {
            let mut map = BlockMap::new_zeroed(HashAlgorithm::Xxh3_128, BLOCK, image.len() as u64)
                .expect("map");
            let digests = digest_blocks(HashAlgorithm::Xxh3_128, BLOCK, &image, threads);
            map.set_digests(0, image.len() as u64, &digests)
                .expect("set");
            assert_eq!(map, whole, "{threads} threads");
        }
        let mut map = whole.clone();
        let two = digest_blocks(HashAlgorithm::Xxh3_128, BLOCK, &[7; 2 * 4096], 2);
        assert!(
            map.set_digests(4096, 4096, &two).is_err(),
            "one block, two digests"
        );
        assert!(
            map.set_digests(100, 2 * 4096, &two).is_err(),
            "not on a block"
        );
        assert!(
            map.set_digests(4 * 4096, 2 * 4096, &two).is_err(),
            "past the end"
        );
        assert_eq!(map, whole, "refusals leave the map alone");
        map.set_digests(4096, 2 * 4096, &two).expect("set");
        let mut patched = image.clone();
        patched[4096..3 * 4096].fill(7);
        assert_eq!(
            map,
            BlockMap::from_image(&patched, BLOCK, HashAlgorithm::Xxh3_128).expect("map")
        );
    }

    #[test]
    fn resize_needs_the_boundary_block_only_when_it_holds_data() {
        let image = image_with(&[false, false], 10, 3);
        let mut map = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
        // Growing from a short data block: its new content is needed.
        assert!(map.resize(5 * 4096, None).is_err());
        let mut grown = image.clone();
        grown.resize(5 * 4096, 0);
        map.resize(5 * 4096, Some(&grown[2 * 4096..3 * 4096]))
            .expect("grow");
        assert_eq!(
            map,
            BlockMap::from_image(&grown, BLOCK, HashAlgorithm::Xxh3_128).expect("map")
        );
        // Shrinking to a zero tail needs nothing.
        map.resize(4 * 4096 + 7, None).expect("shrink");
        grown.truncate(4 * 4096 + 7);
        assert_eq!(
            map,
            BlockMap::from_image(&grown, BLOCK, HashAlgorithm::Xxh3_128).expect("map")
        );
    }

    /// One write applied to an image: `(offset, len, fill byte)`, or a resize.
    #[derive(Debug, Clone)]
    enum Edit {
        Write { offset: usize, len: usize, fill: u8 },
        Resize { new_len: usize },
    }

    fn edit_strategy() -> impl Strategy<Value = Edit> {
        prop_oneof![
            4 => (0usize..12 * 4096, 1usize..3 * 4096, any::<u8>())
                .prop_map(|(offset, len, fill)| Edit::Write { offset, len, fill }),
            1 => (0usize..12 * 4096).prop_map(|new_len| Edit::Resize { new_len }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn encode_decode_round_trips(
            zero in proptest::collection::vec(any::<bool>(), 0..40),
            tail in 0usize..4096,
            seed in any::<u8>(),
            blake in any::<bool>(),
        ) {
            let algorithm = if blake { HashAlgorithm::Blake3_128 } else { HashAlgorithm::Xxh3_128 };
            let map = BlockMap::from_image(&image_with(&zero, tail, seed), BLOCK, algorithm).expect("map");
            let bytes = map.encode();
            prop_assert_eq!(BlockMap::decode(&bytes).expect("decode"), map.clone());
            prop_assert_eq!(map.data_block_count() as usize, map.digests().iter().filter(|d| !d.is_zero()).count());
        }

        #[test]
        fn any_single_corruption_is_detected(
            zero in proptest::collection::vec(any::<bool>(), 1..20),
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let map = BlockMap::from_image(&image_with(&zero, 0, 1), BLOCK, HashAlgorithm::Xxh3_128).expect("map");
            let mut bytes = map.encode();
            let at = position.index(bytes.len());
            bytes[at] ^= flip;
            prop_assert!(BlockMap::decode(&bytes).is_err());
        }

        #[test]
        fn parallel_hashing_equals_serial(
            zero in proptest::collection::vec(any::<bool>(), 0..30),
            tail in 0usize..4096,
            threads in 1usize..5,
        ) {
            let image = image_with(&zero, tail, 7);
            prop_assert_eq!(
                BlockMap::from_image_parallel(&image, BLOCK, HashAlgorithm::Xxh3_128, threads).expect("map"),
                BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map")
            );
        }

        /// Keeping a map current write by write gives the map of the final image.
        #[test]
        fn update_range_and_resize_track_a_fresh_hash(
            initial_len in 0usize..10 * 4096,
            edits in proptest::collection::vec(edit_strategy(), 1..12),
        ) {
            let block = BLOCK as usize;
            let mut image: Vec<u8> = (0..initial_len).map(|i| (i % 251) as u8 * u8::from(i % 3 != 0)).collect();
            let mut map = BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map");
            for edit in edits {
                match edit {
                    Edit::Write { offset, len, fill } => {
                        if offset + len > image.len() {
                            let new_len = offset + len;
                            let old_len = image.len();
                            image.resize(new_len, 0);
                            let boundary_start = old_len / block * block;
                            let boundary_end = (boundary_start + block).min(new_len);
                            map.resize(new_len as u64, Some(&image[boundary_start..boundary_end]))
                                .or_else(|_| map.resize(new_len as u64, None))
                                .expect("grow");
                        }
                        image[offset..offset + len].fill(fill);
                        let start = offset / block * block;
                        let end = ((offset + len).div_ceil(block) * block).min(image.len());
                        map.update_range(start as u64, &image[start..end]).expect("update");
                    }
                    Edit::Resize { new_len } => {
                        let old_len = image.len();
                        image.resize(new_len, 0);
                        let smaller = old_len.min(new_len);
                        let boundary_start = smaller / block * block;
                        let boundary_end = (boundary_start + block).min(new_len);
                        let boundary = (boundary_start < boundary_end).then(|| &image[boundary_start..boundary_end]);
                        map.resize(new_len as u64, boundary).expect("resize");
                    }
                }
                prop_assert_eq!(&map, &BlockMap::from_image(&image, BLOCK, HashAlgorithm::Xxh3_128).expect("map"));
            }
        }
    }
}
