//! Comparing two maps into a plan.
//!
//! ```text
//!  source map  | A | 0 | B | C | 0 | 0 | D |
//!  target map  | A | X | B | Y | Z | 0 | D | E |      (target one block longer)
//!                    ^       ^---^
//!  plan          resize target to the source's size, then
//!                    Zero[1]  Copy[3]  Zero[4]          (adjacent blocks with the same op coalesce)
//! ```
//!
//! A plan is pure data computed from two maps; applying it is the writer's job (the agent's
//! resync writes Copy ranges from its view and zeroes Zero ranges in the store, which may
//! implement them as a trim / Clear Pages).

use crate::error::ResyncError;
use crate::hash::BlockDigest;
use crate::map::{BlockMap, check_comparable};

/// What to do to one range of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeOp {
    /// Copy the source's bytes of this range into the target (data is sent).
    Copy,
    /// The source is all zeros here and the target is not: write zeros or trim. Nothing but
    /// the range itself needs sending.
    Zero,
}

/// One contiguous range of the target to change, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlannedRange {
    /// Start of the range (block-aligned).
    pub offset_bytes: u64,
    /// Length of the range (whole blocks, except that it may end with the source's short
    /// last block).
    pub len_bytes: u64,
    /// What to do.
    pub op: RangeOp,
}

impl PlannedRange {
    /// One past the range's last byte.
    pub fn end_bytes(&self) -> u64 {
        self.offset_bytes + self.len_bytes
    }
}

/// What a resync must do to make the target equal to the source.
///
/// Apply it in this order: resize the target to [`ResyncPlan::source_size_bytes`] when
/// [`ResyncPlan::needs_resize`], then every range, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncPlan {
    block_size_bytes: u32,
    source_size_bytes: u64,
    target_size_bytes: u64,
    ranges: Vec<PlannedRange>,
}

impl ResyncPlan {
    /// The block size of both maps.
    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    /// The size the target must have at the end.
    pub fn source_size_bytes(&self) -> u64 {
        self.source_size_bytes
    }

    /// The target's size according to its map.
    pub fn target_size_bytes(&self) -> u64 {
        self.target_size_bytes
    }

    /// Whether the target must first be resized to the source's size.
    pub fn needs_resize(&self) -> bool {
        self.source_size_bytes != self.target_size_bytes
    }

    /// The ranges to change, sorted by offset, non-overlapping, maximal (two adjacent
    /// ranges never have the same op).
    pub fn ranges(&self) -> &[PlannedRange] {
        &self.ranges
    }

    /// Whether there is nothing to do: the images are already equal.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && !self.needs_resize()
    }

    /// Bytes of source data the plan sends.
    pub fn copy_bytes(&self) -> u64 {
        self.op_bytes(RangeOp::Copy)
    }

    /// Bytes the plan zeroes (sent as markers, not data).
    pub fn zero_bytes(&self) -> u64 {
        self.op_bytes(RangeOp::Zero)
    }

    fn op_bytes(&self, op: RangeOp) -> u64 {
        self.ranges
            .iter()
            .filter(|range| range.op == op)
            .map(|range| range.len_bytes)
            .sum()
    }
}

