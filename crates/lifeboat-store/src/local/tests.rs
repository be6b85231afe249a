//! The local store's tests: the conformance suite, direct and buffered writes together,
//! reopening, and torn or damaged undo records.

use super::undo::UNDO_HEADER_BYTES;
use super::*;
use crate::{MAX_WRITE_BYTES, conformance};
use std::fs::OpenOptions;
use std::io::Write;

#[tokio::test]
async fn local_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    conformance::run_all(&store, "conformance").await;
}

#[tokio::test]
async fn a_fenced_local_writer_changes_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let old = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    // NB: the old writer holds the VM's writer lock throughout: the fence needs no more than
    // a read-only store, as a recovery on another node has.
    let new = LocalStore::open_read_only(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let vm = VmKey::new("ns", "fenced").unwrap_or_else(|e| panic!("{e}"));
    conformance::fencing(&old, &new, &vm).await;
    // A writer that comes back (a restarted agent, its state saying epoch 0) reads, but
    // neither recovers the VM from a crash nor changes anything.
    drop(old);
    let before = std::fs::read(dir.path().join("ns/fenced/manifest.json")).unwrap_or_default();
    let back = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    back.hold_epoch(&vm, 0);
    let manifest = back.manifest(&vm).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(manifest.map(|m| m.epoch.number), Some(2));
    match back.revert_to_latest_point(&vm).await {
        Err(StoreError::Fenced { current: 2, .. }) => {}
        other => panic!("a writer back at epoch 0: {other:?}"),
    }
    let after = std::fs::read(dir.path().join("ns/fenced/manifest.json")).unwrap_or_default();
    assert_eq!(before, after);
}

