//! The client against a real server: `qemu-nbd` serving a qcow2 image (qemu-utils), written
//! through the client, read back through it and checked with `qemu-img compare`.
#![cfg(unix)]
#![allow(clippy::unwrap_used)] // a failed unwrap is the test failure report

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use lifeboat_nbd::{BASE_ALLOCATION, NBD_STATE_HOLE, NbdClient, NbdError};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// `qemu-nbd` serving `image` on `socket` as export `disk` (its socket file made: see
/// [`connect`]); it exits when its client leaves.
fn serve(image: &Path, socket: &Path, read_only: bool) -> Child {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "qcow2", "-x", "disk", "-k"])
        .arg(socket)
        .arg(image);
    if read_only {
        cmd.arg("--read-only");
    }
    let mut child = cmd.spawn().unwrap();
    for _ in 0..500 {
        if socket.exists() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-nbd never listened on {}", socket.display());
}

/// A client of the export `disk` on `socket`, asking for `contexts`. NB: qemu-nbd creates
/// its socket file when it binds, before it listens: a connection in between is refused, and
/// tried again (a probe connection would do no good: qemu-nbd exits when its client leaves).
async fn connect(socket: &Path, contexts: &[String]) -> NbdClient {
    for _ in 0..500 {
        match NbdClient::connect_unix(socket, "disk", contexts, TIMEOUT).await {
            Ok(client) => return client,
            Err(NbdError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("connect to {}: {e}", socket.display()),
        }
    }
    panic!(
        "qemu-nbd never accepted a connection on {}",
        socket.display()
    );
}

/// A new empty 64 MiB qcow2 image `disk.qcow2` in `dir`.
fn new_qcow2(dir: &Path) -> PathBuf {
    let image = dir.join("disk.qcow2");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(created.success());
    image
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[tokio::test]
async fn writes_land_in_the_image_and_read_back_and_a_read_only_export_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let image = new_qcow2(dir.path());
    let expected = dir.path().join("expected.raw");
    let socket = dir.path().join("nbd.sock");
    let mut server = serve(&image, &socket, false);
    let mut client = connect(&socket, &[BASE_ALLOCATION.to_owned()]).await;
    assert!(client.is_writable());
    // One write larger than the server's largest request (it is split), one small one at an
    // odd place, and the raw image that should result.
    let big = pattern(7, 40 * MIB);
    let small = pattern(99, 4096);
    client
        .write(8 * MIB, Bytes::from(big.clone()))
        .await
        .unwrap();
    client
        .write(60 * MIB + 512, Bytes::from(small.clone()))
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.read(8 * MIB, 40 * MIB).await.unwrap(), big);
    assert_eq!(client.read(60 * MIB + 512, 4096).await.unwrap(), small);
    let allocation = client
        .block_status(BASE_ALLOCATION, 0, 64 * MIB)
        .await
        .unwrap();
    assert!(
        allocation
            .iter()
            .any(|e| e.range.contains(&(8 * MIB)) && e.flags & NBD_STATE_HOLE == 0),
        "{allocation:?}"
    );
    let past_the_end = client.write(64 * MIB - 10, Bytes::from(vec![1; 20])).await;
    assert!(
        matches!(past_the_end, Err(NbdError::Invalid(_))),
        "{past_the_end:?}"
    );
    client.disconnect().await.unwrap();
    assert!(server.wait().unwrap().success());

    let mut raw = vec![0u8; (64 * MIB) as usize];
    raw[(8 * MIB) as usize..(48 * MIB) as usize].copy_from_slice(&big);
    raw[(60 * MIB + 512) as usize..(60 * MIB + 512 + 4096) as usize].copy_from_slice(&small);
    std::fs::write(&expected, &raw).unwrap();
    let compare = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&image)
        .arg(&expected)
        .status()
        .unwrap();
    assert!(compare.success(), "the image is not what was written");

    std::fs::remove_file(&socket).ok();
    let mut server = serve(&image, &socket, true);
    let mut client = connect(&socket, &[]).await;
    assert!(!client.is_writable());
    let refused = client.write(0, Bytes::from(vec![1; 512])).await;
    assert!(
        matches!(&refused, Err(NbdError::Invalid(m)) if m.contains("read-only")),
        "{refused:?}"
    );
    client.disconnect().await.unwrap();
    assert!(server.wait().unwrap().success());
}

#[tokio::test]
async fn scattered_pieces_go_out_together_and_each_lands_where_it_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    let image = new_qcow2(dir.path());
    let socket = dir.path().join("nbd.sock");
    let mut server = serve(&image, &socket, false);
    let mut client = connect(&socket, &[]).await;
    // 300 scattered 64 KiB blocks (more than one window in flight), one piece larger than
    // the server's largest request, and a zero-length one.
    let mut writes: Vec<(u64, Bytes)> = (0..300u64)
        .map(|i| {
            let offset = (i * 3 + 1) * 64 * 1024;
            (offset, Bytes::from(pattern(i as u8, 64 * 1024)))
        })
        .collect();
    writes.push((60 * MIB - 40 * 1024, Bytes::from(pattern(3, 40 * 1024))));
    writes.push((62 * MIB, Bytes::new()));
    let big = pattern(200, 40 * MIB);
    client.write_many(&writes).await.unwrap();
    client
        .write_many(&[(0, Bytes::from(vec![9u8; 512]))])
        .await
        .unwrap();
    let pieces: Vec<(u64, u64)> = writes
        .iter()
        .map(|(offset, data)| (*offset, data.len() as u64))
        .collect();
    let read = client.read_many(&pieces).await.unwrap();
    assert_eq!(read.len(), writes.len());
    for ((offset, want), got) in writes.iter().zip(&read) {
        assert_eq!(got, want, "the piece at {offset}");
    }
    // A piece split into several requests comes back whole, beside small ones.
    client
        .write(20 * MIB, Bytes::from(big.clone()))
        .await
        .unwrap();
    let read = client
        .read_many(&[(0, 512), (20 * MIB, 40 * MIB), (64 * 1024, 64 * 1024)])
        .await
        .unwrap();
    assert_eq!(read[0], vec![9u8; 512]);
    assert_eq!(read[1], big);
    assert_eq!(read[2], pattern(0, 64 * 1024));
    // One piece past the end refuses the whole batch, and nothing is sent.
    let refused = client.read_many(&[(0, 512), (64 * MIB - 1, 2)]).await;
    assert!(matches!(refused, Err(NbdError::Invalid(_))), "{refused:?}");
    assert_eq!(client.read(0, 512).await.unwrap(), vec![9u8; 512]);
    client.disconnect().await.unwrap();
    assert!(server.wait().unwrap().success());
}
