//! Adding and removing a finalizer, guarded by the resourceVersion so that a stale cache
//! never drops another controller's finalizer.
//!
//! NB: not kube's `runtime::finalizer` helper: it removes the finalizer as soon as cleanup
//! returns `Ok`, and disabling protection is a job that takes a while, so the cleanup here is
//! a decision that can say "not yet" without pretending to fail.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use lifeboat_api::contract::OPERATOR_FIELD_MANAGER;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::fmt::Debug;

/// Whether `obj` holds `finalizer`.
pub fn has<K: ResourceExt>(obj: &K, finalizer: &str) -> bool {
    obj.finalizers().iter().any(|f| f == finalizer)
}

async fn set<K>(api: &Api<K>, obj: &K, finalizers: Vec<String>) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.resource_version(),
        }
    });
    let params = PatchParams {
        field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(&obj.name_any(), &params, &Patch::Merge(patch))
        .await
        .map(|_| ())
}

/// Add `finalizer` to `obj`.
///
/// # Errors
///
/// The API error; a 409 Conflict means the cache was stale, and the next reconcile sees the
/// newer object.
pub async fn add<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(finalizer.to_owned());
    set(api, obj, finalizers).await
}

/// Make sure a live object holds `finalizer` before anything else is done for it.
///
/// Returns `true` when the reconcile may go on (the object holds the finalizer); `false` when
/// it was just added (the patch comes back as a watch event, which reconciles again) or when
/// the object is being deleted without it (nothing is left to do).
///
/// # Errors
///
/// As [`add`].
pub async fn ensure<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    if has(obj, finalizer) {
        return Ok(true);
    }
    if obj.meta().deletion_timestamp.is_none() {
        add(api, obj, finalizer).await?;
    }
    Ok(false)
}

/// Remove `finalizer` from `obj`; a 404 means it is gone already.
///
/// # Errors
///
/// As [`add`].
pub async fn remove<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let finalizers = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    match set(api, obj, finalizers).await {
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        other => other,
    }
}
