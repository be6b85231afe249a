//! Test support shared by the store's tests and the tests of the crates above it (enable the
//! `testing` feature): a real Azurite blob service started on a free loopback port and killed
//! by its process id, and Azure stores pointed at it. Azurite is the repository's npm
//! devDependency (`npm ci` at the root installs it); without it the tests fail and say so.

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

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

impl Azurite {
    /// Start Azurite in memory on a free port.
    pub fn start() -> Azurite {
        Azurite::start_on(free_port(), None)
    }

    /// Start Azurite on `port`, keeping its data in `location` when given.
    pub fn start_on(port: u16, location: Option<&Path>) -> Azurite {
        let main = azurite_main();
        let mut cmd = Command::new("node");
        cmd.arg(&main)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--disableTelemetry", "--silent", "--skipApiVersionCheck"]);
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
        let azurite = Azurite { child, port };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Azurite did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        azurite
    }

    pub fn account_url(&self) -> String {
        format!("http://127.0.0.1:{}/{DEV_ACCOUNT}", self.port)
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
