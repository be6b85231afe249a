//! What the backend remembers of a VM across calls and restarts (`<work_dir>/<vm>.hyperv.json`),
//! and the pure decisions taken from it: what a crashed agent left behind and how to clean it
//! up ([`plan_sweep`]), whether a disk's tracking can be vouched for ([`assess_disk`]), and
//! whether a disk was written behind RCT's back ([`untracked_write`]).
//!
//! ```text
//!  disks[name] = base: reference point R + the disk's RCT id in R + the frozen image and its
//!                data write GUID when R was cut        (changes are asked "since rct_id")
//!  reference_points = the ones this backend made and has not destroyed yet
//!  intent = Checkpoint{cycle, started, id?}   a view is being opened (or was, before a crash)
//!         | Convert{cycle, checkpoint, known reference points, the would-be bases}
//!  lost[name] = why tracking of the disk cannot be trusted (found while opening a view)
//! ```

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::host::{Checkpoint, CheckpointRef, ReferencePoint, ReferencePointRef};
use lifeboat_engine::backend::Tracking;

/// The backend's record of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Per disk (its name in the ProtectedVM): the base its changes are counted from.
    #[serde(default)]
    pub disks: BTreeMap<String, DiskBase>,
    /// The reference points this backend made and has not destroyed yet (`InstanceID`s).
    #[serde(default)]
    pub reference_points: BTreeSet<String>,
    /// What was under way when the record was last written.
    #[serde(default)]
    pub intent: Option<Intent>,
    /// Disks whose tracking cannot be trusted, with why.
    #[serde(default)]
    pub lost: BTreeMap<String, String>,
}

/// Where a disk's tracking counts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBase {
    /// The image path the ProtectedVM names.
    pub path: String,
    /// The reference point (`InstanceID`) that keeps `rct_id` valid.
    pub reference_point: String,
    /// The disk's RCT id in that reference point.
    pub rct_id: String,
    /// The checkpoint image the base was cut from.
    pub frozen_path: String,
    /// That image's VHDX data write GUID, when it could be read.
    pub data_write_guid: Option<String>,
    /// The cycle that cut the base (0: `start_tracking`).
    pub cycle: u64,
}

/// An operation under way (written before it starts, cleared when it ended).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Intent {
    /// A recovery checkpoint is being taken (a view opening, or a new base).
    Checkpoint {
        /// The cycle.
        cycle: u64,
        /// When the checkpoint was asked for.
        started_unix_ms: u64,
        /// Its `InstanceID`, once known.
        checkpoint: Option<String>,
    },
    /// A checkpoint is being converted to the new base.
    Convert {
        /// The cycle.
        cycle: u64,
        /// The checkpoint's `InstanceID`.
        checkpoint: String,
        /// The VM's reference points before the conversion.
        known_reference_points: Vec<String>,
        /// The bases the conversion makes (their `reference_point` is not known yet).
        bases: BTreeMap<String, DiskBase>,
    },
}

/// What a sweep does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepPlan {
    /// Checkpoints a crashed view or conversion left (destroying one is an Abandon).
    pub destroy_checkpoints: Vec<CheckpointRef>,
    /// Reference points of this backend that no disk counts from any more.
    pub destroy_reference_points: Vec<ReferencePointRef>,
    /// Reference points of this backend that are gone already.
    pub forget_reference_points: Vec<String>,
    /// A conversion that completed before a crash: its reference point and bases.
    pub adopt: Option<(String, BTreeMap<String, DiskBase>)>,
    /// What the sweep found worth a warning.
    pub warnings: Vec<String>,
}

impl SweepPlan {
    /// Whether the sweep has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.destroy_checkpoints.is_empty()
            && self.destroy_reference_points.is_empty()
            && self.forget_reference_points.is_empty()
            && self.adopt.is_none()
    }
}

impl Record {
    /// The reference points some disk counts from.
    pub fn referenced(&self) -> BTreeSet<String> {
        self.disks
            .values()
            .map(|b| b.reference_point.clone())
            .collect()
    }

