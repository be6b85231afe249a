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
        |pieces| async move { Ok(store.read_many(vm, disk, at, &pieces).await?) },
        |_| {},
    )
    .await?;
    Ok(map)
}

/// Chunks at least this long are hashed on every core; shorter ones on one thread, where
/// starting threads would cost more than it saves.
const PARALLEL_HASH_BYTES: usize = 4 * 1024 * 1024;

/// The most pieces one batch of [`read_batches`] holds.
pub(super) const MAX_BATCH_PIECES: usize = 256;

/// `ranges` cut into pieces of at most `piece` bytes, grouped in order into batches of at
/// most `batch_bytes` and [`MAX_BATCH_PIECES`] pieces (a piece longer than `batch_bytes` is
/// a batch alone): what one pipelined read ([`View::read_many`]) asks for (pure). Blocks
/// scattered over a disk go out together, a large range a piece at a time as before.
///
/// [`View::read_many`]: crate::backend::View::read_many
pub(super) fn read_batches(
    ranges: &[std::ops::Range<u64>],
    piece: u64,
    batch_bytes: u64,
) -> Vec<Vec<(u64, u64)>> {
    let piece = piece.max(1);
    let mut batches: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut bytes = 0;
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let len = piece.min(r.end - at);
            match batches.last_mut() {
                Some(batch) if batch.len() < MAX_BATCH_PIECES && bytes + len <= batch_bytes => {
                    batch.push((at, len));
                    bytes += len;
                }
                _ => {
                    batches.push(vec![(at, len)]);
                    bytes = len;
                }
            }
            at += len;
        }
    }
    batches
}

/// Check that a batched read of `pieces` of `disk` returned each piece whole.
///
/// # Errors
///
/// [`EngineError::NotReady`] naming the first piece that came back short (or missing).
pub(super) fn check_read(
    disk: &str,
    pieces: &[(u64, u64)],
    data: &[Bytes],
) -> Result<(), EngineError> {
    let short = pieces
        .iter()
        .enumerate()
        .find(|(i, (_, len))| data.get(*i).map(|d| d.len() as u64) != Some(*len));
    match short {
        Some((i, (offset, len))) => Err(EngineError::NotReady {
            what: format!(
                "reading {len} bytes at {offset} of disk {disk:?} returned {}",
                data.get(i)
                    .map_or_else(|| "nothing".to_owned(), |d| format!("{} bytes", d.len()))
            ),
        }),
        None => Ok(()),
    }
}

