//! Lifeboat's fixed-block resync against `rsync --inplace --no-whole-file`, on one pair of
//! disk images, plus the figures that chose the hash and the default block size.
//!
//! ```text
//!   cargo bench -p lifeboat-blockmap --bench resync_vs_rsync -- [--size-mib N] [--runs N]
//!         [--parts hash,resync,sweep] [--dir PATH] [--keep]
//! ```
//!
//! (or the environment variables `LIFEBOAT_BENCH_SIZE_MIB`, `LIFEBOAT_BENCH_RUNS`,
//! `LIFEBOAT_BENCH_PARTS`, `LIFEBOAT_BENCH_DIR`). Defaults: a 4096 MiB image, 5 runs, every
//! part, under /var/tmp (a disk, not tmpfs). Results are printed as Markdown tables.
//!
//! The pair: `source.img` is random data; `target.img` is a copy with 1 % of its 64 KiB
//! blocks overwritten with other random data at random places. Before each timed step the
//! changed blocks are written back into the target (and synced, outside the timing), so
//! every step of every run has the same work. The page cache is warm for all steps.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow_free::{BenchResult, fail};
use lifeboat_blockmap::{
    AlignedBuffer, ApplyOptions, BlockMap, HashAlgorithm, HashOptions, ResyncOptions, hash_image,
    is_zero, resync_files, store_map,
};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// A tiny error type so the bench needs no extra dependency.
mod anyhow_free {
    pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;
    pub fn fail(message: impl Into<String>) -> Box<dyn std::error::Error> {
        message.into().into()
    }
}

/// One hash under test, returning a few bits so the work is not optimised away.
type HashFn = Box<dyn Fn(&[u8]) -> u64>;

const CHANGED_BLOCK_BYTES: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;

struct Config {
    size_mib: u64,
    runs: usize,
    parts: Vec<String>,
    dir: PathBuf,
    keep: bool,
}

fn config() -> BenchResult<Config> {
    let env = |name: &str| std::env::var(name).ok();
    let mut size_mib = env("LIFEBOAT_BENCH_SIZE_MIB").unwrap_or_else(|| "4096".into());
    let mut runs = env("LIFEBOAT_BENCH_RUNS").unwrap_or_else(|| "5".into());
    let mut parts = env("LIFEBOAT_BENCH_PARTS").unwrap_or_else(|| "hash,resync,sweep".into());
    let mut dir =
        env("LIFEBOAT_BENCH_DIR").unwrap_or_else(|| "/var/tmp/lifeboat-resync-bench".into());
    let mut keep = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| fail(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--size-mib" => size_mib = value()?,
            "--runs" => runs = value()?,
            "--parts" => parts = value()?,
            "--dir" => dir = value()?,
            "--keep" => keep = true,
            // `cargo bench` passes `--bench`; ignore it and anything else cargo adds.
            _ => {}
        }
    }
    Ok(Config {
        size_mib: size_mib.parse()?,
        runs: runs.parse::<usize>()?.max(1),
        parts: parts.split(',').map(str::to_owned).collect(),
        dir: PathBuf::from(dir),
        keep,
    })
}

fn median(durations: &mut [Duration]) -> Duration {
    durations.sort();
    durations[durations.len() / 2]
}

fn spread(durations: &[Duration]) -> String {
    let min = durations.iter().min().copied().unwrap_or_default();
    let max = durations.iter().max().copied().unwrap_or_default();
    format!("{:.3}–{:.3}", min.as_secs_f64(), max.as_secs_f64())
}

