//! The conformance suite every [`ReplicaStore`] passes: the same calls, the same answers, on
//! the local folder and on Azure (Azurite). Each check compares the store with a plain model
//! (the bytes every disk should hold, live and at every point).

use bytes::Bytes;
use std::collections::BTreeMap;

use crate::manifest::{Consistency, DiskDigest};
use crate::{At, MAX_WRITE_BYTES, NewPoint, ReplicaStore, StoreError, VmKey};
use lifeboat_blockmap::{BlockMap, HashAlgorithm};

const MIB: u64 = 1024 * 1024;

/// A deterministic, non-repeating fill.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub(crate) fn digest_of(image: &[u8]) -> DiskDigest {
    let map = BlockMap::from_image(image, 64 * 1024, HashAlgorithm::Xxh3_128)
        .unwrap_or_else(|e| panic!("{e}"));
    DiskDigest {
        algorithm: HashAlgorithm::Xxh3_128.name().to_owned(),
        block_size_bytes: 64 * 1024,
        fingerprint: format!("{:032x}", map.fingerprint()),
    }
}

/// What the store should hold, disk by disk.
#[derive(Clone, Debug, Default)]
pub(crate) struct Model {
    pub(crate) disks: BTreeMap<String, Vec<u8>>,
}

impl Model {
    pub(crate) fn point(
        &self,
        time_unix_ms: u64,
        cycle: u64,
        consistency: Consistency,
    ) -> NewPoint {
        let digests = self
            .disks
            .iter()
            .map(|(name, bytes)| (name.clone(), digest_of(bytes)))
            .collect();
        NewPoint {
            time_unix_ms,
            cycle,
            consistency,
            digests,
            written_by: "node-a/agent".into(),
        }
    }
}

fn ok<T>(result: Result<T, StoreError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn write(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    model: &mut Model,
    disk: &str,
    offset: u64,
    data: Vec<u8>,
) {
    let image = model
        .disks
        .get_mut(disk)
        .unwrap_or_else(|| panic!("no model disk {disk}"));
    image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    ok(
        store.write(vm, disk, offset, page_aligned(&data)).await,
        "write",
    );
}

/// `data` in a buffer that starts on a 4096-byte boundary, as the agent's reads are: with
/// whole pages at page offsets, a store that writes such buffers differently (the local
/// store's direct I/O) takes that path, and the suite's other writes take the other.
pub(crate) fn page_aligned(data: &[u8]) -> Bytes {
    let mut buffer = crate::aligned_buffer(data.len());
    buffer.copy_from_slice(data);
    buffer.freeze()
}

/// Read a whole disk at `at` and compare it with `expected`.
pub(crate) async fn assert_disk(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    disk: &str,
    at: &At,
    expected: &[u8],
) {
    let mut offset = 0;
    while offset < expected.len() as u64 {
        let len = MAX_WRITE_BYTES.min(expected.len() as u64 - offset);
        let got = ok(store.read(vm, disk, at, offset, len).await, "read");
        let want = &expected[offset as usize..(offset + len) as usize];
        if got.as_ref() != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0) as u64 + offset;
            panic!("disk {disk} at {at:?}: first difference at byte {first}");
        }
        offset += len;
    }
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::InvalidRequest { .. }) => {}
        other => panic!("{what}: expected InvalidRequest, got {other:?}"),
    }
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(e @ StoreError::NotFound { .. }) => assert!(!e.is_recoverable()),
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

