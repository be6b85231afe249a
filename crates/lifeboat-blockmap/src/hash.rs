//! Block digests: zero detection first, then a strong 128-bit hash.
//!
//! ```text
//!   block bytes ──► is_zero? ──yes──► BlockDigest::Zero      (nothing hashed, stored or sent)
//!                      │
//!                      no
//!                      ▼
//!               HashAlgorithm::hash ──► BlockDigest::Data(BlockHash)   (16 bytes)
//! ```
//!
//! Two algorithms are supported and recorded in every map, so that a map is never compared
//! with one made by another algorithm:
//!
//! * [`HashAlgorithm::Xxh3_128`] (the default): XXH3 with a 128-bit output, from `twox-hash`,
//!   which picks its AVX2 path at run time. About 4 times as fast as BLAKE3 per core here
//!   (docs/benchmarks.md, "Hash choice and block size"), which keeps hashing far below the
//!   cost of reading a disk.
//! * [`HashAlgorithm::Blake3_128`]: BLAKE3 truncated to 128 bits (a prefix of its XOF
//!   output). Cryptographic: choose it where a guest could craft colliding blocks on
//!   purpose and that matters.
//!
//! A weak checksum alone (a CRC) is never used to decide that two blocks are equal.

use std::fmt;

/// Length of a [`BlockHash`] in bytes.
pub const BLOCK_HASH_LEN_BYTES: usize = 16;

/// The hash function a [`crate::BlockMap`] was built with.
///
/// The discriminants are the ids written in the serialized map; never renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum HashAlgorithm {
    /// XXH3-128 (seed 0, default secret). Non-cryptographic, about 9.5 GB/s per core here.
    #[default]
    Xxh3_128 = 1,
    /// BLAKE3, the first 128 bits of its output. Cryptographic, about 2.5 GB/s per core here.
    Blake3_128 = 2,
}

impl HashAlgorithm {
    /// Every supported algorithm, in id order.
    pub const ALL: [HashAlgorithm; 2] = [HashAlgorithm::Xxh3_128, HashAlgorithm::Blake3_128];

    /// The id stored in serialized maps.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The algorithm with serialized id `id`, if there is one.
    pub fn from_id(id: u8) -> Option<HashAlgorithm> {
        Self::ALL.into_iter().find(|algorithm| algorithm.id() == id)
    }

    /// A short stable name (`xxh3-128`, `blake3-128`) for logs and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Xxh3_128 => "xxh3-128",
            HashAlgorithm::Blake3_128 => "blake3-128",
        }
    }

    /// Hashes `data` (whatever its content: zero detection is [`digest_block`]'s job).
    pub fn hash(self, data: &[u8]) -> BlockHash {
        match self {
            HashAlgorithm::Xxh3_128 => {
                BlockHash(twox_hash::XxHash3_128::oneshot(data).to_le_bytes())
            }
            HashAlgorithm::Blake3_128 => {
                let full = blake3::hash(data);
                let mut prefix = [0u8; BLOCK_HASH_LEN_BYTES];
                prefix.copy_from_slice(&full.as_bytes()[..BLOCK_HASH_LEN_BYTES]);
                BlockHash(prefix)
            }
        }
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A 128-bit strong hash of one block's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; BLOCK_HASH_LEN_BYTES]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// What a map knows about one block.
///
/// NB: `BlockHash` is a byte array (alignment 1), so this enum is 17 bytes, not the 32 a
/// `u128` payload would cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockDigest {
    /// Every byte of the block is zero. No hash is computed, stored or sent.
    Zero,
    /// The block holds data with this hash.
    Data(BlockHash),
}

impl BlockDigest {
    /// Whether the block is all zeros.
    pub fn is_zero(&self) -> bool {
        matches!(self, BlockDigest::Zero)
    }
}

/// Digest of one block: [`BlockDigest::Zero`] when every byte is zero, else its hash.
pub fn digest_block(algorithm: HashAlgorithm, data: &[u8]) -> BlockDigest {
    if is_zero(data) {
        BlockDigest::Zero
    } else {
        BlockDigest::Data(algorithm.hash(data))
    }
}

