//! Lifeboat on one machine, with no cluster and no cloud account: the operator's decisions
//! and the node agent in one process, reading the same `ReplicationPolicy` and `ProtectedVM`
//! manifests that `kubectl apply` takes from a folder, keeping state in an embedded store that
//! survives restarts, replicating to the local folder store by default.
//!
//! ```text
//!  manifests/ ──> daemon (decide_vm + node agent) ──> <state>/db (status, jobs)
//!                        │                        ──> <state>/agent (change logs, cursors)
//!  lifeboat resync VM ──> <state>/requests ──┘
//! ```

pub mod cli;
pub mod daemon;
pub mod db;
pub mod folder;
pub mod plans;
pub mod recovered;
pub mod requests;

pub use daemon::{Daemon, DaemonError, Options};
