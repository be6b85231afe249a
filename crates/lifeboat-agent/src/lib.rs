//! The node agent (one per VM host, the `lifeboat agent` role the chart deploys as a
//! DaemonSet), and the node side of Lifeboat in API terms: how a `ProtectedVM` and its
//! `ReplicationPolicy` configure the engine (`lifeboat-engine`) with a hypervisor backend
//! (`lifeboat-qemu` on Linux, `lifeboat-hyperv` on Windows), how the engine's facts become
//! `status.agent`, and how a `ReplicationJob` runs and reports. The cluster agent (over the
//! Kubernetes API, in [`cluster`]) and standalone mode (over its embedded store) both go
//! through here, so a VM replicates the same way in both.
//!
//! ```text
//!  ProtectedVM + ReplicationPolicy ──config──> vm_worker::open_worker ──> Worker (lifeboat-engine)
//!  Worker facts ──report──> status.agent          ReplicationJob ──jobs──> run_job_on ──> job status
//! ```
//!
//! It does not link the operator: the API/core mapping comes from `lifeboat-control`, the
//! metrics endpoint from `lifeboat-http`.

pub mod cluster;
pub mod config;
pub mod jobs;
pub mod report;
pub mod stores;
pub mod vm_worker;

pub use cluster::{AgentOptions, ClusterError, run};
pub use config::{ConfigError, Site, VmConfig, vm_config, vm_config_on};
pub use report::agent_report;
pub use stores::{SecretSource, StoreCache};
