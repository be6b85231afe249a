//! QMP (the QEMU Machine Protocol) and the QEMU guest agent protocol: line-delimited JSON over
//! a unix socket, one command at a time.
//!
//! ```text
//!  QmpClient ──connect──> greeting {"QMP":…} ──> {"execute":"qmp_capabilities"} ──> {"return":{}}
//!      │
//!      └─ execute(cmd, args) ──> {"execute":cmd,"arguments":args,"id":n}
//!                           <── {"event":…}            (skipped)
//!                           <── {"return":…,"id":n}    or {"error":{"class","desc"},"id":n}
//!
//!  GuestAgent ──> {"execute":"guest-sync-delimited","arguments":{"id":n}}
//!             <── 0xFF {"return":n}   (flushes whatever an earlier client left behind)
//!             ──> {"execute":"guest-fsfreeze-freeze"} … {"execute":"guest-fsfreeze-thaw"}
//! ```
//!
//! The connection is opened lazily and kept; a timeout, an I/O error or a reply out of step
//! drops it, and the next command reconnects. Errors keep the socket path and the command so
//! that [`QmpError::into_backend`] can name the VM, the disk and the node.

use lifeboat_engine::backend::BackendError;
use serde_json::{Value, json};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

/// The longest line accepted from QEMU (query results of big VMs are large, but not this).
pub const MAX_LINE_BYTES: u64 = 64 << 20;

