//! Lifeboat's pure decision core: given a resource's spec, its status, what the agent
//! reported and the time, decide the next job, the status, the conditions and when to look
//! again. No Kubernetes client and no I/O live here, so every decision is unit-testable.
//!
//! Empty until the operator issue fills it; see DESIGN.md section 2.