/// Every check, each on a VM of its own in namespace `ns`.
pub(crate) async fn run_all(store: &dyn ReplicaStore, ns: &str) {
    ok(store.check_writable().await, "check_writable");
    // The VMs of one agent check the store at once.
    for (i, result) in futures::future::join_all((0..16).map(|_| store.check_writable()))
        .await
        .into_iter()
        .enumerate()
    {
        ok(result, &format!("check_writable {i} of 16 at once"));
    }
    disks_and_limits(
        store,
        &VmKey::new(ns, "limits").unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    points_are_immutable(
        store,
        &VmKey::new(ns, "points").unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    deleting_points(
        store,
        &VmKey::new(ns, "delete").unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    revert_and_resize(
        store,
        &VmKey::new(ns, "revert").unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    block_maps_and_vm_deletion(
        store,
        &VmKey::new(ns, "maps").unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    listing_vms(store, ns).await;
}

/// The VMs of `ns` whose names start with `listed-`, as the store lists them.
async fn listed(store: &dyn ReplicaStore, ns: &str) -> Vec<VmKey> {
    ok(store.list_vms().await, "list VMs")
        .into_iter()
        .filter(|k| k.namespace() == ns && k.name().starts_with("listed-"))
        .collect()
}

async fn listing_vms(store: &dyn ReplicaStore, ns: &str) {
    let key = |name: &str| VmKey::new(ns, name).unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (key("listed-a"), key("listed-b"));
    assert_eq!(listed(store, ns).await, Vec::<VmKey>::new());
    // NB: b first: the listing is sorted, whatever the order of creation.
    ok(store.create_disk(&b, "root", MIB).await, "create b");
    ok(store.create_disk(&a, "root", MIB).await, "create a");
    assert_eq!(listed(store, ns).await, vec![a.clone(), b.clone()]);
    // The definition: none until stored, replaced whole, gone with the VM, refused for a VM
    // the store does not hold.
    assert_eq!(ok(store.definition(&a).await, "no definition"), None);
    for text in ["{\"spec\": 1}", "{\"spec\": 2}"] {
        ok(
            store.put_definition(&a, Bytes::from(text)).await,
            "put definition",
        );
        assert_eq!(
            ok(store.definition(&a).await, "definition"),
            Some(Bytes::from(text))
        );
    }
    assert_not_found(
        store
            .put_definition(&key("listed-none"), Bytes::from("{}"))
            .await,
        "a definition for no VM",
    );
    ok(store.delete_vm(&b).await, "delete b");
    assert_eq!(listed(store, ns).await, vec![a.clone()]);
    ok(store.delete_vm(&a).await, "delete a");
    assert_eq!(listed(store, ns).await, Vec::<VmKey>::new());
    assert_eq!(
        ok(store.definition(&a).await, "definition after delete"),
        None
    );
}

async fn disks_and_limits(store: &dyn ReplicaStore, vm: &VmKey) {
    assert_eq!(
        ok(store.manifest(vm).await, "manifest"),
        None,
        "a VM the store never saw has no manifest"
    );
    ok(store.create_disk(vm, "root", 2 * MIB).await, "create");
    ok(
        store.create_disk(vm, "root", 2 * MIB).await,
        "create again, same size: idempotent",
    );
    assert_invalid(
        store.create_disk(vm, "root", 4 * MIB).await,
        "create again, other size",
    );
    assert_invalid(
        store.create_disk(vm, "Root_Disk", MIB).await,
        "a disk name that is not a DNS label",
    );
    assert_invalid(
        store.create_disk(vm, "odd", 1000).await,
        "a size that is not whole pages",
    );
    assert_invalid(
        store.create_disk(vm, "huge", 9 * 1024 * 1024 * MIB).await,
        "a size over 8 TiB",
    );

    assert_invalid(
        store
            .write(vm, "root", 100, Bytes::from(vec![1; 512]))
            .await,
        "an unaligned offset",
    );
    assert_invalid(
        store.write(vm, "root", 0, Bytes::from(vec![1; 700])).await,
        "an unaligned length",
    );
    assert_invalid(
        store
            .write(vm, "root", 0, Bytes::from(vec![1; 4 * MIB as usize + 512]))
            .await,
        "over 4 MiB",
    );
    assert_invalid(
        store
            .write(vm, "root", 2 * MIB - 512, Bytes::from(vec![1; 1024]))
            .await,
        "past the end",
    );
    assert_invalid(
        store.read(vm, "root", &At::Live, 2 * MIB, 512).await,
        "a read past the end",
    );
    assert_not_found(
        store.write(vm, "nope", 0, Bytes::from(vec![1; 512])).await,
        "an unknown disk",
    );
    assert_not_found(
        store
            .read(vm, "root", &At::Point("nope".into()), 0, 512)
            .await,
        "an unknown point",
    );

    let mut model = Model::default();
    model.disks.insert("root".into(), vec![0; 2 * MIB as usize]);
    assert_disk(store, vm, "root", &At::Live, &model.disks["root"]).await;
    write(
        store,
        vm,
        &mut model,
        "root",
        64 * 1024,
        pattern(1, 64 * 1024),
    )
    .await;
    write(store, vm, &mut model, "root", 4096, pattern(2, 512)).await;
    assert_disk(store, vm, "root", &At::Live, &model.disks["root"]).await;

    let ranges = ok(
        store.data_ranges(vm, "root", &At::Live).await,
        "data ranges",
    );
    for written in [64 * 1024..128 * 1024, 4096..4608] {
        assert!(
            ranges
                .iter()
                .any(|r| r.start <= written.start && written.end <= r.end),
            "written range {written:?} missing from {ranges:?}"
        );
    }
    assert!(
        ranges.iter().all(|r| r.end <= MIB),
        "untouched space reported as data: {ranges:?}"
    );
    assert!(
        ranges.windows(2).all(|w| w[0].end < w[1].start),
        "ranges not sorted and disjoint: {ranges:?}"
    );

    // Zeroing a range makes it read as zeros.
    if let Some(d) = model.disks.get_mut("root") {
        d[64 * 1024..96 * 1024].fill(0);
    }
    ok(store.zero(vm, "root", 64 * 1024, 32 * 1024).await, "zero");
    assert_disk(store, vm, "root", &At::Live, &model.disks["root"]).await;
    let manifest =
        ok(store.manifest(vm).await, "manifest").unwrap_or_else(|| panic!("no manifest"));
    assert_eq!(manifest.vm, vm.to_string());
    assert_eq!(manifest.disks.len(), 1);
    assert!(manifest.points.is_empty());
}

/// Write `batch` (offset, data) to disk `root` in one request, in the store and in `model`.
async fn write_many(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    model: &mut Model,
    batch: &[(usize, Vec<u8>)],
    what: &str,
) {
    if let Some(root) = model.disks.get_mut("root") {
        for (offset, data) in batch {
            root[*offset..*offset + data.len()].copy_from_slice(data);
        }
    }
    let writes = batch
        .iter()
        .map(|(offset, data)| (*offset as u64, page_aligned(data)))
        .collect();
    ok(store.write_many(vm, "root", writes).await, what);
}

async fn points_are_immutable(store: &dyn ReplicaStore, vm: &VmKey) {
    let mut model = Model::default();
    for (disk, size) in [("root", 2 * MIB), ("data", MIB)] {
        ok(store.create_disk(vm, disk, size).await, "create");
        model.disks.insert(disk.into(), vec![0; size as usize]);
    }
    write(store, vm, &mut model, "root", 0, pattern(10, MIB as usize)).await;
    write(store, vm, &mut model, "data", 512 * 1024, pattern(11, 4096)).await;
    assert_invalid(
        store
            .cut_point(
                vm,
                NewPoint {
                    digests: BTreeMap::new(),
                    ..model.point(1_000, 1, Consistency::CrashConsistent)
                },
            )
            .await,
        "a point without every disk's digest",
    );
    let a = ok(
        store
            .cut_point(vm, model.point(1_000, 1, Consistency::CrashConsistent))
            .await,
        "cut A",
    );
    let model_a = model.clone();
    // Cut again after a failure that hid the first cut's success (a crash, a lost answer):
    // the same instant and digests are the same point, not an error that wedges the VM...
    let again = ok(
        store
            .cut_point(vm, model.point(1_000, 1, Consistency::CrashConsistent))
            .await,
        "cut A again",
    );
    assert_eq!(again, a, "re-cutting a point returns it as it was cut");
    // ...while other digests under the same id would make it vouch for other data.
    let mut other = model.point(1_000, 1, Consistency::CrashConsistent);
    if let Some(digest) = other.digests.get_mut("root") {
        *digest = digest_of(&pattern(99, 2 * MIB as usize));
    }
    assert_invalid(
        store.cut_point(vm, other).await,
        "the same point id with other digests",
    );
    let listed = ok(store.manifest(vm).await, "manifest").map(|m| m.points.len());
    assert_eq!(listed, Some(1), "re-cutting added no point");

    // Overwrite parts of what A holds, at and off granule boundaries, and zero some.
    write(store, vm, &mut model, "root", 4096, pattern(12, 8192)).await;
    write(store, vm, &mut model, "root", 512, pattern(13, 1024)).await;
    write(store, vm, &mut model, "root", MIB + 512, pattern(14, 2048)).await;
    if let Some(d) = model.disks.get_mut("data") {
        d[512 * 1024..516 * 1024].fill(0);
    }
    ok(store.zero(vm, "data", 512 * 1024, 4096).await, "zero");
    let b = ok(
        store
            .cut_point(vm, model.point(2_000, 2, Consistency::AppConsistent))
            .await,
        "cut B",
    );
    let model_b = model.clone();
    write(store, vm, &mut model, "root", 0, pattern(15, 3 * 4096)).await;
    // Several writes in one request: over granules B still reads from the live file, over
    // one the write before just preserved, across the two disks' sizes' granule boundaries,
    // and one over part of an earlier one in the same request (the later one wins).
    let batch: [(usize, Vec<u8>); 4] = [
        (8192, pattern(16, 8192)),
        (64 * 1024, pattern(17, 64 * 1024)),
        (MIB as usize - 4096, pattern(18, 8192)),
        (12 * 1024, pattern(19, 8192)),
    ];
    write_many(store, vm, &mut model, &batch, "write_many").await;
    // A batch of pieces that do not overlap (a store may write them at once): scattered,
    // and 512-byte pieces sharing granules B still reads from the live file.
    let disjoint: [(usize, Vec<u8>); 5] = [
        (256 * 1024 + 512, pattern(20, 512)),
        (256 * 1024 + 1536, pattern(21, 1024)),
        (320 * 1024, pattern(22, 64 * 1024)),
        (MIB as usize + 64 * 1024, pattern(23, 4096)),
        (256 * 1024 + 3584, pattern(24, 512)),
    ];
    write_many(
        store,
        vm,
        &mut model,
        &disjoint,
        "write_many of disjoint pieces",
    )
    .await;
    assert_invalid(
        store
            .write_many(vm, "root", vec![(2 * MIB, page_aligned(&[1; 4096]))])
            .await,
        "a batch past the disk's end",
    );

    for disk in model.disks.keys() {
        assert_disk(
            store,
            vm,
            disk,
            &At::Point(a.id.clone()),
            &model_a.disks[disk],
        )
        .await;
        assert_disk(
            store,
            vm,
            disk,
            &At::Point(b.id.clone()),
            &model_b.disks[disk],
        )
        .await;
        assert_disk(store, vm, disk, &At::Live, &model.disks[disk]).await;
    }
    // Scattered pieces in one request, each as a read of its own would return: across
    // granules a point reads from undo records and from the live file, off granule boundaries.
    let pieces = [
        (0, 3 * 4096),
        (512, 1024),
        (60 * 1024, 12 * 1024),
        (MIB - 4096, 4096 + 512),
    ];
    for (at, image) in [
        (At::Point(a.id.clone()), &model_a.disks["root"]),
        (At::Point(b.id.clone()), &model_b.disks["root"]),
        (At::Live, &model.disks["root"]),
    ] {
        let got = ok(store.read_many(vm, "root", &at, &pieces).await, "read_many");
        let want: Vec<&[u8]> = pieces
            .iter()
            .map(|&(offset, len)| &image[offset as usize..(offset + len) as usize])
            .collect();
        let got: Vec<&[u8]> = got.iter().map(|d| d.as_ref()).collect();
        assert!(got == want, "read_many at {at:?} differs from the model");
    }
    assert_invalid(
        store
            .read_many(vm, "data", &At::Live, &[(0, 4096), (MIB, 4096)])
            .await,
        "a batch with a piece past the disk's end",
    );
    let ranges_a = ok(
        store
            .data_ranges(vm, "root", &At::Point(a.id.clone()))
            .await,
        "ranges at A",
    );
    assert!(
        ranges_a.iter().any(|r| r.start == 0 && r.end >= MIB),
        "{ranges_a:?}"
    );

    let manifest =
        ok(store.manifest(vm).await, "manifest").unwrap_or_else(|| panic!("no manifest"));
    assert_eq!(
        manifest
            .points
            .iter()
            .map(|p| p.id.clone())
            .collect::<Vec<_>>(),
        [a.id.clone(), b.id.clone()]
    );
    assert_eq!(
        manifest.latest_app_consistent().map(|p| p.id.clone()),
        Some(b.id.clone())
    );
    let point_b = manifest.point(&b.id).unwrap_or_else(|| panic!("B missing"));
    assert_eq!(point_b.disks.len(), 2);
    assert_eq!(
        point_b
            .disks
            .iter()
            .find(|d| d.name == "root")
            .map(|d| d.digest.clone()),
        Some(digest_of(&model_b.disks["root"]))
    );
    assert_eq!(point_b.cycle, 2);
    assert_invalid(
        store
            .read(vm, "data", &At::Point(a.id.clone()), MIB, 512)
            .await,
        "a read past the point's size",
    );
}

async fn deleting_points(store: &dyn ReplicaStore, vm: &VmKey) {
    let mut model = Model::default();
    ok(store.create_disk(vm, "root", MIB).await, "create");
    model.disks.insert("root".into(), vec![0; MIB as usize]);
    let mut points = Vec::new();
    for cycle in 0..4u64 {
        write(
            store,
            vm,
            &mut model,
            "root",
            cycle * 8192,
            pattern(20 + cycle, 16 * 1024),
        )
        .await;
        let p = ok(
            store
                .cut_point(
                    vm,
                    model.point(10_000 + cycle * 1_000, cycle, Consistency::CrashConsistent),
                )
                .await,
            "cut",
        );
        points.push((p.id, model.clone()));
    }
    write(store, vm, &mut model, "root", 0, pattern(30, MIB as usize)).await;

    // A middle point, then the oldest: the others still read as they were.
    ok(
        store.delete_point(vm, &points[1].0).await,
        "delete a middle point",
    );
    ok(
        store.delete_point(vm, &points[1].0).await,
        "delete it again: idempotent",
    );
    for i in [0, 2, 3] {
        assert_disk(
            store,
            vm,
            "root",
            &At::Point(points[i].0.clone()),
            &points[i].1.disks["root"],
        )
        .await;
    }
    ok(
        store.delete_point(vm, &points[0].0).await,
        "delete the oldest",
    );
    for i in [2, 3] {
        assert_disk(
            store,
            vm,
            "root",
            &At::Point(points[i].0.clone()),
            &points[i].1.disks["root"],
        )
        .await;
    }
    assert_not_found(
        store
            .read(vm, "root", &At::Point(points[0].0.clone()), 0, 512)
            .await,
        "a deleted point",
    );
    assert_disk(store, vm, "root", &At::Live, &model.disks["root"]).await;

    // Retention: everything older than 1.5 s before 13.6 s goes, the latest always stays.
    let pruned = ok(store.prune(vm, 1_500, 13_600).await, "prune");
    assert_eq!(pruned, [points[2].0.clone()]);
    let pruned = ok(
        store.prune(vm, 0, 1_000_000).await,
        "prune all but the latest",
    );
    assert!(pruned.is_empty());
    assert_disk(
        store,
        vm,
        "root",
        &At::Point(points[3].0.clone()),
        &points[3].1.disks["root"],
    )
    .await;
}

async fn revert_and_resize(store: &dyn ReplicaStore, vm: &VmKey) {
    let mut model = Model::default();
    ok(store.create_disk(vm, "root", MIB).await, "create");
    model.disks.insert("root".into(), vec![0; MIB as usize]);
    ok(
        store.revert_to_latest_point(vm).await,
        "revert without a point leaves the disk alone",
    );
    write(store, vm, &mut model, "root", 0, pattern(40, 64 * 1024)).await;
    let p = ok(
        store
            .cut_point(vm, model.point(5_000, 1, Consistency::CrashConsistent))
            .await,
        "cut",
    );
    let at_point = model.clone();

    // Half a cycle applied, then a crash: revert puts the live disk back to the point.
    write(store, vm, &mut model, "root", 4096, pattern(41, 32 * 1024)).await;
    write(store, vm, &mut model, "root", 512 * 1024, pattern(42, 4096)).await;
    ok(store.revert_to_latest_point(vm).await, "revert");
    assert_disk(store, vm, "root", &At::Live, &at_point.disks["root"]).await;
    assert_disk(
        store,
        vm,
        "root",
        &At::Point(p.id.clone()),
        &at_point.disks["root"],
    )
    .await;

    // Growing: the point keeps its size and content; the new space reads as zeros.
    ok(store.resize_disk(vm, "root", 2 * MIB).await, "grow");
    let mut grown = at_point.disks["root"].clone();
    grown.resize(2 * MIB as usize, 0);
    assert_disk(store, vm, "root", &At::Live, &grown).await;
    assert_disk(
        store,
        vm,
        "root",
        &At::Point(p.id.clone()),
        &at_point.disks["root"],
    )
    .await;
    // Shrinking below the point's size: the point still reads whole.
    ok(store.resize_disk(vm, "root", MIB / 2).await, "shrink");
    assert_disk(
        store,
        vm,
        "root",
        &At::Live,
        &at_point.disks["root"][..MIB as usize / 2],
    )
    .await;
    assert_disk(
        store,
        vm,
        "root",
        &At::Point(p.id.clone()),
        &at_point.disks["root"],
    )
    .await;
    let manifest =
        ok(store.manifest(vm).await, "manifest").unwrap_or_else(|| panic!("no manifest"));
    assert_eq!(manifest.disk("root").map(|d| d.size_bytes), Some(MIB / 2));
}

async fn block_maps_and_vm_deletion(store: &dyn ReplicaStore, vm: &VmKey) {
    ok(store.create_disk(vm, "root", MIB).await, "create");
    assert_eq!(ok(store.block_map(vm, "root").await, "no map yet"), None);
    let map = BlockMap::new_zeroed(HashAlgorithm::Xxh3_128, 64 * 1024, MIB)
        .unwrap_or_else(|e| panic!("{e}"));
    ok(
        store
            .put_block_map(vm, "root", Bytes::from(map.encode()))
            .await,
        "put map",
    );
    let stored =
        ok(store.block_map(vm, "root").await, "get map").unwrap_or_else(|| panic!("map missing"));
    assert_eq!(BlockMap::decode(&stored).ok(), Some(map));
    ok(store.delete_disk(vm, "root").await, "delete disk");
    ok(
        store.delete_disk(vm, "root").await,
        "delete disk again: idempotent",
    );
    assert_eq!(
        ok(store.manifest(vm).await, "manifest").map(|m| m.disks.len()),
        Some(0)
    );
    ok(store.delete_vm(vm).await, "delete VM");
    assert_eq!(ok(store.manifest(vm).await, "manifest after delete"), None);
}

/// Write, cut a point, overwrite what it holds; returns the point's id. Disk `root` (1 MiB)
/// holds 0xAA in its first 64 KiB at the point.
pub(crate) async fn write_and_cut_then_overwrite(store: &dyn ReplicaStore, vm: &VmKey) -> String {
    let mut model = Model::default();
    ok(store.create_disk(vm, "root", MIB).await, "create");
    model.disks.insert("root".into(), vec![0; MIB as usize]);
    write(store, vm, &mut model, "root", 0, vec![0xAA; 64 * 1024]).await;
    let p = ok(
        store
            .cut_point(vm, model.point(1_000, 1, Consistency::CrashConsistent))
            .await,
        "cut",
    );
    write(store, vm, &mut model, "root", 0, vec![0xBB; 64 * 1024]).await;
    p.id
}

/// A store opened again on the same place sees the same disks, points and data.
pub(crate) async fn survives_reopen<S: ReplicaStore>(open: impl Fn() -> S) {
    let vm = VmKey::new("ns", "reopen").unwrap_or_else(|e| panic!("{e}"));
    let (point, live) = {
        let store = open();
        let point = write_and_cut_then_overwrite(&store, &vm).await;
        ok(store.flush(&vm).await, "flush");
        let live = ok(
            store.read(&vm, "root", &At::Live, 0, MIB).await,
            "read live",
        );
        (point, live)
    };
    let store = open();
    let manifest =
        ok(store.manifest(&vm).await, "manifest").unwrap_or_else(|| panic!("manifest lost"));
    assert_eq!(manifest.points.len(), 1);
    let mut expected = vec![0u8; MIB as usize];
    expected[..64 * 1024].fill(0xAA);
    assert_disk(&store, &vm, "root", &At::Point(point), &expected).await;
    assert_eq!(
        ok(
            store.read(&vm, "root", &At::Live, 0, MIB).await,
            "read live"
        ),
        live
    );
}

fn assert_fenced<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(e @ StoreError::Fenced { .. }) => {
            assert!(!e.is_recoverable(), "{what}: a fence is for good");
            assert_eq!(e.reason(), "Fenced");
        }
        other => panic!("{what}: expected Fenced, got {other:?}"),
    }
}

/// Fencing, with two handles on the same place: `old` replicates VM `vm` under the initial
/// epoch; `new` (another process, another node: for the local store a read-only one, as a
/// recovery beside a writer that still holds the VM opens it) fences it. Every change the
/// old writer asks afterwards is refused, and the replica, its points and its manifest stay
/// as the fence found them. Then a cut and a fence race: exactly the outcomes one would
/// expect of one linear order (the point is in the manifest exactly when its cut returned
/// `Ok`).
pub(crate) async fn fencing(old: &dyn ReplicaStore, new: &dyn ReplicaStore, vm: &VmKey) {
    let mut model = Model::default();
    ok(old.create_disk(vm, "root", MIB).await, "create");
    model.disks.insert("root".into(), vec![0; MIB as usize]);
    old.hold_epoch(vm, 0);
    write(old, vm, &mut model, "root", 0, pattern(40, 64 * 1024)).await;
    let first = ok(
        old.cut_point(vm, model.point(1_000, 1, Consistency::CrashConsistent))
            .await,
        "cut before the fence",
    );
    assert_eq!(
        first.written_by, "node-a/agent",
        "a point says who wrote it"
    );
    assert!(ok(old.epoch(vm).await, "epoch").is_initial());

    let epoch = ok(new.fence(vm, "node-b/agent", 5_000).await, "fence");
    assert_eq!(epoch.number, 1);
    assert_eq!(epoch.holder, "node-b/agent");
    assert_eq!(ok(old.epoch(vm).await, "epoch after the fence"), epoch);
    let before = ok(new.manifest(vm).await, "manifest").unwrap_or_else(|| panic!("no manifest"));
    assert_eq!(before.epoch, epoch, "the manifest shows the epoch");

    assert_fenced(
        old.cut_point(vm, model.point(2_000, 2, Consistency::CrashConsistent))
            .await,
        "a fenced writer's cut",
    );
    assert_fenced(
        old.delete_point(vm, &first.id).await,
        "a fenced writer's prune",
    );
    assert_fenced(old.delete_vm(vm).await, "a fenced writer's delete");
    assert_fenced(
        old.resize_disk(vm, "root", 2 * MIB).await,
        "a fenced writer's resize",
    );
    // NB: data writes may trust a look at the epoch for a second (Azure: one request per
    // write would double them); past it they are refused too.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_fenced(
        old.write(vm, "root", 0, page_aligned(&pattern(41, 4096)))
            .await,
        "a fenced writer's data write",
    );
    assert_fenced(
        old.zero(vm, "root", 0, 4096).await,
        "a fenced writer's zeroing",
    );
    assert_fenced(
        old.put_block_map(vm, "root", Bytes::from_static(b"map"))
            .await,
        "a fenced writer's block map",
    );
    assert_fenced(
        old.write(vm, "root", 0, page_aligned(&pattern(42, 4096)))
            .await,
        "a fenced writer stays fenced",
    );
    let after = ok(new.manifest(vm).await, "manifest").unwrap_or_else(|| panic!("no manifest"));
    assert_eq!(
        after, before,
        "the fenced writer changed nothing of the manifest"
    );
    let mut at_first = vec![0u8; MIB as usize];
    at_first[..64 * 1024].copy_from_slice(&pattern(40, 64 * 1024));
    assert_disk(new, vm, "root", &At::Point(first.id.clone()), &at_first).await;
    assert_disk(new, vm, "root", &At::Live, &at_first).await;

    // A writer at the new epoch races a second fence: one linear order.
    let writer = old;
    writer.hold_epoch(vm, epoch.number);
    let (cut, fence) = tokio::join!(
        writer.cut_point(vm, model.point(3_000, 3, Consistency::CrashConsistent)),
        async {
            loop {
                match new.fence(vm, "node-c/agent", 6_000).await {
                    Err(StoreError::Conflict { .. }) => {}
                    other => break other,
                }
            }
        }
    );
    let fence = ok(fence, "the racing fence");
    assert_eq!(fence.number, 2);
    let manifest = ok(new.manifest(vm).await, "manifest").unwrap_or_else(|| panic!("no manifest"));
    assert_eq!(manifest.epoch, fence);
    let listed = manifest.points.iter().any(|p| p.cycle == 3);
    match cut {
        Ok(_) => assert!(listed, "a cut that returned Ok is in the manifest"),
        Err(StoreError::Fenced { .. } | StoreError::Conflict { .. }) => {
            assert!(!listed, "a refused cut is not in the manifest");
        }
        Err(other) => panic!("the racing cut: {other}"),
    }
    assert_fenced(
        writer
            .cut_point(vm, model.point(4_000, 4, Consistency::CrashConsistent))
            .await,
        "after the second fence",
    );
}