/// Why a QMP or guest agent command failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket is missing, refuses connections, or cannot be opened.
    #[error("cannot connect to {} socket {}: {source}", kind, socket.display())]
    Connect {
        /// `QMP` or `guest agent`.
        kind: &'static str,
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No answer in time (the connection was dropped).
    #[error("{command} got no answer within {timeout:?} on {}", socket.display())]
    Timeout {
        /// The command.
        command: String,
        /// The socket.
        socket: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// The connection failed or closed mid-command.
    #[error("{command} failed on {}: {source}", socket.display())]
    Io {
        /// The command.
        command: String,
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The peer sent something that is not the protocol.
    #[error("{command}: unexpected answer on {}: {detail}", socket.display())]
    Protocol {
        /// The command.
        command: String,
        /// The socket.
        socket: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// QEMU ran the command and refused it.
    #[error("{command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, `CommandNotFound`…).
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

impl QmpError {
    /// QEMU's description of a refused command (empty for other errors).
    pub fn desc(&self) -> &str {
        match self {
            Self::Command { desc, .. } => desc,
            _ => "",
        }
    }

    /// QEMU's error class of a refused command (`CommandNotFound`, ...); None for other
    /// errors.
    pub fn class(&self) -> Option<&str> {
        match self {
            Self::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// Whether QEMU said a block node or device does not exist.
    pub fn is_missing_node(&self) -> bool {
        match self {
            Self::Command { class, desc, .. } => {
                class == "DeviceNotFound"
                    || desc.starts_with("Failed to find node")
                    || desc.starts_with("Cannot find device")
                    || (desc.starts_with("Node ") && desc.ends_with("not found"))
                    || (desc.starts_with("Device ") && desc.ends_with("not found"))
            }
            _ => false,
        }
    }

    /// Whether QEMU said a dirty bitmap does not exist.
    pub fn is_missing_bitmap(&self) -> bool {
        self.desc().starts_with("Dirty bitmap") && self.desc().ends_with("not found")
    }

    /// Whether QEMU said something is in use right now (retrying later may work).
    pub fn is_busy(&self) -> bool {
        let d = self.desc();
        d.contains("in use")
            || d.contains("is busy")
            || d.contains("has active job")
            || d.contains("is locked")
    }

    /// Map to the backend's error, naming the VM, what was done and (when known) the disk and
    /// its node.
    ///
    /// - socket missing or refusing → [`BackendError::VmNotFound`] naming the socket;
    /// - QEMU says the node does not exist → [`BackendError::DiskNotFound`] (with a disk);
    /// - timeouts, lost connections, busy nodes → [`BackendError::Transient`];
    /// - everything else QEMU refuses → [`BackendError::Permanent`].
    pub fn into_backend(self, vm: &str, action: &str, disk: Option<(&str, &str)>) -> BackendError {
        let vm = vm.to_owned();
        let on = match disk {
            Some((disk, node)) => format!("{action} (disk {disk:?}, node {node:?})"),
            None => action.to_owned(),
        };
        match &self {
            Self::Connect { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                BackendError::VmNotFound {
                    vm,
                    detail: format!("{on}: {self}"),
                }
            }
            Self::Connect { .. } | Self::Protocol { .. } => BackendError::Permanent {
                vm,
                action: on,
                detail: self.to_string(),
            },
            Self::Timeout { .. } | Self::Io { .. } => BackendError::Transient {
                vm,
                action: on,
                detail: self.to_string(),
            },
            Self::Command { .. } if self.is_missing_node() => match disk {
                Some((disk, node)) => BackendError::DiskNotFound {
                    vm,
                    disk: disk.to_owned(),
                    detail: format!("QEMU has no block node {node:?}: {self}"),
                },
                None => BackendError::Permanent {
                    vm,
                    action: on,
                    detail: self.to_string(),
                },
            },
            Self::Command { .. } if self.is_busy() => BackendError::Transient {
                vm,
                action: on,
                detail: self.to_string(),
            },
            Self::Command { .. } => BackendError::Permanent {
                vm,
                action: on,
                detail: self.to_string(),
            },
        }
    }
}

/// One open connection: buffered reader and writer halves.
#[derive(Debug)]
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// The process at the other end (`SO_PEERCRED`), if the kernel says.
    peer_pid: Option<u32>,
}

impl Conn {
    async fn open(kind: &'static str, socket: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| QmpError::Connect {
                kind,
                socket: socket.to_owned(),
                source,
            })?;
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let (r, w) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(r),
            writer: w,
            peer_pid,
        })
    }

    async fn send(&mut self, msg: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.writer.flush().await
    }

    /// The next JSON line; `None` at end of stream.
    async fn recv(&mut self) -> io::Result<Option<Value>> {
        loop {
            let mut line = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_LINE_BYTES)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(None);
            }
            if line.last() != Some(&b'\n') && n as u64 == MAX_LINE_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "line over the accepted length",
                ));
            }
            // NB: the guest agent prefixes the reply to guest-sync-delimited with 0xFF, and
            // may send it after stale output: drop everything up to the last 0xFF.
            let start = line.iter().rposition(|b| *b == 0xFF).map_or(0, |i| i + 1);
            let text = &line[start..];
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(text)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not JSON: {e}")));
        }
    }
}

/// How long a refused connection is tried again (QEMU handing the monitor over, or binding
/// its socket before it listens) before it counts as QEMU being gone.
const REFUSED_RETRY_FOR: Duration = Duration::from_secs(2);
/// How long one connection may wait for its greeting and negotiation before a fresh one is
/// tried.
const HANDSHAKE_TRY: Duration = Duration::from_secs(5);

/// A QMP client for one VM: one command at a time, a timeout on each.
#[derive(Debug)]
pub struct QmpClient {
    socket: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
    /// QEMU's pid as of the last connection (0: unknown).
    peer_pid: AtomicU32,
}

