//! The operator: kube-rs controllers for `ReplicationPolicy`, `ProtectedVM` and
//! `ReplicationJob`, thin shells around the decisions of `lifeboat-core`.
//!
//! Empty until the operator issue fills it.
