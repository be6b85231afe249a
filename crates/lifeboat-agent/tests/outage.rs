//! The replica store goes away in the middle of protection: a real Azurite is stopped while
//! the worker replicates a real qemu-storage-daemon disk. Cycles fail with a recoverable error
//! and are retried on ASR's schedule (the copy interval plus 1, 2, 4, 8, 10 minutes, then
//! every 30), driven by a controlled clock; when Azurite is back, the next cycle ships
//! everything and the point equals the source.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lifeboat_core::{ErrorClass, JobKind, JobParams};
use lifeboat_engine::{JobDirs, Worker, run_job};
use lifeboat_store::testing::{Azurite, free_port, shared_key_store, test_options};
use lifeboat_store::{At, ReplicaStore};
use support::Qsd;
use support::engine::{self, settings};

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_backs_off_on_the_asr_schedule_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &[("root", 16 * MIB)]);
    let port = free_port();
    let azurite_data = dir.path().join("azurite");
    std::fs::create_dir_all(&azurite_data).unwrap();
    let mut azurite = Azurite::start_on(port, Some(&azurite_data));
    let store: Arc<dyn ReplicaStore> =
        Arc::new(shared_key_store(&azurite, "replicas", test_options(4)).await);
    let engine = engine::open_engine(
        dir.path(),
        engine::disks(&qsd),
        Arc::new(engine::qemu(&qsd, dir.path())),
        store.clone(),
        settings(),
    )
    .await;
    let vm = engine.vm().clone();
    let mut worker = Worker::new(engine);
    let dirs = JobDirs {
        failover_dir: dir.path().join("failover"),
        original_disks: Vec::new(),
        failover_format: Default::default(),
        seed_dir: None,
    };
    let t0 = SystemTime::now();
    qsd.guest_write("root", 0, MIB, 0x51);
    for kind in [JobKind::EnableProtection, JobKind::FinalizeProtection] {
        run_job(
            worker.engine_mut(),
            kind,
            &JobParams::default(),
            &dirs,
            t0,
            &|_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
    worker.job_finished(t0);
    assert_eq!(worker.next_cycle(), Some(t0 + Duration::from_secs(30)));

    // Azurite goes down; the guest keeps writing.
    azurite.stop();
    qsd.guest_write("root", 4 * MIB, MIB, 0x52);
    let mut now = t0 + Duration::from_secs(30);
    let mut retries = Vec::new();
    for _ in 0..7 {
        let outcome = worker.tick(now).await.expect("a cycle is due");
        let error = outcome.expect_err("the store is down");
        assert!(error.is_recoverable(), "{error}");
        let facts = worker.facts_without_store();
        let last = facts.expect("a last error");
        assert_eq!(last.class, ErrorClass::Recoverable);
        let next = worker.next_cycle().expect("a retry is scheduled");
        assert_eq!(last.next_retry_time, Some(next));
        retries.push(next.duration_since(now).unwrap().as_secs() / 60);
        // Nothing runs before the retry is due.
        assert!(worker.tick(next - Duration::from_secs(1)).await.is_none());
        now = next;
    }
    // 30 s interval + 1, 2, 4, 8, 10 minutes, then 30 (whole minutes shown).
    assert_eq!(retries, [1, 2, 4, 8, 10, 30, 30]);
    assert_eq!(
        worker.engine().state().pending.len(),
        7,
        "every failed cycle's log is kept"
    );

    // Azurite is back: the next cycle ships every pending cycle and the replica is whole.
    let _azurite = Azurite::start_on(port, Some(&azurite_data));
    let report = worker
        .tick(now)
        .await
        .expect("due")
        .unwrap_or_else(|e| panic!("after the outage: {e}"));
    assert!(report.point.is_some());
    assert!(worker.engine().state().pending.is_empty());
    let facts = worker.facts(now).await.unwrap();
    assert_eq!(facts.last_error, None);
    // The clock moved 85 minutes: the last hour holds the last failure and the success.
    assert_eq!((facts.failed_last_hour, facts.succeeded_last_hour), (1, 1));
    assert_eq!((facts.failed_total, facts.succeeded_total), (7, 1));
    let latest = facts.latest_point.unwrap().id;
    let replica = engine::replica(
        store.as_ref(),
        &vm,
        "root",
        qsd.spec("root").size,
        &At::Point(latest),
    )
    .await;
    support::assert_same(
        "the replica after the outage",
        &replica,
        &qsd.read_disk("root"),
    );
}
