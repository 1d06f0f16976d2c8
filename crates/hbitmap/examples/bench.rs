//! Micro-benchmark of the dirty bitmap on a 1 TiB virtual disk at 64 KiB and 512 B
//! granularity. Run with `cargo run --release -p hbitmap --example bench`; prints one
//! table per granularity (~10-20 s in total). Figures are indicative, not a timed test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hbitmap::HBitmap;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Disk size used throughout.
const DISK: u64 = TIB;

/// splitmix64: a small deterministic generator so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A 4 KiB-aligned offset for a 4 KiB write inside the disk.
    fn write_offset(&mut self) -> u64 {
        (self.next() % (DISK / (4 * KIB))) * 4 * KIB
    }
}

/// One table row.
struct Row {
    what: String,
    ns_per_op: f64,
    extra: String,
}

fn row(what: impl Into<String>, ops: u64, took: Duration, extra: impl Into<String>) -> Row {
    Row {
        what: what.into(),
        ns_per_op: took.as_nanos() as f64 / ops.max(1) as f64,
        extra: extra.into(),
    }
}

fn gib_per_s(bytes: u64, took: Duration) -> String {
    format!(
        "{:.1} GiB/s",
        bytes as f64 / GIB as f64 / took.as_secs_f64()
    )
}

fn mib(bytes: usize) -> String {
    if bytes < MIB as usize {
        format!("{:.1} KiB", bytes as f64 / KIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

fn new_bitmap(gran: u64) -> HBitmap {
    HBitmap::new(DISK, gran).expect("valid bitmap")
}

/// A bitmap with `permille`/1000 of the granules of `bytes` (from 0) dirty at random.
fn random_fill(gran: u64, bytes: u64, permille: u64, rng: &mut Rng) -> HBitmap {
    let mut b = new_bitmap(gran);
    let granules = bytes / gran;
    if permille >= 500 {
        // Dense: every bit an independent coin flip, loaded 64 KiB at a time.
        let mut buf = vec![0u8; 64 * KIB as usize];
        let mut g = 0;
        while g < granules {
            for word in buf.chunks_exact_mut(8) {
                word.copy_from_slice(&rng.next().to_le_bytes());
            }
            b.deserialize_part(g, &buf);
            g += buf.len() as u64 * 8;
        }
    } else {
        for _ in 0..granules * permille / 1000 {
            b.set((rng.next() % granules) * gran, 1);
        }
    }
    b
}

/// Marks 4 KiB writes in a flat bit array: the floor any layout pays for random access.
fn flat_or(flat: &mut [u64], offsets: &[u64], gran: u64) {
    for &off in offsets {
        let (g0, g1) = (off / gran, (off + 4 * KIB - 1) / gran);
        for g in g0..=g1 {
            flat[(g / 64) as usize] |= 1 << (g % 64);
        }
    }
    black_box(flat);
}

fn bench_granularity(gran: u64, rows: &mut Vec<Row>) {
    let mut rng = Rng(gran);

    // Marking: random 4 KiB writes (includes first-touch chunk allocations).
    let n = 2_000_000;
    let offsets: Vec<u64> = (0..n).map(|_| rng.write_offset()).collect();
    let mut b = new_bitmap(gran);
    let t = Instant::now();
    for &off in &offsets {
        b.set(off, 4 * KIB);
    }
    let took = t.elapsed();
    rows.push(row(
        "set: random 4 KiB write",
        n,
        took,
        format!("{n} writes, {} dirty after", mib(b.count() as usize)),
    ));
    // The same writes again: every chunk allocated, the pure marking cost.
    let t = Instant::now();
    for &off in &offsets {
        b.set(off, 4 * KIB);
    }
    rows.push(row("set: random 4 KiB, warm", n, t.elapsed(), ""));
    // Floor for comparison: the same writes OR-ed into a flat array (no summaries, no count).
    let granules = DISK / gran;
    let mut flat = vec![0u64; granules.div_ceil(64) as usize];
    flat_or(&mut flat, &offsets, gran); // fault the pages in first
    let t = Instant::now();
    flat_or(&mut flat, &offsets, gran);
    rows.push(row(
        "baseline: flat [u64] OR, same writes",
        n,
        t.elapsed(),
        "",
    ));
    drop(flat);
    // Cache-hot: writes confined to the first 1 GiB, so the cost is instructions, not misses.
    let hot: Vec<u64> = offsets.iter().map(|o| o % GIB).collect();
    for &off in &hot {
        b.set(off, 4 * KIB);
    }
    let t = Instant::now();
    for &off in &hot {
        b.set(off, 4 * KIB);
    }
    rows.push(row(
        "set: 4 KiB write within 1 GiB (cache-hot)",
        n,
        t.elapsed(),
        "",
    ));
    drop(hot);
    let t = Instant::now();
    let mut sum = 0u64;
    for _ in 0..n {
        sum = sum.wrapping_add(black_box(&b).count());
    }
    black_box(sum);
    rows.push(row("count", n, t.elapsed(), "O(1)"));
    drop(b);

    // Marking: sequential 1 MiB writes over the whole disk.
    let mut b = new_bitmap(gran);
    let writes = DISK / MIB;
    let t = Instant::now();
    for i in 0..writes {
        b.set(i * MIB, MIB);
    }
    let took = t.elapsed();
    rows.push(row(
        "set: sequential 1 MiB write",
        writes,
        took,
        gib_per_s(DISK, took),
    ));
    rows.push(row(
        "memory: full bitmap",
        1,
        Duration::ZERO,
        mib(b.memory_usage()),
    ));
    let t = Instant::now();
    b.reset_all();
    rows.push(row("reset_all of full bitmap", 1, t.elapsed(), ""));
    rows.push(row(
        "memory: empty bitmap",
        1,
        Duration::ZERO,
        mib(b.memory_usage()),
    ));
    drop(b);

    // Iteration over a sparse bitmap (0.1 % of granules, whole disk).
    let sparse = random_fill(gran, DISK, 1, &mut rng);
    rows.push(row(
        "memory: sparse 0.1 % bitmap",
        1,
        Duration::ZERO,
        mib(sparse.memory_usage()),
    ));
    let t = Instant::now();
    let runs = sparse.dirty_ranges(0, u64::MAX).count() as u64;
    let took = t.elapsed();
    rows.push(row(
        "dirty_ranges: sparse 0.1 %, per run",
        runs,
        took,
        format!("{runs} runs; {} of disk", gib_per_s(DISK, took)),
    ));
    let t = Instant::now();
    let (mut pos, mut found) = (0, 0u64);
    while let Some(o) = sparse.next_dirty(pos, u64::MAX) {
        found += 1;
        pos = o + gran;
    }
    let took = t.elapsed();
    rows.push(row(
        "next_dirty loop: sparse 0.1 %, per hit",
        found,
        took,
        gib_per_s(DISK, took),
    ));

    // Persistence paths: whole-bitmap serialisation, loading, and QEMU's debug hash.
    let t = Instant::now();
    let bytes = sparse.to_bytes();
    let took = t.elapsed();
    rows.push(row(
        "to_bytes: sparse 0.1 %",
        1,
        took,
        format!("{} out", mib(bytes.len())),
    ));
    let mut loaded = new_bitmap(gran);
    let t = Instant::now();
    loaded.deserialize_part(0, &bytes);
    let took = t.elapsed();
    rows.push(row(
        "deserialize_part: sparse 0.1 %",
        1,
        took,
        format!("{} in", mib(bytes.len())),
    ));
    drop((bytes, loaded));
    let t = Instant::now();
    black_box(sparse.qemu_sha256());
    let took = t.elapsed();
    rows.push(row("qemu_sha256: sparse 0.1 %", 1, took, ""));

    // Iteration over a dense bitmap (50 %, coin flip per granule). At 512 B only the first
    // 64 GiB are filled and walked to keep the run short.
    let dense_bytes = if gran < 4 * KIB { 64 * GIB } else { DISK };
    let dense = random_fill(gran, dense_bytes, 500, &mut rng);
    let t = Instant::now();
    let runs = dense.dirty_ranges(0, dense_bytes).count() as u64;
    let took = t.elapsed();
    rows.push(row(
        "dirty_ranges: dense 50 %, per run",
        runs,
        took,
        format!(
            "{runs} runs over {} GiB; {}",
            dense_bytes / GIB,
            gib_per_s(dense_bytes, took)
        ),
    ));

    // Merge: sparse into empty (chunks copied), dense into sparse (word OR).
    let mut target = new_bitmap(gran);
    let t = Instant::now();
    target.merge(&sparse).expect("same size");
    let took = t.elapsed();
    rows.push(row(
        "merge: sparse into empty",
        1,
        took,
        gib_per_s(DISK, took),
    ));
    let t = Instant::now();
    target.merge(&dense).expect("same size");
    let took = t.elapsed();
    rows.push(row(
        "merge: dense into sparse",
        1,
        took,
        format!("{} GiB dense", dense_bytes / GIB),
    ));
    drop((target, dense));

    // Merge across granularities: the sparse bitmap into one at the other granularity.
    let other = if gran == 512 { 64 * KIB } else { 512 };
    let mut target = new_bitmap(other);
    let t = Instant::now();
    target.merge(&sparse).expect("same size");
    let took = t.elapsed();
    rows.push(row(
        format!("merge: sparse into {other} B gran"),
        1,
        took,
        gib_per_s(DISK, took),
    ));
    drop((target, sparse));

    // Eight bitmaps marked by each 4 KiB write (first pass allocates, second is warm).
    let n = 200_000;
    let mut bitmaps: Vec<HBitmap> = (0..8).map(|_| new_bitmap(gran)).collect();
    for pass in ["cold", "warm"] {
        let t = Instant::now();
        for &off in &offsets[..n as usize] {
            for b in &mut bitmaps {
                b.set(off, 4 * KIB);
            }
        }
        rows.push(row(
            format!("8 bitmaps: per 4 KiB write, {pass}"),
            n,
            t.elapsed(),
            "",
        ));
    }
    let total: usize = bitmaps.iter().map(|b| b.memory_usage()).sum();
    rows.push(row(
        "memory: 8 bitmaps after 200k writes",
        1,
        Duration::ZERO,
        mib(total),
    ));
}

fn main() {
    let start = Instant::now();
    for gran in [64 * KIB, 512] {
        let mut rows = Vec::new();
        bench_granularity(gran, &mut rows);
        println!("\n1 TiB disk, granularity {gran} B");
        println!(
            "| {:<40} | {:>12} | {:<40} |",
            "operation", "ns/op", "notes"
        );
        println!("|{:-<42}|{:->14}|{:-<42}|", "", "", "");
        for r in rows {
            let ns = if r.ns_per_op == 0.0 {
                "-".to_string()
            } else {
                format!("{:.1}", r.ns_per_op)
            };
            println!("| {:<40} | {:>12} | {:<40} |", r.what, ns, r.extra);
        }
    }
    println!("\ntotal {:.1} s", start.elapsed().as_secs_f64());
}
