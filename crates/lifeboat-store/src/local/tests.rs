//! The local store's tests: the conformance suite, direct and buffered writes together,
//! reopening, and torn or damaged undo records.

use super::undo::UNDO_HEADER_BYTES;
use super::*;
use crate::conformance;
use std::fs::OpenOptions;
use std::io::Write;

#[tokio::test]
async fn local_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = LocalStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    conformance::run_all(&store, "conformance").await;
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
