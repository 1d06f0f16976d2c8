//! Micro-benchmark of the dirty bitmap on a 1 TiB virtual disk at 64 KiB and 512 B
//! granularity. Run with `cargo run --release -p hbitmap --example hbitmap_bench`; prints one
//! table per granularity (~15 s of CPU in total). Figures are indicative, not a timed test.
//!
//! Repeatable measurements report the best of [`REPEAT`] runs, so a busy machine shows
//! the uncontended cost; "cold" rows (first touch of memory) run once.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hbitmap::HBitmap;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Disk size used throughout.
const DISK: u64 = TIB;

/// Runs per repeatable measurement (best one reported).
const REPEAT: usize = 3;

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
    /// `None` for rows that report only a note (memory).
    ns_per_op: Option<f64>,
    note: String,
}

/// Collects rows for one table.
#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    fn time(&mut self, what: impl Into<String>, ops: u64, took: Duration, note: impl Into<String>) {
        self.0.push(Row {
            what: what.into(),
            ns_per_op: Some(took.as_nanos() as f64 / ops.max(1) as f64),
            note: note.into(),
        });
    }

    fn note(&mut self, what: impl Into<String>, note: impl Into<String>) {
        self.0.push(Row {
            what: what.into(),
            ns_per_op: None,
            note: note.into(),
        });
    }

    fn print(&self, title: &str) {
        println!("\n{title}\n");
        println!(
            "| {:<44} | {:>12} | {:<44} |",
            "operation", "ns/op", "notes"
        );
        println!("|{:-<46}|{:->14}|{:-<46}|", "", "", "");
        for r in &self.0 {
            let ns = r.ns_per_op.map_or("-".to_string(), |ns| {
                if ns >= 100_000.0 {
                    format!("{:.2} ms", ns / 1e6)
                } else {
                    format!("{ns:.1}")
                }
            });
            println!("| {:<44} | {:>12} | {:<44} |", r.what, ns, r.note);
        }
    }
}

