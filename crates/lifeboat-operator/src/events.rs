//! Kubernetes Events, with stable reasons (`JobStarted`, `HealthCritical`, ...: see
//! `lifeboat_core::vm::reasons`), about the ProtectedVM so that `kubectl describe pvm` tells
//! its story, with the job as the related object where there is one.
//!
//! Events are best effort: one that cannot be published is logged, never a reconcile error.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType};
use lifeboat_core::vm::{Notice, reasons};

use crate::context::Context;

/// Event reasons the policy controller uses.
pub mod policy_reasons {
    /// A policy's deletion waits for the VMs that use it.
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
}

/// The action an event's reason belongs to (the Events API's `action`).
fn action(reason: &str) -> &'static str {
    match reason {
        reasons::JOB_CREATED => "CreateJob",
        reasons::JOB_WITHDRAWN => "DeleteJob",
        reasons::JOB_STARTED | reasons::JOB_SUCCEEDED | reasons::JOB_FAILED => "TrackJob",
        reasons::HEALTH_NORMAL | reasons::HEALTH_WARNING | reasons::HEALTH_CRITICAL => {
            "DecideHealth"
        }
        reasons::REQUEST_REJECTED => "HandleRequest",
        policy_reasons::DELETION_BLOCKED => "HoldFinalizer",
        _ => "Reconcile",
    }
}

/// Publish `notices` about `obj`, with `related` (a job) as the related object.
pub async fn publish<K>(
    ctx: &Context,
    obj: &K,
    notices: &[Notice],
    related: Option<ObjectReference>,
) where
    K: Resource<DynamicType = ()>,
{
    let regarding = obj.object_ref(&());
    for notice in notices {
        let event = Event {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: notice.reason.into(),
            note: Some(notice.note.chars().take(1000).collect()),
            action: action(notice.reason).into(),
            secondary: related.clone(),
        };
        if let Err(error) = ctx.recorder.publish(&event, &regarding).await {
            tracing::warn!(reason = notice.reason, %error, "could not publish an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_an_action() {
        for reason in [
            reasons::JOB_CREATED,
            reasons::JOB_STARTED,
            reasons::JOB_SUCCEEDED,
            reasons::JOB_FAILED,
            reasons::JOB_WITHDRAWN,
            reasons::REQUEST_REJECTED,
            reasons::HEALTH_NORMAL,
            reasons::HEALTH_WARNING,
            reasons::HEALTH_CRITICAL,
            policy_reasons::DELETION_BLOCKED,
        ] {
            assert_ne!(action(reason), "Reconcile", "{reason}");
        }
    }
}