/// Direct writes, buffered writes over the same pages, undo pre-images read through the
/// page cache, and a reopen: every read sees the last write, and the point keeps its own.
#[tokio::test]
async fn direct_and_buffered_writes_agree() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let vm = VmKey::new("ns", "direct").unwrap_or_else(|e| panic!("{e}"));
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let ok = |r: Result<(), StoreError>| r.unwrap_or_else(|e| panic!("{e}"));
    ok(store.create_disk(&vm, "root", 1 << 20).await);
    let direct = store
        .with_vm(&vm, |state| Ok(state.live_disk("root")?.direct.is_some()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        direct,
        "{} has no direct I/O: this test would not reach the direct path",
        dir.path().display()
    );
    let page = |byte: u8, len: usize| conformance::page_aligned(&vec![byte; len]);
    let mut model = vec![0u8; 1 << 20];
    fn put(model: &mut [u8], at: usize, data: Bytes) -> (u64, Bytes) {
        model[at..at + data.len()].copy_from_slice(&data);
        (at as u64, data)
    }
    // Direct, then a point, then buffered over part of it (the pre-image is read through
    // the cache after a direct write), then direct over the dirty cached page.
    let (at, data) = put(&mut model, 0, page(0xAA, 64 * 1024));
    ok(store.write(&vm, "root", at, data).await);
    let point = store
        .cut_point(
            &vm,
            conformance::Model {
                disks: [("root".to_owned(), model.clone())].into(),
            }
            .point(1, 1, crate::Consistency::CrashConsistent),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let at_point = model.clone();
    let (at, data) = put(&mut model, 4096 + 512, page(0xBB, 4096).slice(..1024));
    ok(store.write(&vm, "root", at, data).await);
    let (at, data) = put(&mut model, 8192, page(0xCC, 8192));
    ok(store.write(&vm, "root", at, data).await);
    let (at, data) = put(&mut model, 4096, page(0xDD, 4096));
    ok(store.write(&vm, "root", at, data).await);
    ok(store.flush(&vm).await);
    conformance::assert_disk(&store, &vm, "root", &At::Live, &model).await;
    conformance::assert_disk(&store, &vm, "root", &At::Point(point.id.clone()), &at_point).await;
    drop(store);
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    conformance::assert_disk(&store, &vm, "root", &At::Live, &model).await;
    conformance::assert_disk(&store, &vm, "root", &At::Point(point.id), &at_point).await;
}

#[tokio::test]
async fn state_survives_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    conformance::survives_reopen(|| LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")))
        .await;
}

#[tokio::test]
async fn a_torn_undo_record_is_cut_and_a_damaged_one_reported() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let vm = VmKey::new("ns", "torn").unwrap_or_else(|e| panic!("{e}"));
    let point = {
        let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        conformance::write_and_cut_then_overwrite(&store, &vm).await
    };
    let segment = dir.path().join("ns/torn/undo/root/000000000001.undo");
    let len = std::fs::metadata(&segment).map(|m| m.len()).unwrap_or(0);
    assert!(len > UNDO_HEADER_BYTES, "the overwrite saved pre-images");

    // A crash while appending leaves a partial record at the end: cut on open, the point
    // still reads what it held for the granules whose records are whole.
    let file = OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap_or_else(|e| panic!("{e}"));
    (&file)
        .write_all(b"LBU1 torn")
        .unwrap_or_else(|e| panic!("{e}"));
    drop(file);
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let data = store
        .read(&vm, "root", &At::Point(point.clone()), 0, 4096)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(data.iter().all(|&b| b == 0xAA));
    assert_eq!(
        std::fs::metadata(&segment).map(|m| m.len()).unwrap_or(0),
        len
    );
    drop(store);

    // Damage inside a record is corruption, reported, never served.
    let mut bytes = std::fs::read(&segment).unwrap_or_default();
    bytes[UNDO_HEADER_BYTES as usize + 10] ^= 0xFF;
    bytes.extend_from_slice(&[0u8; 8192]);
    std::fs::write(&segment, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let error = store
        .read(&vm, "root", &At::Point(point), 0, 4096)
        .await
        .err();
    assert!(
        matches!(error, Some(StoreError::Corrupt { .. })),
        "{error:?}"
    );
    assert!(!error.is_some_and(|e| e.is_recoverable()));
}

const MIB: u64 = 1024 * 1024;

fn ok<T>(result: Result<T, StoreError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Write `fill` over `range` of disk `root`, in the store and in `model`.
async fn put(store: &LocalStore, vm: &VmKey, model: &mut [u8], range: Range<usize>, fill: u8) {
    model[range.clone()].fill(fill);
    let data = conformance::page_aligned(&model[range.clone()]);
    ok(
        store.write(vm, "root", range.start as u64, data).await,
        "write",
    );
}

async fn cut(store: &LocalStore, vm: &VmKey, model: &[u8], time: u64) -> String {
    let point = conformance::Model {
        disks: [("root".to_owned(), model.to_vec())].into(),
    }
    .point(time, time, crate::Consistency::CrashConsistent);
    ok(store.cut_point(vm, point).await, "cut").id
}

/// A VM `ns/<name>` with disk `root` (1 MiB) and two points, each with an undo segment, and
/// live writes after the second: returns the points' ids and contents, and the live content.
async fn two_points(dir: &Path, name: &str) -> (VmKey, Vec<(String, Vec<u8>)>, Vec<u8>) {
    let vm = VmKey::new("ns", name).unwrap_or_else(|e| panic!("{e}"));
    let store = LocalStore::open(dir).unwrap_or_else(|e| panic!("{e}"));
    ok(store.create_disk(&vm, "root", MIB).await, "create");
    let mut model = vec![0u8; MIB as usize];
    put(&store, &vm, &mut model, 0..64 * 1024, 0xAA).await;
    let first = (cut(&store, &vm, &model, 1_000).await, model.clone());
    put(&store, &vm, &mut model, 0..32 * 1024, 0xBB).await;
    put(&store, &vm, &mut model, 128 * 1024..160 * 1024, 0xB2).await;
    let second = (cut(&store, &vm, &model, 2_000).await, model.clone());
    put(&store, &vm, &mut model, 16 * 1024..96 * 1024, 0xCC).await;
    ok(store.flush(&vm).await, "flush");
    (vm, vec![first, second], model)
}

fn append(path: &Path, bytes: &[u8]) {
    let mut file = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(bytes).unwrap_or_else(|e| panic!("{e}"));
}

fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Every file and folder under `dir`: relative path -> length and XXH3 of the content
/// (folders: `None`).
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Option<(u64, u64)>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).unwrap_or_else(|e| panic!("{e}")) {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            if path.is_dir() {
                out.insert(rel, None);
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
                let hash = twox_hash::XxHash3_64::oneshot(&bytes);
                out.insert(rel, Some((bytes.len() as u64, hash)));
            }
        }
    }
    out
}

