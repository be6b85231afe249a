//! Reflinked twins of raw disk files: how a raw image keeps a record of its writes across a
//! restart of its VM, which a raw image cannot hold in itself (QEMU keeps a persistent dirty
//! bitmap in qcow2 only).
//!
//! When a failover (or a failback) leaves a raw image file equal to a recovery point, it
//! clones the file (`FICLONE`) beside it, as `.<file>.lifeboat-since-<point>`: a twin that
//! shares every data extent with the image and costs no space while neither is written. A
//! write to the image afterwards cannot change a shared extent in place: the file system
//! gives the written range new space. So comparing the two files' extent maps (`FIEMAP`)
//! later names every range written since, without reading any data:
//!
//! ```text
//!   image  [ A ][ B ][ C' ][ D ]      C' written since the point: new physical space
//!   twin   [ A ][ B ][ C  ][ D ]      the point's data, untouched
//!           same same diff  same  ──> changed since the point: C
//! ```
//!
//! A re-protect that starts from that point then reads and compares only those ranges, as it
//! does with a qcow2 image's seed bitmap, instead of reading the whole disk.
//!
//! # Guarantees
//!
//! A range reported unchanged maps, in both files, to the same physical space, with flags
//! that say the data is where the map says (not delayed, inline, encoded or unknown) and with
//! the same allocated-but-unwritten state; a range that is a hole in both is unchanged too.
//! Shared space is never written in place, so such a range holds the point's data. Anything
//! else counts as changed: a file system that moved a shared extent (a defragmenter) costs
//! a compare, never a missed write.
//!
//! # Assumptions
//!
//! The image's page cache is written back before its map is read (`fdatasync`, which waits
//! for the writeback and so for the file system's copy-on-write remap): a write that QEMU
//! completed into the page cache has its new space then. Only regular files
//! on a file system that clones and maps extents (XFS with reflink, btrfs, bcachefs, OCFS2):
//! elsewhere there is no twin (or, on an NFS mount that clones, one that is never read), and
//! a re-protect compares the whole disk, as before.
//!
//! # Caveats
//!
//! The twin keeps the point's copy of every block the VM rewrites, until the re-protect
//! that uses it ends (or the VM's protection is disabled): up to the disk's allocated size,
//! as a snapshot would; an image removed by hand leaves its twins, holding all of the
//! point's data, unless they are removed with it. Linux only (ReFS block cloning on Windows
//! is not used).

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How a twin's file name starts after the image's name: `.<image>.lifeboat-since-<point>`.
const TWIN_INFIX: &str = ".lifeboat-since-";

/// How the name of a twin being made ends, until it is whole.
const CLONING: &str = ".cloning";

/// One extent of a file's map, as `FIEMAP` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Where it starts in the file, in bytes.
    pub logical: u64,
    /// Where it starts on the device, in bytes.
    pub physical: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its data is where `physical` says: not delayed, unknown, inline, encoded, encrypted or
    /// unaligned.
    pub located: bool,
    /// Allocated but never written (reads as zeros).
    pub unwritten: bool,
}

/// The twin of the image at `image` for `point`: `.<file name>.lifeboat-since-<point>` in the
/// same folder. None for a path without a file name.
pub fn twin_path(image: &Path, point: &str) -> Option<PathBuf> {
    let name = image.file_name()?.to_str()?;
    Some(image.with_file_name(format!(".{name}{TWIN_INFIX}{point}")))
}

/// Clone the raw image file at `image` (equal to `point` now, flushed) as its twin for
/// `point`, replacing any twin of it for another point. Whether one was made: false when the
/// image is not a regular file or its file system cannot clone (the caller then has none, and
/// a re-protect compares the disk in full).
///
/// # Errors
///
/// Creating, cloning into or renaming the twin failed for another reason.
pub fn make(image: &Path, point: &str) -> io::Result<bool> {
    let Some(twin) = twin_path(image, point) else {
        return Ok(false);
    };
    if !std::fs::metadata(image)?.is_file() {
        return Ok(false);
    }
    let made = clone_file(image, &twin)?;
    remove_others(image, made.then_some(point))?;
    Ok(made)
}

