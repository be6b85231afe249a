//! Finding the unix socket of an NBD server that QEMU already runs. QEMU runs at most one NBD
//! server and QMP cannot say where it listens, so this asks Linux instead:
//!
//! ```text
//!  QMP socket ──SO_PEERCRED──> QEMU's pid
//!  /proc/<pid>/fd/*  ──readlink──> socket:[inode]   (QEMU's sockets)
//!  /proc/<pid>/net/unix ──> listening stream sockets: inode → path
//!  each candidate path ──connect──> 18-byte greeting NBDMAGIC IHAVEOPT? ──> the NBD server
//! ```
//!
//! # Caveats
//! - Needs the right to read `/proc/<pid>/fd` (same user as QEMU, or root).
//! - Probing connects to QEMU's other listening sockets (a second monitor sends a QMP
//!   greeting, a chardev sends nothing) and hangs up at once; nothing is written to them.
//! - TCP servers are not looked for: a view exported on an unencrypted TCP server would put
//!   the VM's disks on the network.

use super::nbd::{GREETING_BYTES, NBD_OPT_ABORT, encode_option, parse_greeting};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// `__SO_ACCEPTCON` in `/proc/net/unix`: the socket listens.
const SO_ACCEPTCON: u32 = 0x0001_0000;
/// `SOCK_STREAM` in `/proc/net/unix`.
const SOCK_STREAM: u32 = 1;

/// The inode of a `socket:[N]` link target.
pub(super) fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The listening stream sockets with a filesystem path in `/proc/net/unix` text: (inode, path).
pub(super) fn listening_unix_sockets(table: &str) -> Vec<(u64, PathBuf)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode [Path]
            let mut f = line.split_whitespace();
            let flags = u32::from_str_radix(f.nth(3)?, 16).ok()?;
            let ty = u32::from_str_radix(f.next()?, 16).ok()?;
            let _state = f.next()?;
            let inode = f.next()?.parse().ok()?;
            let path = f.next()?;
            // NB: abstract sockets show as "@name"; QEMU's NBD server listens on a path.
            (flags & SO_ACCEPTCON != 0 && ty == SOCK_STREAM && path.starts_with('/'))
                .then(|| (inode, PathBuf::from(path)))
        })
        .collect()
}

/// Whether an NBD server answers on `path` (it greets first), within `timeout`.
pub(super) async fn is_nbd_server(path: &Path, timeout: Duration) -> bool {
    let probe = async {
        let mut s = UnixStream::connect(path).await.ok()?;
        let mut greeting = [0u8; GREETING_BYTES];
        s.read_exact(&mut greeting).await.ok()?;
        parse_greeting(&greeting).ok()?;
        // Say goodbye properly: fixed-newstyle client flags, then NBD_OPT_ABORT.
        let mut bye = 1u32.to_be_bytes().to_vec();
        bye.extend(encode_option(NBD_OPT_ABORT, &[]).ok()?);
        let _ = s.write_all(&bye).await;
        Some(())
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(())))
}

/// The unix socket of the NBD server in process `pid`, skipping `skip` (the QMP socket).
pub(super) async fn nbd_server_of(
    pid: u32,
    skip: &Path,
    timeout: Duration,
) -> Result<Option<PathBuf>, String> {
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut inodes = HashSet::new();
    let mut dir = tokio::fs::read_dir(&fd_dir)
        .await
        .map_err(|e| format!("{}: {e}", fd_dir.display()))?;
    while let Some(entry) = dir
        .next_entry()
        .await
        .map_err(|e| format!("{}: {e}", fd_dir.display()))?
    {
        if let Ok(target) = tokio::fs::read_link(entry.path()).await
            && let Some(inode) = target.to_str().and_then(socket_inode)
        {
            inodes.insert(inode);
        }
    }
    let table_path = format!("/proc/{pid}/net/unix");
    let table = tokio::fs::read_to_string(&table_path)
        .await
        .map_err(|e| format!("{table_path}: {e}"))?;
    let mut candidates: Vec<PathBuf> = listening_unix_sockets(&table)
        .into_iter()
        .filter(|(inode, path)| inodes.contains(inode) && path != skip)
        .map(|(_, path)| path)
        .collect();
    // NB: look at likely names first; probing the others is harmless but slower.
    candidates.sort_by_key(|p| !p.to_string_lossy().contains("nbd"));
    for path in candidates {
        if is_nbd_server(&path, timeout).await {
            return Ok(Some(path));
        }
    }
    Ok(None)
}
