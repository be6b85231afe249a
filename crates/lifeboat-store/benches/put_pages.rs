//! Throughput of 4 MiB Put Page writes with 1, 4 and 8 requests in flight: the Azure store
//! against Azurite (in memory: this measures our client path, not Azure), and the local
//! folder store for comparison. Prints the median of several runs per setting.
//!
//! `cargo bench -p lifeboat-store --bench put_pages` (needs `npm ci` at the repository root).

use bytes::Bytes;
use futures::StreamExt as _;
use lifeboat_store::azure::{AzureStore, AzureStoreOptions, Credentials};
use lifeboat_store::local::LocalStore;
use lifeboat_store::{MAX_WRITE_BYTES, ReplicaStore, VmKey};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Writes per run: 32 x 4 MiB = 128 MiB.
const WRITES: u64 = 32;
const RUNS: usize = 5;

struct Azurite(Child);

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_azurite() -> (Azurite, u16) {
    let main = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../node_modules/azurite/dist/src/blob/main.js");
    assert!(
        main.exists(),
        "Azurite is not installed: run `npm ci --no-audit --no-fund` in the repository root"
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("node")
        .arg(&main)
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .args(["--inMemoryPersistence", "--extentMemoryLimit", "4096"])
        .args(["--disableTelemetry", "--silent", "--skipApiVersionCheck"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node");
    let azurite = Azurite(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "Azurite did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (azurite, port)
}

/// One run: create a disk, write it with `in_flight` 4 MiB writes at a time; MB/s.
async fn run(store: &dyn ReplicaStore, in_flight: usize, run: usize) -> f64 {
    let vm = VmKey::new("bench", &format!("vm-{in_flight}-{run}")).expect("vm");
    store
        .create_disk(&vm, "root", WRITES * MAX_WRITE_BYTES)
        .await
        .expect("create");
    let page = Bytes::from(
        (0..MAX_WRITE_BYTES)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let start = Instant::now();
    futures::stream::iter(0..WRITES)
        .map(|i| {
            let (vm, page) = (&vm, page.clone());
            async move {
                store
                    .write(vm, "root", i * MAX_WRITE_BYTES, page)
                    .await
                    .expect("write")
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    store.flush(&vm).await.expect("flush");
    let secs = start.elapsed().as_secs_f64();
    store.delete_vm(&vm).await.expect("delete");
    (WRITES * MAX_WRITE_BYTES) as f64 / 1e6 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let (_azurite, port) = start_azurite();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = LocalStore::open(dir.path()).expect("local store");
    println!(
        "4 MiB writes, {WRITES} per run ({} MiB), median of {RUNS} runs",
        WRITES * 4
    );
    println!("{:<28} {:>9} {:>12}", "store", "in flight", "MB/s");
    for in_flight in [1usize, 4, 8] {
        let options = AzureStoreOptions {
            upload_concurrency: in_flight,
            ..Default::default()
        };
        let credentials = Credentials::AccountKey {
            account: "devstoreaccount1".into(),
            key: DEV_KEY.into(),
        };
        let azure = AzureStore::new(
            &format!("http://127.0.0.1:{port}/devstoreaccount1"),
            "bench",
            credentials,
            options,
        )
        .expect("store");
        azure.ensure_container().await.expect("container");
        let mut azure_runs = Vec::new();
        let mut local_runs = Vec::new();
        for r in 0..RUNS {
            azure_runs.push(run(&azure, in_flight, r).await);
            local_runs.push(run(&local, in_flight, r).await);
        }
        println!(
            "{:<28} {:>9} {:>12.0}",
            "azure (Azurite, shared key)",
            in_flight,
            median(azure_runs)
        );
        println!(
            "{:<28} {:>9} {:>12.0}",
            "local folder",
            in_flight,
            median(local_runs)
        );
    }
}
