//! The final content of every changed range of a disk, so that a cycle ships each changed
//! byte once.
//!
//! ```text
//! writes, in order:   [aaaa]          [cc]
//!                        [bbbbbb]       [dd]
//! ChangeMap:          [aaabbbbbb]     [cdd]      later writes win; overlapping and
//!                     ^0              ^12        adjacent ranges merge into one
//! ```
//!
//! The map is a `BTreeMap` from a range's start offset to its bytes. Its invariant: ranges are
//! non-empty, disjoint and not adjacent (there is at least one unchanged byte between two).

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};

use crate::error::{HrlError, Problem, Result};
use crate::reader::LogWrite;

/// Changed ranges of a disk and their final content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeMap {
    ranges: BTreeMap<u64, Vec<u8>>,
}

impl ChangeMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The map of the writes of a log (or of a chain of logs), applied in order.
    pub fn from_writes<'a, I>(writes: I) -> Result<Self>
    where
        I: IntoIterator<Item = &'a LogWrite>,
    {
        let mut map = Self::new();
        map.apply_writes(writes)?;
        Ok(map)
    }

    /// Records a write of `data` at `disk_offset`, over anything written before. Empty writes
    /// change nothing.
    ///
    /// # Guarantees
    ///
    /// Extending a range at its end (sequential writes) appends in place: a run of sequential
    /// writes costs linear time, not quadratic.
    pub fn apply_write(&mut self, disk_offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let end = disk_offset
            .checked_add(len)
            .ok_or(HrlError::CoalesceWrite {
                disk_offset,
                len,
                problem: Problem::Overflow,
            })?;
        if data.is_empty() {
            return Ok(());
        }
        // The range starting at or before the write that reaches it (touching counts).
        let left = self
            .ranges
            .range(..=disk_offset)
            .next_back()
            .filter(|(start, bytes)| **start + bytes.len() as u64 >= disk_offset)
            .map(|(start, _)| *start);
        // Ranges starting inside the write or right at its end; disjointness means only the
        // last of them can reach past the write.
        let swallowed: Vec<u64> = self
            .ranges
            .range((Excluded(disk_offset), Included(end)))
            .map(|(start, _)| *start)
            .collect();
        let mut tail: Vec<u8> = Vec::new();
        for start in swallowed {
            if let Some(bytes) = self.ranges.remove(&start) {
                let range_end = start + bytes.len() as u64;
                if range_end > end {
                    tail = bytes[(end - start) as usize..].to_vec();
                }
            }
        }
        match left.and_then(|start| self.ranges.get_mut(&start).map(|b| (start, b))) {
            Some((start, bytes)) => {
                let rel = (disk_offset - start) as usize;
                if rel + data.len() <= bytes.len() {
                    // Entirely inside an existing range: overwrite in place.
                    bytes[rel..rel + data.len()].copy_from_slice(data);
                } else {
                    bytes.truncate(rel);
                    bytes.extend_from_slice(data);
                    bytes.extend_from_slice(&tail);
                }
            }
            None => {
                let mut bytes = Vec::with_capacity(data.len() + tail.len());
                bytes.extend_from_slice(data);
                bytes.extend_from_slice(&tail);
                self.ranges.insert(disk_offset, bytes);
            }
        }
        Ok(())
    }

    /// Records every write, in order.
    pub fn apply_writes<'a, I>(&mut self, writes: I) -> Result<()>
    where
        I: IntoIterator<Item = &'a LogWrite>,
    {
        for w in writes {
            self.apply_write(w.disk_offset, &w.data)?;
        }
        Ok(())
    }

    /// The changed ranges, by increasing offset: (start offset, final bytes).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.ranges
            .iter()
            .map(|(start, bytes)| (*start, bytes.as_slice()))
    }

    /// Takes the ranges out.
    pub fn into_ranges(self) -> BTreeMap<u64, Vec<u8>> {
        self.ranges
    }

    /// Number of disjoint ranges.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Total changed bytes: what a cycle ships.
    pub fn changed_bytes(&self) -> u64 {
        self.ranges.values().map(|b| b.len() as u64).sum()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn apply_direct(disk: &mut Vec<u8>, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if disk.len() < end {
            disk.resize(end, 0);
        }
        disk[offset as usize..end].copy_from_slice(data);
    }

    #[test]
    fn later_writes_win_and_adjacent_ranges_merge() {
        let mut map = ChangeMap::new();
        map.apply_write(0, b"aaaa").unwrap();
        map.apply_write(2, b"bbbbbb").unwrap();
        map.apply_write(12, b"cc").unwrap();
        map.apply_write(13, b"dd").unwrap();
        let ranges: Vec<_> = map.ranges().collect();
        assert_eq!(ranges, vec![(0, &b"aabbbbbb"[..]), (12, &b"cdd"[..])]);
        map.apply_write(8, b"xxxx").unwrap();
        let ranges: Vec<_> = map.ranges().collect();
        assert_eq!(ranges, vec![(0, &b"aabbbbbbxxxxcdd"[..])]);
        assert_eq!(map.changed_bytes(), 15);
    }

    #[test]
    fn write_inside_a_range_overwrites_in_place() {
        let mut map = ChangeMap::new();
        map.apply_write(10, b"0123456789").unwrap();
        map.apply_write(12, b"ab").unwrap();
        assert_eq!(
            map.ranges().collect::<Vec<_>>(),
            vec![(10, &b"01ab456789"[..])]
        );
    }

    #[test]
    fn write_covering_several_ranges_replaces_them() {
        let mut map = ChangeMap::new();
        map.apply_write(0, b"aa").unwrap();
        map.apply_write(5, b"bb").unwrap();
        map.apply_write(10, b"cccc").unwrap();
        map.apply_write(1, b"XXXXXXXXXXX").unwrap();
        assert_eq!(
            map.ranges().collect::<Vec<_>>(),
            vec![(0, &b"aXXXXXXXXXXXcc"[..])]
        );
    }

    #[test]
    fn empty_and_overflowing_writes() {
        let mut map = ChangeMap::new();
        map.apply_write(5, b"").unwrap();
        assert!(map.is_empty());
        assert!(matches!(
            map.apply_write(u64::MAX, b"x"),
            Err(HrlError::CoalesceWrite {
                problem: Problem::Overflow,
                ..
            })
        ));
        map.apply_write(u64::MAX - 1, b"x").unwrap();
        assert_eq!(map.range_count(), 1);
    }

    proptest! {
        #[test]
        fn equals_applying_writes_to_a_vec(
            writes in prop::collection::vec((0u64..200, prop::collection::vec(any::<u8>(), 0..40)), 0..40)
        ) {
            let mut map = ChangeMap::new();
            let mut disk = Vec::new();
            let mut touched = Vec::new();
            for (offset, data) in &writes {
                map.apply_write(*offset, data).unwrap();
                apply_direct(&mut disk, *offset, data);
                apply_direct(&mut touched, *offset, &vec![1u8; data.len()]);
            }
            // Every range holds exactly the final bytes and covers only touched bytes.
            let mut covered = vec![0u8; touched.len()];
            let mut previous_end: Option<u64> = None;
            for (start, bytes) in map.ranges() {
                prop_assert!(!bytes.is_empty());
                if let Some(pe) = previous_end {
                    prop_assert!(start > pe, "ranges must be disjoint and not adjacent");
                }
                let end = start as usize + bytes.len();
                prop_assert_eq!(&disk[start as usize..end], bytes);
                covered[start as usize..end].fill(1);
                previous_end = Some(end as u64);
            }
            prop_assert_eq!(covered, touched);
        }
    }
}
