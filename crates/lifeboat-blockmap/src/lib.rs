//! Fixed-block maps, the one block hash, and resync planning: what the initial copy, the
//! cycles, the resync and the failover's verification all use to know a disk's blocks, and
//! how a replica is made equal to its source by sending only the blocks that differ.
//!
//! ```text
//!   source image ──hash──► source map ─┐
//!                                      ├─► plan_resync ──► ResyncPlan: [Copy | Zero ranges]
//!   target map (stored beside the      │                         │
//!   replica, kept current by           ┘                         ▼
//!   update_range; or re-hashed)                 apply (the agent): copy / zero
//! ```
//!
//! * [`hash`]: zero detection and the block hash (XXH3-128 by default, BLAKE3 on request).
//! * [`map`]: [`BlockMap`], one digest per block, its update-in-place operations and its
//!   versioned, checksummed serialized form.
//! * [`plan`]: [`plan_resync`] compares two maps into coalesced [`PlannedRange`]s.
//!
//! Everything here is synchronous and free of Kubernetes and of I/O; it works on `&[u8]`. The
//! agent's resync (`lifeboat-engine`, `replicator/resync.rs`) reads its view and its store and
//! uses these pieces; [`digest_blocks`] spreads the hashing of a chunk over the cores. The
//! choice of hash and default block size is measured: docs/benchmarks.md.

pub mod error;
pub mod hash;
pub mod map;
pub mod plan;

pub use error::{FormatProblem, ResyncError};
pub use hash::{BlockDigest, BlockHash, HashAlgorithm, digest_block, digest_blocks, is_zero};
pub use map::{BlockMap, DEFAULT_BLOCK_SIZE_BYTES, MAX_BLOCK_SIZE_BYTES, MIN_BLOCK_SIZE_BYTES};
pub use plan::{PlannedRange, RangeOp, ResyncPlan, plan_resync};
