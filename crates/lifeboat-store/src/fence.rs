//! Fencing: which writer may change a VM's replica. Every VM's replica has an epoch, a number
//! that only grows, with the writer that took it. A writer replicates under the epoch it holds
//! ([`crate::ReplicaStore::hold_epoch`]); a failover moves the replica to a new epoch with a
//! conditional write ([`crate::ReplicaStore::fence`]). From then on every change the old
//! writer asks of the store (data, block maps, the manifest, points, deletions) is refused
//! with [`StoreError::Fenced`], and it stays refused: the old writer never writes again.
//!
//! ```text
//!   agent on node A holds epoch 3 ── cycles ──> writes, manifest (conditional on epoch 3)
//!   failover on node B: fence ──> epoch 4 (holder B), conditional on what it read
//!   agent A comes back: its next change ──> Fenced (the store is at 4, taken by B)
//! ```
//!
//! Where the epoch lives: the local store keeps `epoch.json` beside the manifest, written
//! under `epoch.lock` (an exclusive lock the manifest writes take too, so that a manifest
//! write and a fence never interleave); Azure keeps it in the manifest blob, whose every
//! update is conditional on the ETag read (If-Match), so that of two writers racing one wins.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{StoreError, VmKey};

/// A replica's epoch: who may write it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Epoch {
    /// Grows by one at every fence; 0 for a replica never fenced.
    pub number: u64,
    /// Who took it (`<node>/<pod>` of an agent, `lifeboat recover` and its host), empty for 0.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub holder: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub time_unix_ms: u64,
}

impl Epoch {
    /// Whether this is the first epoch (never fenced).
    pub fn is_initial(&self) -> bool {
        self.number == 0
    }

    /// The epoch after this one, taken by `holder` at `time_unix_ms`.
    pub fn next(&self, holder: &str, time_unix_ms: u64) -> Epoch {
        Epoch {
            number: self.number + 1,
            holder: holder.to_owned(),
            time_unix_ms,
        }
    }
}

/// The epoch a store handle writes each VM under. A VM without one is written unchecked
/// (creating a replica, tools, tests); the engine always holds one.
#[derive(Debug, Default)]
pub(crate) struct Held(Mutex<HashMap<VmKey, u64>>);

impl Held {
    pub(crate) fn hold(&self, vm: &VmKey, epoch: u64) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.insert(vm.clone(), epoch);
    }

    pub(crate) fn get(&self, vm: &VmKey) -> Option<u64> {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.get(vm).copied()
    }

    /// `Ok` when this handle may change `vm`, whose replica is at `current`.
    pub(crate) fn check(&self, vm: &VmKey, current: &Epoch) -> Result<(), StoreError> {
        check(&vm.to_string(), self.get(vm), current)
    }
}

/// `Ok` when a writer holding `held` may change `vm`, whose replica is at `current`.
pub(crate) fn check(vm: &str, held: Option<u64>, current: &Epoch) -> Result<(), StoreError> {
    match held {
        Some(held) if held != current.number => Err(StoreError::Fenced {
            vm: vm.to_owned(),
            held,
            current: current.number,
            holder: current.holder.clone(),
        }),
        _ => Ok(()),
    }
}
