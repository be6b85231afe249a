//! The `hyperv` backend through the [`Hypervisor`] and [`View`] traits, on the
//! [`FakeHyperVHost`] test double; and the replication engine end to end on it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::fake::FakeHyperVHost;
use super::host::{HostError, Missing};
use super::record::{Intent, Record};
use super::{HyperVHypervisor, HyperVOptions};
use lifeboat_engine::backend::{
    BackendError, CloseView, DiskRef, Hypervisor, Quiesce, Tracking, View,
};

const MIB: u64 = 1024 * 1024;

struct Rig {
    dir: tempfile::TempDir,
    host: FakeHyperVHost,
    hv: HyperVHypervisor,
    disks: Vec<DiskRef>,
}

fn rig(disks: &[(&str, u64)]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let host = FakeHyperVHost::new("web1", disks);
    let hv = hypervisor(&host, dir.path());
    Rig {
        disks: disks
            .iter()
            .map(|(name, _)| DiskRef {
                name: (*name).to_owned(),
                path: FakeHyperVHost::image(name),
                node: None,
            })
            .collect(),
        dir,
        host,
        hv,
    }
}

fn hypervisor(host: &FakeHyperVHost, dir: &std::path::Path) -> HyperVHypervisor {
    HyperVHypervisor::with_host(
        "web1",
        Arc::new(host.clone()),
        dir.join("hyperv"),
        HyperVOptions::default(),
    )
}

impl Rig {
    async fn tracking(&self) -> Vec<Tracking> {
        self.hv.tracking(&self.disks).await.unwrap()
    }

    async fn view(&self, cycle: u64) -> Box<dyn View> {
        self.hv
            .open_view(&self.disks, cycle, Quiesce::None)
            .await
            .unwrap()
    }

