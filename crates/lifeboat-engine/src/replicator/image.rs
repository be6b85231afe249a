//! Disk images the engine writes itself, outside any hypervisor: a failover's output and a
//! failback's original disks. A raw image (or a block device) is a file, written in place; a
//! qcow2 image is written through a `qemu-nbd` serving it (NBD over a unix socket), so that
//! qcow2's layout and its persistent dirty bitmaps stay QEMU's business.
//!
//! ```text
//!  raw:    open ─> pread/pwrite ─> fsync
//!  qcow2:  qemu-img create ─> qemu-nbd -f qcow2 [-B seed] ─> NBD READ/WRITE/BLOCK_STATUS
//!          ─> NBD FLUSH ─> disconnect (qemu-nbd closes the image, storing its bitmaps, and exits)
//!          ─> qemu-img bitmap --add/--remove
//! ```

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lifeboat_blockmap::{BlockMap, is_zero};
use lifeboat_store::local::{PositionalIo, data_ranges};
use lifeboat_store::{At, MAX_WRITE_BYTES, ReplicaStore, VmKey};

use super::maps::{check_read, read_batches};
use crate::error::EngineError;

/// The format of a disk image the engine writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw data, sparse: any hypervisor boots it (Hyper-V and Azure as a fixed VHD's data).
    #[default]
    Raw,
    /// qcow2 (v3), written through `qemu-nbd`: QEMU/KVM boots it, and it carries a persistent
    /// dirty bitmap recording the recovered VM's writes since the point, so that its re-protect
    /// sends only those blocks without reading the rest of the disk.
    Qcow2,
}

impl DiskFormat {
    /// The name users write (`raw`, `qcow2`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// The file name extension of its images.
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Raw => "img",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// Every format, for cleanups that remove whatever a failover wrote.
    pub const ALL: [DiskFormat; 2] = [DiskFormat::Raw, DiskFormat::Qcow2];
}

impl std::str::FromStr for DiskFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown disk format {s:?} (raw or qcow2)"))
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long `qemu-nbd` may take to listen, and an NBD request to be answered.
#[cfg(unix)]
const NBD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Run `qemu-img` with `args`; its stdout.
///
/// # Errors
///
/// It cannot be run, or fails: [`EngineError::NotReady`] naming the command and its message.
pub(super) async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, EngineError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| EngineError::NotReady {
            what: format!("cannot run qemu-img (qemu-utils): {e}"),
        })?;
    if !out.status.success() {
        let line: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return Err(EngineError::NotReady {
            what: format!(
                "qemu-img {} failed: {}",
                line.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// A persistent dirty bitmap stored in a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct StoredBitmap {
    pub(super) name: String,
    /// It records writes (`auto`).
    pub(super) enabled: bool,
    /// The image was not closed cleanly since it was loaded (`in-use`): it cannot be trusted.
    pub(super) in_use: bool,
}

/// What `qemu-img info` says of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Qcow2Info {
    /// The guest-visible size.
    pub(super) virtual_size: u64,
    /// Its persistent dirty bitmaps.
    pub(super) bitmaps: Vec<StoredBitmap>,
}

/// Inspect the qcow2 image at `path` (`qemu-img info`).
pub(super) async fn qcow2_info(path: &Path) -> Result<Qcow2Info, EngineError> {
    let out = qemu_img(&[
        "info".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
    ])
    .await?;
    let info: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| EngineError::NotReady {
            what: format!("qemu-img info {}: unreadable answer: {e}", path.display()),
        })?;
    let list = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let virtual_size = info
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| EngineError::NotReady {
            what: format!("qemu-img info {}: no virtual size", path.display()),
        })?;
    let bitmaps = list
        .iter()
        .filter_map(|b| {
            let flags: Vec<&str> = b
                .get("flags")?
                .as_array()?
                .iter()
                .filter_map(serde_json::Value::as_str)
                .collect();
            Some(StoredBitmap {
                name: b.get("name")?.as_str()?.to_owned(),
                enabled: flags.contains(&"auto"),
                in_use: flags.contains(&"in-use"),
            })
        })
        .collect();
    Ok(Qcow2Info {
        virtual_size,
        bitmaps,
    })
}

