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
use std::os::unix::ffi::OsStrExt;
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

/// The listening stream sockets with a filesystem path in a `/proc/net/unix` table: (inode,
/// path).
///
/// NB: bytes, not text, and the path is the rest of the line, not a word: the kernel prints
/// `sun_path` as it is, so a path may hold spaces and any non-UTF-8 byte (a VM folder named
/// "Mes VMs/é"). Only a newline in a path cannot be told apart, and such a line is skipped
/// as unparsable.
pub(super) fn listening_unix_sockets(table: &[u8]) -> Vec<(u64, PathBuf)> {
    table
        .split(|b| *b == b'\n')
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path: seven fields padded with spaces,
            // then one space and the path to the end of the line.
            let mut rest = line;
            let mut fields = [&b""[..]; 7];
            for field in &mut fields {
                rest = rest.trim_ascii_start();
                let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
                (*field, rest) = rest.split_at(end);
            }
            let path = rest.strip_prefix(b" ")?;
            let number = |field: &[u8], radix| {
                u64::from_str_radix(std::str::from_utf8(field).ok()?, radix).ok()
            };
            let flags = number(fields[3], 16)?;
            let ty = number(fields[4], 16)?;
            let inode = number(fields[6], 10)?;
            // NB: abstract sockets show as "@name"; QEMU's NBD server listens on a path.
            (flags & u64::from(SO_ACCEPTCON) != 0
                && ty == u64::from(SOCK_STREAM)
                && path.first() == Some(&b'/'))
            .then(|| (inode, PathBuf::from(std::ffi::OsStr::from_bytes(path))))
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
    let table = tokio::fs::read(&table_path)
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
