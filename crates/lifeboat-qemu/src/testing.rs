//! Test support for this crate's tests and the crates above it (feature `testing`): a VM block
//! layer for end-to-end tests: a real `qemu-storage-daemon` holding the VM's disks (qcow2
//! images, raw image files or block devices, see [`DiskSpec`]), with QMP on a unix socket and
//! a writable NBD export per disk through which `qemu-io` writes as the guest would. Started
//! in a temporary folder, stopped by its process id: as a crash would ([`Qsd::kill`]) or
//! cleanly ([`Qsd::stop`]).

#![allow(clippy::unwrap_used, clippy::expect_used)] // NB: a test harness: a failed setup is the test's failure report.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a disk of the daemon is stored, and so which block nodes serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// `<dir>/<name>.qcow2`: node `<name>` (driver `qcow2`) over `<name>-file` (`file`).
    Qcow2,
    /// `<dir>/<name>.img`: node `<name>` (driver `raw`) over `<name>-file` (`file`).
    RawFile,
    /// A raw image file at the path given (a failover's output, served where it was written),
    /// with the nodes of [`DiskFormat::RawFile`].
    RawFileAt(PathBuf),
    /// A block device: node `<name>` (driver `host_device`), no format node above it.
    Device(PathBuf),
}

/// One disk of the daemon: its name (the guest's NBD export and the node the guest writes
/// through), its size and how it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
    pub format: DiskFormat,
}

impl DiskSpec {
    /// A qcow2 image `<dir>/<name>.qcow2` of `size` bytes, created if missing.
    pub fn qcow2(name: &str, size: u64) -> DiskSpec {
        DiskSpec {
            name: name.to_owned(),
            size,
            format: DiskFormat::Qcow2,
        }
    }

    /// A raw image file `<dir>/<name>.img` of `size` bytes (sparse), created if missing.
    pub fn raw_file(name: &str, size: u64) -> DiskSpec {
        DiskSpec {
            name: name.to_owned(),
            size,
            format: DiskFormat::RawFile,
        }
    }

    /// The raw image file at `path` (which must exist), served in place.
    pub fn raw_file_at(name: &str, path: impl Into<PathBuf>) -> DiskSpec {
        let path = path.into();
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("cannot inspect {}: {e}", path.display()))
            .len();
        DiskSpec {
            name: name.to_owned(),
            size,
            format: DiskFormat::RawFileAt(path),
        }
    }

    /// The block device `device` (a loop device, say), its size as the kernel reports it.
    pub fn device(name: &str, device: impl Into<PathBuf>) -> DiskSpec {
        let device = device.into();
        let size = std::fs::File::open(&device)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .unwrap_or_else(|e| panic!("cannot open block device {}: {e}", device.display()));
        DiskSpec {
            name: name.to_owned(),
            size,
            format: DiskFormat::Device(device),
        }
    }

    /// The file or device holding the disk.
    pub fn image(&self, dir: &Path) -> PathBuf {
        match &self.format {
            DiskFormat::Qcow2 => dir.join(format!("{}.qcow2", self.name)),
            DiskFormat::RawFile => dir.join(format!("{}.img", self.name)),
            DiskFormat::RawFileAt(path) | DiskFormat::Device(path) => path.clone(),
        }
    }

    /// The driver of the node the guest writes through (`qcow2`, `raw`, `host_device`).
    pub fn driver(&self) -> &'static str {
        match self.format {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::RawFile | DiskFormat::RawFileAt(_) => "raw",
            DiskFormat::Device(_) => "host_device",
        }
    }

    fn create(&self, dir: &Path) {
        let image = self.image(dir);
        match self.format {
            DiskFormat::Qcow2 if !image.exists() => {
                run(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        image.to_str().unwrap(),
                        &self.size.to_string(),
                    ],
                );
            }
            DiskFormat::RawFile if !image.exists() => {
                std::fs::File::create(&image)
                    .and_then(|f| f.set_len(self.size))
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", image.display()));
            }
            _ => {}
        }
    }

    /// The `--blockdev` options of its nodes, the protocol node first.
    fn blockdevs(&self, dir: &Path) -> Vec<String> {
        let name = &self.name;
        let image = self.image(dir);
        match self.format {
            DiskFormat::Qcow2 | DiskFormat::RawFile | DiskFormat::RawFileAt(_) => vec![
                format!(
                    "driver=file,node-name={name}-file,filename={}",
                    image.display()
                ),
                format!("driver={},node-name={name},file={name}-file", self.driver()),
            ],
            DiskFormat::Device(_) => vec![format!(
                "driver=host_device,node-name={name},filename={}",
                image.display()
            )],
        }
    }
}

