//! The file system under a VM's state folder, as one narrow trait: what the engine does
//! there (its state file, its change logs) and the durability each call promises.
//!
//! The agent runs on [`LocalFs`], the node's own file system. The power-cut simulation
//! (`lifeboat-sim`) runs the same engine on a file system that keeps exactly what these
//! promises say and drops or tears the rest at a power cut, so every durability claim the
//! engine makes about its state folder is checked against the contract, not against a kernel
//! that happens to keep more.
//!
//! # Durability
//!
//! - [`StateFs::write_atomic`] and [`StateFs::create_dir_all`] are durable when they return.
//! - What is written through [`StateFs::create`] is durable once [`StateFile::sync`] has
//!   returned *and* the file's folder was synced with [`StateFs::sync_folder`] (its entry).
//! - [`StateFs::remove`] is durable once the folder is synced.

use std::fmt;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// A file being written in the state folder.
pub trait StateFile: Write + Seek + Send {
    /// Make the file's content durable (fsync); returns its size.
    ///
    /// # Errors
    ///
    /// The sync failed: nothing written since the last sync may be durable.
    fn sync(&mut self) -> std::io::Result<u64>;
}

/// A file being read from the state folder.
pub trait StateReader: Read + Seek + Send {}

impl<R: Read + Seek + Send> StateReader for R {}

/// The file system of a VM's state folder.
pub trait StateFs: Send + Sync + fmt::Debug {
    /// A whole file, or `None` when there is none.
    ///
    /// # Errors
    ///
    /// The file exists and cannot be read.
    fn read(&self, path: &Path) -> std::io::Result<Option<Vec<u8>>>;

    /// Replace `path` with `bytes` so that a crash leaves the old file or the new one;
    /// durable when it returns.
    ///
    /// # Errors
    ///
    /// The step that failed, named in the message.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;

    /// Create a folder and its parents, durably.
    ///
    /// # Errors
    ///
    /// A folder cannot be created or synced into its parent.
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()>;

    /// Create (or truncate) a file for writing; see the module's durability rules.
    ///
    /// # Errors
    ///
    /// The file cannot be created.
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn StateFile>>;

    /// Open a file for reading.
    ///
    /// # Errors
    ///
    /// The file is missing or cannot be opened.
    fn open(&self, path: &Path) -> std::io::Result<Box<dyn StateReader>>;

    /// The entries of a folder, sorted; empty when the folder is missing.
    ///
    /// # Errors
    ///
    /// The folder exists and cannot be listed.
    fn list(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>>;

    /// Remove a file; whether it was there. Durable once its folder is synced.
    ///
    /// # Errors
    ///
    /// The file exists and cannot be removed.
    fn remove(&self, path: &Path) -> std::io::Result<bool>;

    /// Make the creation or removal of an entry of `dir` durable.
    ///
    /// # Errors
    ///
    /// The folder cannot be synced.
    fn sync_folder(&self, dir: &Path) -> std::io::Result<()>;

    /// The bytes a writer may still use on the file system of `dir`.
    ///
    /// # Errors
    ///
    /// The file system cannot be asked.
    fn free_space_bytes(&self, dir: &Path) -> std::io::Result<u64>;
}

/// The node's own file system: what the agent runs on.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalFs;

impl StateFile for std::fs::File {
    fn sync(&mut self) -> std::io::Result<u64> {
        self.sync_all()?;
        Ok(self.metadata()?.len())
    }
}

impl StateFs for LocalFs {
    fn read(&self, path: &Path) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        lifeboat_store::files::write_atomic(path, bytes).map_err(|e| {
            std::io::Error::new(
                e.source.kind(),
                format!("{} {}: {}", e.action, e.path.display(), e.source),
            )
        })
    }

    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        lifeboat_store::files::create_dir_all_durable(dir)
    }

    fn create(&self, path: &Path) -> std::io::Result<Box<dyn StateFile>> {
        Ok(Box::new(std::fs::File::create(path)?))
    }

    fn open(&self, path: &Path) -> std::io::Result<Box<dyn StateReader>> {
        Ok(Box::new(std::fs::File::open(path)?))
    }

    fn list(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut paths = entries
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()?;
        paths.sort();
        Ok(paths)
    }

    fn remove(&self, path: &Path) -> std::io::Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn sync_folder(&self, dir: &Path) -> std::io::Result<()> {
        lifeboat_store::files::sync_folder(dir)
    }

    fn free_space_bytes(&self, dir: &Path) -> std::io::Result<u64> {
        crate::space::free_space_bytes(dir)
    }
}