/// The points the image at `image` has twins for (usually none or one).
///
/// # Errors
///
/// The image's folder cannot be read.
pub fn points(image: &Path) -> io::Result<Vec<String>> {
    let mut points = Vec::new();
    for_each_twin(image, |point, _| {
        if !point.ends_with(CLONING) {
            points.push(point.to_owned());
        }
        Ok(())
    })?;
    Ok(points)
}

/// The ranges of the image at `image` written since its twin for `point` was made: sorted,
/// disjoint, in bytes. None when there is no such twin, it is not on the image's file system
/// or not of its length, or extent maps cannot be read here.
///
/// Only what reached the file by the time of the call is named, and a range the image wrote
/// and then punched back to a hole the twin has too reads as unchanged: a caller whose image
/// is still being written adds the writes made from before the call on (a VM's dirty bitmap).
///
/// # Errors
///
/// Reading either file's extent map failed.
pub fn changed_since(image: &Path, point: &str) -> io::Result<Option<Vec<Range<u64>>>> {
    let Some(twin) = twin_path(image, point) else {
        return Ok(None);
    };
    let (Ok(live), Ok(kept)) = (std::fs::metadata(image), std::fs::metadata(&twin)) else {
        return Ok(None);
    };
    if !live.is_file() || !kept.is_file() || live.len() != kept.len() || !same_device(&live, &kept)
    {
        return Ok(None);
    }
    let Some(live_map) = extents(image, true)? else {
        return Ok(None);
    };
    let Some(twin_map) = extents(&twin, false)? else {
        return Ok(None);
    };
    Ok(Some(changed(&live_map, &twin_map, live.len())))
}

/// Remove every twin of the image at `image` (a re-protect that no longer needs one, a
/// failover's disks removed). The twins removed.
///
/// # Errors
///
/// The folder cannot be read, or a twin cannot be removed.
pub fn remove_all(image: &Path) -> io::Result<usize> {
    remove_others(image, None)
}

/// Remove the image's twins but the one for `keep`; how many.
fn remove_others(image: &Path, keep: Option<&str>) -> io::Result<usize> {
    let mut removed = 0;
    for_each_twin(image, |point, path| {
        if Some(point) == keep {
            return Ok(());
        }
        match std::fs::remove_file(path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
    })?;
    Ok(removed)
}

/// Call `each(point, path)` for every twin of the image at `image` (and a clone left half
/// made, whose "point" ends in `.cloning`).
fn for_each_twin(image: &Path, each: impl FnMut(&str, &Path) -> io::Result<()>) -> io::Result<()> {
    for_each_beside(image, TWIN_INFIX, each)
}

/// Call `each(point, path)` for every file beside the image at `image` (in its folder) named
/// `.<image's file name><infix><point>`: the records Lifeboat keeps of a raw image, one per
/// point (its twins, its [`crate::stamp`]s).
pub(crate) fn for_each_beside(
    image: &Path,
    infix: &str,
    mut each: impl FnMut(&str, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let (Some(dir), Some(name)) = (image.parent(), image.file_name().and_then(|n| n.to_str()))
    else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{name}{infix}");
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        if let Some(point) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) {
            each(point, &entry.path())?;
        }
    }
    Ok(())
}