/// Digests of the blocks of `data` (`block_size_bytes` each, the last one may be short), in
/// order, hashed on up to `threads` threads, each taking a contiguous run of blocks.
///
/// # Guarantees
/// The same digests as [`digest_block`] of each block, whatever the thread count.
pub fn digest_blocks(
    algorithm: HashAlgorithm,
    block_size_bytes: u32,
    data: &[u8],
    threads: usize,
) -> Vec<BlockDigest> {
    let block_len = (block_size_bytes as usize).max(1);
    let mut digests = vec![BlockDigest::Zero; data.len().div_ceil(block_len)];
    let blocks_per_thread = digests.len().div_ceil(threads.max(1)).max(1);
    let hash_run = |run_index: usize, slots: &mut [BlockDigest]| {
        let blocks = data[run_index * blocks_per_thread * block_len..].chunks(block_len);
        for (slot, block) in slots.iter_mut().zip(blocks) {
            *slot = digest_block(algorithm, block);
        }
    };
    if blocks_per_thread >= digests.len() {
        hash_run(0, &mut digests);
    } else {
        std::thread::scope(|scope| {
            for (run_index, slots) in digests.chunks_mut(blocks_per_thread).enumerate() {
                scope.spawn(move || hash_run(run_index, slots));
            }
        });
    }
    digests
}

/// Whether every byte of `data` is zero.
///
/// # Guarantees
/// Exact (no sampling). Returns at the first non-zero 256-byte stripe, so a data block
/// costs almost nothing; a zero block is scanned at memory speed.
///
/// NB: each stripe is a fixed-size array OR-folded as `u128` words. With that shape LLVM
/// emits 16 unaligned 128-bit loads and `por`s per stripe in the portable (SSE2) build
/// (checked in the assembly); the same fold over `u64` words stayed scalar (`orq`). The
/// benchmark's hash table reports the measured rate.
pub fn is_zero(data: &[u8]) -> bool {
    const STRIPE_BYTES: usize = 256;
    let (stripes, tail) = data.as_chunks::<STRIPE_BYTES>();
    for stripe in stripes {
        let (words, _) = stripe.as_chunks::<16>();
        let folded = words
            .iter()
            .fold(0u128, |acc, word| acc | u128::from_ne_bytes(*word));
        if folded != 0 {
            return false;
        }
    }
    tail.iter().all(|&byte| byte == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn algorithm_ids_round_trip_and_unknown_ids_are_refused() {
        for algorithm in HashAlgorithm::ALL {
            assert_eq!(HashAlgorithm::from_id(algorithm.id()), Some(algorithm));
        }
        assert_eq!(HashAlgorithm::from_id(0), None);
        assert_eq!(HashAlgorithm::from_id(3), None);
    }

    #[test]
    fn zero_detection_sees_a_single_set_bit_anywhere() {
        for len in [0usize, 1, 7, 255, 256, 257, 4096, 65536 + 3] {
            let mut data = vec![0u8; len];
            assert!(is_zero(&data));
            for position in [0, len / 2, len.saturating_sub(1)] {
                if len == 0 {
                    continue;
                }
                data[position] = 0x80;
                assert!(!is_zero(&data), "len {len} position {position}");
                data[position] = 0;
            }
        }
    }

    #[test]
    fn zero_blocks_get_no_hash() {
        assert_eq!(
            digest_block(HashAlgorithm::Xxh3_128, &[0u8; 4096]),
            BlockDigest::Zero
        );
        assert!(matches!(
            digest_block(HashAlgorithm::Blake3_128, &[1u8; 4096]),
            BlockDigest::Data(_)
        ));
    }

    proptest! {
        /// twox-hash (runtime-dispatched SIMD) against xxhash-rust (an independent
        /// implementation), across the short, medium and long-input code paths.
        #[test]
        fn xxh3_128_matches_an_independent_implementation(
            data in proptest::collection::vec(any::<u8>(), 0..5000)
        ) {
            let ours = HashAlgorithm::Xxh3_128.hash(&data);
            let theirs = xxhash_rust::xxh3::xxh3_128(&data).to_le_bytes();
            prop_assert_eq!(ours.0, theirs);
        }

        #[test]
        fn blake3_128_is_a_prefix_of_blake3(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let ours = HashAlgorithm::Blake3_128.hash(&data);
            let full = blake3::hash(&data);
            prop_assert_eq!(&ours.0[..], &full.as_bytes()[..16]);
        }
    }

    #[test]
    fn xxh3_128_matches_on_block_sized_input() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(
            HashAlgorithm::Xxh3_128.hash(&data).0,
            xxhash_rust::xxh3::xxh3_128(&data).to_le_bytes()
        );
    }
}
