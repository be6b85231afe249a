//! The node side of Lifeboat in API terms: how a `ProtectedVM` and its `ReplicationPolicy`
//! configure the agent's engine, how the engine's facts become `status.agent`, and how a
//! `ReplicationJob` runs and reports. The cluster agent (over the Kubernetes API, in
//! [`cluster`]) and standalone mode (over its embedded store) both go through here, so a VM
//! replicates the same way in both.
//!
//! ```text
//!  ProtectedVM + ReplicationPolicy ──config──> engine::open_worker ──> Worker (lifeboat-agent)
//!  Worker facts ──report──> status.agent          ReplicationJob ──jobs──> run_job_on ──> job status
//! ```

pub mod cluster;
pub mod config;
pub mod engine;
pub mod jobs;
pub mod report;
pub mod stores;

pub use cluster::{AgentOptions, ClusterError, run};
pub use config::{ConfigError, VmConfig, vm_config};
pub use report::agent_report;
pub use stores::{SecretSource, StoreCache};