/// Time of one run of `f`.
fn once(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Best time of [`REPEAT`] runs of `f`.
fn best(f: impl FnMut()) -> Duration {
    best_of(REPEAT, f)
}

/// Best time of `n` runs of `f`.
fn best_of(n: usize, mut f: impl FnMut()) -> Duration {
    (0..n).map(|_| once(&mut f)).min().unwrap_or_default()
}

fn gib_per_s(bytes: u64, took: Duration) -> String {
    format!(
        "{:.0} GiB/s",
        bytes as f64 / GIB as f64 / took.as_secs_f64()
    )
}

fn size(bytes: usize) -> String {
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

fn mark_all(b: &mut HBitmap, offsets: &[u64]) {
    for &off in offsets {
        b.set(off, 4 * KIB);
    }
}

/// Marking costs: random 4 KiB writes (cold, warm, cache-hot, flat baseline), count,
/// sequential 1 MiB writes, reset_all and memory of full / empty bitmaps.
fn bench_marking(gran: u64, offsets: &[u64], t: &mut Table) {
    let n = offsets.len() as u64;
    let mut b = new_bitmap(gran);
    let took = once(|| mark_all(&mut b, offsets));
    let note = format!("first touch; {} dirty after", size(b.count() as usize));
    t.time("set: random 4 KiB write, cold", n, took, note);
    let took = best(|| mark_all(&mut b, offsets));
    t.time("set: random 4 KiB write, warm", n, took, "");

    let mut flat = vec![0u64; (DISK / gran).div_ceil(64) as usize];
    flat_or(&mut flat, offsets, gran);
    let took = best(|| flat_or(&mut flat, offsets, gran));
    t.time(
        "baseline: same writes into a flat [u64]",
        n,
        took,
        "no summaries/count",
    );
    drop(flat);

    let hot: Vec<u64> = offsets.iter().map(|o| o % GIB).collect();
    mark_all(&mut b, &hot);
    let took = best(|| mark_all(&mut b, &hot));
    t.time("set: 4 KiB write within 1 GiB (cache-hot)", n, took, "");

    let took = best(|| {
        let mut sum = 0u64;
        for _ in 0..n {
            sum = sum.wrapping_add(black_box(&b).count());
        }
        black_box(sum);
    });
    t.time("count", n, took, "O(1)");
    drop(b);

    let mut b = new_bitmap(gran);
    let writes = DISK / MIB;
    let seq = |b: &mut HBitmap| {
        for i in 0..writes {
            b.set(i * MIB, MIB);
        }
    };
    let took = once(|| seq(&mut b));
    t.time(
        "set: sequential 1 MiB write, cold",
        writes,
        took,
        gib_per_s(DISK, took),
    );
    b.reset(0, DISK - 1);
    let took = once(|| seq(&mut b));
    t.time(
        "set: sequential 1 MiB write, warm",
        writes,
        took,
        gib_per_s(DISK, took),
    );
    t.note("memory: full bitmap", size(b.memory_usage()));
    let took = once(|| b.reset_all());
    t.time("reset_all of a full bitmap", 1, took, "frees every chunk");
    t.note("memory: empty bitmap", size(b.memory_usage()));
}

/// Iteration, persistence and merge costs on sparse and dense bitmaps.
fn bench_scans(gran: u64, rng: &mut Rng, t: &mut Table) {
    // Whole-bitmap operations on the 256 MiB leaf at 512 B run once to bound the runtime.
    let reps = if gran < 4 * KIB { 1 } else { REPEAT };
    let sparse = random_fill(gran, DISK, 1, rng);
    t.note("memory: sparse 0.1 % bitmap", size(sparse.memory_usage()));
    let runs = sparse.dirty_ranges(0, u64::MAX).count() as u64;
    let took = best(|| {
        black_box(sparse.dirty_ranges(0, u64::MAX).count());
    });
    let note = format!("{runs} runs; {}", gib_per_s(DISK, took));
    t.time("dirty_ranges: sparse 0.1 %, per run", runs, took, note);
    let took = best(|| {
        let mut pos = 0;
        while let Some(o) = sparse.next_dirty(pos, u64::MAX) {
            pos = o + gran;
        }
    });
    t.time(
        "next_dirty loop: sparse 0.1 %, per hit",
        runs,
        took,
        gib_per_s(DISK, took),
    );

    let bytes = sparse.to_bytes();
    let took = best_of(reps, || {
        black_box(sparse.to_bytes());
    });
    t.time(
        "to_bytes: sparse 0.1 %",
        1,
        took,
        format!("{} out", size(bytes.len())),
    );
    let took = best_of(reps, || {
        let mut loaded = new_bitmap(gran);
        loaded.deserialize_part(0, &bytes);
        black_box(loaded);
    });
    t.time(
        "deserialize_part: sparse 0.1 %",
        1,
        took,
        format!("{} in", size(bytes.len())),
    );
    drop(bytes);
    // SHA-256 runs at a fixed byte rate; measured on the 2 MiB leaf only (the 256 MiB
    // one would take seconds and say nothing new).
    if gran >= 4 * KIB {
        let took = best(|| {
            black_box(sparse.qemu_sha256());
        });
        let hashed = sparse.qemu_hash_bytes().len() as u64;
        let note = format!(
            "{:.0} MiB/s",
            hashed as f64 / MIB as f64 / took.as_secs_f64()
        );
        t.time("qemu_sha256: sparse 0.1 %", 1, took, note);
    }

    // Dense: 50 %, coin flip per granule. At 512 B only the first 64 GiB are filled and
    // walked, to keep the run short.
    let dense_bytes = if gran < 4 * KIB { 64 * GIB } else { DISK };
    let dense = random_fill(gran, dense_bytes, 500, rng);
    let runs = dense.dirty_ranges(0, dense_bytes).count() as u64;
    let took = best_of(reps, || {
        black_box(dense.dirty_ranges(0, dense_bytes).count());
    });
    let note = format!(
        "{runs} runs / {} GiB; {}",
        dense_bytes / GIB,
        gib_per_s(dense_bytes, took)
    );
    t.time("dirty_ranges: dense 50 %, per run", runs, took, note);

    let took = best_of(reps, || {
        let mut target = new_bitmap(gran);
        target.merge(&sparse).expect("same size");
        black_box(target);
    });
    t.time("merge: sparse into empty", 1, took, "copies chunks");
    let took = (0..reps)
        .map(|_| {
            let mut target = sparse.clone();
            once(|| target.merge(&dense).expect("same size"))
        })
        .min()
        .unwrap_or_default();
    let note = format!("word OR over {} GiB", dense_bytes / GIB);
    t.time("merge: dense into sparse", 1, took, note);
    let other = if gran == 512 { 64 * KIB } else { 512 };
    let took = once(|| {
        let mut target = new_bitmap(other);
        target.merge(&sparse).expect("same size");
        black_box(target);
    });
    t.time(
        format!("merge: sparse into {other} B granularity"),
        1,
        took,
        "via dirty_ranges",
    );
}

/// Eight bitmaps marked by every 4 KiB write.
fn bench_eight(gran: u64, offsets: &[u64], t: &mut Table) {
    let mut bitmaps: Vec<HBitmap> = (0..8).map(|_| new_bitmap(gran)).collect();
    let mark8 = |bitmaps: &mut Vec<HBitmap>| {
        for &off in offsets {
            for b in bitmaps.iter_mut() {
                b.set(off, 4 * KIB);
            }
        }
    };
    let n = offsets.len() as u64;
    let took = once(|| mark8(&mut bitmaps));
    t.time(
        "8 bitmaps: per 4 KiB write, cold",
        n,
        took,
        "first touch of chunks",
    );
    let took = best(|| mark8(&mut bitmaps));
    t.time("8 bitmaps: per 4 KiB write, warm", n, took, "");
    let total: usize = bitmaps.iter().map(|b| b.memory_usage()).sum();
    t.note(format!("memory: 8 bitmaps after {n} writes"), size(total));
}

/// The same eight bitmaps marked together (`HBitmap::set_in_all`): they share their blocks.
fn bench_eight_together(gran: u64, offsets: &[u64], t: &mut Table) {
    let mut bitmaps: Vec<HBitmap> = (0..8).map(|_| new_bitmap(gran)).collect();
    let mark8 = |bitmaps: &mut Vec<HBitmap>| {
        for &off in offsets {
            HBitmap::set_in_all(bitmaps, |b: &mut HBitmap| Some(b), off, 4 * KIB);
        }
    };
    let n = offsets.len() as u64;
    let took = once(|| mark8(&mut bitmaps));
    t.time(
        "8 bitmaps together: per 4 KiB write, cold",
        n,
        took,
        "set_in_all; blocks shared",
    );
    let took = best(|| mark8(&mut bitmaps));
    t.time("8 bitmaps together: per 4 KiB write, warm", n, took, "");
    let total = HBitmap::memory_usage_together(&bitmaps);
    t.note(
        format!("memory: 8 bitmaps together after {n} writes"),
        size(total),
    );
}

fn main() {
    let start = Instant::now();
    for gran in [64 * KIB, 512] {
        let mut rng = Rng(gran);
        let offsets: Vec<u64> = (0..2_000_000).map(|_| rng.write_offset()).collect();
        let mut t = Table::default();
        bench_marking(gran, &offsets, &mut t);
        bench_scans(gran, &mut rng, &mut t);
        let eight = if gran < 4 * KIB { 100_000 } else { 200_000 };
        bench_eight(gran, &offsets[..eight], &mut t);
        bench_eight_together(gran, &offsets[..eight], &mut t);
        t.print(&format!("1 TiB disk, granularity {gran} B"));
    }
    println!("\ntotal {:.1} s", start.elapsed().as_secs_f64());
}
