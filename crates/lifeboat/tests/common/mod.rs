//! What the standalone end-to-end tests share: the `lifeboat` binary, a daemon on a work
//! folder (`manifests/`, `state/`, `failover/`, `daemon.log`), and the tools run on its state.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const LIFEBOAT: &str = env!("CARGO_BIN_EXE_lifeboat");

/// A `lifeboat standalone` daemon on `work`, logging to `work/daemon.log`; killed with
/// SIGKILL when dropped, so that a failed test leaves no daemon behind.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    pub fn start(work: &Path) -> Daemon {
        Daemon::start_with(work, &[])
    }

    /// [`Daemon::start`] with `extra` arguments.
    pub fn start_with(work: &Path, extra: &[&str]) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join("daemon.log"))
            .unwrap();
        let child = Command::new(LIFEBOAT)
            .args(["standalone", "--manifests"])
            .arg(work.join("manifests"))
            .arg("--state-dir")
            .arg(work.join("state"))
            .arg("--failover-dir")
            .arg(work.join("failover"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Daemon { child }
    }

    /// SIGKILL, and wait until it is gone: a crash of the process, not a power cut (the kernel
    /// keeps the page cache and every write it accepted).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `lifeboat ARGS --state-dir WORK/state`: its standard output. A failure fails the test,
/// with the arguments, the standard error and the standard output.
pub fn lifeboat(work: &Path, args: &[&str]) -> String {
    let out = Command::new(LIFEBOAT)
        .args(args)
        .arg("--state-dir")
        .arg(work.join("state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lifeboat {args:?} failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Wait until `check` holds, for at most `seconds`; else fail with `what` and the tail of
/// the daemon's log.
#[allow(dead_code)] // not every test binary that shares this module waits
pub fn wait_until(work: &Path, what: &str, seconds: u64, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(work.join("daemon.log")).unwrap_or_default();
            panic!(
                "timed out waiting for {what}\nlog tail:\n{}",
                log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