/// Add the enabled persistent bitmap `name` to the qcow2 image at `path` (closed).
pub(super) async fn add_bitmap(path: &Path, name: &str) -> Result<(), EngineError> {
    qemu_img(&[
        "bitmap".as_ref(),
        "--add".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        name.as_ref(),
    ])
    .await
    .map(drop)
}

/// Remove the bitmap `name` from the qcow2 image at `path` (closed).
pub(super) async fn remove_bitmap(path: &Path, name: &str) -> Result<(), EngineError> {
    qemu_img(&[
        "bitmap".as_ref(),
        "--remove".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        name.as_ref(),
    ])
    .await
    .map(drop)
}

/// Create an empty qcow2 v3 image of `size` bytes at `path`.
pub(super) async fn create_qcow2(path: &Path, size: u64) -> Result<(), EngineError> {
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "compat=1.1".as_ref(),
        path.as_os_str(),
        size.to_string().as_ref(),
    ])
    .await
    .map(drop)
}

/// An image open for reading and writing.
pub(super) enum Image {
    /// A raw image or a block device.
    File {
        file: Arc<std::fs::File>,
        path: PathBuf,
    },
    /// A qcow2 image served by a `qemu-nbd` of our own.
    #[cfg(unix)]
    Nbd(Box<Served>),
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::File { path, .. } => f.debug_struct("Image::File").field("path", path).finish(),
            #[cfg(unix)]
            Image::Nbd(s) => f.debug_struct("Image::Nbd").field("path", &s.path).finish(),
        }
    }
}

/// A qcow2 image served by `qemu-nbd`, and the connection to it.
#[cfg(unix)]
pub(super) struct Served {
    path: PathBuf,
    socket: PathBuf,
    server: tokio::process::Child,
    client: tokio::sync::Mutex<lifeboat_nbd::NbdClient>,
    /// The dirty bitmap context exported, if one was asked for.
    bitmap_context: Option<String>,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EngineError {
    EngineError::state(action, path)
}

/// Run file I/O on the blocking pool; a failure names `action` and the image's `path`.
async fn blocking<T: Send + 'static>(
    action: &'static str,
    path: &Path,
    io: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(io)
        .await
        .map_err(|e| EngineError::NotReady {
            what: format!("{action} {}: cancelled ({e})", path.display()),
        })?
        .map_err(io_error(action, path))
}

impl Image {
    /// Wrap an open raw image or block device.
    pub(super) fn file(file: std::fs::File, path: &Path) -> Image {
        Image::File {
            file: Arc::new(file),
            path: path.to_owned(),
        }
    }

    /// Open the qcow2 image at `path` for reading and writing: a `qemu-nbd` of our own serves
    /// it and we connect; with `bitmap`, its persistent dirty bitmap of that name is exported
    /// too ([`Image::dirty_ranges`]).
    ///
    /// # Errors
    ///
    /// `qemu-nbd` cannot be run or does not listen (its message is given), the NBD handshake
    /// fails, or this is not a Unix node.
    pub(super) async fn open_qcow2(
        path: &Path,
        bitmap: Option<&str>,
    ) -> Result<Image, EngineError> {
        #[cfg(unix)]
        {
            Self::serve_qcow2(path, bitmap).await
        }
        #[cfg(not(unix))]
        {
            let _ = bitmap;
            Err(EngineError::NotReady {
                what: format!(
                    "{}: qcow2 images are written through qemu-nbd, on Linux nodes only",
                    path.display()
                ),
            })
        }
    }

