//! Stamps of raw image files: what a file's metadata said when Lifeboat left it equal to a
//! recovery point, so that a later look can tell that nothing has written it since without
//! reading it.
//!
//! A raw image holds no record of its writes, and QEMU keeps a dirty bitmap across a restart
//! only in qcow2. A stamp bridges the gap between the moment a failover (or a failback)
//! leaves the file at a point and the moment a VM started on it can record its writes: the
//! failover keeps the stamp beside the file, as `.<file>.lifeboat-stamp-<point>`; once a VM
//! runs on the file, the agent asks its hypervisor to record the writes since that point
//! ([`crate::backend::Hypervisor::arm_seeds`]: a seed bitmap named for the point), then
//! checks the stamp again. Equal, nothing wrote the file before the bitmap recorded, so the
//! bitmap names every write since the point, as a qcow2 image's persistent one does, and the
//! re-protect from that point reads only those blocks:
//!
//! ```text
//!  failover: write, verify, flush ──> stamp S beside the file
//!  the VM starts on the file ──> agent: S still the file's? ──> add seed bitmap (recording)
//!                                                          ──> S still the file's? yes: armed
//!                                                                                  no: removed
//!  re-protect from the point ──> only the blocks the seed bitmap marks are read
//! ```
//!
//! A stamp is used once: it is removed when the bitmap is armed, and when the file no longer
//! matches it (written since: that record can never hold again). The guest must not write
//! before the agent looks (each agent tick, a second or two): one that does changes the
//! file's stamp, and costs the re-protect a compare of the whole disk (what a stamp can fail
//! to see is listed on [`FileStamp`]).

use std::io;
use std::path::{Path, PathBuf};

/// How a stamp file's name starts after the image's name: `.<image>.lifeboat-stamp-<point>`.
const STAMP_INFIX: &str = ".lifeboat-stamp-";

/// What a raw image file's metadata said when it was left at a point (stopped by a planned
/// failover, or written and flushed by a failback's first step): a write since changes its
/// change time (and its modification time). A stamp holds within one boot of the host only:
/// a crash can lose the journal's record of a time change whose write reached the disk (one
/// that bypassed the page cache), so after a reboot no stamp of before matches. Limits: a
/// clock set back, or a write within the same timestamp tick as the stamp on a file system
/// or kernel without fine-grained timestamps (Linux before 6.13 keeps them coarse, a few
/// ms), can go unseen; a file moved to another device only costs a full compare. Kept for
/// regular files only: a block device's node says nothing about writes to the device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    /// The point the file was brought to.
    pub point: String,
    /// Its device and inode: the same file, not one put in its place.
    pub device: u64,
    /// See `device`.
    pub inode: u64,
    /// Its length.
    pub len: u64,
    /// Its modification time, in nanoseconds since the epoch.
    pub modified_ns: i128,
    /// Its change time (any write or metadata change), in nanoseconds since the epoch.
    pub changed_ns: i128,
    /// The host's boot (Linux's `boot_id`) the stamp was taken in. None off Linux, where a
    /// stamp is not bound to a boot (and a stamp kept before this field matches none now).
    #[serde(default)]
    pub boot: Option<String>,
}

impl FileStamp {
    /// The stamp of the regular file at `path` as it is now, for `point`; None for anything
    /// else (a block device, a file gone) and off Unix.
    pub fn of(path: &Path, point: &str) -> Option<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
            let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
            Some(Self {
                point: point.to_owned(),
                device: meta.dev(),
                inode: meta.ino(),
                len: meta.len(),
                modified_ns: ns(meta.mtime(), meta.mtime_nsec()),
                changed_ns: ns(meta.ctime(), meta.ctime_nsec()),
                boot: boot_id(),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = (path, point);
            None
        }
    }
}

/// This boot of the host, as Linux names it; None elsewhere.
#[cfg(unix)]
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// The stamp file of the image at `image` for `point`. None for a path without a file name.
fn stamp_path(image: &Path, point: &str) -> Option<PathBuf> {
    let name = image.file_name()?.to_str()?;
    Some(image.with_file_name(format!(".{name}{STAMP_INFIX}{point}")))
}