/// A running qemu-storage-daemon and its disks.
#[derive(Debug)]
pub struct Qsd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
    /// `(name, size)` of every disk, in the order given.
    pub disks: Vec<(String, u64)>,
    /// How each disk is stored, in the same order.
    pub specs: Vec<DiskSpec>,
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (Debian's qemu-utils must be installed): {e}")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Qsd {
    /// Create qcow2 disks `(name, size)` in `dir` and start the daemon on them.
    pub fn start(dir: &Path, disks: &[(&str, u64)]) -> Qsd {
        let specs: Vec<DiskSpec> = disks
            .iter()
            .map(|(name, size)| DiskSpec::qcow2(name, *size))
            .collect();
        Qsd::start_with(dir, &specs)
    }

    /// Create the disks that are missing (image files in `dir`; devices must exist) and
    /// start the daemon on them.
    pub fn start_with(dir: &Path, disks: &[DiskSpec]) -> Qsd {
        for spec in disks {
            spec.create(dir);
        }
        let mut qsd = Qsd {
            child: None,
            dir: dir.to_path_buf(),
            qmp: dir.join("qmp.sock"),
            nbd: dir.join("nbd.sock"),
            disks: disks.iter().map(|d| (d.name.clone(), d.size)).collect(),
            specs: disks.to_vec(),
        };
        qsd.spawn();
        qsd
    }

    /// How `disk` is stored.
    pub fn spec(&self, disk: &str) -> &DiskSpec {
        self.specs
            .iter()
            .find(|d| d.name == disk)
            .unwrap_or_else(|| panic!("no disk {disk:?}"))
    }

    /// The file or device holding `disk`.
    pub fn image(&self, disk: &str) -> PathBuf {
        self.spec(disk).image(&self.dir)
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.nbd);
        let mut args: Vec<String> = Vec::new();
        for spec in &self.specs {
            for blockdev in spec.blockdevs(&self.dir) {
                args.push("--blockdev".into());
                args.push(blockdev);
            }
        }
        args.push("--nbd-server".into());
        args.push(format!("addr.type=unix,addr.path={}", self.nbd.display()));
        for (name, _) in &self.disks {
            args.push("--export".into());
            args.push(format!(
                "type=nbd,id=guest-{name},node-name={name},name={name},writable=on"
            ));
        }
        args.push("--chardev".into());
        args.push(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            self.qmp.display()
        ));
        args.push("--monitor".into());
        args.push("chardev=qmp0".into());
        let child = Command::new("qemu-storage-daemon")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start qemu-storage-daemon (Debian's qemu-utils 10): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.qmp.exists() && self.nbd.exists()) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not open its sockets"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn nbd_uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.nbd.display())
    }

    /// Write `len` bytes of `pattern` at `offset` of `disk`, as the guest.
    pub fn guest_write(&self, disk: &str, offset: u64, len: u64, pattern: u8) {
        let command = format!("write -P {pattern:#04x} {offset} {len}");
        run(
            "qemu-io",
            &["-f", "raw", &self.nbd_uri(disk), "-c", &command],
        );
    }

    /// Several writes `(offset, len, pattern)` in one qemu-io run.
    pub fn guest_writes(&self, disk: &str, writes: &[(u64, u64, u8)]) {
        let mut args = vec!["-f".to_owned(), "raw".to_owned(), self.nbd_uri(disk)];
        for (offset, len, pattern) in writes {
            args.push("-c".into());
            args.push(format!("write -P {pattern:#04x} {offset} {len}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("qemu-io", &args);
    }

    /// The whole disk as the guest sees it now: through the guest's NBD export while the
    /// daemon runs (whatever the format), from the image or device itself while it is stopped.
    pub fn read_disk(&self, disk: &str) -> Vec<u8> {
        let spec = self.spec(disk);
        if self.child.is_none() {
            return match spec.format {
                DiskFormat::RawFile | DiskFormat::RawFileAt(_) | DiskFormat::Device(_) => {
                    let mut bytes = std::fs::read(spec.image(&self.dir)).unwrap_or_else(|e| {
                        panic!("read {}: {e}", spec.image(&self.dir).display())
                    });
                    bytes.truncate(spec.size as usize);
                    bytes
                }
                DiskFormat::Qcow2 => {
                    self.convert_to_raw(disk, &["-f", "qcow2"], &spec.image(&self.dir))
                }
            };
        }
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},export={disk}",
            self.nbd.display()
        );
        self.convert_to_raw(disk, &["--image-opts"], Path::new(&opts))
    }

    fn convert_to_raw(&self, disk: &str, source_args: &[&str], source: &Path) -> Vec<u8> {
        let out = self.dir.join(format!("{disk}.dump"));
        let mut args = vec!["convert", "-q", "-O", "raw"];
        args.extend_from_slice(source_args);
        args.push(source.to_str().unwrap());
        args.push(out.to_str().unwrap());
        run("qemu-img", &args);
        let bytes = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        bytes
    }

    /// Stop the daemon as a crash would (SIGKILL): a qcow2 image is left as it was, its
    /// bitmaps marked in use, those added since it was opened never written.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the daemon cleanly (SIGTERM, as a host shutting the VM down), and wait for it to
    /// exit: it closes its images, writing a qcow2's persistent bitmaps.
    ///
    /// NB: not QMP `quit`: the daemon's monitor serves one client at a time, and the backend
    /// under test holds it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        run("kill", &["-TERM", &child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "qemu-storage-daemon did not exit cleanly on SIGTERM: {status}"
                    );
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("qemu-storage-daemon did not exit within 20 s of SIGTERM: {other:?}");
                }
            }
        }
    }

    /// Start a stopped (or killed) daemon again on the same disks and sockets.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "qemu-storage-daemon is still running");
        self.spawn();
    }

    /// Start it again on the same disks and sockets, after a crash (SIGKILL).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start it again on the same disks and sockets, after a clean stop (SIGTERM).
    pub fn restart_clean(&mut self) {
        self.stop();
        self.spawn();
    }
}

