//! Lifeboat's pure decision core: given what a resource says, what the agent reported and the
//! time, decide the next job, health, RPO, retry times and conditions. No Kubernetes client, no
//! clock and no I/O live here: every function takes `now`, so every decision is unit-testable
//! and the operator and standalone mode decide alike.
//!
//! ```text
//!  spec + status + agent reports + job + heartbeat + now ──> decide ──> status, conditions,
//!                                                                      job to create, events,
//!                                                                      requeue time
//! ```
//!
//! | module | decides |
//! |---|---|
//! | [`vm`] | a ProtectedVM's life cycle: jobs, requests, retries, status |
//! | [`policy`] | a ReplicationPolicy's readiness and deletion |
//! | [`job`] | when a finished ReplicationJob is deleted |
//! | [`health`], [`rpo`](mod@rpo), [`retry`] | ASR's health rules, RPO, retry schedule |
//! | [`conditions`] | every condition of every resource |
//! | [`lease`] | leader election |
//! | [`window`] | wall-clock windows in a time zone |

pub mod clock;
pub mod conditions;
pub mod health;
pub mod job;
pub mod lease;
pub mod model;
pub mod policy;
pub mod retry;
pub mod rpo;
pub mod vm;
pub mod window;

pub use clock::{Clock, JumpingClock, ManualClock, SystemClock};
pub use conditions::{ConditionStatus, ObservedCondition, set_condition};
pub use health::{Health, HealthDecision, HealthInputs, decide_health};
pub use model::{
    ErrorReport, FailoverKind, JobKind, JobParams, JobState, Phase, PointChoice, PolicySettings,
    ResyncReason,
};
pub use retry::{ErrorClass, RetryDecision, next_retry};
pub use rpo::{format_duration, format_rfc3339, rpo};
pub use vm::{Materialised, VmDecision, VmInput, decide_vm};
