//! Micro benchmark: sequential and random 4 KiB / 64 KiB I/O on a 1 GiB image, in process,
//! next to the same pattern on the raw file as a baseline.
//!
//! `cargo run --release -p qcow2 --example qcow2_bench [DIR]` (default DIR: /dev/shm).

use std::sync::Arc;
use std::time::Instant;

use qcow2::{CreateOptions, FileStorage, OpenOptions, Qcow2, Storage};

const SIZE: u64 = 1 << 30;

/// Anything that can do positioned guest I/O.
trait Disk: Send + Sync {
    fn read(&self, buf: &mut [u8], off: u64);
    fn write(&self, buf: &[u8], off: u64);
}

impl Disk for Qcow2 {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.read_at(buf, off).expect("read");
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.write_at(buf, off).expect("write");
    }
}

impl Disk for FileStorage {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.read_at(buf, off).expect("read");
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.write_at(buf, off).expect("write");
    }
}

/// xorshift
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Run `ops` requests of `bs` bytes on `threads` threads; returns (MiB/s, kIOPS).
fn run(
    disk: &Arc<dyn Disk>,
    bs: usize,
    ops: u64,
    random: bool,
    write: bool,
    threads: u64,
) -> (f64, f64) {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut buf = vec![(t as u8) | 1; bs];
                let mut seed = 0x1234_5678_9abc_def1 ^ (t + 1);
                let blocks = SIZE / bs as u64;
                for i in 0..ops / threads {
                    let blk = if random {
                        next(&mut seed) % blocks
                    } else {
                        (i * threads + t) % blocks
                    };
                    if write {
                        disk.write(&buf, blk * bs as u64);
                    } else {
                        disk.read(&mut buf, blk * bs as u64);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("bench thread");
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = (ops / threads * threads) as f64 * bs as f64;
    (bytes / secs / (1 << 20) as f64, ops as f64 / secs / 1000.0)
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/dev/shm".into());
    let qpath = format!("{dir}/qcow2-bench-{}.qcow2", std::process::id());
    let rpath = format!("{dir}/qcow2-bench-{}.raw", std::process::id());
    let st = Arc::new(FileStorage::create(&qpath).expect("create"));
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .expect("create image");
    let q: Arc<dyn Disk> = Arc::new(Qcow2::open(st, OpenOptions::default()).expect("open"));
    let raw = FileStorage::create(&rpath).expect("create raw");
    raw.truncate(SIZE).expect("truncate");
    let r: Arc<dyn Disk> = Arc::new(raw);

    println!(
        "{:<34} {:>10} {:>8} | {:>10} {:>8}",
        "1 GiB, 64 KiB clusters", "qcow2MiB/s", "kIOPS", "raw MiB/s", "kIOPS"
    );
    let cases: [(&str, usize, u64, bool, bool, u64); 8] = [
        (
            "seq write 64K (allocating)",
            65536,
            SIZE / 65536,
            false,
            true,
            1,
        ),
        ("seq read 64K", 65536, SIZE / 65536, false, false, 1),
        ("rand read 4K", 4096, 200_000, true, false, 1),
        ("rand read 4K, 4 threads", 4096, 400_000, true, false, 4),
        ("rand write 4K (in place)", 4096, 200_000, true, true, 1),
        ("rand write 4K, 4 threads", 4096, 400_000, true, true, 4),
        ("rand read 64K", 65536, 20_000, true, false, 1),
        ("rand write 64K", 65536, 20_000, true, true, 1),
    ];
    for (name, bs, ops, random, write, threads) in cases {
        let (qm, qi) = run(&q, bs, ops, random, write, threads);
        let (rm, ri) = run(&r, bs, ops, random, write, threads);
        println!("{name:<34} {qm:>10.0} {qi:>8.1} | {rm:>10.0} {ri:>8.1}");
    }
    // Allocating random 4K writes (copy-on-write of the rest of each cluster) on a fresh image.
    let st2 = Arc::new(FileStorage::create(&qpath).expect("create"));
    Qcow2::create(
        st2.as_ref(),
        &CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .expect("create image");
    let q2: Arc<dyn Disk> = Arc::new(Qcow2::open(st2, OpenOptions::default()).expect("open"));
    let (qm, qi) = run(&q2, 4096, 20_000, true, true, 1);
    println!(
        "{:<34} {qm:>10.0} {qi:>8.1} |",
        "rand write 4K (allocating, COW)"
    );
    let _ = std::fs::remove_file(&qpath);
    let _ = std::fs::remove_file(&rpath);
}
