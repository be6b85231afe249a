//! What the agent remembers of one VM across restarts: its phase, its cycle counter, the
//! change logs written and not yet shipped, and the cursors of long work (initial copy,
//! resync), in one JSON file replaced atomically.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::error::EngineError;
use crate::fs::StateFs;

/// Where the VM is, as the agent sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnginePhase {
    /// Nothing done yet.
    #[default]
    New,
    /// Replica disks created, tracking started; the copy has not finished.
    Enabled,
    /// The initial copy is done; the changes made during it are not shipped yet.
    Copied,
    /// Delta replication: every cycle ships a change set and cuts a point.
    Protected,
    /// A resync is required (tracking lost, logs over threshold, a corrupt log, a request).
    ResyncRequired {
        /// Why.
        reason: String,
    },
    /// Failed over to a point; not replicating.
    FailedOver {
        /// The point.
        point: String,
    },
    /// Protection removed.
    Disabled,
}

/// One disk's change log of a cycle that is not shipped yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLog {
    /// The disk.
    pub disk: String,
    /// The sealed log file.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
}

/// A cycle whose logs are sealed and not yet applied and cut as a point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCycle {
    /// The cycle number.
    pub cycle: u64,
    /// The instant its view froze, in ms since the epoch.
    pub time_unix_ms: u64,
    /// Whether the view was application-consistent.
    pub app_consistent: bool,
    /// One log per disk.
    pub logs: Vec<PendingLog>,
}

/// Where an interrupted copy stopped, disk by disk: bytes below `offset` of disk `disk`
/// (and every disk before it) are in the replica as of the view of cycle `cycle`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyCursor {
    /// The view the copied bytes came from.
    pub cycle: u64,
    /// Index of the disk being copied.
    pub disk_index: usize,
    /// Bytes of that disk done.
    pub offset: u64,
}

/// Everything the agent keeps for one VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// The phase.
    pub phase: EnginePhase,
    /// The epoch of the replica this agent writes under (see `lifeboat_store::fence`): the
    /// store's when protection starts, the new one after this agent fences it. A store at
    /// another epoch refuses every change: the agent was fenced.
    #[serde(default)]
    pub epoch: u64,
    /// The last cycle number used (views are numbered from 1).
    pub last_cycle: u64,
    /// Cycles with sealed logs not yet applied, oldest first.
    pub pending: Vec<PendingCycle>,
    /// Set while a pending cycle is being applied to the store: after a crash, the store's
    /// live disks are reverted to the latest point before applying again. It stays set when
    /// the cycle's logs are dropped for a resync before the live disks could be put back:
    /// the resync puts them back before it trusts the latest point's block map.
    pub applying: bool,
    /// The initial copy's progress, while it runs.
    pub copy: Option<CopyCursor>,
    /// The cycle whose view a running resync reads.
    #[serde(default)]
    pub resync_cycle: Option<u64>,
    /// The window of a disk (name, start, end) a running resync may have written past its
    /// last saved map: sent again when the resync resumes.
    #[serde(default)]
    pub resync_intent: Option<(String, u64, u64)>,
    /// The ranges inside [`AgentState::resync_intent`]'s window that the resync writes there
    /// (sent again, only they, when it resumes); empty: the whole window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resync_intent_ranges: Vec<(u64, u64)>,
    /// When the last app-consistent point was cut, in ms since the epoch.
    #[serde(default)]
    pub last_app_consistent_unix_ms: Option<u64>,
    /// The disks a running resync compares in full, decided when it starts and kept for its
    /// resumption (a lost disk's new bitmap knows nothing of what was lost); the others'
    /// changes are known to the hypervisor, and only their changed blocks are compared.
    /// `None` with a resync running (a state from before this field): every disk.
    #[serde(default)]
    pub resync_full_disks: Option<Vec<String>>,
    /// What the hypervisor said of each disk at the last enable.
    #[serde(default)]
    pub disks: Vec<DiskRecord>,
}

/// What the hypervisor said of a disk at enable: its format and whether its tracking
/// survives a restart of the hypervisor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The disk's name.
    pub name: String,
    /// Its image format (`qcow2`, `raw`, `host_device`, `vhdx`).
    pub format: String,
    /// Whether its tracking survives a clean restart of the hypervisor.
    pub tracking_survives_restart: bool,
    /// Why it does not, and what would make it, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_note: Option<String>,
}

impl From<&crate::backend::DiskInfo> for DiskRecord {
    fn from(info: &crate::backend::DiskInfo) -> Self {
        DiskRecord {
            name: info.name.clone(),
            format: info.format.clone(),
            tracking_survives_restart: info.durability.survives_restart(),
            tracking_note: match &info.durability {
                crate::backend::TrackingDurability::Persistent => None,
                crate::backend::TrackingDurability::InMemory(why) => Some(why.clone()),
            },
        }
    }
}

impl AgentState {
    /// The state file of a VM's state folder.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    /// Load the state, or a new one when the folder holds none.
    ///
    /// # Errors
    ///
    /// [`EngineError::CorruptState`] when the file does not parse; an I/O error otherwise.
    pub fn load(fs: &dyn StateFs, dir: &Path) -> Result<AgentState, EngineError> {
        let path = Self::path(dir);
        match fs.read(&path) {
            Ok(Some(bytes)) => {
                serde_json::from_slice(&bytes).map_err(|e| EngineError::CorruptState {
                    path,
                    detail: e.to_string(),
                })
            }
            Ok(None) => Ok(AgentState::default()),
            Err(e) => Err(EngineError::state("read agent state", path)(e)),
        }
    }

    /// Save the state atomically ([`StateFs::write_atomic`]: durable when it returns).
    ///
    /// # Errors
    ///
    /// The I/O error, naming the file.
    pub fn save(&self, fs: &dyn StateFs, dir: &Path) -> Result<(), EngineError> {
        let path = Self::path(dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| EngineError::CorruptState {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        fs.write_atomic(&path, &bytes)
            .map_err(EngineError::state("save agent state", path))
    }

    /// Bytes of logs written and not yet shipped.
    pub fn pending_log_bytes(&self) -> u64 {
        self.pending
            .iter()
            .flat_map(|c| c.logs.iter())
            .map(|l| l.size_bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::LocalFs;

    #[test]
    fn state_round_trips_and_a_corrupt_file_is_reported() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            AgentState::load(&LocalFs, dir.path()).ok(),
            Some(AgentState::default())
        );
        let state = AgentState {
            phase: EnginePhase::ResyncRequired {
                reason: "TrackingLost".into(),
            },
            last_cycle: 7,
            pending: vec![PendingCycle {
                cycle: 7,
                time_unix_ms: 1,
                app_consistent: false,
                logs: vec![PendingLog {
                    disk: "root".into(),
                    path: "/x".into(),
                    size_bytes: 4096,
                }],
            }],
            ..AgentState::default()
        };
        state
            .save(&LocalFs, dir.path())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            AgentState::load(&LocalFs, dir.path()).ok(),
            Some(state.clone())
        );
        assert_eq!(state.pending_log_bytes(), 4096);
        std::fs::write(AgentState::path(dir.path()), b"{not json")
            .unwrap_or_else(|e| panic!("{e}"));
        let error = AgentState::load(&LocalFs, dir.path()).err();
        assert!(
            matches!(error, Some(EngineError::CorruptState { .. })),
            "{error:?}"
        );
    }
}