    /// Take the bases a conversion made: `reference_point` is the new base of `bases`' disks.
    pub fn adopt(&mut self, reference_point: &str, bases: &BTreeMap<String, DiskBase>) {
        for (disk, base) in bases {
            let mut base = base.clone();
            base.reference_point = reference_point.to_owned();
            self.disks.insert(disk.clone(), base);
            self.lost.remove(disk);
        }
        self.reference_points.insert(reference_point.to_owned());
    }
}

/// Plan the cleanup of what an earlier run left: run before anything else touches the VM,
/// never while this process has a view open.
///
/// # Guarantees
/// - A checkpoint a view left is destroyed: its changes stay counted from the old base, as
///   after an Abandon (the next cycle ships them again, harmlessly).
/// - A conversion that completed is adopted only when exactly one reference point appeared
///   that nobody knew of: anything else keeps the old base, which only costs shipping more.
/// - Only this backend's reference points are ever destroyed.
///
/// # Assumptions
/// Recovery checkpoints created after a view's intent was written (less `slack_ms` for clock
/// skew) and before its id was recorded are this backend's.
pub fn plan_sweep(
    record: &Record,
    checkpoints: &[Checkpoint],
    reference_points: &[ReferencePoint],
    slack_ms: u64,
) -> SweepPlan {
    let mut plan = SweepPlan::default();
    let listed: BTreeSet<&str> = reference_points
        .iter()
        .map(|r| r.reference_point.instance_id.as_str())
        .collect();
    let listed_checkpoint = |id: &str| {
        checkpoints
            .iter()
            .find(|c| c.checkpoint.instance_id == id)
            .map(|c| c.checkpoint.clone())
    };
    match &record.intent {
        None => {}
        Some(Intent::Checkpoint {
            cycle,
            checkpoint: Some(id),
            ..
        }) => {
            if let Some(c) = listed_checkpoint(id) {
                plan.warnings.push(format!(
                    "destroying checkpoint {id} that the view of cycle {cycle} left: its changes \
                     stay tracked"
                ));
                plan.destroy_checkpoints.push(c);
            }
        }
        Some(Intent::Checkpoint {
            cycle,
            started_unix_ms,
            checkpoint: None,
        }) => {
            let since = started_unix_ms.saturating_sub(slack_ms);
            for c in checkpoints
                .iter()
                .filter(|c| c.recovery && c.created_unix_ms.is_some_and(|t| t >= since))
            {
                plan.warnings.push(format!(
                    "destroying recovery checkpoint {} made while cycle {cycle} opened its view",
                    c.checkpoint.instance_id
                ));
                plan.destroy_checkpoints.push(c.checkpoint.clone());
            }
        }
        Some(Intent::Convert {
            cycle,
            checkpoint,
            known_reference_points,
            bases,
        }) => {
            if let Some(c) = listed_checkpoint(checkpoint) {
                plan.warnings.push(format!(
                    "the conversion of cycle {cycle} did not happen: destroying checkpoint \
                     {checkpoint}, its changes stay tracked"
                ));
                plan.destroy_checkpoints.push(c);
            } else {
                let appeared: Vec<&str> = listed
                    .iter()
                    .copied()
                    .filter(|id| {
                        !known_reference_points.iter().any(|k| k == id)
                            && !record.reference_points.contains(*id)
                    })
                    .collect();
                match appeared.as_slice() {
                    [one] => plan.adopt = Some(((*one).to_owned(), bases.clone())),
                    other => plan.warnings.push(format!(
                        "cannot tell which reference point the conversion of cycle {cycle} made \
                         ({} appeared): keeping the old bases",
                        other.len()
                    )),
                }
            }
        }
    }
    let mut after = record.clone();
    if let Some((id, bases)) = &plan.adopt {
        after.adopt(id, bases);
    }
    let referenced = after.referenced();
    for id in after
        .reference_points
        .iter()
        .filter(|id| !referenced.contains(*id))
    {
        match reference_points
            .iter()
            .find(|r| r.reference_point.instance_id == *id)
        {
            Some(r) => plan
                .destroy_reference_points
                .push(r.reference_point.clone()),
            None => plan.forget_reference_points.push(id.clone()),
        }
    }
    plan
}

