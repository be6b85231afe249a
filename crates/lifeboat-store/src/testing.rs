//! Test support shared by the store's tests and the tests of the crates above it (enable the
//! `testing` feature): a real Azurite blob service started on a free loopback port and killed
//! by its process id, and Azure stores pointed at it. Azurite is the repository's npm
//! devDependency (`npm ci` at the root installs it); without it the tests fail and say so.
//!
//! Token credentials need https: [`Azurite::start_https_oauth`] serves https with a
//! certificate made for the test (by the `openssl` command) and checks bearer tokens. The
//! SDK's HTTP client trusts the roots it finds when it is built (`SSL_CERT_FILE` replaces the
//! system's), so a test that talks to it runs its body again in a child process of the test
//! binary whose environment names the certificate: [`rerun_in_child`].

#![allow(clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::azure::{AzureStore, AzureStoreOptions, Credentials};

/// Azurite's documented development account and key (public).
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
pub const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite blob service, killed (by its pid) on drop.
#[derive(Debug)]
pub struct Azurite {
    child: Child,
    pub port: u16,
    /// Serves https (with bearer-token checks) rather than http.
    https: bool,
}

fn azurite_main() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let main = root.join("node_modules/azurite/dist/src/blob/main.js");
    assert!(
        main.exists(),
        "Azurite is not installed ({} is missing): run `npm ci --no-audit --no-fund` in the repository root",
        main.display()
    );
    main
}

/// A free loopback TCP port, never one this process handed out before.
///
/// NB: the port is free when it is returned, and is taken by the service it is for a moment
/// later; the kernel may hand the same port to the next `bind(0)` in between. Two services of
/// one test binary started at once (tests run in parallel) must not get the same port: the
/// second would fail to listen while the first answered its readiness check, and its test
/// would talk to the first, until that one is killed.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("local addr").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

impl Azurite {
    /// Start Azurite in memory on a free port.
    pub fn start() -> Azurite {
        Azurite::start_on(free_port(), None)
    }

    /// Start Azurite on `port`, keeping its data in `location` when given.
    pub fn start_on(port: u16, location: Option<&Path>) -> Azurite {
        Azurite::spawn(port, location, None)
    }

    /// Start Azurite in memory on a free port, serving https with a certificate for
    /// `127.0.0.1` and `localhost` made in `dir`, and checking bearer tokens (`--oauth basic`:
    /// a token's issuer, audience and lifetime, not its signature). Returns it and the
    /// certificate's PEM file, the root a client must trust (see [`rerun_in_child`]). Shared
    /// Key requests work as on the http one.
    ///
    /// Needs the `openssl` command (Debian package `openssl`).
    pub fn start_https_oauth(dir: &Path) -> (Azurite, PathBuf) {
        let (cert, key) = self_signed_certificate(dir);
        let azurite = Azurite::spawn(free_port(), None, Some((&cert, &key)));
        (azurite, cert)
    }

    /// Start Azurite; with `tls` (a certificate and its key) on https and checking tokens.
    fn spawn(port: u16, location: Option<&Path>, tls: Option<(&Path, &Path)>) -> Azurite {
        let main = azurite_main();
        let mut cmd = Command::new("node");
        cmd.arg(&main)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--disableTelemetry", "--silent", "--skipApiVersionCheck"]);
        if let Some((cert, key)) = tls {
            cmd.args(["--oauth", "basic", "--cert"])
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        match location {
            Some(dir) => cmd.arg("--location").arg(dir),
            None => cmd.args(["--inMemoryPersistence", "--extentMemoryLimit", "512"]),
        };
        // For debugging a failing test: AZURITE_DEBUG_LOG=/tmp/azurite.log keeps Azurite's log.
        if let Some(log) = std::env::var_os("AZURITE_DEBUG_LOG") {
            cmd.arg("--debug").arg(log);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node (is Node.js installed?)");
        let mut azurite = Azurite {
            child,
            port,
            https: tls.is_some(),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = azurite.child.try_wait() {
                panic!(
                    "Azurite exited before it listened on port {port} ({status}): is the port taken? AZURITE_DEBUG_LOG=FILE keeps its log"
                );
            }
            assert!(
                Instant::now() < deadline,
                "Azurite did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        azurite
    }

    /// The development account's path-style URL (`https` when it serves https).
    pub fn account_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{DEV_ACCOUNT}", self.port)
    }

    /// Kill it now (by pid) and wait until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stop it by SIGTERM (by pid), as an outage that keeps the service's data: Azurite then
    /// saves its metadata (with SIGKILL it would lose the last seconds of it, an emulator
    /// artefact, not an Azure behaviour). SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Quick-failing options for tests: a killed Azurite must surface within seconds.
pub fn test_options(upload_concurrency: usize) -> AzureStoreOptions {
    AzureStoreOptions {
        upload_concurrency,
        max_retries: 2,
        initial_retry_delay: Duration::from_millis(50),
        max_retry_delay: Duration::from_millis(200),
        request_timeout: Duration::from_secs(10),
    }
}

pub async fn shared_key_store(
    azurite: &Azurite,
    container: &str,
    options: AzureStoreOptions,
) -> AzureStore {
    let credentials = Credentials::AccountKey {
        account: DEV_ACCOUNT.to_owned(),
        key: DEV_KEY.to_owned(),
    };
    let store =
        AzureStore::new(&azurite.account_url(), container, credentials, options).expect("store");
    store
        .ensure_container()
        .await
        .expect("create the container");
    store
}

/// A self-signed certificate for `127.0.0.1` and `localhost` (an end-entity certificate, not
/// a CA: rustls refuses a CA certificate as a server's), valid for a day, and its key, as PEM
/// files `cert.pem` and `key.pem` in `dir`.
fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "keyUsage=critical,digitalSignature"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (Debian package `openssl`) to make a test certificate");
    assert!(
        output.status.success(),
        "openssl could not make a test certificate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}

/// The variable that tells a child process started by [`rerun_in_child`] which test it runs.
const CHILD_TEST: &str = "LIFEBOAT_TEST_CHILD";

/// Whether this process is the child that [`rerun_in_child`] started for `test`.
pub fn is_child_for(test: &str) -> bool {
    std::env::var_os(CHILD_TEST).is_some_and(|t| t == test)
}

/// Run the test `test` (`module_path!()` and the test's name, `crate::module::name`) again,
/// alone, in a child process of this test binary whose environment also has `env`, and panic
/// with the child's output unless it passed. The test tells the two runs apart with
/// [`is_child_for`].
///
/// NB: for settings read from the environment when a client is built (`SSL_CERT_FILE`, the
/// `AZURE_*` variables of workload identity): a test cannot change its own process's
/// environment soundly while other tests' threads read it.
pub fn rerun_in_child(test: &str, env: &[(&str, &std::ffi::OsStr)]) {
    let exe = std::env::current_exe().expect("the test binary's path");
    // NB: libtest names a test by its path without the crate.
    let name = test.split_once("::").map_or(test, |(_, rest)| rest);
    let output = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_TEST, test)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("start the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // NB: the child's lines are quoted, so that its own `test result:` line is not read as
    // this binary's by whatever totals the output.
    let quoted: String = [stdout.as_ref(), &String::from_utf8_lossy(&output.stderr)]
        .iter()
        .flat_map(|s| s.lines())
        .map(|l| format!("  child| {l}\n"))
        .collect();
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} failed in its child process ({}):\n{quoted}",
        output.status
    );
}
