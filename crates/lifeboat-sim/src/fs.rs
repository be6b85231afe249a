//! A file system in memory that keeps exactly what [`StateFs`] promises: a file's content is
//! durable once synced, its name once its folder is synced, an atomic replace at once; at a
//! power cut everything else is dropped or torn, 512-byte sector by sector, in any order.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lifeboat_engine::fs::{StateFile, StateFs, StateReader};

use crate::world::{Fault, World};

/// The unit a power cut keeps or loses.
pub const SECTOR_BYTES: usize = 512;

#[derive(Debug, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a power cut for sure.
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct Tree {
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    /// The names reads see.
    names: BTreeMap<PathBuf, u64>,
    /// The names that survive a power cut.
    durable_names: BTreeMap<PathBuf, u64>,
    /// Folders (created durably).
    folders: BTreeSet<PathBuf>,
}

/// The simulated file system of the agent's state folder.
#[derive(Clone, Debug)]
pub struct SimFs {
    tree: Arc<Mutex<Tree>>,
    world: Arc<World>,
}

fn injected(what: &str) -> std::io::Error {
    std::io::Error::other(format!("{what}: injected failure"))
}

impl SimFs {
    /// An empty file system.
    pub fn new(world: Arc<World>) -> SimFs {
        SimFs {
            tree: Arc::default(),
            world,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tree> {
        self.tree
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ask the world; `Ok(true)`: act, then fail.
    fn call(&self, what: &str) -> std::io::Result<bool> {
        match self.world.call(what) {
            Fault::None => Ok(false),
            Fault::Before => Err(injected(what)),
            Fault::After => Ok(true),
        }
    }

    /// The power cut: names not made durable are gone (or back), content not synced is
    /// dropped or torn sector by sector; what remains is what the disk holds.
    pub fn power_cut(&self) {
        let mut tree = self.lock();
        tree.names = tree.durable_names.clone();
        let live: BTreeSet<u64> = tree.names.values().copied().collect();
        tree.inodes.retain(|id, _| live.contains(id));
        for inode in tree.inodes.values_mut() {
            let torn = tear(&inode.synced, &inode.data, &self.world);
            inode.synced.clone_from(&torn);
            inode.data = torn;
        }
    }

    /// What `path` would hold after a power cut now, for sure (its synced content under a
    /// durable name), without asking the world: for the checks.
    pub fn durable_file(&self, path: &Path) -> Option<Vec<u8>> {
        let tree = self.lock();
        let id = tree.durable_names.get(path)?;
        tree.inodes.get(id).map(|i| i.synced.clone())
    }

    /// Paths of every file, for reports.
    pub fn files(&self) -> Vec<PathBuf> {
        self.lock().names.keys().cloned().collect()
    }
}

/// What a file holds after a power cut, between its synced content and what was written:
/// either length, and each sector from either side (zeros where neither reaches).
fn tear(synced: &[u8], written: &[u8], world: &World) -> Vec<u8> {
    if synced == written {
        return synced.to_vec();
    }
    let len = if world.below(2) == 0 {
        synced.len()
    } else {
        written.len()
    };
    let mut out = vec![0u8; len];
    for start in (0..len).step_by(SECTOR_BYTES) {
        let end = (start + SECTOR_BYTES).min(len);
        let source = if world.below(2) == 0 { synced } else { written };
        let from = source.get(start..end.min(source.len())).unwrap_or(&[]);
        out[start..start + from.len()].copy_from_slice(from);
    }
    out
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl StateFs for SimFs {
    fn read(&self, path: &Path) -> std::io::Result<Option<Vec<u8>>> {
        self.call("read")?;
        let tree = self.lock();
        Ok(tree
            .names
            .get(path)
            .and_then(|id| tree.inodes.get(id))
            .map(|i| i.data.clone()))
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let fail_after = self.call("write atomic")?;
        let mut tree = self.lock();
        let mut folder = parent(path);
        while !folder.as_os_str().is_empty() && tree.folders.insert(folder.clone()) {
            folder = parent(&folder);
        }
        let id = tree.next_inode;
        tree.next_inode += 1;
        tree.inodes.insert(
            id,
            Inode {
                data: bytes.to_vec(),
                synced: bytes.to_vec(),
            },
        );
        tree.names.insert(path.to_path_buf(), id);
        tree.durable_names.insert(path.to_path_buf(), id);
        if fail_after {
            return Err(injected("write atomic"));
        }
        Ok(())
    }

    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        let fail_after = self.call("create folder")?;
        let mut tree = self.lock();
        let mut folder = dir.to_path_buf();
        while !folder.as_os_str().is_empty() && tree.folders.insert(folder.clone()) {
            folder = parent(&folder);
        }
        if fail_after {
            return Err(injected("create folder"));
        }
        Ok(())
    }

    fn create(&self, path: &Path) -> std::io::Result<Box<dyn StateFile>> {
        let fail_after = self.call("create")?;
        let mut tree = self.lock();
        if !tree.folders.contains(&parent(path)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no folder {}", parent(path).display()),
            ));
        }
        let id = match tree.names.get(path) {
            Some(&id) => id,
            None => {
                let id = tree.next_inode;
                tree.next_inode += 1;
                tree.inodes.insert(id, Inode::default());
                tree.names.insert(path.to_path_buf(), id);
                id
            }
        };
        if let Some(inode) = tree.inodes.get_mut(&id) {
            inode.data.clear();
        }
        if fail_after {
            return Err(injected("create"));
        }
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode: id,
            position: 0,
        }))
    }

    fn open(&self, path: &Path) -> std::io::Result<Box<dyn StateReader>> {
        self.call("open")?;
        let tree = self.lock();
        let data = tree
            .names
            .get(path)
            .and_then(|id| tree.inodes.get(id))
            .map(|i| i.data.clone())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no file {}", path.display()),
                )
            })?;
        Ok(Box::new(std::io::Cursor::new(data)))
    }

    fn list(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        self.call("list")?;
        let tree = self.lock();
        let mut out: BTreeSet<PathBuf> = tree
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        out.extend(
            tree.folders
                .iter()
                .filter(|p| p.parent() == Some(dir))
                .cloned(),
        );
        Ok(out.into_iter().collect())
    }

    fn remove(&self, path: &Path) -> std::io::Result<bool> {
        let fail_after = self.call("remove")?;
        let removed = self.lock().names.remove(path).is_some();
        if fail_after {
            return Err(injected("remove"));
        }
        Ok(removed)
    }

    fn sync_folder(&self, dir: &Path) -> std::io::Result<()> {
        let fail_after = self.call("sync folder")?;
        let mut tree = self.lock();
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        tree.durable_names.retain(|p, _| !in_dir(p));
        let current: Vec<(PathBuf, u64)> = tree
            .names
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        tree.durable_names.extend(current);
        if fail_after {
            return Err(injected("sync folder"));
        }
        Ok(())
    }

    fn free_space_bytes(&self, _dir: &Path) -> std::io::Result<u64> {
        self.call("free space")?;
        Ok(1 << 40)
    }
}