/// The ranges of a file of `len` bytes whose map `live` differs from `twin`'s (both sorted by
/// `logical`, as `FIEMAP` gives them): everything either maps, but what both map to the same
/// located physical space in the same written state. Sorted and disjoint.
pub fn changed(live: &[Extent], twin: &[Extent], len: u64) -> Vec<Range<u64>> {
    let clip = |e: &Extent| e.logical.min(len)..e.logical.saturating_add(e.len).min(len);
    let mut mapped: Vec<Range<u64>> = live.iter().chain(twin).map(clip).collect();
    mapped.retain(|r| !r.is_empty());
    let mapped = crate::backend::union_ranges(mapped);
    // What both map to the same place: the overlaps of the two sorted lists, walked together.
    let mut same: Vec<Range<u64>> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < live.len() && j < twin.len() {
        let (a, b) = (&live[i], &twin[j]);
        let (ra, rb) = (clip(a), clip(b));
        let overlap = ra.start.max(rb.start)..ra.end.min(rb.end);
        let shared = a.located
            && b.located
            && a.unwritten == b.unwritten
            && a.physical.wrapping_sub(a.logical) == b.physical.wrapping_sub(b.logical);
        if !overlap.is_empty() && shared {
            same.push(overlap);
        }
        if ra.end <= rb.end {
            i += 1;
        } else {
            j += 1;
        }
    }
    let same = crate::backend::merge_ranges(same);
    subtract(&mapped, &same)
}

/// `from` without `minus` (both sorted and disjoint).
fn subtract(from: &[Range<u64>], minus: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut k = 0;
    for r in from {
        let mut start = r.start;
        while k < minus.len() && minus[k].end <= start {
            k += 1;
        }
        let mut m = k;
        while m < minus.len() && minus[m].start < r.end {
            if minus[m].start > start {
                out.push(start..minus[m].start);
            }
            start = start.max(minus[m].end);
            m += 1;
        }
        if start < r.end {
            out.push(start..r.end);
        }
    }
    out
}

#[cfg(unix)]
fn same_device(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev()
}

#[cfg(not(unix))]
fn same_device(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
}

