//! The replication engine: what actually protects a VM, over two traits. It copies the disks
//! once (initial replication), then every copy interval cuts a change set through the
//! hypervisor's [`backend::Hypervisor`], writes it as sealed HRL logs, applies them to the
//! replica store and cuts a recovery point; it resynchronizes with fixed-block checksums when
//! tracking is lost or the logs pile up, and materialises recovery points for (test)
//! failover. The hypervisors live in crates of their own (`lifeboat-qemu`,
//! `lifeboat-hyperv`); the deployed agent (`lifeboat-agent`) picks one per VM.
//!
//! ```text
//!   Hypervisor (lifeboat-qemu | lifeboat-hyperv) ──View──> Replicator ──HRL logs──> ReplicaStore ──> points
//!                                                           Worker: cycles on schedule, retries
//! ```

pub mod backend;
pub mod error;
pub mod fs;
pub mod jobs;
pub mod replicator;
pub mod space;
pub mod stamp;
pub mod state;
pub mod throttle;
pub mod twin;
pub mod worker;

pub use error::EngineError;
pub use jobs::{JobDirs, JobResult, run_job, run_store_job};
pub use replicator::{Progress, Replicator, Report, Settings};
pub use worker::{VmFacts, Worker};
