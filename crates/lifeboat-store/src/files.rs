//! Small files made durable: the local store's manifest and block maps, the agent's state,
//! standalone mode's embedded database and request files all go through [`write_atomic`].

use std::io::Write;
use std::path::{Path, PathBuf};

/// The step of [`write_atomic`] that failed, the path it was done on, and why; each caller
/// turns it into its own error.
#[derive(Debug)]
pub struct FileError {
    /// `create folder`, `create`, `write`, `sync`, `replace` or `sync folder`.
    pub action: &'static str,
    /// The path.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// Write `bytes` to `path` so that a crash leaves either the old file or the new one: a
/// temporary beside it (named after this process, so two processes never share one), synced,
/// renamed over it, then the folder synced so that the rename itself is durable (and any
/// folder created for it synced into its parent).
///
/// # Errors
///
/// The step that failed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let step = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| FileError {
            action,
            path,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir_all_durable(dir).map_err(step("create folder", dir))?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut file = std::fs::File::create(&tmp).map_err(step("create", &tmp))?;
    file.write_all(bytes).map_err(step("write", &tmp))?;
    file.sync_all().map_err(step("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(step("replace", path))?;
    sync_folder(dir).map_err(step("sync folder", dir))
}

/// `std::fs::create_dir_all`, made durable: each folder it creates is synced into its
/// parent (the parent's entry for it), so that a crash cannot lose a folder whose files were
/// synced.
///
/// # Errors
///
/// A folder cannot be created, or a parent cannot be synced.
pub fn create_dir_all_durable(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        missing.push(path);
        at = path.parent();
    }
    std::fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        sync_folder(
            created
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
    }
    Ok(())
}

/// Remove the file at `path` if it is there, then make the removal durable (sync its
/// folder). Whether it was there.
///
/// # Errors
///
/// The file cannot be removed (other than missing), or its folder cannot be synced.
pub fn remove_file_durable(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            sync_folder(path.parent().unwrap_or(Path::new(".")))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Make the creation, removal or renaming of an entry of `dir` durable.
///
/// # Errors
///
/// The folder cannot be opened or synced.
#[cfg(unix)]
pub fn sync_folder(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// NB: Windows cannot open a folder as a file (and NTFS journals its metadata): nothing to do.
///
/// # Errors
///
/// None.
#[cfg(not(unix))]
pub fn sync_folder(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_a_failed_step_is_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("sub/state.json");
        write_atomic(&path, b"one").unwrap_or_else(|e| panic!("{e:?}"));
        write_atomic(&path, b"two").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(std::fs::read(&path).ok(), Some(b"two".to_vec()));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("state.json")],
            "no temporary left"
        );

        // A folder where the file's folder should be: the step and the path say so.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").unwrap_or_else(|e| panic!("{e}"));
        let error = write_atomic(&blocked.join("state.json"), b"x")
            .err()
            .unwrap_or_else(|| panic!("wrote under a file"));
        assert_eq!(error.action, "create folder");
        assert_eq!(error.path, blocked);
    }
}