/// CPU seconds used so far by this process and its waited-for children (rsync, cat), from
/// /proc/self/stat (clock ticks of 10 ms). Unlike wall time, this does not move when other
/// work on the machine takes a core away.
fn cpu_seconds() -> BenchResult<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_name = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .ok_or_else(|| fail("unexpected /proc/self/stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14-17 of stat(5) (utime, stime, cutime, cstime); `fields[0]` is field 3.
    let mut ticks = 0u64;
    for index in 11..=14 {
        ticks += fields
            .get(index)
            .ok_or_else(|| fail("short /proc/self/stat"))?
            .parse::<u64>()?;
    }
    Ok(ticks as f64 / 100.0)
}

/// Runs `step`, returning its result and the CPU seconds it used.
fn with_cpu<T>(step: impl FnOnce() -> BenchResult<T>) -> BenchResult<(T, f64)> {
    let before = cpu_seconds()?;
    let result = step()?;
    Ok((result, cpu_seconds()? - before))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

fn median_f64(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

/// Best of `tries` timings of `work` (throughput figures: the best run is the least
/// disturbed by the other builds on this machine).
fn best_of(tries: usize, mut work: impl FnMut()) -> Duration {
    (0..tries)
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn hash_part(config: &Config) -> BenchResult<()> {
    let len = 256 * MIB as usize;
    let mut buffer = AlignedBuffer::new(len);
    SmallRng::seed_from_u64(1).fill_bytes(buffer.as_mut_slice());
    let data = buffer.as_slice();
    let block = CHANGED_BLOCK_BYTES;
    println!(
        "\n### Hash throughput (in memory, {} MiB, 64 KiB blocks)\n",
        len as u64 / MIB
    );
    println!("| what | threads | GB/s |\n|---|---|---|");
    let mut sink = 0u64;
    let rows: Vec<(&str, HashFn)> = vec![
        (
            "xxh3-128, twox-hash 2 (runtime AVX2 dispatch)",
            Box::new(|b| HashAlgorithm::Xxh3_128.hash(b).0[0].into()),
        ),
        (
            "xxh3-128, xxhash-rust (portable build: SSE2)",
            Box::new(|b| xxhash_rust::xxh3::xxh3_128(b) as u64),
        ),
        (
            "blake3-128, blake3 (runtime dispatch)",
            Box::new(|b| HashAlgorithm::Blake3_128.hash(b).0[0].into()),
        ),
        (
            "is_zero on random data (stops at the first stripe)",
            Box::new(|b| u64::from(is_zero(b))),
        ),
    ];
    for (name, hash) in &rows {
        let elapsed = best_of(3, || {
            for chunk in data.chunks(block) {
                sink = sink.wrapping_add(hash(chunk));
            }
        });
        println!(
            "| {name}, from memory | 1 | {:.2} |",
            gbps(len as u64, elapsed)
        );
        // The same 1 MiB, again and again: in L2, so this is the hash's own speed.
        let hot = &data[..MIB as usize];
        let elapsed = best_of(3, || {
            for _ in 0..256 {
                for chunk in hot.chunks(block) {
                    sink = sink.wrapping_add(hash(chunk));
                }
            }
        });
        println!(
            "| {name}, hot in L2 | 1 | {:.2} |",
            gbps(256 * MIB, elapsed)
        );
    }
    let mut zeros = AlignedBuffer::new(len);
    // NB: touch every page, or they all map the kernel's one zero page and stay in L1.
    zeros.as_mut_slice().fill(0);
    let elapsed = best_of(3, || {
        for chunk in zeros.as_slice().chunks(block) {
            sink = sink.wrapping_add(u64::from(is_zero(chunk)));
        }
    });
    println!(
        "| is_zero on zero blocks (whole scan), from memory | 1 | {:.2} |",
        gbps(len as u64, elapsed)
    );
    for algorithm in HashAlgorithm::ALL {
        let elapsed = best_of(3, || {
            if let Ok(map) = BlockMap::from_image_parallel(data, block as u32, algorithm, 2) {
                sink = sink.wrapping_add(map.data_block_count());
            }
        });
        println!(
            "| BlockMap::from_image_parallel, {algorithm} | 2 | {:.2} |",
            gbps(len as u64, elapsed)
        );
    }
    std::hint::black_box(sink);

    // Page-cache reads into aligned and misaligned buffers, and through hash_image.
    std::fs::create_dir_all(&config.dir)?;
    let path = config.dir.join("read-test.img");
    std::fs::write(&path, data)?;
    let file = File::open(&path)?;
    let chunk = MIB as usize;
    let mut aligned = AlignedBuffer::new(chunk);
    let mut plain = vec![0u8; chunk + 64];
    let read_all = |buffer: &mut [u8]| {
        for offset in (0..len).step_by(chunk) {
            let _ = file.read_exact_at(buffer, offset as u64);
        }
    };
    read_all(aligned.as_mut_slice());
    println!(
        "\n### Page-cache reads (1 MiB preads of a cached {} MiB file)\n",
        len as u64 / MIB
    );
    println!("| buffer | threads | GB/s |\n|---|---|---|");
    let elapsed = best_of(5, || read_all(aligned.as_mut_slice()));
    println!(
        "| 4096-aligned (AlignedBuffer) | 1 | {:.2} |",
        gbps(len as u64, elapsed)
    );
    let elapsed = best_of(5, || read_all(&mut plain[..chunk]));
    println!(
        "| plain `vec![0u8; n]` (address mod 4096 = {}) | 1 | {:.2} |",
        plain.as_ptr() as usize % 4096,
        gbps(len as u64, elapsed)
    );
    let elapsed = best_of(5, || read_all(&mut plain[8..8 + chunk]));
    println!(
        "| plain, offset by 8 bytes | 1 | {:.2} |",
        gbps(len as u64, elapsed)
    );
    let image = lifeboat_blockmap::FileImage::open(&path)?;
    for algorithm in HashAlgorithm::ALL {
        for (threads, read_chunk_kib) in [(1, 1024usize), (2, 256), (2, 1024), (2, 4096)] {
            let options = HashOptions {
                block_size_bytes: block as u32,
                algorithm,
                threads,
                read_chunk_bytes: read_chunk_kib * 1024,
            };
            let elapsed = best_of(3, || {
                let _ = hash_image(&image, &options, &mut |_, _| {});
            });
            println!(
                "| hash_image (read + {algorithm}), {read_chunk_kib} KiB reads | {threads} | {:.2} |",
                gbps(len as u64, elapsed)
            );
        }
    }
    std::fs::remove_file(&path)?;
    Ok(())
}

/// The image pair and the changes that make the target differ.
struct Pair {
    source: PathBuf,
    target: PathBuf,
    size_bytes: u64,
    /// (offset, the target's changed content) for every changed block.
    changes: Vec<(u64, Vec<u8>)>,
}

impl Pair {
    fn create(dir: &Path, size_bytes: u64) -> BenchResult<Pair> {
        std::fs::create_dir_all(dir)?;
        let source = dir.join("source.img");
        let target = dir.join("target.img");
        let mut rng = SmallRng::seed_from_u64(42);
        let started = Instant::now();
        let mut file = File::create(&source)?;
        let mut chunk = vec![0u8; 16 * MIB as usize];
        let mut written = 0u64;
        while written < size_bytes {
            let step = (size_bytes - written).min(chunk.len() as u64) as usize;
            rng.fill_bytes(&mut chunk[..step]);
            file.write_all(&chunk[..step])?;
            written += step as u64;
        }
        file.sync_all()?;
        std::fs::copy(&source, &target)?;
        let block_count = size_bytes / CHANGED_BLOCK_BYTES as u64;
        let changed_count = (block_count / 100).max(1);
        let mut chosen = std::collections::BTreeSet::new();
        while (chosen.len() as u64) < changed_count {
            chosen.insert(rng.random_range(0..block_count));
        }
        let changes = chosen
            .into_iter()
            .map(|index| {
                let mut data = vec![0u8; CHANGED_BLOCK_BYTES];
                rng.fill_bytes(&mut data);
                (index * CHANGED_BLOCK_BYTES as u64, data)
            })
            .collect();
        let pair = Pair {
            source,
            target,
            size_bytes,
            changes,
        };
        pair.restore_target()?;
        eprintln!(
            "created the pair ({} MiB, {} changed blocks) in {:.1} s",
            size_bytes / MIB,
            pair.changes.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(pair)
    }

    /// Puts the changed blocks back into the target and syncs it.
    fn restore_target(&self) -> BenchResult<()> {
        let file = OpenOptions::new().write(true).open(&self.target)?;
        file.set_len(self.size_bytes)?;
        for (offset, data) in &self.changes {
            file.write_all_at(data, *offset)?;
        }
        file.sync_all()?;
        Ok(())
    }

    fn changed_bytes(&self) -> u64 {
        (self.changes.len() * CHANGED_BLOCK_BYTES) as u64
    }

    fn warm_cache(&self) -> BenchResult<()> {
        cat(&[&self.source, &self.target])?;
        Ok(())
    }
}

fn cat(paths: &[&Path]) -> BenchResult<Duration> {
    let started = Instant::now();
    let status = Command::new("cat")
        .args(paths)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        return Err(fail(format!("cat failed: {status}")));
    }
    Ok(started.elapsed())
}

struct RsyncRun {
    elapsed: Duration,
    literal_bytes: u64,
    sent_bytes: u64,
}

fn parse_stat(stats: &str, label: &str) -> BenchResult<u64> {
    let line = stats
        .lines()
        .find(|line| line.trim_start().starts_with(label))
        .ok_or_else(|| fail(format!("rsync --stats has no {label:?}")))?;
    let digits: String = line[label.len()..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    Ok(digits.parse()?)
}

fn rsync(pair: &Pair) -> BenchResult<RsyncRun> {
    let started = Instant::now();
    let output = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(&pair.source)
        .arg(&pair.target)
        .output()?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        return Err(fail(format!(
            "rsync failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let stats = String::from_utf8_lossy(&output.stdout);
    Ok(RsyncRun {
        elapsed,
        literal_bytes: parse_stat(&stats, "Literal data:")?,
        sent_bytes: parse_stat(&stats, "Total bytes sent:")?,
    })
}

fn resync_options(
    block_size_bytes: u32,
    algorithm: HashAlgorithm,
    dir: &Path,
    stored_map: bool,
) -> ResyncOptions {
    ResyncOptions {
        hash: HashOptions {
            block_size_bytes,
            algorithm,
            ..HashOptions::default()
        },
        apply: ApplyOptions {
            // NB: rsync does not fsync either; durability costs are the same for both and
            // are left out of both.
            sync_target: false,
            ..ApplyOptions::default()
        },
        target_map_path: stored_map.then(|| dir.join("target.map")),
        cursor_path: Some(dir.join("target.cursor")),
        verify_target: false,
    }
}

struct ResyncRun {
    elapsed: Duration,
    copied_bytes: u64,
    ranges: usize,
    hash_source: Duration,
    hash_target: Duration,
    apply: Duration,
}

fn lifeboat(pair: &Pair, options: &ResyncOptions) -> BenchResult<ResyncRun> {
    let started = Instant::now();
    let report = resync_files(&pair.source, &pair.target, options, &mut |_| {})?;
    let elapsed = started.elapsed();
    Ok(ResyncRun {
        elapsed,
        copied_bytes: report.applied.copied_bytes,
        ranges: report.planned_ranges,
        hash_source: report.hash_source_duration,
        hash_target: report.hash_target_duration,
        apply: report.apply_duration,
    })
}

fn check_equal(pair: &Pair) -> BenchResult<()> {
    let (source, target) = (File::open(&pair.source)?, File::open(&pair.target)?);
    let (mut a, mut b) = (
        AlignedBuffer::new(4 * MIB as usize),
        AlignedBuffer::new(4 * MIB as usize),
    );
    let mut offset = 0;
    while offset < pair.size_bytes {
        let step = (pair.size_bytes - offset).min(4 * MIB) as usize;
        source.read_exact_at(&mut a.as_mut_slice()[..step], offset)?;
        target.read_exact_at(&mut b.as_mut_slice()[..step], offset)?;
        if a.as_slice()[..step] != b.as_slice()[..step] {
            return Err(fail(format!(
                "target differs from source near offset {offset}"
            )));
        }
        offset += step as u64;
    }
    Ok(())
}

fn resync_part(config: &Config, pair: &Pair) -> BenchResult<()> {
    let dir = &config.dir;
    let block = lifeboat_blockmap::DEFAULT_BLOCK_SIZE_BYTES;
    // The stored map of the (restored) target, as the production path keeps it.
    let target_map = hash_image(
        &lifeboat_blockmap::FileImage::open(&pair.target)?,
        &HashOptions {
            block_size_bytes: block,
            ..HashOptions::default()
        },
        &mut |_, _| {},
    )?;
    let hashing_both = resync_options(block, HashAlgorithm::Xxh3_128, dir, false);
    let stored = resync_options(block, HashAlgorithm::Xxh3_128, dir, true);
    let blake = resync_options(block, HashAlgorithm::Blake3_128, dir, false);
    pair.warm_cache()?;

    let (mut a, mut b, mut a_blake, mut c, mut d) = (vec![], vec![], vec![], vec![], vec![]);
    // CPU seconds per step: (a), (b), (a'), (c), (d).
    let mut cpu: [Vec<f64>; 5] = Default::default();
    let mut last = None;
    let mut rsync_last = None;
    for run in 0..config.runs {
        pair.restore_target()?;
        let load = load_average();
        let (lifeboat_a, cpu_a) = with_cpu(|| lifeboat(pair, &hashing_both))?;
        if run == 0 {
            check_equal(pair)?;
        }
        pair.restore_target()?;
        store_map(&dir.join("target.map"), &target_map, false)?;
        let (lifeboat_b, cpu_b) = with_cpu(|| lifeboat(pair, &stored))?;
        if run == 0 {
            check_equal(pair)?;
        }
        pair.restore_target()?;
        let (lifeboat_blake, cpu_blake) = with_cpu(|| lifeboat(pair, &blake))?;
        pair.restore_target()?;
        let (rsync_run, cpu_rsync) = with_cpu(|| rsync(pair))?;
        if run == 0 {
            check_equal(pair)?;
        }
        let (floor, cpu_floor) = with_cpu(|| cat(&[&pair.source, &pair.target]))?;
        eprintln!(
            "run {run} (load average {load}): resync {:.3} s (hash source {:.3}, target {:.3}, apply {:.3}), stored map {:.3} s, blake3 {:.3} s, rsync {:.3} s, floor {:.3} s; cpu s: {cpu_a:.2} {cpu_b:.2} {cpu_blake:.2} {cpu_rsync:.2} {cpu_floor:.2}",
            lifeboat_a.elapsed.as_secs_f64(),
            lifeboat_a.hash_source.as_secs_f64(),
            lifeboat_a.hash_target.as_secs_f64(),
            lifeboat_a.apply.as_secs_f64(),
            lifeboat_b.elapsed.as_secs_f64(),
            lifeboat_blake.elapsed.as_secs_f64(),
            rsync_run.elapsed.as_secs_f64(),
            floor.as_secs_f64()
        );
        a.push(lifeboat_a.elapsed);
        b.push(lifeboat_b.elapsed);
        a_blake.push(lifeboat_blake.elapsed);
        c.push(rsync_run.elapsed);
        d.push(floor);
        for (series, value) in cpu
            .iter_mut()
            .zip([cpu_a, cpu_b, cpu_blake, cpu_rsync, cpu_floor])
        {
            series.push(value);
        }
        last = Some((lifeboat_a, lifeboat_b));
        rsync_last = Some(rsync_run);
    }
    let (Some((lifeboat_a, lifeboat_b)), Some(rsync_run)) = (last, rsync_last) else {
        return Err(fail("no runs"));
    };
    let spreads = [
        spread(&a),
        spread(&b),
        spread(&a_blake),
        spread(&c),
        spread(&d),
    ];
    let (ma, mb, ma_blake, mc, md) = (
        median(&mut a),
        median(&mut b),
        median(&mut a_blake),
        median(&mut c),
        median(&mut d),
    );
    println!(
        "\n### Resync vs rsync ({} MiB pair, {} changed 64 KiB blocks = {} bytes, {} runs)\n",
        pair.size_bytes / MIB,
        pair.changes.len(),
        pair.changed_bytes(),
        config.runs
    );
    println!("| step | median s | min–max s | data sent (bytes) |\n|---|---|---|---|");
    println!(
        "| (a) Lifeboat resync, hashing both images (xxh3-128, 64 KiB) | {:.3} | {} | {} ({} ranges) |",
        ma.as_secs_f64(),
        spreads[0],
        lifeboat_a.copied_bytes,
        lifeboat_a.ranges
    );
    println!(
        "| (b) Lifeboat resync, target map stored (only the source is read) | {:.3} | {} | {} |",
        mb.as_secs_f64(),
        spreads[1],
        lifeboat_b.copied_bytes
    );
    println!(
        "| (a') as (a) with blake3-128 | {:.3} | {} | {} |",
        ma_blake.as_secs_f64(),
        spreads[2],
        lifeboat_a.copied_bytes
    );
    println!(
        "| (c) rsync --inplace --no-whole-file | {:.3} | {} | literal {} / total sent {} |",
        mc.as_secs_f64(),
        spreads[3],
        rsync_run.literal_bytes,
        rsync_run.sent_bytes
    );
    println!(
        "| (d) floor: cat source target > /dev/null | {:.3} | {} | – |",
        md.as_secs_f64(),
        spreads[4]
    );
    let [cpu_a, cpu_b, cpu_blake, cpu_rsync, cpu_floor] =
        cpu.map(|mut series| median_f64(&mut series));
    println!(
        "\nCPU seconds (this process and its children), medians: (a) {cpu_a:.2}, (b) {cpu_b:.2}, (a') {cpu_blake:.2}, (c) rsync {cpu_rsync:.2}, (d) floor {cpu_floor:.2}; rsync / (a) {:.1}x",
        cpu_rsync / cpu_a
    );
    let ratio = |x: Duration, y: Duration| x.as_secs_f64() / y.as_secs_f64();
    println!("\n| ratio | value | target |\n|---|---|---|");
    println!("| rsync / (a) | {:.1}x | ≥ 8x |", ratio(mc, ma));
    println!("| rsync / (b) | {:.1}x | ≥ 8x |", ratio(mc, mb));
    println!("| (a) / floor | {:.2}x | ≤ 1.6x |", ratio(ma, md));
    println!("| (b) / floor | {:.2}x | ≤ 1.6x |", ratio(mb, md));
    println!(
        "| (a) bytes sent / changed bytes | {:.3} | ≤ 1 |",
        lifeboat_a.copied_bytes as f64 / pair.changed_bytes() as f64
    );
    Ok(())
}

fn sweep_part(config: &Config, pair: &Pair) -> BenchResult<()> {
    println!(
        "\n### Block-size sweep (1 % of 64 KiB blocks changed; resync hashing both images, xxh3-128, {} rounds)\n",
        config.runs
    );
    println!(
        "| block size | median s | data sent (bytes) | sent / changed | ranges | map size (bytes) |\n|---|---|---|---|---|---|"
    );
    pair.warm_cache()?;
    let block_sizes_kib = [16u32, 64, 256, 1024];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); block_sizes_kib.len()];
    let mut last: Vec<Option<ResyncRun>> = block_sizes_kib.iter().map(|_| None).collect();
    // NB: rounds interleave the block sizes, so that a burst of load from elsewhere on the
    // machine spreads over all of them instead of skewing one.
    for _ in 0..config.runs {
        for (index, block_kib) in block_sizes_kib.iter().enumerate() {
            let options = resync_options(
                block_kib * 1024,
                HashAlgorithm::Xxh3_128,
                &config.dir,
                false,
            );
            pair.restore_target()?;
            let run = lifeboat(pair, &options)?;
            times[index].push(run.elapsed);
            last[index] = Some(run);
        }
    }
    for (index, block_kib) in block_sizes_kib.iter().enumerate() {
        let Some(run) = &last[index] else { continue };
        let options = resync_options(
            block_kib * 1024,
            HashAlgorithm::Xxh3_128,
            &config.dir,
            false,
        );
        let map = hash_image(
            &lifeboat_blockmap::FileImage::open(&pair.source)?,
            &options.hash,
            &mut |_, _| {},
        )?;
        println!(
            "| {block_kib} KiB | {:.3} | {} | {:.2} | {} | {} |",
            median(&mut times[index]).as_secs_f64(),
            run.copied_bytes,
            run.copied_bytes as f64 / pair.changed_bytes() as f64,
            run.ranges,
            map.encode().len()
        );
    }
    Ok(())
}

fn main() -> BenchResult<()> {
    let config = config()?;
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")?
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split(':').nth(1))
            .unwrap_or("?")
            .trim()
    );
    if config.parts.iter().any(|part| part == "hash") {
        hash_part(&config)?;
    }
    let wants_pair = config
        .parts
        .iter()
        .any(|part| part == "resync" || part == "sweep");
    if wants_pair {
        let pair = Pair::create(&config.dir, config.size_mib * MIB)?;
        let result = (|| -> BenchResult<()> {
            if config.parts.iter().any(|part| part == "resync") {
                resync_part(&config, &pair)?;
            }
            if config.parts.iter().any(|part| part == "sweep") {
                sweep_part(&config, &pair)?;
            }
            Ok(())
        })();
        if !config.keep {
            for name in ["source.img", "target.img", "target.map", "target.cursor"] {
                let _ = std::fs::remove_file(config.dir.join(name));
            }
            let _ = std::fs::remove_dir(&config.dir);
        }
        result?;
    }
    Ok(())
}