/// Whether a disk's changes can be counted from its base.
///
/// - `listed`: the VM's reference points now;
/// - `enabled`: whether RCT is on for the image the VM writes to (`None`: unknown);
/// - `probe`: why asking for changes since the base's RCT id failed, if it did.
pub fn assess_disk(
    disk: &str,
    record: &Record,
    listed: &BTreeSet<String>,
    enabled: Option<bool>,
    probe: Option<&str>,
) -> Tracking {
    if let Some(why) = record.lost.get(disk) {
        return Tracking::Lost(why.clone());
    }
    let Some(base) = record.disks.get(disk) else {
        return Tracking::Absent;
    };
    if !listed.contains(&base.reference_point) {
        return Tracking::Lost(format!(
            "reference point {} of disk {disk:?} no longer exists: the changes since it cannot be told",
            base.reference_point
        ));
    }
    if enabled == Some(false) {
        return Tracking::Lost(format!(
            "Resilient Change Tracking is off for the image of disk {disk:?}: changes made meanwhile were not tracked"
        ));
    }
    if let Some(why) = probe {
        return Tracking::Lost(format!(
            "the RCT id {} of disk {disk:?} is no longer valid: {why}",
            base.rct_id
        ));
    }
    Tracking::Active
}

/// Whether a disk was written without RCT seeing it: RCT reports no change since the base,
/// yet the frozen image's VHDX data write GUID (which changes before the first write of
/// user-visible data) differs from the base's. Compared only for the same image file.
/// Returns the reason when it was.
pub fn untracked_write(
    disk: &str,
    base: &DiskBase,
    frozen_path: &str,
    data_write_guid: Option<&str>,
    rct_reports_changes: bool,
) -> Option<String> {
    let (Some(before), Some(now)) = (base.data_write_guid.as_deref(), data_write_guid) else {
        return None;
    };
    if rct_reports_changes || !same_path(&base.frozen_path, frozen_path) || before == now {
        return None;
    }
    Some(format!(
        "the VHDX data write GUID of {frozen_path} (disk {disk:?}) changed from {before} to {now} \
         although RCT reports no change since reference point {}: the disk was written while \
         tracking was off",
        base.reference_point
    ))
}

/// The disk's RCT id in a new reference point: the one read from its frozen image when the
/// reference point lists it; else the one the reference point pairs with the image's virtual
/// disk id.
pub fn pair_rct_id(
    disk: &str,
    frozen_rct_id: &str,
    virtual_disk_id: &str,
    reference_point: &ReferencePoint,
) -> Result<String, String> {
    if reference_point
        .disks
        .iter()
        .any(|d| d.rct_id == frozen_rct_id)
    {
        return Ok(frozen_rct_id.to_owned());
    }
    let wanted = normalize_guid(virtual_disk_id);
    reference_point
        .disks
        .iter()
        .find(|d| normalize_guid(&d.virtual_disk_id) == wanted)
        .map(|d| d.rct_id.clone())
        .ok_or_else(|| {
            format!(
                "reference point {} lists neither the RCT id {frozen_rct_id} of disk {disk:?} nor \
                 its virtual disk id {virtual_disk_id} (it lists {:?})",
                reference_point.reference_point.instance_id, reference_point.disks
            )
        })
}

fn normalize_guid(s: &str) -> String {
    s.trim()
        .trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase()
}

