//! Fixed-block maps, the one block hash, and resync planning: what the initial copy, the
//! cycles, the resync and the failover's verification all use to know a disk's blocks, and
//! how a replica is made equal to its source by sending only the blocks that differ,
//! resuming where an interrupted resync stopped.
//!
//! ```text
//!   source image ──hash──► source map ─┐
//!                                      ├─► plan_resync ──► ResyncPlan: [Copy | Zero ranges]
//!   target map (stored beside the      │                         │
//!   replica, kept current by           ┘                         ▼
//!   update_range; or re-hashed)                 apply: copy / zero, checkpoint a ResyncCursor
//! ```
//!
//! * [`hash`]: zero detection and the block hash (XXH3-128 by default, BLAKE3 on request).
//! * [`map`]: [`BlockMap`], one digest per block, its update-in-place operations and its
//!   versioned, checksummed serialized form.
//! * [`plan`]: [`plan_resync`] compares two maps into coalesced [`PlannedRange`]s;
//!   [`ResyncCursor`] records progress.
//! * [`image`]: positional I/O ([`BlockSource`], [`BlockSink`]) over files and memory,
//!   parallel hashing of images, plan application, and the [`resync_files`] driver.
//!
//! Everything here is synchronous and free of Kubernetes; the pure parts work on `&[u8]`.
//! The choice of hash and default block size is measured: docs/benchmarks.md, "Resync vs
//! rsync".

pub mod error;
pub mod hash;
pub mod image;
pub mod map;
pub mod plan;

pub use error::{FormatProblem, ResyncError};
pub use hash::{BlockDigest, BlockHash, HashAlgorithm, digest_block, is_zero};
pub use image::{
    AlignedBuffer, ApplyOptions, ApplyReport, BlockSink, BlockSource, FileImage, HashOptions,
    MemoryImage, ResyncOptions, ResyncPhase, ResyncProgress, ResyncReport, TargetMapOrigin,
    apply_plan, hash_image, load_cursor, load_map, resync_files, store_map,
};
pub use map::{BlockMap, DEFAULT_BLOCK_SIZE_BYTES, MAX_BLOCK_SIZE_BYTES, MIN_BLOCK_SIZE_BYTES};
pub use plan::{PlannedRange, RangeOp, ResyncCursor, ResyncPlan, plan_resync};