impl QmpClient {
    /// A client for the QMP socket at `socket`; it connects on the first command.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
            peer_pid: AtomicU32::new(0),
        }
    }

    /// The pid of the QEMU process behind the socket, as of the last connection.
    pub fn peer_pid(&self) -> Option<u32> {
        Some(self.peer_pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether this client holds a connection now (it may have gone stale since).
    pub async fn connected(&self) -> bool {
        self.conn.lock().await.is_some()
    }

    /// Run `command` with `arguments` (`Value::Null` for none) and return its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut guard = self.conn.lock().await;
        let reused = guard.is_some();
        let mut result = self.attempt(&mut guard, command, arguments.clone()).await;
        // NB: QEMU closes a monitor connection only when it exits, so a kept connection that
        // is found closed belongs to a QEMU that is gone (restarted, say): connect afresh
        // once instead of failing the first command after every restart.
        if reused && matches!(&result, Err(QmpError::Io { source, .. }) if is_closed(source)) {
            *guard = None;
            result = self.attempt(&mut guard, command, arguments).await;
        }
        // NB: after a timeout or a broken stream the next line may belong to this command;
        // start afresh rather than guess.
        if matches!(
            result,
            Err(QmpError::Timeout { .. } | QmpError::Io { .. } | QmpError::Protocol { .. })
        ) {
            *guard = None;
        }
        result
    }

    async fn attempt(
        &self,
        conn: &mut Option<Conn>,
        command: &str,
        arguments: Value,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, self.exchange(conn, command, arguments, id)).await
        {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                socket: self.socket.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        conn: &mut Option<Conn>,
        command: &str,
        arguments: Value,
        id: u64,
    ) -> Result<Value, QmpError> {
        if conn.is_none() {
            *conn = Some(self.handshake().await?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(self.protocol(command, "no connection"));
        };
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        c.send(&msg).await.map_err(|e| self.io(command, e))?;
        loop {
            let reply = c
                .recv()
                .await
                .map_err(|e| self.io(command, e))?
                .ok_or_else(|| {
                    self.io(
                        command,
                        io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed the socket"),
                    )
                })?;
            if reply.get("event").is_some() {
                continue;
            }
            // NB: a reply with another id answers a command whose caller gave up (a dropped
            // future); it is not ours.
            if reply.get("id").is_some_and(|v| v != &json!(id)) {
                continue;
            }
            return reply_value(command, reply).map_err(|detail| match detail {
                ReplyError::Command { class, desc } => QmpError::Command {
                    command: command.to_owned(),
                    class,
                    desc,
                },
                ReplyError::Shape(d) => self.protocol(command, &d),
            });
        }
    }

    /// Connect and negotiate. QEMU's monitor serves one client at a time and takes the next
    /// one only after it has let the last one go; on a busy host a connection made in that
    /// moment can be refused, closed before its greeting, or left waiting without one. All
    /// are tried again: a refusal or a close for [`REFUSED_RETRY_FOR`] (a QEMU that is gone
    /// stays refused, and is reported as such), a missing greeting until the command's own
    /// timeout.
    async fn handshake(&self) -> Result<Conn, QmpError> {
        let refused_until = tokio::time::Instant::now() + REFUSED_RETRY_FOR;
        let mut pause = Duration::from_millis(20);
        loop {
            match tokio::time::timeout(HANDSHAKE_TRY, self.try_handshake()).await {
                Ok(Err(QmpError::Connect { source, .. }))
                    if matches!(
                        source.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::WouldBlock
                    ) && tokio::time::Instant::now() < refused_until => {}
                Ok(Err(QmpError::Io {
                    ref command,
                    ref source,
                    ..
                })) if command == "greeting"
                    && source.kind() == io::ErrorKind::UnexpectedEof
                    && tokio::time::Instant::now() < refused_until =>
                {
                    tracing::debug!(socket = %self.socket.display(), "QMP closed before its greeting: connecting again");
                }
                Ok(result) => return result,
                Err(_) => {
                    tracing::debug!(socket = %self.socket.display(), "no QMP greeting yet: connecting again")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn try_handshake(&self) -> Result<Conn, QmpError> {
        let mut c = Conn::open("QMP", &self.socket).await?;
        self.peer_pid
            .store(c.peer_pid.unwrap_or(0), Ordering::Relaxed);
        let greeting = c
            .recv()
            .await
            .map_err(|e| self.io("greeting", e))?
            .ok_or_else(|| {
                self.io(
                    "greeting",
                    io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the greeting"),
                )
            })?;
        if greeting.get("QMP").is_none() {
            return Err(self.protocol("greeting", &format!("not a QMP greeting: {greeting}")));
        }
        c.send(&json!({ "execute": "qmp_capabilities", "id": 0 }))
            .await
            .map_err(|e| self.io("qmp_capabilities", e))?;
        loop {
            let reply = c
                .recv()
                .await
                .map_err(|e| self.io("qmp_capabilities", e))?
                .ok_or_else(|| {
                    self.io(
                        "qmp_capabilities",
                        io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed the socket"),
                    )
                })?;
            // NB: QEMU 10 can greet a connection twice when it was queued behind another
            // client that just left; the second greeting is not the answer.
            if reply.get("event").is_some() || reply.get("QMP").is_some() {
                continue;
            }
            return match reply_value("qmp_capabilities", reply) {
                Ok(_) => Ok(c),
                Err(ReplyError::Command { class, desc }) => Err(QmpError::Command {
                    command: "qmp_capabilities".into(),
                    class,
                    desc,
                }),
                Err(ReplyError::Shape(d)) => Err(self.protocol("qmp_capabilities", &d)),
            };
        }
    }

    fn io(&self, command: &str, source: io::Error) -> QmpError {
        QmpError::Io {
            command: command.to_owned(),
            socket: self.socket.clone(),
            source,
        }
    }

    fn protocol(&self, command: &str, detail: &str) -> QmpError {
        QmpError::Protocol {
            command: command.to_owned(),
            socket: self.socket.clone(),
            detail: detail.to_owned(),
        }
    }
}

/// Whether an I/O error says the peer closed the connection.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

enum ReplyError {
    Command { class: String, desc: String },
    Shape(String),
}

/// The `return` of a reply, or its `error`.
fn reply_value(command: &str, mut reply: Value) -> Result<Value, ReplyError> {
    if let Some(v) = reply.get_mut("return") {
        return Ok(v.take());
    }
    if let Some(e) = reply.get("error") {
        let class = e
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("UnknownError")
            .to_owned();
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        return Err(ReplyError::Command { class, desc });
    }
    Err(ReplyError::Shape(format!(
        "reply to {command} has neither return nor error: {reply}"
    )))
}

/// A QEMU guest agent (`qemu-ga`) reached through the host side of its virtio-serial socket.
///
/// # Caveats
/// The agent serves one client at a time and keeps no session: each call connects, resyncs
/// with `guest-sync-delimited` and disconnects.
#[derive(Debug, Clone)]
pub struct GuestAgent {
    socket: PathBuf,
    timeout: Duration,
}

impl GuestAgent {
    /// The agent behind `socket`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Run one guest agent command and return its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        tokio::time::timeout(self.timeout, self.exchange(command, arguments))
            .await
            .unwrap_or_else(|_| {
                Err(QmpError::Timeout {
                    command: command.to_owned(),
                    socket: self.socket.clone(),
                    timeout: self.timeout,
                })
            })
    }

    async fn exchange(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let io = |source| QmpError::Io {
            command: command.to_owned(),
            socket: self.socket.clone(),
            source,
        };
        let eof = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest agent closed the socket",
            )
        };
        let mut c = Conn::open("guest agent", &self.socket).await?;
        // NB: a process id and a clock make a sync id that an earlier, abandoned client's
        // reply cannot carry.
        let sync_id = u64::from(std::process::id()) << 32
            | u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos()),
            );
        c.send(&json!({ "execute": "guest-sync-delimited", "arguments": { "id": sync_id } }))
            .await
            .map_err(io)?;
        loop {
            let reply = c.recv().await.map_err(io)?.ok_or_else(eof).map_err(io)?;
            if reply.get("return") == Some(&json!(sync_id)) {
                break;
            }
        }
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        c.send(&msg).await.map_err(io)?;
        let reply = c.recv().await.map_err(io)?.ok_or_else(eof).map_err(io)?;
        reply_value(command, reply).map_err(|e| match e {
            ReplyError::Command { class, desc } => QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            },
            ReplyError::Shape(detail) => QmpError::Protocol {
                command: command.to_owned(),
                socket: self.socket.clone(),
                detail,
            },
        })
    }
}
