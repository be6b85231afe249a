//! The per-VM manifest: its disks and its recovery points, with each point's consistency and
//! each disk's digest at that point. Stored as JSON (a file, or a small blob), replaced
//! atomically. The functions that choose points (prune by retention, pick for failover) are
//! pure and live here.

use serde::{Deserialize, Serialize};

/// The manifest format's version; a reader refuses a newer one.
pub const MANIFEST_VERSION: u32 = 1;

/// Consistency of a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Consistency {
    /// As if the VM lost power at that instant.
    CrashConsistent,
    /// The guest's filesystems (or VSS writers) were quiesced.
    AppConsistent,
}

/// A disk's digest at a point: the fingerprint of its block map, with the map's parameters,
/// so that failover and verification can re-hash a materialised disk and compare.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskDigest {
    /// The block hash (`xxh3-128`, `blake3`, ...).
    pub algorithm: String,
    /// The block size the map was built with.
    pub block_size_bytes: u32,
    /// The map's fingerprint, as lowercase hex.
    pub fingerprint: String,
}

/// A disk of the VM, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// The disk's name (a DNS label).
    pub name: String,
    /// Its current size.
    pub size_bytes: u64,
}

/// A disk as it was at a point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointDisk {
    /// The disk's name.
    pub name: String,
    /// Its size at the point.
    pub size_bytes: u64,
    /// Its digest at the point.
    pub digest: DiskDigest,
    /// Where the store keeps the point's data for this disk (a snapshot timestamp, a segment
    /// number): the store's own, opaque to callers.
    pub store_ref: String,
}

/// A recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// Unique and sortable by time: `20261128T190512.345Z-c42`.
    pub id: String,
    /// The instant it captures, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The replication cycle it came from.
    pub cycle: u64,
    /// Crash- or app-consistent.
    pub consistency: Consistency,
    /// Every disk at the point.
    pub disks: Vec<PointDisk>,
    /// Who wrote it (the agent, `<node>/<pod>`); empty in points written before it was kept.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub written_by: String,
}

/// What the store holds for one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] when written.
    pub version: u32,
    /// The VM, as `namespace/name`.
    pub vm: String,
    /// Its replica disks now.
    pub disks: Vec<ManifestDisk>,
    /// Its points, oldest first.
    pub points: Vec<RecoveryPoint>,
    /// Who may write the replica (see [`crate::fence`]); the initial epoch is not written.
    #[serde(default, skip_serializing_if = "crate::Epoch::is_initial")]
    pub epoch: crate::Epoch,
}

impl Manifest {
    /// An empty manifest for `vm`.
    pub fn new(vm: &str) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            vm: vm.to_owned(),
            disks: Vec::new(),
            points: Vec::new(),
            epoch: crate::Epoch::default(),
        }
    }

    /// A disk by name.
    pub fn disk(&self, name: &str) -> Option<&ManifestDisk> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// A point by id.
    pub fn point(&self, id: &str) -> Option<&RecoveryPoint> {
        self.points.iter().find(|p| p.id == id)
    }

    /// The newest point.
    pub fn latest(&self) -> Option<&RecoveryPoint> {
        self.points.last()
    }

    /// The newest point cut at or before `unix_ms`.
    pub fn latest_not_after(&self, unix_ms: u64) -> Option<&RecoveryPoint> {
        self.points.iter().rev().find(|p| p.time_unix_ms <= unix_ms)
    }

    /// The newest app-consistent point.
    pub fn latest_app_consistent(&self) -> Option<&RecoveryPoint> {
        self.points
            .iter()
            .rev()
            .find(|p| p.consistency == Consistency::AppConsistent)
    }

    /// The points older than `retention_ms` before `now_unix_ms`, oldest first, never the
    /// latest (a VM always keeps one point to fail over to).
    pub fn points_to_prune(&self, retention_ms: u64, now_unix_ms: u64) -> Vec<String> {
        let cutoff = now_unix_ms.saturating_sub(retention_ms);
        let keep_from = self.points.len().saturating_sub(1);
        self.points[..keep_from]
            .iter()
            .filter(|p| p.time_unix_ms < cutoff)
            .map(|p| p.id.clone())
            .collect()
    }

    /// Parse a manifest, refusing one written by a newer Lifeboat.
    ///
    /// # Errors
    ///
    /// A message saying what is wrong (the caller names the file or blob).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if manifest.version > MANIFEST_VERSION {
            return Err(format!(
                "manifest version {} is newer than this Lifeboat understands ({MANIFEST_VERSION})",
                manifest.version
            ));
        }
        Ok(manifest)
    }

    /// The manifest as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // NB: serialising these plain types cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// A point id: the time in UTC to the millisecond, and the cycle, so that ids sort by time and
/// say when they are.
pub fn point_id(time_unix_ms: u64, cycle: u64) -> String {
    let secs = time_unix_ms / 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z-c{cycle}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        time_unix_ms % 1000
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: &str, time_unix_ms: u64, consistency: Consistency) -> RecoveryPoint {
        RecoveryPoint {
            id: id.into(),
            time_unix_ms,
            cycle: 0,
            consistency,
            disks: Vec::new(),
            written_by: String::new(),
        }
    }

    #[test]
    fn point_ids_read_as_utc_times_and_sort_by_time() {
        assert_eq!(point_id(0, 1), "19700101T000000.000Z-c1");
        // 2026-11-28T19:05:12.345Z
        assert_eq!(point_id(1_795_892_712_345, 42), "20261128T190512.345Z-c42");
        assert_eq!(point_id(951_782_400_000, 7), "20000229T000000.000Z-c7");
        assert!(point_id(1_000, 9) < point_id(2_000, 1));
    }

    #[test]
    fn pruning_keeps_the_latest_and_everything_inside_retention() {
        let mut m = Manifest::new("ns/vm");
        m.points = vec![
            point("a", 1_000, Consistency::CrashConsistent),
            point("b", 5_000, Consistency::AppConsistent),
            point("c", 9_000, Consistency::CrashConsistent),
        ];
        assert_eq!(m.points_to_prune(6_000, 10_000), ["a"]);
        assert_eq!(m.points_to_prune(4_000, 10_000), ["a", "b"]);
        assert_eq!(m.points_to_prune(0, 10_000), ["a", "b"]);
        assert_eq!(m.points_to_prune(100_000, 10_000), Vec::<String>::new());
        // Even when every point is old, the latest stays.
        assert_eq!(m.points_to_prune(0, 1_000_000), ["a", "b"]);
        assert_eq!(m.latest_app_consistent().map(|p| p.id.as_str()), Some("b"));
        // The newest point at or before a time: at its instant, between two, before all.
        let not_after = |t| m.latest_not_after(t).map(|p| p.id.as_str());
        assert_eq!(not_after(5_000), Some("b"));
        assert_eq!(not_after(8_999), Some("b"));
        assert_eq!(not_after(100_000), Some("c"));
        assert_eq!(not_after(999), None);
        assert_eq!(
            Manifest::new("x").points_to_prune(0, 5),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_manifest_round_trips_and_a_newer_version_is_refused() {
        let mut m = Manifest::new("ns/vm");
        m.disks.push(ManifestDisk {
            name: "root".into(),
            size_bytes: 1 << 20,
        });
        assert_eq!(Manifest::from_json(&m.to_json()), Ok(m.clone()));
        m.version = MANIFEST_VERSION + 1;
        let error = Manifest::from_json(&m.to_json()).err().unwrap_or_default();
        assert!(error.contains("newer"), "{error}");
        assert!(Manifest::from_json(b"{\"version\":1").is_err());
    }
}