/// Issue 16, defect 6: a crash while deleting a point appends to an older point's segment; a
/// torn record at its end is cut like one at the end of the latest segment, and every point
/// reads back what it held. A bad record in the middle of it stays corruption.
#[tokio::test]
async fn a_torn_tail_in_an_older_segment_is_cut_and_every_point_reads_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (vm, points, live) = two_points(dir.path(), "older").await;
    let older = dir.path().join("ns/older/undo/root/000000000001.undo");
    let whole = len_of(&older);
    assert!(
        whole > UNDO_HEADER_BYTES,
        "the first point saved pre-images"
    );
    append(&older, b"LBU1 torn by a crash while deleting a point");

    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let manifest = ok(
        store.manifest(&vm).await,
        "manifest after a torn older segment",
    );
    assert_eq!(manifest.map(|m| m.points.len()), Some(2));
    for (id, content) in &points {
        conformance::assert_disk(&store, &vm, "root", &At::Point(id.clone()), content).await;
    }
    conformance::assert_disk(&store, &vm, "root", &At::Live, &live).await;
    assert_eq!(len_of(&older), whole, "the torn record is cut off");
    drop(store);

    // Damage before the last record's worth of the older segment is corruption, reported by
    // every read that needs the segment (the older point's); the segment is opened when
    // first needed, so the newer point, the live disk and the writes that go on do not stop.
    let mut bytes = std::fs::read(&older).unwrap_or_default();
    bytes[UNDO_HEADER_BYTES as usize + 10] ^= 0xFF;
    std::fs::write(&older, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let manifest = ok(store.manifest(&vm).await, "manifest");
    assert_eq!(manifest.map(|m| m.points.len()), Some(2));
    let error = store
        .read(&vm, "root", &At::Point(points[0].0.clone()), 0, 4096)
        .await
        .err();
    assert!(
        matches!(error, Some(StoreError::Corrupt { .. })),
        "{error:?}"
    );
    conformance::assert_disk(
        &store,
        &vm,
        "root",
        &At::Point(points[1].0.clone()),
        &points[1].1,
    )
    .await;
    conformance::assert_disk(&store, &vm, "root", &At::Live, &live).await;
}

/// A batch of scattered writes larger than the pre-images one round reads
/// (`PRESERVE_ROUND_BYTES`), written on several threads, with 512-byte pieces that share
/// granules: the point keeps what it held, the live disk has every piece, also after the
/// store is opened again (its segments opened when first read).
#[tokio::test]
async fn a_large_scattered_batch_keeps_the_point_whole() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let vm = VmKey::new("ns", "scattered").unwrap_or_else(|e| panic!("{e}"));
    let size = 48 * MIB as usize;
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    ok(store.create_disk(&vm, "root", size as u64).await, "create");
    let mut model: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    for at in (0..size).step_by(MAX_WRITE_BYTES as usize) {
        let data = conformance::page_aligned(&model[at..at + MAX_WRITE_BYTES as usize]);
        ok(store.write(&vm, "root", at as u64, data).await, "fill");
    }
    let point = cut(&store, &vm, &model, 1_000).await;
    let at_point = model.clone();
    // Every other 64 KiB block (24 MiB of pre-images), and three pieces inside one granule
    // of a block left alone.
    let mut batch = Vec::new();
    for (i, at) in (0..size).step_by(128 * 1024).enumerate() {
        let data = vec![0xC0 ^ (i as u8); 64 * 1024];
        model[at..at + data.len()].copy_from_slice(&data);
        batch.push((at as u64, conformance::page_aligned(&data)));
    }
    for (at, len) in [
        (65_536 + 512, 512),
        (65_536 + 1536, 1024),
        (65_536 + 3072, 512),
    ] {
        let data = vec![0x5A; len];
        model[at..at + len].copy_from_slice(&data);
        batch.push((at as u64, conformance::page_aligned(&data)));
    }
    ok(store.write_many(&vm, "root", batch).await, "write_many");
    ok(store.flush(&vm).await, "flush");
    conformance::assert_disk(&store, &vm, "root", &At::Point(point.clone()), &at_point).await;
    conformance::assert_disk(&store, &vm, "root", &At::Live, &model).await;
    drop(store);
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    conformance::assert_disk(&store, &vm, "root", &At::Point(point.clone()), &at_point).await;
    conformance::assert_disk(&store, &vm, "root", &At::Live, &model).await;
    // Back to the point: the pre-images put every block back.
    ok(store.revert_to_latest_point(&vm).await, "revert");
    conformance::assert_disk(&store, &vm, "root", &At::Live, &at_point).await;
}