/// A file of [`SimFs`] open for writing.
#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    inode: u64,
    position: u64,
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // NB: buffered writes are not calls the world decides on: they fail, if at all, at
        // the sync, as page-cache writes do.
        let mut tree = self.fs.lock();
        let inode = tree
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| std::io::Error::other("file removed by a power cut"))?;
        let at = self.position as usize;
        if inode.data.len() < at + buf.len() {
            inode.data.resize(at + buf.len(), 0);
        }
        inode.data[at..at + buf.len()].copy_from_slice(buf);
        self.position += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for SimFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let len = self
            .fs
            .lock()
            .inodes
            .get(&self.inode)
            .map_or(0, |i| i.data.len() as u64);
        self.position = match pos {
            SeekFrom::Start(at) => at,
            SeekFrom::End(delta) => len.saturating_add_signed(delta),
            SeekFrom::Current(delta) => self.position.saturating_add_signed(delta),
        };
        Ok(self.position)
    }
}

impl StateFile for SimFile {
    fn sync(&mut self) -> std::io::Result<u64> {
        let fail_after = self.fs.call("sync")?;
        let mut tree = self.fs.lock();
        let inode = tree
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| std::io::Error::other("file removed by a power cut"))?;
        inode.synced.clone_from(&inode.data);
        let len = inode.data.len() as u64;
        if fail_after {
            return Err(injected("sync"));
        }
        Ok(len)
    }
}

/// Read a file whole through the trait (for tests).
pub fn read_all(fs: &dyn StateFs, path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    fs.open(path)?.read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_synced_survives_a_power_cut() {
        let world = Arc::new(World::new(7));
        let fs = SimFs::new(world);
        let dir = Path::new("/s/logs");
        fs.create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        let kept = dir.join("kept");
        let mut file = fs.create(&kept).unwrap_or_else(|e| panic!("{e}"));
        file.write_all(&[1u8; 4096])
            .unwrap_or_else(|e| panic!("{e}"));
        file.sync().unwrap_or_else(|e| panic!("{e}"));
        fs.sync_folder(dir).unwrap_or_else(|e| panic!("{e}"));
        let unnamed = dir.join("unnamed");
        let mut other = fs.create(&unnamed).unwrap_or_else(|e| panic!("{e}"));
        other
            .write_all(&[2u8; 512])
            .unwrap_or_else(|e| panic!("{e}"));
        other.sync().unwrap_or_else(|e| panic!("{e}"));
        fs.write_atomic(Path::new("/s/state.json"), b"{}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(fs.remove(&kept).unwrap_or_else(|e| panic!("{e}")));
        fs.power_cut();
        assert_eq!(
            read_all(&fs, &kept).unwrap_or_else(|e| panic!("{e}")),
            vec![1u8; 4096],
            "a removal whose folder was not synced is undone"
        );
        assert!(
            read_all(&fs, &unnamed).is_err(),
            "its name was never synced"
        );
        assert_eq!(
            fs.read(Path::new("/s/state.json")).ok().flatten(),
            Some(b"{}".to_vec())
        );
    }

    #[test]
    fn unsynced_content_is_torn_by_sector() {
        // Over many seeds, a file written and not synced comes back in every way a disk
        // allows: old, new, and sectors of each.
        let mut seen = BTreeSet::new();
        for seed in 0..64 {
            let world = Arc::new(World::new(seed));
            let fs = SimFs::new(world);
            fs.create_dir_all(Path::new("/d"))
                .unwrap_or_else(|e| panic!("{e}"));
            let path = Path::new("/d/f");
            let mut file = fs.create(path).unwrap_or_else(|e| panic!("{e}"));
            file.write_all(&[1u8; 1024])
                .unwrap_or_else(|e| panic!("{e}"));
            file.sync().unwrap_or_else(|e| panic!("{e}"));
            fs.sync_folder(Path::new("/d"))
                .unwrap_or_else(|e| panic!("{e}"));
            file.seek(SeekFrom::Start(0))
                .unwrap_or_else(|e| panic!("{e}"));
            file.write_all(&[2u8; 1024])
                .unwrap_or_else(|e| panic!("{e}"));
            fs.power_cut();
            let got = read_all(&fs, path).unwrap_or_else(|e| panic!("{e}"));
            seen.insert((got[0], got[600]));
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
    }
}
