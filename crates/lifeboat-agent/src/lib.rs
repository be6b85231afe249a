//! The node agent: what actually protects a VM. It tracks writes through the VM's hypervisor,
//! copies the disks once (initial replication), then every copy interval cuts a change set,
//! writes it as sealed HRL logs, applies them to the replica store and cuts a recovery point;
//! it resynchronizes with fixed-block checksums when tracking is lost or the logs pile up, and
//! materialises recovery points for (test) failover.
//!
//! ```text
//!   Hypervisor (qemu | hyperv) ──View──> engine ──HRL logs──> ReplicaStore ──> points
//! ```

pub mod backend;
pub mod engine;
pub mod error;
pub mod hyperv;
pub mod jobs;
pub mod qemu;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod throttle;
pub mod worker;

pub use engine::{Progress, Replicator, Report, Settings};
pub use error::AgentError;
pub use jobs::{JobDirs, JobResult, run_job};
pub use worker::{VmFacts, Worker};
