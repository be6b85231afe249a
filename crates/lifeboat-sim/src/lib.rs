//! Power-cut simulation of Lifeboat's data path, after FoundationDB's simulation and
//! TigerBeetle's VOPR: the real replication engine ([`lifeboat_engine::Replicator`]) and the
//! real local store run on a simulated state file system ([`fs::SimFs`]), a durability layer
//! over the store ([`store::SimStore`]) and a simulated VM ([`vm::SimVm`]) that keep exactly
//! what their contracts promise and lose the rest at a power cut. One seed decides every
//! guest write, fault, crash and cut, so a failing schedule replays exactly.
//!
//! ```text
//!  explore::run(seed) ──> guest writes ─> engine op ─> faults / crash / power cut ─> checks
//!                           SimVm          Replicator    World (seeded)              points = source?
//!                                          ├─ SimFs (state folder)                   nothing lost?
//!                                          └─ SimStore ─> LocalStore (real)          no wedge?
//! ```

pub mod explore;
pub mod fs;
pub mod rng;
pub mod store;
pub mod vm;
pub mod world;

pub use explore::{Interruption, Options, Outcome, SWEEPS, SweepOutcome, Target, run, sweep};