/// Keep `stamp` (the image's as it is now, equal to `stamp.point` and flushed) beside the
/// image at `image`, replacing its stamps for other points. Written to a temporary name and
/// renamed: a stamp that cannot be read is not used.
///
/// # Errors
///
/// The stamp cannot be written, or an older one removed.
pub fn keep_beside(image: &Path, stamp: &FileStamp) -> io::Result<()> {
    let path = stamp_path(image, &stamp.point)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an image without a name"))?;
    // NB: a name `beside` does not list (a point may hold dots).
    let tmp = image.with_file_name(format!(
        ".{}.lifeboat-stamp.tmp",
        image
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, serde_json::to_vec(stamp)?)?;
    std::fs::rename(&tmp, &path)?;
    crate::twin::for_each_beside(image, STAMP_INFIX, |point, other| {
        if point == stamp.point {
            return Ok(());
        }
        remove(other)
    })
}

/// The stamps kept beside the image at `image` that can be read (usually none or one).
///
/// # Errors
///
/// The image's folder cannot be read.
pub fn beside(image: &Path) -> io::Result<Vec<FileStamp>> {
    let mut stamps = Vec::new();
    crate::twin::for_each_beside(image, STAMP_INFIX, |point, path| {
        let read = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<FileStamp>(&bytes).ok());
        stamps.extend(read.filter(|s| s.point == point));
        Ok(())
    })?;
    Ok(stamps)
}

/// Remove the image's stamp for `point`, if it has one.
///
/// # Errors
///
/// It cannot be removed.
pub fn forget(image: &Path, point: &str) -> io::Result<()> {
    stamp_path(image, point).map_or(Ok(()), |path| remove(&path))
}

/// Remove every stamp of the image at `image` (its disks removed, its protection disabled).
///
/// # Errors
///
/// The folder cannot be read, or a stamp cannot be removed.
pub fn forget_all(image: &Path) -> io::Result<()> {
    crate::twin::for_each_beside(image, STAMP_INFIX, |_, path| remove(path))
}

fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;

    #[test]
    fn a_stamp_kept_beside_an_image_is_found_replaced_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![7u8; 4096]).unwrap();
        assert_eq!(beside(&image).unwrap(), Vec::new());
        let p1 = FileStamp::of(&image, "p1").unwrap();
        keep_beside(&image, &p1).unwrap();
        assert_eq!(beside(&image).unwrap(), vec![p1.clone()]);
        assert!(dir.path().join(".disk.img.lifeboat-stamp-p1").exists());
        let p2 = FileStamp::of(&image, "p2").unwrap();
        keep_beside(&image, &p2).unwrap();
        assert_eq!(
            beside(&image).unwrap(),
            vec![p2.clone()],
            "one point's stamp at a time"
        );
        // NB: another image's stamps in the same folder are its own.
        let other = dir.path().join("disk.img2");
        std::fs::write(&other, b"x").unwrap();
        keep_beside(&other, &FileStamp::of(&other, "p1").unwrap()).unwrap();
        assert_eq!(beside(&image).unwrap(), vec![p2.clone()]);
        forget(&image, "p2").unwrap();
        assert_eq!(beside(&image).unwrap(), Vec::new());
        forget(&image, "p2").unwrap();
        forget_all(&other).unwrap();
        assert_eq!(beside(&other).unwrap(), Vec::new());
    }

    #[test]
    fn a_write_to_the_file_makes_its_stamp_differ() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 8192]).unwrap();
        let then = FileStamp::of(&image, "p1").unwrap();
        assert_eq!(FileStamp::of(&image, "p1").as_ref(), Some(&then));
        // NB: past a coarse timestamp tick, which fine-grained timestamps do not need.
        std::thread::sleep(std::time::Duration::from_millis(20));
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .write_all_at(b"guest", 4096)
            .unwrap();
        assert_ne!(FileStamp::of(&image, "p1").as_ref(), Some(&then));
    }
}