/// Issue 16, defect 4: a read-only open (`lifeboat points` beside the daemon) repairs
/// nothing: an unlisted undo segment and torn tails stay, no byte of the folder changes, and
/// the points read back; a writing open then does the repair.
#[tokio::test]
async fn a_read_only_open_changes_nothing_and_a_writing_open_repairs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (vm, points, live) = two_points(dir.path(), "ro").await;
    let undo = dir.path().join("ns/ro/undo/root");
    let stale = undo.join("000000000099.undo");
    std::fs::write(&stale, b"a segment of a point whose deletion crashed")
        .unwrap_or_else(|e| panic!("{e}"));
    let (older, latest) = (
        undo.join("000000000001.undo"),
        undo.join("000000000002.undo"),
    );
    let whole = (len_of(&older), len_of(&latest));
    append(&older, b"LBU1 torn");
    append(&latest, b"LBU1 torn too");
    let before = snapshot(dir.path());

    let store = LocalStore::open_read_only(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let manifest = ok(store.manifest(&vm).await, "read-only manifest");
    let ids: Vec<String> = manifest
        .map(|m| m.points.into_iter().map(|p| p.id).collect())
        .unwrap_or_default();
    assert_eq!(ids, points.iter().map(|p| p.0.clone()).collect::<Vec<_>>());
    for (id, content) in &points {
        conformance::assert_disk(&store, &vm, "root", &At::Point(id.clone()), content).await;
    }
    conformance::assert_disk(&store, &vm, "root", &At::Live, &live).await;
    let other = VmKey::new("ns", "absent").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ok(store.manifest(&other).await, "manifest of an absent VM"),
        None
    );
    drop(store);
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a read-only open changed the folder"
    );
    // Changes are refused, not made.
    let store = LocalStore::open_read_only(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let refused = store.create_disk(&other, "root", MIB).await.err();
    assert!(
        matches!(refused, Some(StoreError::InvalidRequest { .. })),
        "{refused:?}"
    );
    let refused = store
        .write(&vm, "root", 0, conformance::page_aligned(&[1; 4096]))
        .await
        .err();
    assert!(
        matches!(refused, Some(StoreError::InvalidRequest { .. })),
        "{refused:?}"
    );
    drop(store);
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused change changed the folder"
    );

    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    for (id, content) in &points {
        conformance::assert_disk(&store, &vm, "root", &At::Point(id.clone()), content).await;
    }
    assert!(
        !stale.exists(),
        "a writing open removes the unlisted segment"
    );
    assert_eq!(
        (len_of(&older), len_of(&latest)),
        whole,
        "and cuts torn tails"
    );
}

/// Issue 16, defect 4: a VM is written by one store at a time, across processes and within
/// one (each store opens the lock file itself): the second writer is refused, recoverably,
/// naming the lock file; a read-only store still reads; once the first lets go, the second
/// gets it.
#[tokio::test]
async fn a_second_writer_of_a_vm_is_refused_naming_the_lock_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let vm = VmKey::new("ns", "locked").unwrap_or_else(|e| panic!("{e}"));
    let first = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    ok(first.create_disk(&vm, "root", MIB).await, "create");
    let second = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let error = second
        .manifest(&vm)
        .await
        .err()
        .unwrap_or_else(|| panic!("a second writer loaded a VM another store holds"));
    let message = error.to_string();
    assert!(
        message.contains("VM ns/locked is held by another Lifeboat process (lock file ")
            && message.contains(&dir.path().join("ns/locked").display().to_string()),
        "{message}"
    );
    assert!(error.is_recoverable(), "{error:?}");
    let again = second.create_disk(&vm, "root", MIB).await.err();
    assert!(again.is_some_and(|e| e.is_recoverable()));

    let reader = LocalStore::open_read_only(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let manifest = ok(reader.manifest(&vm).await, "read beside the writer");
    assert_eq!(manifest.map(|m| m.disks.len()), Some(1));

    drop(first);
    let manifest = ok(second.manifest(&vm).await, "manifest once the first let go");
    assert_eq!(manifest.map(|m| m.disks.len()), Some(1));
}