/// Whether two Windows paths name the same file (case, separators, `\\?\`).
pub fn same_path(a: &str, b: &str) -> bool {
    fn norm(p: &str) -> String {
        let p = p.trim().replace('/', "\\");
        let p = p.strip_prefix(r"\\?\").unwrap_or(&p);
        p.trim_end_matches('\\').to_lowercase()
    }
    norm(a) == norm(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;
    use crate::host::RctDisk;

    fn base(rp: &str) -> DiskBase {
        DiskBase {
            path: r"D:\vm\os.vhdx".into(),
            reference_point: rp.into(),
            rct_id: format!("rct:{rp}"),
            frozen_path: r"D:\vm\os.vhdx".into(),
            data_write_guid: Some("guid-1".into()),
            cycle: 3,
        }
    }

    fn checkpoint(id: &str, created: u64, recovery: bool) -> Checkpoint {
        Checkpoint {
            checkpoint: CheckpointRef {
                instance_id: id.into(),
                path: format!("path-{id}"),
            },
            name: String::new(),
            recovery,
            created_unix_ms: Some(created),
        }
    }

    fn rp(id: &str) -> ReferencePoint {
        ReferencePoint {
            reference_point: ReferencePointRef {
                instance_id: id.into(),
                path: format!("path-{id}"),
            },
            rct_based: true,
            consistency: None,
            disks: vec![RctDisk {
                virtual_disk_id: "{ABC}".into(),
                rct_id: format!("rct:{id}"),
            }],
        }
    }

    fn record_with(rps: &[&str], base_rp: &str) -> Record {
        Record {
            disks: [("os".to_owned(), base(base_rp))].into(),
            reference_points: rps.iter().map(|s| (*s).to_owned()).collect(),
            ..Record::default()
        }
    }

    #[test]
    fn a_clean_record_sweeps_nothing_but_unreferenced_reference_points() {
        let r = record_with(&["R1"], "R1");
        assert!(plan_sweep(&r, &[], &[rp("R1"), rp("THEIRS")], 0).is_empty());
        let r = record_with(&["R0", "R1", "RGONE"], "R1");
        let plan = plan_sweep(&r, &[], &[rp("R0"), rp("R1"), rp("THEIRS")], 0);
        assert_eq!(
            plan.destroy_reference_points,
            vec![rp("R0").reference_point]
        );
        assert_eq!(plan.forget_reference_points, vec!["RGONE".to_owned()]);
    }

    #[test]
    fn a_view_left_open_has_its_checkpoint_destroyed() {
        let mut r = record_with(&["R1"], "R1");
        r.intent = Some(Intent::Checkpoint {
            cycle: 4,
            started_unix_ms: 10_000,
            checkpoint: Some("CP4".into()),
        });
        let plan = plan_sweep(
            &r,
            &[
                checkpoint("CP4", 10_100, true),
                checkpoint("USER", 20_000, false),
            ],
            &[rp("R1")],
            1000,
        );
        assert_eq!(
            plan.destroy_checkpoints,
            vec![checkpoint("CP4", 0, true).checkpoint]
        );
        assert!(plan.destroy_reference_points.is_empty());

        // A crash before the id was recorded: recovery checkpoints made since then are ours.
        r.intent = Some(Intent::Checkpoint {
            cycle: 4,
            started_unix_ms: 10_000,
            checkpoint: None,
        });
        let plan = plan_sweep(
            &r,
            &[
                checkpoint("OLD", 1_000, true),
                checkpoint("CP4", 9_500, true),
                checkpoint("USER", 20_000, false),
            ],
            &[rp("R1")],
            1000,
        );
        assert_eq!(
            plan.destroy_checkpoints,
            vec![checkpoint("CP4", 0, true).checkpoint]
        );
    }

    #[test]
    fn a_conversion_that_completed_is_adopted_and_the_old_base_destroyed() {
        let mut r = record_with(&["R1"], "R1");
        let mut new_base = base("");
        new_base.rct_id = "rct:new".into();
        new_base.cycle = 5;
        r.intent = Some(Intent::Convert {
            cycle: 5,
            checkpoint: "CP5".into(),
            known_reference_points: vec!["R1".into(), "THEIRS".into()],
            bases: [("os".to_owned(), new_base)].into(),
        });
        let plan = plan_sweep(&r, &[], &[rp("R1"), rp("THEIRS"), rp("R5")], 0);
        let (id, bases) = plan.adopt.clone().unwrap();
        assert_eq!(id, "R5");
        assert_eq!(bases["os"].rct_id, "rct:new");
        assert_eq!(
            plan.destroy_reference_points,
            vec![rp("R1").reference_point]
        );
        let mut after = r.clone();
        after.adopt(&id, &bases);
        assert_eq!(after.disks["os"].reference_point, "R5");
        assert!(after.reference_points.contains("R5"));

        // Two appeared: nobody can tell which is ours, the old base stays.
        let plan = plan_sweep(&r, &[], &[rp("R1"), rp("THEIRS"), rp("R5"), rp("X")], 0);
        assert!(plan.adopt.is_none());
        assert!(plan.destroy_reference_points.is_empty());
        assert_eq!(plan.warnings.len(), 1);

        // The checkpoint is still there: the conversion never happened.
        let plan = plan_sweep(&r, &[checkpoint("CP5", 0, true)], &[rp("R1")], 0);
        assert!(plan.adopt.is_none());
        assert_eq!(plan.destroy_checkpoints.len(), 1);
    }

    #[test]
    fn tracking_is_lost_without_its_reference_point_or_with_rct_off() {
        let r = record_with(&["R1"], "R1");
        let listed: BTreeSet<String> = ["R1".to_owned()].into();
        assert_eq!(
            assess_disk("os", &r, &listed, Some(true), None),
            Tracking::Active
        );
        assert_eq!(
            assess_disk("data", &r, &listed, Some(true), None),
            Tracking::Absent
        );
        assert!(matches!(
            assess_disk("os", &r, &BTreeSet::new(), Some(true), None),
            Tracking::Lost(why) if why.contains("reference point R1 of disk \"os\" no longer exists")
        ));
        assert!(matches!(
            assess_disk("os", &r, &listed, Some(false), None),
            Tracking::Lost(why) if why.contains("Resilient Change Tracking is off")
        ));
        assert!(matches!(
            assess_disk("os", &r, &listed, Some(true), Some("ERROR_VHD_INVALID_CHANGE_TRACKING_ID")),
            Tracking::Lost(why) if why.contains("rct:R1")
        ));
        let mut r = r;
        r.lost
            .insert("os".into(), "written behind RCT's back".into());
        assert_eq!(
            assess_disk("os", &r, &listed, Some(true), None),
            Tracking::Lost("written behind RCT's back".into())
        );
    }

    #[test]
    fn a_data_write_guid_that_changed_without_changes_is_an_untracked_write() {
        let b = base("R1");
        let frozen = r"d:/VM/OS.vhdx";
        assert!(untracked_write("os", &b, frozen, Some("guid-2"), false).is_some());
        assert_eq!(
            untracked_write("os", &b, frozen, Some("guid-1"), false),
            None
        );
        assert_eq!(
            untracked_write("os", &b, frozen, Some("guid-2"), true),
            None
        );
        assert_eq!(
            untracked_write("os", &b, r"D:\vm\os_1.avhdx", Some("guid-2"), false),
            None
        );
        assert_eq!(untracked_write("os", &b, frozen, None, false), None);
    }

    #[test]
    fn rct_ids_pair_by_value_then_by_virtual_disk_id() {
        let r = rp("R5");
        assert_eq!(pair_rct_id("os", "rct:R5", "{zzz}", &r).unwrap(), "rct:R5");
        assert_eq!(pair_rct_id("os", "rct:other", "abc", &r).unwrap(), "rct:R5");
        assert!(pair_rct_id("os", "rct:other", "{def}", &r).is_err());
    }

    #[test]
    fn windows_paths_compare_without_case_or_separator_differences() {
        assert!(same_path(r"D:\VM\Os.vhdx", "d:/vm/os.VHDX"));
        assert!(same_path(r"\\?\D:\vm\os.vhdx", r"D:\vm\os.vhdx"));
        assert!(!same_path(r"D:\vm\os.vhdx", r"D:\vm\os2.vhdx"));
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let mut r = record_with(&["R1"], "R1");
        r.intent = Some(Intent::Checkpoint {
            cycle: 2,
            started_unix_ms: 5,
            checkpoint: None,
        });
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            serde_json::from_str::<Record>("{}").unwrap(),
            Record::default()
        );
    }
}