    fn record(&self) -> Record {
        let path = self.dir.path().join("hyperv").join("web1.hyperv.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }
}

async fn read_all(view: &dyn View, disk: &str, size: u64) -> Vec<u8> {
    view.read(disk, 0, size).await.unwrap().to_vec()
}

#[tokio::test]
async fn start_tracking_cuts_a_base_and_views_count_changes_from_it() {
    let r = rig(&[("os", 8 * MIB), ("data", 4 * MIB)]);
    let infos = r.hv.inspect(&r.disks).await.unwrap();
    assert_eq!(infos[0].size_bytes, 8 * MIB);
    assert_eq!(r.tracking().await, vec![Tracking::Absent, Tracking::Absent]);

    r.hv.start_tracking(&r.disks).await.unwrap();
    assert_eq!(r.tracking().await, vec![Tracking::Active, Tracking::Active]);
    assert_eq!(
        r.host.checkpoint_count(),
        0,
        "the base's checkpoint became a reference point"
    );
    assert_eq!(r.host.reference_point_ids().len(), 1);
    // Idempotent.
    r.hv.start_tracking(&r.disks).await.unwrap();
    assert_eq!(r.host.reference_point_ids().len(), 1);

    r.host.write("os", 3 * MIB, &[0xAB; 4096]);
    r.host.write("data", 0, &[0xCD; 512]);
    let view = r.view(1).await;
    assert_eq!(view.quiesced(), Quiesce::None);
    assert_eq!(
        view.changed_extents("os").await.unwrap(),
        vec![3 * MIB..3 * MIB + 4096]
    );
    assert_eq!(view.changed_extents("data").await.unwrap(), vec![0..512]);

    // The view does not move while the guest writes on.
    let frozen = r.host.data("os");
    r.host.write("os", 3 * MIB, &[0xEE; 4096]);
    assert_eq!(read_all(view.as_ref(), "os", 8 * MIB).await, frozen);
    // Unaligned reads are widened to sectors and cut back.
    assert_eq!(
        view.read("os", 3 * MIB + 100, 10).await.unwrap().to_vec(),
        vec![0xAB; 10]
    );
    assert_eq!(
        view.allocated_extents("os").await.unwrap(),
        vec![3 * MIB..4 * MIB]
    );
    assert!(view.read("os", 8 * MIB - 1, 2).await.is_err());

    let before = r.host.reference_point_ids();
    view.close(CloseView::Commit).await.unwrap();
    let after = r.host.reference_point_ids();
    assert_eq!(after.len(), 1, "the old base is destroyed: {after:?}");
    assert_ne!(after, before);
    assert_eq!(r.host.checkpoint_count(), 0);
    assert_eq!(r.record().disks["os"].reference_point, after[0]);
    assert_eq!(r.record().disks["os"].cycle, 1);

    // The next view has only what was written after the committed one.
    let view = r.view(2).await;
    assert_eq!(
        view.changed_extents("os").await.unwrap(),
        vec![3 * MIB..3 * MIB + 4096]
    );
    assert_eq!(view.changed_extents("data").await.unwrap(), vec![]);
    view.close(CloseView::Commit).await.unwrap();
    let view = r.view(3).await;
    assert_eq!(view.changed_extents("os").await.unwrap(), vec![]);
    view.close(CloseView::Commit).await.unwrap();
    assert_eq!(r.tracking().await, vec![Tracking::Active, Tracking::Active]);
}

#[tokio::test]
async fn an_abandoned_view_leaves_its_changes_to_the_next() {
    let r = rig(&[("os", 4 * MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    r.host.write("os", 0, &[1; 4096]);
    let view = r.view(1).await;
    view.close(CloseView::Abandon).await.unwrap();
    assert_eq!(r.host.checkpoint_count(), 0);
    r.host.write("os", MIB, &[2; 4096]);
    let view = r.view(2).await;
    assert_eq!(
        view.changed_extents("os").await.unwrap(),
        vec![0..4096, MIB..MIB + 4096]
    );
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn an_application_consistent_view_falls_back_to_crash_consistent() {
    let r = rig(&[("os", MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    let view =
        r.hv.open_view(&r.disks, 1, Quiesce::Application)
            .await
            .unwrap();
    assert_eq!(view.quiesced(), Quiesce::Application);
    view.close(CloseView::Commit).await.unwrap();

    r.host.fail_next(
        "create_recovery_checkpoint",
        HostError::Job(Box::new(super::host::JobFailure {
            class: "Msvm_VirtualSystemSnapshotService",
            method: "CreateSnapshot",
            target: "VM web1".into(),
            job: "J".into(),
            state: 10,
            error_code: 32768,
            description: "The VSS writer failed in the guest".into(),
            summary: String::new(),
        })),
    );
    let view =
        r.hv.open_view(&r.disks, 2, Quiesce::Application)
            .await
            .unwrap();
    assert_eq!(view.quiesced(), Quiesce::None);
    view.close(CloseView::Commit).await.unwrap();
    assert!(
        r.host
            .log()
            .iter()
            .any(|l| l == "create_recovery_checkpoint Crash")
    );
}

#[tokio::test]
async fn a_reference_point_that_vanished_means_resync_and_a_new_base() {
    let r = rig(&[("os", MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    r.host.delete_reference_points();
    match &r.tracking().await[0] {
        Tracking::Lost(why) => assert!(why.contains("no longer exists"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A view cannot count from it either (the engine asks tracking() first and resyncs).
    let e =
        r.hv.open_view(&r.disks, 1, Quiesce::None)
            .await
            .unwrap_err();
    assert!(e.to_string().contains("is lost"), "{e}");
    assert_eq!(r.host.checkpoint_count(), 0);
    r.hv.start_tracking(&r.disks).await.unwrap();
    assert_eq!(r.tracking().await, vec![Tracking::Active]);
}

#[tokio::test]
async fn reset_or_disabled_rct_means_resync() {
    let r = rig(&[("os", MIB), ("data", MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    r.host.reset_rct("os");
    r.host.disable_rct("data");
    let t = r.tracking().await;
    assert!(
        matches!(&t[0], Tracking::Lost(why) if why.contains("no longer valid")),
        "{t:?}"
    );
    assert!(
        matches!(&t[1], Tracking::Lost(why) if why.contains("is off")),
        "{t:?}"
    );
}

#[tokio::test]
async fn a_write_behind_rcts_back_fails_the_view_and_means_resync() {
    let r = rig(&[("os", 2 * MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    let view = r.view(1).await;
    view.close(CloseView::Commit).await.unwrap();
    r.host.write_untracked("os", 0, &[9; 512]);
    let e =
        r.hv.open_view(&r.disks, 2, Quiesce::None)
            .await
            .unwrap_err();
    assert!(e.is_recoverable(), "the next cycle resyncs: {e}");
    assert!(e.to_string().contains("data write GUID"), "{e}");
    assert_eq!(
        r.host.checkpoint_count(),
        0,
        "the view's checkpoint is removed"
    );
    assert!(
        matches!(&r.tracking().await[0], Tracking::Lost(why) if why.contains("data write GUID"))
    );
    // A resync starts tracking anew.
    r.hv.start_tracking(&r.disks).await.unwrap();
    assert_eq!(r.tracking().await, vec![Tracking::Active]);
    let view = r.view(3).await;
    assert_eq!(view.changed_extents("os").await.unwrap(), vec![]);
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn a_view_dropped_by_a_crash_is_swept_and_its_changes_kept() {
    let r = rig(&[("os", MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    r.host.write("os", 0, &[7; 4096]);
    let view = r.view(1).await;
    drop(view);
    assert_eq!(r.host.checkpoint_count(), 1);
    // A new process: the record says a view's checkpoint was under way.
    let hv = hypervisor(&r.host, r.dir.path());
    assert_eq!(hv.tracking(&r.disks).await.unwrap(), vec![Tracking::Active]);
    assert_eq!(r.host.checkpoint_count(), 0);
    let view = hv.open_view(&r.disks, 2, Quiesce::None).await.unwrap();
    assert_eq!(view.changed_extents("os").await.unwrap(), vec![0..4096]);
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn a_conversion_finished_before_a_crash_is_adopted() {
    let r = rig(&[("os", MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    r.host.add_foreign_reference_point("THEIRS");
    r.host.write("os", 0, &[7; 4096]);
    let view = r.view(1).await;
    // The agent dies inside close(Commit), after ConvertToReferencePoint and before it
    // recorded the new base: replay the conversion under its recorded intent.
    let mut record = r.record();
    let Some(Intent::Checkpoint {
        checkpoint: Some(cp),
        ..
    }) = record.intent.clone()
    else {
        panic!("no checkpoint intent: {record:?}")
    };
    let known = r.host.reference_point_ids();
    let mut base = record.disks["os"].clone();
    base.rct_id = "rct:os:2".into();
    base.cycle = 1;
    record.intent = Some(Intent::Convert {
        cycle: 1,
        checkpoint: cp.clone(),
        known_reference_points: known,
        bases: [("os".to_owned(), base)].into(),
    });
    std::mem::forget(view);
    let path = r.dir.path().join("hyperv").join("web1.hyperv.json");
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    use super::host::{CheckpointRef, HyperVHost};
    let made = r
        .host
        .convert_to_reference_point(&CheckpointRef {
            instance_id: cp.clone(),
            path: format!("cp:{cp}"),
        })
        .unwrap();

    let hv = hypervisor(&r.host, r.dir.path());
    assert_eq!(hv.tracking(&r.disks).await.unwrap(), vec![Tracking::Active]);
    let record = r.record();
    assert_eq!(
        record.disks["os"].reference_point,
        made.reference_point.instance_id
    );
    let mut left = r.host.reference_point_ids();
    left.sort();
    let mut want = vec![
        made.reference_point.instance_id.clone(),
        "THEIRS".to_owned(),
    ];
    want.sort();
    assert_eq!(
        left, want,
        "the old base is destroyed, the foreign one kept"
    );
    let view = hv.open_view(&r.disks, 2, Quiesce::None).await.unwrap();
    assert_eq!(view.changed_extents("os").await.unwrap(), vec![]);
    view.close(CloseView::Commit).await.unwrap();
}

#[tokio::test]
async fn host_failures_map_to_the_asr_classes() {
    let r = rig(&[("os", MIB)]);
    let missing = DiskRef {
        name: "gone".into(),
        path: r"D:\vm\gone.vhdx".into(),
        node: None,
    };
    let e = r.hv.inspect(&[missing]).await.unwrap_err();
    assert!(matches!(e, BackendError::DiskNotFound { .. }), "{e}");

    r.host.fail_next(
        "create_recovery_checkpoint",
        HostError::Method {
            class: "Msvm_VirtualSystemSnapshotService",
            method: "CreateSnapshot",
            target: "VM web1".into(),
            code: 32774,
        },
    );
    let e = r.hv.start_tracking(&r.disks).await.unwrap_err();
    assert!(e.is_recoverable(), "{e}");
    assert!(e.to_string().contains("32774 (system is in use)"), "{e}");

    r.host.fail_next(
        "create_recovery_checkpoint",
        HostError::Job(Box::new(super::host::JobFailure {
            class: "Msvm_VirtualSystemSnapshotService",
            method: "CreateSnapshot",
            target: "VM web1".into(),
            job: "J".into(),
            state: 10,
            error_code: 32769,
            description: "Access denied".into(),
            summary: String::new(),
        })),
    );
    let e = r.hv.start_tracking(&r.disks).await.unwrap_err();
    assert!(matches!(e, BackendError::Permanent { .. }), "{e}");

    r.hv.start_tracking(&r.disks).await.unwrap();
    r.host.fail_next(
        "open_for_read",
        HostError::VirtualDisk {
            action: "AttachVirtualDisk",
            path: FakeHyperVHost::image("os"),
            code: super::host::codes::ERROR_VHD_PARENT_VHD_NOT_FOUND,
            message: "The system cannot find the parent virtual disk.".into(),
        },
    );
    let view = r.view(1).await;
    let e = view.read("os", 0, 512).await.unwrap_err();
    assert!(
        matches!(e, BackendError::Permanent { .. }),
        "a broken chain: {e}"
    );
    view.close(CloseView::Abandon).await.unwrap();

    r.host.remove_vm();
    let e = r.hv.tracking(&r.disks).await.unwrap_err();
    assert!(matches!(e, BackendError::VmNotFound { .. }), "{e}");
    assert_eq!(e.reason(), "VmNotFound");
    let _ = Missing::Vm;
}

#[tokio::test]
async fn stop_tracking_destroys_the_backends_reference_points_only() {
    let r = rig(&[("os", MIB)]);
    r.host.add_foreign_reference_point("THEIRS");
    r.hv.start_tracking(&r.disks).await.unwrap();
    assert_eq!(r.host.reference_point_ids().len(), 2);
    r.hv.stop_tracking(&r.disks).await.unwrap();
    assert_eq!(r.host.reference_point_ids(), vec!["THEIRS".to_owned()]);
    assert_eq!(r.tracking().await, vec![Tracking::Absent]);
}

/// The replication engine on the Hyper-V backend and the local store: initial replication,
/// delta cycles and a resync after a write behind RCT's back, each recovery point equal to
/// the disk as the view froze it.
#[tokio::test]
async fn the_engine_replicates_a_hyperv_vm_to_the_local_store() {
    use lifeboat_engine::{Replicator, Settings};
    use lifeboat_store::local::LocalStore;
    use lifeboat_store::{At, ReplicaStore, VmKey};

    let r = rig(&[("os", 6 * MIB)]);
    let store = Arc::new(LocalStore::open(r.dir.path().join("store")).unwrap());
    let vm = VmKey::new("tests", "web1").unwrap();
    let settings = Settings {
        copy_interval: Duration::from_secs(30),
        block_size_bytes: 64 * 1024,
        ..Settings::default()
    };
    let mut engine = Replicator::open(
        vm.clone(),
        r.disks.clone(),
        r.dir.path().join("agent"),
        Arc::new(hypervisor(&r.host, r.dir.path())),
        store.clone(),
        settings,
    )
    .await
    .unwrap();
    r.host.write("os", MIB, &[0x11; 64 * 1024]);
    r.host.write("os", 5 * MIB + 4096, &[0x22; 4096]);
    engine.enable().await.unwrap();
    let report = engine.initial_copy(&|_| {}).await.unwrap();
    assert!(
        report.bytes_read <= 2 * MIB,
        "unallocated blocks are skipped: {report:?}"
    );

    let latest = |store: Arc<LocalStore>, vm: VmKey| async move {
        let point = store
            .manifest(&vm)
            .await
            .unwrap()
            .unwrap()
            .latest()
            .unwrap()
            .clone();
        store
            .read(&vm, "os", &At::Point(point.id), 0, 6 * MIB)
            .await
            .unwrap()
            .to_vec()
    };

    r.host.write("os", 2 * MIB, &[0x33; 8192]);
    let report = engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(
        report.point.is_some() && report.resync_required.is_none(),
        "{report:?}"
    );
    assert_eq!(latest(store.clone(), vm.clone()).await, r.host.data("os"));

    r.host.write("os", 0, &[0x44; 512]);
    engine.run_cycle(SystemTime::now()).await.unwrap();
    assert_eq!(latest(store.clone(), vm.clone()).await, r.host.data("os"));

    // Written while tracking was off: the view fails, the next cycle asks for a resync.
    r.host.write_untracked("os", 4 * MIB, &[0x55; 4096]);
    let e = engine.run_cycle(SystemTime::now()).await.unwrap_err();
    assert!(e.is_recoverable(), "{e}");
    let report = engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(report.resync_required.is_some(), "{report:?}");
    engine.resync(SystemTime::now(), &|_| {}).await.unwrap();
    assert_eq!(latest(store.clone(), vm.clone()).await, r.host.data("os"));

    r.host.write("os", 3 * MIB, &[0x66; 4096]);
    let report = engine.run_cycle(SystemTime::now()).await.unwrap();
    assert!(report.resync_required.is_none(), "{report:?}");
    assert_eq!(latest(store, vm).await, r.host.data("os"));
    assert!(r.host.reads() > 0);
}

#[tokio::test]
async fn a_stop_shuts_the_guest_down_or_pauses_one_that_ignores_it() {
    use super::fake::Power;
    use lifeboat_engine::backend::Stopped;
    let r = rig(&[("root", MIB)]);
    r.hv.start_tracking(&r.disks).await.unwrap();
    let how =
        r.hv.stop_vm(&r.disks, Duration::from_millis(10))
            .await
            .unwrap();
    assert_eq!(how, Stopped::GuestShutDown);
    assert_eq!(r.host.stopped(), Some(Power::Off));
    // The last view still opens on a stopped VM (the final cycle of a planned failover).
    let view = r.view(1).await;
    view.close(CloseView::Commit).await.unwrap();
    // Stopping again changes nothing.
    let again =
        r.hv.stop_vm(&r.disks, Duration::from_millis(10))
            .await
            .unwrap();
    assert_eq!(again, Stopped::GuestShutDown);

    let r = rig(&[("root", MIB)]);
    r.host.ignore_shutdown();
    let how =
        r.hv.stop_vm(&r.disks, Duration::from_millis(10))
            .await
            .unwrap();
    assert_eq!(how, Stopped::Paused);
    assert_eq!(r.host.stopped(), Some(Power::Paused));
}
