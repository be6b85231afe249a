//! The control plane's half that the operator and the standalone daemon share: the
//! translation between the API types (`lifeboat-api`) and the decisions' words
//! (`lifeboat-core`), and the one path from a VM's decision to its effects.
//!
//! ```text
//!  ProtectedVM, ReplicationPolicy ──mapping──> lifeboat_core::decide_vm ──> VmDecision
//!                                                                             │ reconcile_vm
//!              operator: VmWriter over the Kubernetes API  <─────────────────┤
//!              standalone: VmWriter over the embedded store <────────────────┘
//! ```
//!
//! Nothing here talks to a server: the writers live with their transports.

pub mod mapping;
pub mod plan;
pub mod reconcile;
pub mod recovery;
pub mod requests;

pub use reconcile::{Carried, Created, JobNameTaken, VmPass, VmWriter, job_object, reconcile_vm};
