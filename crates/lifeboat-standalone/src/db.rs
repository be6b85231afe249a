//! The embedded store: the resources as standalone mode last decided them (each ProtectedVM
//! with its status, each ReplicationPolicy's status, each ReplicationJob), as JSON files
//! replaced atomically, so that the state survives restarts and `lifeboat status` can read it
//! while the daemon runs, without talking to it.
//!
//! ```text
//!  <state>/db/ProtectedVM/<namespace>/<name>.json
//!  <state>/db/ReplicationPolicy/<namespace>/<name>.json
//!  <state>/db/ReplicationJob/<namespace>/<name>.json
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The embedded store under a state folder.
#[derive(Clone, Debug)]
pub struct Db {
    root: PathBuf,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record does not parse.
    #[error("{path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
}

impl Db {
    /// The store in `<state>/db`.
    pub fn new(state_dir: &Path) -> Db {
        Db {
            root: state_dir.join("db"),
        }
    }

    fn path(&self, kind: &str, namespace: &str, name: &str) -> PathBuf {
        self.root
            .join(kind)
            .join(namespace)
            .join(format!("{name}.json"))
    }

    /// A record, if there is one.
    ///
    /// # Errors
    ///
    /// It cannot be read or does not parse.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<T>, DbError> {
        let path = self.path(kind, namespace, name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| DbError::Corrupt {
                    path,
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DbError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Every record of a kind, sorted by namespace and name.
    ///
    /// # Errors
    ///
    /// A record cannot be read or does not parse.
    pub fn list<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, DbError> {
        let mut paths = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(self.root.join(kind)) else {
            return Ok(Vec::new());
        };
        for ns in namespaces.flatten() {
            let Ok(files) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            paths.extend(
                files
                    .flatten()
                    .map(|f| f.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "json")),
            );
        }
        paths.sort();
        paths
            .into_iter()
            .map(|path| {
                let bytes = std::fs::read(&path).map_err(|source| DbError::Io {
                    action: "read",
                    path: path.clone(),
                    source,
                })?;
                serde_json::from_slice(&bytes).map_err(|e| DbError::Corrupt {
                    path,
                    detail: e.to_string(),
                })
            })
            .collect()
    }

    /// Write a record atomically (temporary file, fsync, rename).
    ///
    /// # Errors
    ///
    /// The file cannot be written.
    pub fn put<T: Serialize>(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        value: &T,
    ) -> Result<(), DbError> {
        let path = self.path(kind, namespace, name);
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| DbError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        lifeboat_store::files::write_atomic(&path, &bytes).map_err(|e| DbError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        })
    }

    /// Delete a record (gone already is fine).
    ///
    /// # Errors
    ///
    /// The file exists and cannot be removed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<(), DbError> {
        let path = self.path(kind, namespace, name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DbError::Io {
                action: "delete",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// The exclusive lock of a state folder: one standalone daemon at a time.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Take the lock of `state_dir`, or say which process holds it.
    ///
    /// # Errors
    ///
    /// Another process holds it (its pid is named), or the lock file cannot be written.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, String> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("create state folder {}: {e}", state_dir.display()))?;
        let path = state_dir.join("standalone.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        // NB: std's advisory lock (flock on Unix, LockFileEx on Windows), released with the file.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(format!(
                    "another lifeboat standalone (pid {}) is using the state folder {}: stop it first, or use another --state-dir",
                    if holder.is_empty() { "unknown" } else { holder },
                    state_dir.display()
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("lock {}: {e}", path.display()));
            }
        }
        file.set_len(0)
            .and_then(|_| write!(file, "{}", std::process::id()))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_survive_a_new_handle() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = Db::new(dir.path());
        assert_eq!(
            db.get::<serde_json::Value>("ProtectedVM", "ns", "a").ok(),
            Some(None)
        );
        db.put("ProtectedVM", "ns", "b", &serde_json::json!({"x": 2}))
            .unwrap_or_else(|e| panic!("{e}"));
        db.put("ProtectedVM", "ns", "a", &serde_json::json!({"x": 1}))
            .unwrap_or_else(|e| panic!("{e}"));
        let again = Db::new(dir.path());
        let all: Vec<serde_json::Value> = again.list("ProtectedVM").unwrap_or_default();
        assert_eq!(
            all,
            [serde_json::json!({"x": 1}), serde_json::json!({"x": 2})]
        );
        again
            .delete("ProtectedVM", "ns", "a")
            .unwrap_or_else(|e| panic!("{e}"));
        again
            .delete("ProtectedVM", "ns", "a")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            again
                .list::<serde_json::Value>("ProtectedVM")
                .map(|v| v.len())
                .ok(),
            Some(1)
        );
    }

    #[test]
    fn a_second_daemon_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = StateLock::acquire(dir.path());
        assert!(first.is_ok());
        let second = StateLock::acquire(dir.path()).err().unwrap_or_default();
        assert!(
            second.contains("another lifeboat standalone")
                && second.contains(&std::process::id().to_string()),
            "{second}"
        );
        drop(first);
        assert!(
            StateLock::acquire(dir.path()).is_ok(),
            "released with its holder"
        );
    }
}