/// Hash `ranges` of `disk` (whole blocks, sorted) into `map`, reading them with `read` a
/// batch of pieces at a time ([`read_batches`], pieces and batches of at most `chunk`);
/// `hashed(bytes)` after each batch, with the bytes so far. Returns the bytes read.
///
/// The next batch's read is in flight while the current one is hashed on a blocking thread
/// (a long piece's blocks spread over the cores): the source never waits for the hashing,
/// and the runtime's threads never hash. The view's resync pass, a failback's comparison
/// and the replica's verification pass all read through here.
pub(super) async fn hash_ranges<R, F>(
    map: &mut BlockMap,
    disk: &str,
    ranges: &[std::ops::Range<u64>],
    chunk: u64,
    read: R,
    mut hashed: impl FnMut(u64),
) -> Result<u64, EngineError>
where
    R: Fn(Vec<(u64, u64)>) -> F,
    F: std::future::Future<Output = Result<Vec<Bytes>, EngineError>>,
{
    let map_error = |source| EngineError::BlockMap {
        disk: disk.to_owned(),
        source,
    };
    let mut batches = read_batches(ranges, chunk, chunk).into_iter();
    /// Read the pieces of batch `next`, if there is one, and check they came back whole.
    async fn read_next<R, F>(
        read: &R,
        disk: &str,
        next: Option<Vec<(u64, u64)>>,
    ) -> Result<Option<(Vec<(u64, u64)>, Vec<Bytes>)>, EngineError>
    where
        R: Fn(Vec<(u64, u64)>) -> F,
        F: std::future::Future<Output = Result<Vec<Bytes>, EngineError>>,
    {
        let Some(pieces) = next else {
            return Ok(None);
        };
        let data = read(pieces.clone()).await?;
        check_read(disk, &pieces, &data)?;
        Ok(Some((pieces, data)))
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let (algorithm, block_size_bytes) = (map.algorithm(), map.block_size_bytes());
    let mut done = 0;
    let mut current = read_next(&read, disk, batches.next()).await?;
    while let Some((pieces, data)) = current.take() {
        let hashing = tokio::task::spawn_blocking(move || {
            data.iter()
                .map(|data| {
                    let threads = if data.len() >= PARALLEL_HASH_BYTES {
                        cores
                    } else {
                        1
                    };
                    digest_blocks(algorithm, block_size_bytes, data, threads)
                })
                .collect::<Vec<_>>()
        });
        let (next, digests) = tokio::join!(read_next(&read, disk, batches.next()), hashing);
        let digests = match digests {
            Ok(digests) => digests,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {
                return Err(EngineError::NotReady {
                    what: format!("hashing disk {disk:?} was cancelled: the agent is stopping"),
                });
            }
        };
        for ((offset, len), digests) in pieces.into_iter().zip(digests) {
            map.set_digests(offset, len, &digests).map_err(map_error)?;
            done += len;
        }
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
    let mut sorted: Vec<_> = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    // NB: widening keeps the order by start.
    crate::backend::merge_ranges(
        sorted
            .into_iter()
            .map(|r| {
                r.start / block * block..r.end.div_ceil(block).saturating_mul(block).min(size_bytes)
            })
            .filter(|r| r.start < r.end),
    )
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
    fn batches_cut_ranges_into_pieces_and_group_them_in_order() {
        // Scattered blocks: many to a batch, up to the byte bound.
        let blocks: Vec<_> = (0..10u64).map(|i| i * 100..i * 100 + 10).collect();
        assert_eq!(
            read_batches(&blocks, 64, 35),
            vec![
                vec![(0, 10), (100, 10), (200, 10)],
                vec![(300, 10), (400, 10), (500, 10)],
                vec![(600, 10), (700, 10), (800, 10)],
                vec![(900, 10)],
            ]
        );
        // A long range: a piece at a time, each alone when it fills a batch; the short last
        // piece shares its batch with the next range.
        assert_eq!(
            read_batches(&[0..150, 200..210], 64, 64),
            vec![vec![(0, 64)], vec![(64, 64)], vec![(128, 22), (200, 10)],]
        );
        // The piece count bound.
        let many: Vec<_> = (0..600u64).map(|i| i * 2..i * 2 + 1).collect();
        let batches = read_batches(&many, 1, u64::MAX);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [
                MAX_BATCH_PIECES,
                MAX_BATCH_PIECES,
                600 - 2 * MAX_BATCH_PIECES
            ]
        );
        assert!(read_batches(&[], 64, 64).is_empty());
    }

    #[test]
    fn a_batched_read_that_comes_back_short_names_the_piece() {
        let pieces = [(0, 4), (4096, 4)];
        let whole = [Bytes::from_static(b"abcd"), Bytes::from_static(b"efgh")];
        assert!(check_read("root", &pieces, &whole).is_ok());
        let short = check_read("root", &pieces, &whole[..1])
            .expect_err("one piece of two came back")
            .to_string();
        assert!(
            short.contains("4 bytes at 4096 of disk \"root\" returned nothing"),
            "{short}"
        );
        let cut = [Bytes::from_static(b"abcd"), Bytes::from_static(b"ef")];
        let short = check_read("root", &pieces, &cut)
            .expect_err("the second piece came back short")
            .to_string();
        assert!(short.contains("returned 2 bytes"), "{short}");
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