    #[cfg(unix)]
    async fn serve_qcow2(path: &Path, bitmap: Option<&str>) -> Result<Image, EngineError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // NB: in the temporary folder, not beside the image: a unix socket's path is at most
        // 107 bytes.
        let socket = std::env::temp_dir().join(format!(
            "lifeboat-{}-{}.nbd.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = tokio::process::Command::new("qemu-nbd");
        cmd.args(["-f", "qcow2", "-x", "disk", "--cache=writeback", "-k"])
            .arg(&socket)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(bitmap) = bitmap {
            cmd.arg("-B").arg(bitmap);
        }
        cmd.arg(path);
        let mut server = cmd.spawn().map_err(|e| EngineError::NotReady {
            what: format!(
                "cannot run qemu-nbd (qemu-utils) for {}: {e}",
                path.display()
            ),
        })?;
        let bitmap_context = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut contexts = vec![lifeboat_nbd::BASE_ALLOCATION.to_owned()];
        contexts.extend(bitmap_context.clone());
        // NB: qemu-nbd binds its socket (the file appears) before it listens: a connection
        // made in between is refused, and is tried again (seen in CI).
        let started = std::time::Instant::now();
        let client = loop {
            if let Ok(Some(status)) = server.try_wait() {
                let mut message = String::new();
                if let Some(mut stderr) = server.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = stderr.read_to_string(&mut message).await;
                }
                return Err(EngineError::NotReady {
                    what: format!(
                        "qemu-nbd serving {} exited ({status}): {}",
                        path.display(),
                        message.trim()
                    ),
                });
            }
            if started.elapsed() > NBD_TIMEOUT {
                return Err(EngineError::NotReady {
                    what: format!(
                        "qemu-nbd serving {} did not listen on {} within {NBD_TIMEOUT:?}",
                        path.display(),
                        socket.display()
                    ),
                });
            }
            if socket.exists() {
                match lifeboat_nbd::NbdClient::connect_unix(&socket, "disk", &contexts, NBD_TIMEOUT)
                    .await
                {
                    Ok(client) => break client,
                    Err(lifeboat_nbd::NbdError::Connect { source, .. })
                        if source.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => {
                        return Err(EngineError::NotReady {
                            what: format!(
                                "NBD connection to qemu-nbd serving {}: {e}",
                                path.display()
                            ),
                        });
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        Ok(Image::Nbd(Box::new(Served {
            path: path.to_owned(),
            socket,
            server,
            client: tokio::sync::Mutex::new(client),
            bitmap_context,
        })))
    }

    #[cfg(unix)]
    fn path(&self) -> &Path {
        match self {
            Image::File { path, .. } => path,
            #[cfg(unix)]
            Image::Nbd(s) => &s.path,
        }
    }

    #[cfg(unix)]
    fn nbd_error(&self, action: &str, e: lifeboat_nbd::NbdError) -> EngineError {
        EngineError::NotReady {
            what: format!("NBD {action} of {}: {e}", self.path().display()),
        }
    }

    /// Read each of `pieces` (`(offset, len)`): their data, in order (over NBD, pipelined).
    pub(super) async fn read_many(
        &self,
        pieces: Vec<(u64, u64)>,
    ) -> Result<Vec<Bytes>, EngineError> {
        match self {
            Image::File { file, path } => {
                let file = Arc::clone(file);
                blocking("read disk image", path, move || {
                    pieces
                        .into_iter()
                        .map(|(offset, len)| {
                            let mut buf = vec![0u8; len as usize];
                            file.read_exact_at(&mut buf, offset)
                                .map(|()| Bytes::from(buf))
                        })
                        .collect()
                })
                .await
            }
            #[cfg(unix)]
            Image::Nbd(s) => s
                .client
                .lock()
                .await
                .read_many(&pieces)
                .await
                .map_err(|e| self.nbd_error("read", e)),
        }
    }

    /// Write each of `writes` (`(offset, data)`), in order (over NBD, pipelined).
    pub(super) async fn write_many(&self, writes: Vec<(u64, Bytes)>) -> Result<(), EngineError> {
        match self {
            Image::File { file, path } => {
                let file = Arc::clone(file);
                blocking("write disk image", path, move || {
                    writes
                        .iter()
                        .try_for_each(|(offset, data)| file.write_all_at(data, *offset))
                })
                .await
            }
            #[cfg(unix)]
            Image::Nbd(s) => s
                .client
                .lock()
                .await
                .write_many(&writes)
                .await
                .map_err(|e| self.nbd_error("write", e)),
        }
    }

    /// The ranges of the first `size` bytes that may hold data (the rest reads as zeros).
    pub(super) async fn data_ranges(&self, size: u64) -> Result<Vec<Range<u64>>, EngineError> {
        match self {
            Image::File { file, path } => {
                data_ranges(file, size).map_err(io_error("find data in disk image", path))
            }
            #[cfg(unix)]
            Image::Nbd(s) => {
                let extents = s
                    .client
                    .lock()
                    .await
                    .block_status(lifeboat_nbd::BASE_ALLOCATION, 0, size)
                    .await
                    .map_err(|e| self.nbd_error("block status", e))?;
                Ok(extents
                    .into_iter()
                    .filter(|e| e.flags & lifeboat_nbd::NBD_STATE_ZERO == 0)
                    .map(|e| e.range)
                    .collect())
            }
        }
    }

    /// The dirty ranges of the bitmap exported with [`Image::open_qcow2`], if one was.
    pub(super) async fn dirty_ranges(
        &self,
        size: u64,
    ) -> Result<Option<Vec<Range<u64>>>, EngineError> {
        match self {
            Image::File { .. } => {
                let _ = size;
                Ok(None)
            }
            #[cfg(unix)]
            Image::Nbd(s) => {
                let Some(context) = &s.bitmap_context else {
                    return Ok(None);
                };
                let extents = s
                    .client
                    .lock()
                    .await
                    .block_status(context, 0, size)
                    .await
                    .map_err(|e| self.nbd_error("block status", e))?;
                Ok(Some(
                    extents
                        .into_iter()
                        .filter(|e| e.flags & lifeboat_nbd::NBD_STATE_DIRTY != 0)
                        .map(|e| e.range)
                        .collect(),
                ))
            }
        }
    }

    /// Make everything written durable and close the image (a `qemu-nbd` exits, storing the
    /// image's bitmaps).
    ///
    /// # Errors
    ///
    /// The sync or flush fails, or `qemu-nbd` does not exit cleanly.
    pub(super) async fn finish(self) -> Result<(), EngineError> {
        match self {
            Image::File { file, path } => {
                blocking("sync disk image", &path, move || file.sync_all()).await
            }
            #[cfg(unix)]
            Image::Nbd(s) => {
                let Served {
                    path,
                    socket,
                    mut server,
                    client,
                    ..
                } = *s;
                let nbd = |action: &str, e: lifeboat_nbd::NbdError| EngineError::NotReady {
                    what: format!("NBD {action} of {}: {e}", path.display()),
                };
                let mut client = client.into_inner();
                client.flush().await.map_err(|e| nbd("flush", e))?;
                client
                    .disconnect()
                    .await
                    .map_err(|e| nbd("disconnect", e))?;
                let status = tokio::time::timeout(NBD_TIMEOUT, server.wait())
                    .await
                    .map_err(|_| EngineError::NotReady {
                        what: format!("qemu-nbd serving {} did not exit", path.display()),
                    })?
                    .map_err(io_error("wait for qemu-nbd", &path))?;
                if !status.success() {
                    return Err(EngineError::NotReady {
                        what: format!("qemu-nbd serving {} exited with {status}", path.display()),
                    });
                }
                let _ = std::fs::remove_file(&socket);
                Ok(())
            }
        }
    }
}

/// How many bytes of pieces one batch of [`write_from_store`] reads before writing them.
const STORE_BATCH_BYTES: u64 = 16 * 1024 * 1024;

/// Where [`write_from_store`] takes its data: `disk` of `vm` `at` a point of the store.
pub(super) struct StoreSource<'a> {
    pub store: &'a dyn ReplicaStore,
    pub vm: &'a VmKey,
    pub disk: &'a str,
    pub at: &'a At,
}

/// Read `batch` from the store, if there is one: each piece's offset with its data.
async fn fetch(
    source: &StoreSource<'_>,
    batch: Option<Vec<(u64, u64)>>,
) -> Result<Option<Vec<(u64, Bytes)>>, EngineError> {
    let Some(batch) = batch else {
        return Ok(None);
    };
    let data = source
        .store
        .read_many(source.vm, source.disk, source.at, &batch)
        .await?;
    check_read(source.disk, &batch, &data)?;
    Ok(Some(
        batch.iter().map(|&(offset, _)| offset).zip(data).collect(),
    ))
}

/// Write `ranges` (whole blocks of `map`, sorted, disjoint) of a disk in the store onto
/// `image`, keeping `map` (the image's block map) up to date: ranges marked zero are
/// written as zeros without reading the store; the others are read, in batches of pieces,
/// the next batch read while the current one is written (over NBD, its writes pipelined).
/// With `fresh` (an image that reads as zeros), all-zero data is not written.
/// `copied(end, read)` after each batch: the furthest end written so far, the bytes read so
/// far.
/// Returns the bytes read. A failover's output and a failback's original disk are both
/// written here.
///
/// # Errors
///
/// Store reads, image writes, or a map that does not cover a range.
pub(super) async fn write_from_store(
    source: &StoreSource<'_>,
    ranges: &[(Range<u64>, bool)],
    fresh: bool,
    image: &Image,
    map: &mut BlockMap,
    mut copied: impl FnMut(u64, u64),
) -> Result<u64, EngineError> {
    let map_error = |e| EngineError::BlockMap {
        disk: source.disk.to_owned(),
        source: e,
    };
    let block = u64::from(map.block_size_bytes());
    let chunk = (MAX_WRITE_BYTES / block).max(1) * block;
    let (zeros, data): (Vec<_>, Vec<_>) = ranges.iter().cloned().partition(|(_, zero)| *zero);
    let zeros: Vec<Range<u64>> = zeros.into_iter().map(|(r, _)| r).collect();
    let data: Vec<Range<u64>> = data.into_iter().map(|(r, _)| r).collect();
    let mut read = 0;
    // NB: the furthest end so far: the zero ranges come after the data ranges, not in
    // address order, and progress never goes back.
    let mut end = 0;
    let mut batches = read_batches(&data, chunk, STORE_BATCH_BYTES).into_iter();
    let mut current = fetch(source, batches.next()).await?;
    while let Some(batch) = current.take() {
        for (offset, data) in &batch {
            map.update_range(*offset, data).map_err(map_error)?;
            read += data.len() as u64;
            end = end.max(offset + data.len() as u64);
        }
        let writes = batch
            .into_iter()
            .filter(|(_, data)| !(fresh && is_zero(data)))
            .collect();
        let (next, written) = tokio::join!(fetch(source, batches.next()), image.write_many(writes));
        written?;
        current = next?;
        copied(end, read);
    }
    let zero = Bytes::from(vec![0u8; chunk as usize]);
    for batch in read_batches(&zeros, chunk, STORE_BATCH_BYTES) {
        for &(offset, len) in &batch {
            map.zero_range(offset, len).map_err(map_error)?;
            end = end.max(offset + len);
        }
        if !fresh {
            let writes = batch
                .into_iter()
                .map(|(offset, len)| (offset, zero.slice(..len as usize)))
                .collect();
            image.write_many(writes).await?;
        }
        copied(end, read);
    }
    Ok(read)
}
