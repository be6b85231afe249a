//! Lifeboat's pure decision core: given what a resource says, what the agent reported and the
//! time, decide health, RPO, retry times and conditions. No Kubernetes client, no clock and
//! no I/O live here: every function takes `now`, so every decision is unit-testable and the
//! operator and standalone mode decide alike.
//!
//! ```text
//!  spec + status + agent reports + now ──> decide ──> status, conditions, requeue time
//! ```

pub mod conditions;
pub mod health;
pub mod retry;
pub mod rpo;

pub use conditions::{ConditionStatus, ObservedCondition, set_condition};
pub use health::{HealthDecision, HealthInputs, decide_health};
pub use retry::{ErrorClass, RetryDecision, next_retry};
pub use rpo::{format_duration, rpo};