/// Clone `from` into a new file at `to` (through a temporary name, so that a twin is whole or
/// absent); false when the file system cannot.
#[cfg(target_os = "linux")]
fn clone_file(from: &Path, to: &Path) -> io::Result<bool> {
    let source = std::fs::File::open(from)?;
    let mut temporary = to.as_os_str().to_owned();
    temporary.push(CLONING);
    let temporary = PathBuf::from(temporary);
    let target = std::fs::File::create(&temporary)?;
    if let Err(e) = rustix::fs::ioctl_ficlone(&target, &source) {
        drop(target);
        let _ = std::fs::remove_file(&temporary);
        // NB: EOPNOTSUPP (ext4), EXDEV, EINVAL (a file system without the call), ENOTTY.
        return match e {
            rustix::io::Errno::OPNOTSUPP
            | rustix::io::Errno::XDEV
            | rustix::io::Errno::INVAL
            | rustix::io::Errno::NOTTY => Ok(false),
            e => Err(e.into()),
        };
    }
    target.sync_all()?;
    std::fs::rename(&temporary, to)?;
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn clone_file(_: &Path, _: &Path) -> io::Result<bool> {
    Ok(false)
}

/// The extent map of the file at `path` (`sync`: its page cache written back first, and
/// every copy-on-write remap that ends); None where maps cannot be read (off Linux, or a file
/// system without `FIEMAP`).
#[cfg(target_os = "linux")]
fn extents(path: &Path, sync: bool) -> io::Result<Option<Vec<Extent>>> {
    use fiemap::{FiemapExtentFlags as F, FiemapFlags};
    let file = std::fs::File::open(path)?;
    // NB: once, not with FIEMAP_FLAG_SYNC, which the crate sends with every batch of 8.
    if sync {
        file.sync_data()?;
    }
    let elsewhere = F::UNKNOWN
        | F::DELALLOC
        | F::ENCODED
        | F::DATA_ENCRYPTED
        | F::NOT_ALIGNED
        | F::DATA_INLINE
        | F::DATA_TAIL;
    let mut out = Vec::new();
    for extent in fiemap::Fiemap::with_flags(&file, FiemapFlags::empty()) {
        let extent = match extent {
            Ok(extent) => extent,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        out.push(Extent {
            logical: extent.fe_logical,
            physical: extent.fe_physical,
            len: extent.fe_length,
            located: !extent.fe_flags.intersects(elsewhere),
            unwritten: extent.fe_flags.contains(F::UNWRITTEN),
        });
    }
    Ok(Some(out))
}

#[cfg(not(target_os = "linux"))]
fn extents(_: &Path, _: bool) -> io::Result<Option<Vec<Extent>>> {
    Ok(None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::single_range_in_vec_init)] // a failed unwrap is the test failure report; one-range lists are lists
mod tests {
    use super::*;

    const K: u64 = 4096;

    fn at(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical: logical * K,
            physical: physical * K,
            len: len * K,
            located: true,
            unwritten: false,
        }
    }

    fn blocks(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
        ranges.iter().map(|r| r.start / K..r.end / K).collect()
    }

    #[test]
    fn a_twin_just_made_shows_nothing_changed() {
        let map = [at(0, 100, 10), at(20, 300, 5)];
        assert!(changed(&map, &map, 30 * K).is_empty());
    }

    #[test]
    fn a_range_given_new_space_is_changed_and_only_it() {
        let twin = [at(0, 100, 100)];
        // Blocks 10..12 rewritten: the file system split the extent around new space.
        let live = [at(0, 100, 10), at(10, 900, 2), at(12, 112, 88)];
        assert_eq!(blocks(&changed(&live, &twin, 100 * K)), [10..12]);
    }

    #[test]
    fn holes_count_where_one_side_has_data() {
        // The image wrote into a hole (5..6) and punched one (20..22) where the twin has data.
        let twin = [at(0, 100, 5), at(20, 200, 10)];
        let live = [at(0, 100, 5), at(5, 700, 1), at(22, 202, 8)];
        assert_eq!(blocks(&changed(&live, &twin, 40 * K)), [5..6, 20..22]);
    }

    #[test]
    fn same_space_at_another_offset_or_not_located_is_changed() {
        let twin = [at(0, 100, 4), at(4, 104, 4)];
        // 0..4 maps to the same space but shifted by a block; 4..8 is the same but delayed.
        let mut delayed = at(4, 104, 4);
        delayed.located = false;
        let live = [at(0, 101, 4), delayed];
        assert_eq!(blocks(&changed(&live, &twin, 8 * K)), [0..8]);
        let mut unwritten = at(0, 100, 8);
        unwritten.unwritten = true;
        assert_eq!(
            blocks(&changed(&[unwritten], &[at(0, 100, 8)], 8 * K)),
            [0..8]
        );
    }

    #[test]
    fn extents_past_the_end_are_clipped() {
        let twin = [at(0, 100, 4)];
        let live = [at(0, 100, 2), at(2, 500, 8)];
        assert_eq!(blocks(&changed(&live, &twin, 4 * K)), [2..4]);
    }

    #[test]
    fn subtract_leaves_the_gaps() {
        assert_eq!(
            subtract(&[0..10, 20..30], &[2..4, 8..22, 25..26]),
            [0..2, 4..8, 22..25, 26..30]
        );
        assert_eq!(subtract(&[0..10], &[]), [0..10]);
        assert!(subtract(&[5..6], &[0..10]).is_empty());
    }

    #[test]
    fn twins_are_named_beside_the_image_and_removed_by_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm-failover-root.img");
        std::fs::write(&image, b"data").unwrap();
        let twin = twin_path(&image, "p1").unwrap();
        assert_eq!(
            twin.file_name().unwrap(),
            ".vm-failover-root.img.lifeboat-since-p1"
        );
        std::fs::write(&twin, b"data").unwrap();
        std::fs::write(
            dir.path().join(".vm-failover-data.img.lifeboat-since-p1"),
            b"",
        )
        .unwrap();
        assert_eq!(remove_all(&image).unwrap(), 1);
        assert!(!twin.exists());
        assert!(
            dir.path()
                .join(".vm-failover-data.img.lifeboat-since-p1")
                .exists()
        );
        // A file system that cannot clone (this test's may or may not): no twin, or one.
        match make(&image, "p2").unwrap() {
            true => assert_eq!(changed_since(&image, "p2").unwrap(), Some(Vec::new())),
            false => assert_eq!(changed_since(&image, "p2").unwrap(), None),
        }
    }
}