/// Compares a source map with a target map and returns the ranges that differ.
///
/// Per block of the source (`S` its digest, `T` the target's for the same block):
///
/// | case | op |
/// |---|---|
/// | same length in both, `S == T` | none |
/// | `S` zero, target block zero after resizing (past its end, or its digest is zero) | none |
/// | `S` zero, otherwise | [`RangeOp::Zero`] |
/// | `S` data, otherwise | [`RangeOp::Copy`] |
///
/// # Guarantees
/// Applying the plan to an image that the target map describes (resize, then the ranges)
/// makes it equal to the image that the source map describes, up to hash collisions.
/// Equal maps give an empty plan. Zero blocks of the source never produce a copy.
///
/// # Caveats
/// A block that changes length (the last block of one image when the sizes differ) is
/// never taken as equal: its stored hash covered other bytes.
pub fn plan_resync(source: &BlockMap, target: &BlockMap) -> Result<ResyncPlan, ResyncError> {
    check_comparable(source, target)?;
    let mut ranges: Vec<PlannedRange> = Vec::new();
    for (block_index, &source_digest) in source.digests().iter().enumerate() {
        let block_index = block_index as u64;
        let (offset_bytes, len_bytes) = source.block_extent(block_index);
        let target_digest = target.digest(block_index);
        let same_length = target.block_extent(block_index).1 == len_bytes;
        // Past the target's end the resize zero-fills; a zero block that changes length
        // stays zero; anything else that changes length is unknown.
        let target_zero_after_resize = target_digest.is_none_or(|digest| digest.is_zero());
        let op = match source_digest {
            BlockDigest::Zero if target_zero_after_resize => None,
            BlockDigest::Zero => Some(RangeOp::Zero),
            BlockDigest::Data(_) if same_length && target_digest == Some(source_digest) => None,
            BlockDigest::Data(_) => Some(RangeOp::Copy),
        };
        let Some(op) = op else { continue };
        match ranges.last_mut() {
            Some(last) if last.op == op && last.end_bytes() == offset_bytes => {
                last.len_bytes += len_bytes;
            }
            _ => ranges.push(PlannedRange {
                offset_bytes,
                len_bytes,
                op,
            }),
        }
    }
    Ok(ResyncPlan {
        block_size_bytes: source.block_size_bytes(),
        source_size_bytes: source.image_size_bytes(),
        target_size_bytes: target.image_size_bytes(),
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgorithm;
    use proptest::prelude::*;

    const BLOCK: usize = 4096;

    /// Applies a plan's remaining ranges to an in-memory target, returning the bytes copied.
    fn apply(
        plan: &ResyncPlan,
        ranges: &[PlannedRange],
        source: &[u8],
        target: &mut Vec<u8>,
    ) -> u64 {
        if plan.needs_resize() {
            target.resize(plan.source_size_bytes() as usize, 0);
        }
        let mut copied = 0;
        for range in ranges {
            let span = range.offset_bytes as usize..range.end_bytes() as usize;
            match range.op {
                RangeOp::Copy => {
                    target[span.clone()].copy_from_slice(&source[span]);
                    copied += range.len_bytes;
                }
                RangeOp::Zero => target[span].fill(0),
            }
        }
        copied
    }

    fn map(image: &[u8]) -> BlockMap {
        BlockMap::from_image(image, BLOCK as u32, HashAlgorithm::Xxh3_128).expect("map")
    }

    /// Images built from a few block patterns, so that equal, zero and differing blocks all
    /// occur often.
    fn image_strategy() -> impl Strategy<Value = Vec<u8>> {
        (proptest::collection::vec(0u8..4, 0..24), 0usize..BLOCK).prop_map(|(blocks, tail)| {
            let mut image = Vec::new();
            for pattern in blocks {
                let fill = [0u8, 1, 2, 3][pattern as usize];
                image.extend(std::iter::repeat_n(fill, BLOCK));
            }
            image.extend(std::iter::repeat_n(9u8, tail));
            image
        })
    }

    #[test]
    fn size_mismatch_and_zero_ranges_are_explicit() {
        let mut source = vec![0u8; 6 * BLOCK];
        source[..BLOCK].fill(1); // A
        source[2 * BLOCK..3 * BLOCK].fill(2); // B
        source[3 * BLOCK..4 * BLOCK].fill(3); // C
        let mut target = vec![7u8; 8 * BLOCK];
        target[..BLOCK].fill(1);
        target[2 * BLOCK..3 * BLOCK].fill(2);
        target[5 * BLOCK..].fill(0);
        let plan = plan_resync(&map(&source), &map(&target)).expect("plan");
        assert!(plan.needs_resize());
        let block = BLOCK as u64;
        assert_eq!(
            plan.ranges(),
            &[
                PlannedRange {
                    offset_bytes: block,
                    len_bytes: block,
                    op: RangeOp::Zero
                },
                PlannedRange {
                    offset_bytes: 3 * block,
                    len_bytes: block,
                    op: RangeOp::Copy
                },
                PlannedRange {
                    offset_bytes: 4 * block,
                    len_bytes: block,
                    op: RangeOp::Zero
                },
            ]
        );
        assert_eq!(plan.copy_bytes(), block);
    }

    #[test]
    fn maps_of_different_shapes_are_refused() {
        let a = map(&[1u8; 8192]);
        let b = BlockMap::from_image(&[1u8; 8192], 8192, HashAlgorithm::Xxh3_128).expect("map");
        let c = BlockMap::from_image(&[1u8; 8192], 4096, HashAlgorithm::Blake3_128).expect("map");
        assert!(matches!(
            plan_resync(&a, &b),
            Err(ResyncError::CompareMaps {
                field: "block_size_bytes",
                ..
            })
        ));
        assert!(matches!(
            plan_resync(&a, &c),
            Err(ResyncError::CompareMaps {
                field: "algorithm",
                ..
            })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn applying_the_plan_makes_target_equal_source(source in image_strategy(), target in image_strategy()) {
            let plan = plan_resync(&map(&source), &map(&target)).expect("plan");
            let mut patched = target.clone();
            let copied = apply(&plan, plan.ranges(), &source, &mut patched);
            prop_assert_eq!(&patched, &source);
            prop_assert_eq!(copied, plan.copy_bytes());
            // Ranges are sorted, disjoint and maximal.
            for pair in plan.ranges().windows(2) {
                prop_assert!(pair[0].end_bytes() <= pair[1].offset_bytes);
                prop_assert!(pair[0].end_bytes() < pair[1].offset_bytes || pair[0].op != pair[1].op);
            }
            // Zero blocks of the source are never copied.
            for range in plan.ranges().iter().filter(|range| range.op == RangeOp::Copy) {
                for block in source[range.offset_bytes as usize..range.end_bytes() as usize].chunks(BLOCK) {
                    prop_assert!(block.iter().any(|&byte| byte != 0));
                }
            }
            // Once equal, there is nothing left to do.
            prop_assert!(plan_resync(&map(&source), &map(&patched)).expect("plan").is_empty());
        }

        #[test]
        fn equal_images_give_empty_plans(image in image_strategy()) {
            let plan = plan_resync(&map(&image), &map(&image)).expect("plan");
            prop_assert!(plan.is_empty());
            prop_assert_eq!(plan.copy_bytes() + plan.zero_bytes(), 0);
        }
    }
}
