//! Block maps of the replicas, stored beside them and tagged with what they describe: the
//! id of the recovery point the live replica equals, or an operation in progress. A map whose
//! tag does not match is not trusted; it is rebuilt by reading the replica (the verification
//! pass), never used to skip data.
//!
//! ```text
//!  stored bytes: "LBMT" | tag length (u16 LE) | tag | BlockMap::encode()
//! ```

use bytes::Bytes;

use lifeboat_blockmap::{BlockMap, HashAlgorithm, digest_blocks};
use lifeboat_store::{At, DiskDigest, MAX_WRITE_BYTES, ReplicaStore, VmKey};

use crate::error::EngineError;

const MAGIC: &[u8; 4] = b"LBMT";

/// The tag of a map written during the initial copy.
pub(super) const TAG_COPY: &str = "initial-copy";
/// The tag of a map written during a resync.
pub(super) const TAG_RESYNC: &str = "resync";

pub(super) fn encode(tag: &str, map: &BlockMap) -> Bytes {
    let mut bytes = Vec::with_capacity(6 + tag.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(tag.len() as u16).to_le_bytes());
    bytes.extend_from_slice(tag.as_bytes());
    bytes.extend_from_slice(&map.encode());
    Bytes::from(bytes)
}

/// The tag and the map, or None when the bytes are not a tagged map.
pub(super) fn decode(bytes: &[u8]) -> Option<(String, BlockMap)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let tag = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
    let map = BlockMap::decode(rest.get(2 + len..)?).ok()?;
    Some((tag, map))
}

/// The stored map of `disk` if its tag is one of `trusted` and it has the wanted shape.
pub(super) async fn load_trusted(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    disk: &str,
    size_bytes: u64,
    block_size_bytes: u32,
    trusted: &[&str],
) -> Result<Option<BlockMap>, EngineError> {
    let Some(bytes) = store.block_map(vm, disk).await? else {
        return Ok(None);
    };
    Ok(decode(&bytes).and_then(|(tag, map)| {
        let fits =
            map.image_size_bytes() == size_bytes && map.block_size_bytes() == block_size_bytes;
        (fits && trusted.contains(&tag.as_str())).then_some(map)
    }))
}

/// Build the map of a replica disk by reading it (the verification pass): only the ranges
/// that may hold data are read.
pub(super) async fn hash_replica(
    store: &dyn ReplicaStore,
    vm: &VmKey,
    disk: &str,
    at: &At,
    size_bytes: u64,
    block_size_bytes: u32,
) -> Result<BlockMap, EngineError> {
    let mut map = BlockMap::new_zeroed(HashAlgorithm::default(), block_size_bytes, size_bytes)
        .map_err(|source| EngineError::BlockMap {
            disk: disk.to_owned(),
            source,
        })?;
    let block = u64::from(block_size_bytes);
    let chunk = (MAX_WRITE_BYTES / block).max(1) * block;
    let ranges = align(&store.data_ranges(vm, disk, at).await?, block, size_bytes);
    hash_ranges(
        &mut map,
        disk,
        &ranges,
        chunk,
        |offset, len| async move { Ok(store.read(vm, disk, at, offset, len).await?) },
        |_| {},
    )
    .await?;
    Ok(map)
}

/// Chunks at least this long are hashed on every core; shorter ones on one thread, where
/// starting threads would cost more than it saves.
const PARALLEL_HASH_BYTES: usize = 4 * 1024 * 1024;

/// Hash `ranges` of `disk` (whole blocks, sorted) into `map`, reading them with `read` a
/// `chunk` at a time; `hashed(bytes)` after each chunk, with the bytes so far. Returns the
/// bytes read.
///
/// The next chunk's read is in flight while the current one is hashed on a blocking thread
/// (its blocks spread over the cores): the source never waits for the hashing, and the
/// runtime's threads never hash. The view's resync pass and the replica's verification pass
/// both read through here.
pub(super) async fn hash_ranges<R, F>(
    map: &mut BlockMap,
    disk: &str,
    ranges: &[std::ops::Range<u64>],
    chunk: u64,
    read: R,
    mut hashed: impl FnMut(u64),
) -> Result<u64, EngineError>
where
    R: Fn(u64, u64) -> F,
    F: std::future::Future<Output = Result<Bytes, EngineError>>,
{
    let map_error = |source| EngineError::BlockMap {
        disk: disk.to_owned(),
        source,
    };
    let chunk = chunk.max(1);
    let mut pieces = ranges.iter().flat_map(|r| {
        std::iter::successors(Some(r.start), move |at| Some(at + chunk))
            .take_while(move |at| *at < r.end)
            .map(move |at| (at, chunk.min(r.end - at)))
    });
    let read_next = |next: Option<(u64, u64)>| {
        let read = &read;
        async move {
            match next {
                Some((offset, len)) => Ok(Some((offset, len, read(offset, len).await?))),
                None => Ok::<_, EngineError>(None),
            }
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let (algorithm, block_size_bytes) = (map.algorithm(), map.block_size_bytes());
    let mut done = 0;
    let mut current = read_next(pieces.next()).await?;
    while let Some((offset, len, data)) = current.take() {
        let threads = if data.len() >= PARALLEL_HASH_BYTES {
            cores
        } else {
            1
        };
        let hashing = tokio::task::spawn_blocking(move || {
            digest_blocks(algorithm, block_size_bytes, &data, threads)
        });
        let (next, digests) = tokio::join!(read_next(pieces.next()), hashing);
        let digests = match digests {
            Ok(digests) => digests,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {
                return Err(EngineError::NotReady {
                    what: format!("hashing disk {disk:?} was cancelled: the agent is stopping"),
                });
            }
        };
        map.set_digests(offset, len, &digests).map_err(map_error)?;
        done += len;
        hashed(done);
        current = next?;
    }
    Ok(done)
}

/// The digest the manifest records for a disk.
pub(super) fn digest(map: &BlockMap) -> DiskDigest {
    DiskDigest {
        algorithm: map.algorithm().name().to_owned(),
        block_size_bytes: map.block_size_bytes(),
        fingerprint: format!("{:032x}", map.fingerprint()),
    }
}

/// Ranges widened to whole blocks (the last one may end at the disk's short end), clipped to
/// `size_bytes`, sorted and merged.
pub(super) fn align(
    ranges: &[std::ops::Range<u64>],
    block: u64,
    size_bytes: u64,
) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
    let mut sorted: Vec<_> = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    for r in sorted {
        let start = r.start / block * block;
        let end = r.end.div_ceil(block).saturating_mul(block).min(size_bytes);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_maps_round_trip_and_junk_is_not_a_map() {
        let map = BlockMap::new_zeroed(HashAlgorithm::default(), 65536, 1 << 20)
            .unwrap_or_else(|e| panic!("{e}"));
        let bytes = encode("20261128T000000.000Z-c1", &map);
        assert_eq!(
            decode(&bytes),
            Some(("20261128T000000.000Z-c1".to_owned(), map.clone()))
        );
        assert_eq!(decode(b"LBMT\xff\xff"), None);
        assert_eq!(
            decode(&map.encode()),
            None,
            "an untagged map is not trusted"
        );
    }

    #[test]
    fn ranges_widen_to_blocks_and_merge() {
        assert_eq!(
            align(&[5..10, 4000..4200, 70..80], 4096, 1 << 20),
            vec![0..8192]
        );
        assert_eq!(
            align(&[0..1, 10_000..10_001], 4096, 10_240),
            [0..4096, 8192..10_240]
        );
        assert_eq!(align(&[], 4096, 100), Vec::<std::ops::Range<u64>>::new());
    }
}
