//! Test support for this crate's tests and the crates above it (feature `testing`): a VM block
//! layer for end-to-end tests: a real `qemu-storage-daemon` holding qcow2 disks,
//! with QMP on a unix socket and a writable NBD export per disk through which `qemu-io`
//! writes as the guest would. Started in a temporary folder, stopped by its process id.

#![allow(clippy::unwrap_used, clippy::expect_used)] // NB: a test harness: a failed setup is the test's failure report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running qemu-storage-daemon and its disks.
#[derive(Debug)]
pub struct Qsd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
    pub disks: Vec<(String, u64)>,
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
        for (name, size) in disks {
            let image = dir.join(format!("{name}.qcow2"));
            if !image.exists() {
                run(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        image.to_str().unwrap(),
                        &size.to_string(),
                    ],
                );
            }
        }
        let mut qsd = Qsd {
            child: None,
            dir: dir.to_path_buf(),
            qmp: dir.join("qmp.sock"),
            nbd: dir.join("nbd.sock"),
            disks: disks.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect(),
        };
        qsd.spawn();
        qsd
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.nbd);
        let mut args: Vec<String> = Vec::new();
        for (name, _) in &self.disks {
            let image = self.dir.join(format!("{name}.qcow2"));
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name={name}-file,filename={}",
                image.display()
            ));
            args.push("--blockdev".into());
            args.push(format!("driver=qcow2,node-name={name},file={name}-file"));
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

    /// The whole disk as the guest sees it now.
    pub fn read_disk(&self, disk: &str) -> Vec<u8> {
        let out = self.dir.join(format!("{disk}.dump"));
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},export={disk}",
            self.nbd.display()
        );
        run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-O",
                "raw",
                "--image-opts",
                &opts,
                out.to_str().unwrap(),
            ],
        );
        let bytes = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        bytes
    }

    /// Stop the daemon as a crash would (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same disks and sockets.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
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