/// A file attached to a loop device (`losetup`, root only), detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    /// Attach `file` to the first free loop device; why not, when that cannot be done here
    /// (not root, no losetup, no loop devices).
    pub fn attach(file: &Path) -> Result<LoopDevice, String> {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "losetup --find --show {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if device.is_empty() {
            return Err("losetup named no device".into());
        }
        Ok(LoopDevice {
            device: PathBuf::from(device),
        })
    }
}

/// Run a clean-up `command` (`what`, as a person would type it) from a `Drop`: a failure is
/// printed, not raised.
fn clean_up(what: &str, command: &mut Command) {
    match command.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "{what} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("cannot run {what}: {e}"),
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        clean_up(
            &format!("losetup -d {}", self.device.display()),
            Command::new("losetup").arg("-d").arg(&self.device),
        );
    }
}

/// A folder on a file system that clones files (XFS with reflink, on a loop-mounted sparse
/// image in a temporary folder; root only), unmounted on drop: where a raw image gets its
/// reflinked twin (`lifeboat_engine::twin`).
#[derive(Debug)]
pub struct ReflinkFolder {
    /// The mounted folder.
    pub path: PathBuf,
    // NB: after `path` is unmounted, the image's folder goes.
    _image: tempfile::TempDir,
}

impl ReflinkFolder {
    /// Make and mount one of `size_bytes` (XFS needs 300 MiB at least); why not, when that
    /// cannot be done here (not root, no `mkfs.xfs` from Debian's xfsprogs, no loop devices).
    pub fn mount(size_bytes: u64) -> Result<ReflinkFolder, String> {
        let image = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = image.path().join("xfs.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size_bytes))
            .map_err(|e| format!("cannot create {}: {e}", file.display()))?;
        let path = image.path().join("mnt");
        std::fs::create_dir(&path).map_err(|e| e.to_string())?;
        let step = |program: &str, args: &[&std::ffi::OsStr]| {
            let output = Command::new(program)
                .args(args)
                .output()
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{program} failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        };
        step(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                file.as_os_str(),
            ],
        )?;
        step(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                file.as_os_str(),
                path.as_os_str(),
            ],
        )?;
        Ok(ReflinkFolder {
            path,
            _image: image,
        })
    }
}

impl Drop for ReflinkFolder {
    fn drop(&mut self) {
        // NB: lazy: a daemon of a failed test may still hold a file there.
        clean_up(
            &format!("umount {}", self.path.display()),
            Command::new("umount").arg("-l").arg(&self.path),
        );
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read the NBD export `export` served on the unix socket `socket` (by a hook's
/// qemu-storage-daemon, say) into `out`, with qemu-img; its bytes.
pub fn read_export(socket: &Path, export: &str, out: &Path) -> Vec<u8> {
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd+unix:///{export}?socket={}", socket.display()),
            &out.display().to_string(),
        ],
    );
    std::fs::read(out).unwrap_or_else(|e| panic!("read {}: {e}", out.display()))
}

/// Assert that the export `export` on `socket` holds `want` (read into `scratch`).
pub fn assert_served(what: &str, socket: &Path, export: &str, want: &[u8], scratch: &Path) {
    assert_same(what, &read_export(socket, export, scratch), want);
}

/// Compare two disk images, naming the first differing byte.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

/// Wait up to `seconds` for the stamp a failover or failback kept beside the raw image `image`
/// (`lifeboat_engine::stamp`) to be used: an agent found the VM started on it and armed its
/// seed bitmap (or found the file written since). Panics, naming the image, when it is not.
pub fn wait_stamp_used(image: &Path, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while lifeboat_engine::stamp::beside(image).is_ok_and(|s| !s.is_empty()) {
        assert!(
            Instant::now() < deadline,
            "{} still has its stamp after {seconds} s: no agent armed the VM started on it",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
