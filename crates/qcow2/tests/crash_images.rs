//! Crash-image harness: persistent bitmaps survive a power cut consistent and complete.
//!
//! A run drives an image the way the block core does (load bitmaps, writes / write-zeroes /
//! discards, client flushes, checkpoints that store the exact bitmaps) on a storage layer that
//! records every write and flush. From the record we build many on-disk states a power cut could
//! leave: a cut point, every write before the last flush before it kept, a random subset of the
//! later (unflushed) writes kept. Each state must open with every bitmap consistent and holding
//! at least every write the run saw acknowledged (a stronger oracle than "acknowledged and
//! flushed": the log's mark is durable before the data write is even issued). A bounded sample
//! of states also goes through `qemu-img check`, which must find no errors.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use qcow2::{
    CreateOptions, FileStorage, LoadedBitmap, MemStorage, OpenOptions, Qcow2, Storage, StoreBitmap,
};

/// One storage operation of a run.
#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Flush,
    Truncate(u64),
}

/// A storage that serves the current contents from memory and records every operation.
struct Recorder {
    cur: MemStorage,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn new(base: Vec<u8>) -> Recorder {
        Recorder {
            cur: MemStorage::from_bytes(base),
            ops: Mutex::new(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        self.ops.lock().expect("ops").len()
    }

    fn ops(&self) -> Vec<Op> {
        self.ops.lock().expect("ops").clone()
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.cur.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.cur.write_at(buf, offset)?;
        self.ops
            .lock()
            .expect("ops")
            .push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        self.cur.size()
    }
    fn truncate(&self, size: u64) -> std::io::Result<()> {
        self.cur.truncate(size)?;
        self.ops.lock().expect("ops").push(Op::Truncate(size));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.ops.lock().expect("ops").push(Op::Flush);
        Ok(())
    }
}

/// What a power cut after `cut` operations may leave: flushed writes kept, each later write
/// kept with probability 1/2 (in issue order); one in four kept writes is torn: only a random
/// subset of its 512-byte sectors lands.
fn crash_state(base: &[u8], ops: &[Op], cut: usize, rng: &mut Rng) -> Vec<u8> {
    let durable = ops[..cut]
        .iter()
        .rposition(|o| matches!(o, Op::Flush))
        .unwrap_or(0);
    let mut img = base.to_vec();
    for (i, op) in ops[..cut].iter().enumerate() {
        match op {
            Op::Write(off, data) if i < durable || rng.below(2) == 0 => {
                let end = *off as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                let torn = i >= durable && data.len() > 512 && rng.below(4) == 0;
                for (k, sector) in data.chunks(512).enumerate() {
                    if torn && rng.below(2) == 0 {
                        continue;
                    }
                    let at = *off as usize + k * 512;
                    img[at..at + sector.len()].copy_from_slice(sector);
                }
            }
            Op::Truncate(size) => img.resize(*size as usize, 0),
            _ => {}
        }
    }
    img
}

const DISK: u64 = 64 << 20;
const REGION: u64 = 1 << 20;
/// The bitmaps of the run: (name, granularity, recording).
const BITMAPS: &[(&str, u64, bool)] = &[
    ("b64k", 64 << 10, true),
    ("b512", 512, true),
    ("b1m", 1 << 20, true),
    ("off", 64 << 10, false),
];

/// The model of one bitmap: set granules.
fn mark(bits: &mut [bool], g: u64, off: u64, len: u64) {
    for i in off / g..=(off + len - 1) / g {
        bits[i as usize] = true;
    }
}

fn to_bytes(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, &b) in bits.iter().enumerate() {
        if b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

fn bit(data: &[u8], i: usize) -> bool {
    data.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// A fresh image with the run's bitmaps stored (empty), as bytes.
fn base_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: DISK,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st.clone(), OpenOptions::default()).expect("open");
    let list: Vec<StoreBitmap> = BITMAPS
        .iter()
        .map(|(n, g, rec)| StoreBitmap {
            name: n.to_string(),
            granularity: *g,
            auto: *rec,
            inconsistent_keep_in_use: false,
            data: Vec::new(),
        })
        .collect();
    img.store_bitmaps(&list, false).expect("store");
    img.close().expect("close");
    st.to_bytes()
}

/// A write the run saw acknowledged: (operations recorded when it returned, offset, length).
type Acked = (usize, u64, u64);

/// Drive one run on bitmaps `loaded` at open (no checkpoint in the first `quiet` steps);
/// returns the acknowledged writes and the number of operations recorded before the first
/// checkpoint.
fn run(
    img: &Qcow2,
    loaded: &[LoadedBitmap],
    rec: &Recorder,
    seed: u64,
    steps: usize,
    quiet: usize,
) -> (Vec<Acked>, usize) {
    let mut rng = Rng(seed);
    let mut model: Vec<Vec<bool>> = BITMAPS
        .iter()
        .map(|(name, g, _)| {
            let b = loaded.iter().find(|b| &b.name == name).expect("loaded");
            (0..DISK.div_ceil(*g) as usize)
                .map(|i| bit(&b.data, i))
                .collect()
        })
        .collect();
    let mut acked = Vec::new();
    let mut first_store = usize::MAX;
    for step in 0..steps {
        // Writes cluster in a few hot areas, like real guests, so regions get reused.
        let area = rng.below(4) * (DISK / 4);
        let off = (area + rng.below(DISK / 16)) & !511;
        let len = (1 + rng.below(128)) * 512;
        let len = len.min(DISK - off);
        let done = match rng.below(20) {
            0..=9 => img.write_at(&vec![(seed as u8) | 1; len as usize], off),
            10..=11 => img.write_zeroes(off, len, rng.below(2) == 0),
            12 => img.discard(off, len),
            13..=16 => {
                img.flush().expect("flush");
                continue;
            }
            _ if step < quiet => {
                img.flush().expect("flush");
                continue;
            }
            _ => {
                // A checkpoint: the exact bitmaps stored, then flushed.
                let list: Vec<StoreBitmap> = BITMAPS
                    .iter()
                    .zip(&model)
                    .map(|((n, g, r), bits)| StoreBitmap {
                        name: n.to_string(),
                        granularity: *g,
                        auto: *r,
                        inconsistent_keep_in_use: false,
                        data: to_bytes(bits),
                    })
                    .collect();
                first_store = first_store.min(rec.len());
                img.store_bitmaps(&list, false).expect("checkpoint");
                img.flush().expect("flush");
                continue;
            }
        };
        done.expect("write");
        for ((_, g, recording), bits) in BITMAPS.iter().zip(model.iter_mut()) {
            if *recording {
                mark(bits, *g, off, len);
            }
        }
        acked.push((rec.len(), off, len));
    }
    (acked, first_store)
}

/// Open a crash state and check every bitmap is consistent and covers `must` (writes acked
/// before the cut). Returns the extra dirty bytes of the 64 KiB bitmap beyond `must`, and
/// whether the bitmaps had to be recovered from the log.
fn check_state(state: Vec<u8>, must: &[(u64, u64)]) -> (u64, bool) {
    let st = Arc::new(MemStorage::from_bytes(state));
    let img = Qcow2::open(st, OpenOptions::default()).expect("crash state opens");
    let loaded = img.load_bitmaps().expect("crash state loads its bitmaps");
    assert_eq!(loaded.len(), BITMAPS.len());
    let mut extra = 0;
    let recovered = loaded.iter().any(|b| b.recovered);
    for (name, g, recording) in BITMAPS {
        let b = loaded
            .iter()
            .find(|b| &b.name == name)
            .expect("bitmap present");
        assert!(
            !b.inconsistent,
            "bitmap {name} came back inconsistent after a power cut"
        );
        let mut want = vec![false; DISK.div_ceil(*g) as usize];
        if *recording {
            for &(off, len) in must {
                mark(&mut want, *g, off, len);
            }
        }
        for (i, &w) in want.iter().enumerate() {
            assert!(
                !w || bit(&b.data, i),
                "bitmap {name} misses granule {i} written and acknowledged before the cut"
            );
        }
        if *g == 64 << 10 && *recording {
            let have = (0..want.len()).filter(|&i| bit(&b.data, i)).count();
            let need = want.iter().filter(|&&w| w).count();
            extra += (have - need) as u64 * g;
        }
    }
    (extra, recovered)
}

/// `qemu-img check` of a state: no errors (leaks, which any crash of a qcow2 writer may leave,
/// are counted, not failed).
fn qemu_check(dir: &TempDir, state: &[u8]) -> bool {
    let path = dir.path("state.qcow2");
    std::fs::write(&path, state).expect("write state");
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path.to_str().expect("p")])
        .output()
        .expect("qemu-img is required for this test");
    let text = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check found errors in a crash state (exit {code}):\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    code == 3
}

fn require_qemu() {
    assert!(
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok(),
        "qemu-img is required (oracle of this test)"
    );
}

#[test]
fn every_power_cut_state_opens_with_consistent_bitmaps_covering_acknowledged_writes() {
    require_qemu();
    qcow2::dirty_log::set_region_bytes(REGION);
    let dir = TempDir::new("crash");
    let base = base_image();
    let (mut states, mut leaky, mut checked, mut extra_sum, mut recovered) = (0, 0, 0, 0u64, 0);
    for seed in 1..=3u64 {
        let rec = Arc::new(Recorder::new(base.clone()));
        let img = Qcow2::open(rec.clone(), OpenOptions::default()).expect("open");
        assert_eq!(img.dirty_log_region(), REGION);
        let loaded = img.load_bitmaps().expect("load");
        let (acked, _) = run(&img, &loaded, &rec, seed * 0x9e37_79b9, 300, 0);
        let ops = rec.ops();
        let mut rng = Rng(seed);
        for k in 0..120 {
            let cut = if k == 0 {
                ops.len()
            } else {
                rng.below(ops.len() as u64 + 1) as usize
            };
            let state = crash_state(&base, &ops, cut, &mut rng);
            let must: Vec<(u64, u64)> = acked
                .iter()
                .filter(|a| a.0 <= cut)
                .map(|a| (a.1, a.2))
                .collect();
            if k % 30 == 0 {
                leaky += qemu_check(&dir, &state) as usize;
                checked += 1;
            }
            let (extra, rec) = check_state(state, &must);
            extra_sum += extra;
            recovered += rec as usize;
            states += 1;
        }
    }
    eprintln!(
        "{states} crash states ({recovered} recovered from the log) consistent and complete; \
         qemu-img check: {checked} states, no errors, {leaky} with leaked clusters; \
         extra dirty (64K bitmap) {} KiB on average",
        extra_sum / states as u64 / 1024
    );
    assert!(recovered > states / 2, "most cuts fall between checkpoints");
}

/// The block layer's open of an image: the bitmaps are loaded (and recovered) through a
/// read-only instance, then a second, writable instance claims them. After a first crash and
/// such a recovery, every power cut of the second life (before and after its first checkpoint)
/// must still give consistent bitmaps holding the writes of both lives: the regions recovered
/// by the read-only instance stay covered until a store writes them into the bitmap data.
#[test]
fn a_second_power_cut_after_a_read_only_recovery_and_a_writable_claim_loses_nothing() {
    qcow2::dirty_log::set_region_bytes(REGION);
    let base = base_image();
    let (mut states, mut before_checkpoint) = (0, 0);
    for seed in 1..=3u64 {
        // First life, cut after its last operation with a random subset of unflushed writes.
        let rec = Arc::new(Recorder::new(base.clone()));
        let img = Qcow2::open(rec.clone(), OpenOptions::default()).expect("open");
        let loaded = img.load_bitmaps().expect("load");
        let (acked1, _) = run(&img, &loaded, &rec, seed * 0x51_7cc1, 60, 60);
        drop(img);
        let ops = rec.ops();
        let mut rng = Rng(seed ^ 0xabcd);
        let state1 = crash_state(&base, &ops, ops.len(), &mut rng);
        let must1: Vec<(u64, u64)> = acked1.iter().map(|a| (a.1, a.2)).collect();

        // Second life: read-only load, then the writable claim, on the crashed image.
        let rec = Arc::new(Recorder::new(state1.clone()));
        let ro = Qcow2::open(rec.clone(), OpenOptions { read_only: true }).expect("read-only open");
        let loaded = ro.load_bitmaps().expect("read-only load");
        assert!(
            loaded.iter().all(|b| b.recovered && !b.inconsistent),
            "the first crash recovers"
        );
        let rw = Qcow2::open(rec.clone(), OpenOptions::default()).expect("writable open");
        rw.claim_bitmaps().expect("claim");
        drop(ro);
        let (acked2, first_store) = run(&rw, &loaded, &rec, seed * 0x9e37_79b9, 80, 40);
        let ops = rec.ops();
        for k in 0..80 {
            let cut = if k == 0 {
                ops.len()
            } else {
                rng.below(ops.len() as u64 + 1) as usize
            };
            let state = crash_state(&state1, &ops, cut, &mut rng);
            let mut must = must1.clone();
            must.extend(acked2.iter().filter(|a| a.0 <= cut).map(|a| (a.1, a.2)));
            check_state(state, &must);
            states += 1;
            before_checkpoint += (cut < first_store) as usize;
        }
    }
    eprintln!("{states} second-crash states ({before_checkpoint} before any checkpoint) complete");
    assert!(
        before_checkpoint > states / 5,
        "many cuts fall before a checkpoint"
    );
}

/// A crashed image (bitmaps in use, log valid), as left by killing the writer.
fn crashed_image(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path("c.qcow2");
    let p = path.to_str().expect("p");
    qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]);
    qemu_img(&["bitmap", "--add", p, "b1"]);
    qemu_img(&["bitmap", "--add", "-g", "128K", "--disable", p, "b2"]);
    let img = open_rw(&path);
    img.load_bitmaps().expect("load");
    img.write_at(&[7u8; 4096], 3 << 20).expect("write");
    img.flush().expect("flush");
    drop(img); // no store, no close: the process "died"
    path
}

fn open_rw(path: &Path) -> Qcow2 {
    let st = Arc::new(FileStorage::open(path, true).expect("open file"));
    Qcow2::open(st, OpenOptions::default()).expect("open")
}

#[test]
fn qemu_sees_a_crashed_image_as_before_and_it_checks_clean() {
    require_qemu();
    qcow2::dirty_log::set_region_bytes(REGION);
    let dir = TempDir::new("crash-qemu");
    let path = crashed_image(&dir);
    assert_check_clean(&path);
    let info = qemu_img(&["info", "-U", "--output=json", path.to_str().expect("p")]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("json");
    let names: Vec<(String, Vec<String>)> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps listed")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().expect("n").to_string(),
                serde_json::from_value(b["flags"].clone()).expect("flags"),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            (
                "b1".to_string(),
                vec!["in-use".to_string(), "auto".to_string()]
            ),
            ("b2".to_string(), vec!["in-use".to_string()]),
        ]
    );
}

#[test]
fn crashed_image_recovers_each_bitmap_with_the_written_region() {
    qcow2::dirty_log::set_region_bytes(REGION);
    let dir = TempDir::new("crash-recover");
    let path = crashed_image(&dir);
    let img = open_rw(&path);
    let loaded = img.load_bitmaps().expect("load");
    for b in &loaded {
        assert!(b.recovered && !b.inconsistent, "{} not recovered", b.name);
        let g = b.granularity;
        let set: Vec<usize> = (0..(DISK / g) as usize)
            .filter(|&i| bit(&b.data, i))
            .collect();
        // Exactly the 1 MiB region holding the write at 3 MiB.
        let want: Vec<usize> = ((3 << 20) / g as usize..(4 << 20) / g as usize).collect();
        assert_eq!(set, want, "bitmap {}", b.name);
    }
}

#[test]
fn after_qemu_opens_a_crashed_image_writable_its_bitmaps_stay_inconsistent() {
    require_qemu();
    qcow2::dirty_log::set_region_bytes(REGION);
    let dir = TempDir::new("crash-stale");
    let path = crashed_image(&dir);
    // QEMU writes without knowing the log: it clears the log's autoclear bit.
    qemu_io(&path, &["write -P 9 40M 64k"]);
    assert_check_clean(&path);
    let img = open_rw(&path);
    let loaded = img.load_bitmaps().expect("load");
    assert!(loaded.iter().all(|b| b.inconsistent && !b.recovered));
    drop(img);
    assert_check_clean(&path);
}

#[test]
fn clean_close_leaves_bitmaps_clean_and_a_reopen_needs_no_recovery() {
    qcow2::dirty_log::set_region_bytes(REGION);
    let dir = TempDir::new("crash-clean");
    let path = dir.path("c.qcow2");
    let st = Arc::new(FileStorage::create(&path).expect("create"));
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: DISK,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st, OpenOptions::default()).expect("open");
    let b = StoreBitmap {
        name: "b".into(),
        granularity: 65536,
        auto: true,
        inconsistent_keep_in_use: false,
        data: vec![1],
    };
    img.store_bitmaps(std::slice::from_ref(&b), false)
        .expect("store");
    img.write_at(&[1u8; 512], 5 << 20).expect("write");
    img.store_bitmaps(&[b], false).expect("store at close");
    img.close().expect("close");
    let img = open_rw(&path);
    let loaded = img.load_bitmaps().expect("load");
    assert!(!loaded[0].recovered && !loaded[0].inconsistent);
    assert_eq!(loaded[0].data[0], 1);
}

#[test]
fn concurrent_writers_sharing_mark_flushes_lose_no_acknowledged_write_at_a_power_cut() {
    qcow2::dirty_log::set_region_bytes(REGION);
    let base = base_image();
    let rec = Arc::new(Recorder::new(base.clone()));
    let img = Arc::new(Qcow2::open(rec.clone(), OpenOptions::default()).expect("open"));
    img.load_bitmaps().expect("load");
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    for phase in 0..4u64 {
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (img, rec, acked) = (img.clone(), rec.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(1 + phase * 16 + t);
                    for _ in 0..40 {
                        let off = rng.below(DISK / 4096 - 64) * 4096;
                        let len = (1 + rng.below(16)) * 4096;
                        img.write_at(&vec![t as u8 + 1; len as usize], off)
                            .expect("write");
                        acked.lock().expect("acked").push((rec.len(), off, len));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer");
        }
        if phase == 1 {
            // A checkpoint between phases (never concurrent with writes, as in the block core).
            let done: Vec<(u64, u64)> = acked
                .lock()
                .expect("acked")
                .iter()
                .map(|a| (a.1, a.2))
                .collect();
            let list: Vec<StoreBitmap> = BITMAPS
                .iter()
                .map(|(n, g, r)| {
                    let mut bits = vec![false; DISK.div_ceil(*g) as usize];
                    if *r {
                        for &(o, l) in &done {
                            mark(&mut bits, *g, o, l);
                        }
                    }
                    StoreBitmap {
                        name: n.to_string(),
                        granularity: *g,
                        auto: *r,
                        inconsistent_keep_in_use: false,
                        data: to_bytes(&bits),
                    }
                })
                .collect();
            img.store_bitmaps(&list, false).expect("checkpoint");
            img.flush().expect("flush");
        }
    }
    let ops = rec.ops();
    let acked = acked.lock().expect("acked").clone();
    let mut rng = Rng(99);
    let mut recovered = 0;
    for k in 0..60 {
        let cut = if k == 0 {
            ops.len()
        } else {
            rng.below(ops.len() as u64 + 1) as usize
        };
        let must: Vec<(u64, u64)> = acked
            .iter()
            .filter(|a| a.0 <= cut)
            .map(|a| (a.1, a.2))
            .collect();
        let (_, rec) = check_state(crash_state(&base, &ops, cut, &mut rng), &must);
        recovered += rec as usize;
    }
    assert!(
        recovered > 30,
        "only {recovered} of 60 states needed the log"
    );
}

#[test]
fn a_tib_disk_gets_coarser_regions_and_qemu_handles_the_large_extension() {
    require_qemu();
    qcow2::dirty_log::set_region_bytes(REGION);
    let dir = TempDir::new("crash-tib");
    let path = dir.path("t.qcow2");
    let p = path.to_str().expect("p");
    qemu_img(&["create", "-q", "-f", "qcow2", p, "1T"]);
    qemu_img(&["bitmap", "--add", p, "b"]);
    let img = open_rw(&path);
    // 1 MiB regions would need a 128 KiB map: coarsened until it fits into cluster 0.
    assert_eq!(img.dirty_log_region(), 4 << 20);
    img.load_bitmaps().expect("load");
    img.write_at(&[1u8; 512], (1 << 40) - 512)
        .expect("write at the end");
    img.flush().expect("flush");
    drop(img);
    assert_check_clean(&path);
    let img = open_rw(&path);
    let b = img.load_bitmaps().expect("load").remove(0);
    assert!(b.recovered);
    let set = (0..(1u64 << 24) as usize)
        .filter(|&i| bit(&b.data, i))
        .count();
    assert_eq!(set, 64, "the last 4 MiB region at 64 KiB granularity");
    drop(img);
    // QEMU opens it writable (keeping our extension, clearing its autoclear bit) and writes.
    qemu_io(&path, &["write -P 3 0 64k", "read -P 3 0 64k"]);
    assert_check_clean(&path);
    let img = open_rw(&path);
    assert!(img.load_bitmaps().expect("load")[0].inconsistent);
}

#[test]
fn small_cluster_images_without_room_for_a_log_fall_back_to_inconsistent_bitmaps() {
    qcow2::dirty_log::set_region_bytes(REGION);
    let st = Arc::new(MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: DISK,
            cluster_size: 1024,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st.clone(), OpenOptions::default()).expect("open");
    let b = StoreBitmap {
        name: "b".into(),
        granularity: 65536,
        auto: true,
        inconsistent_keep_in_use: false,
        data: Vec::new(),
    };
    img.store_bitmaps(&[b], false).expect("store");
    drop(img);
    let img = Qcow2::open(st.clone(), OpenOptions::default()).expect("open");
    assert_eq!(img.dirty_log_region(), 0, "1 KiB clusters leave no room");
    img.load_bitmaps().expect("load");
    img.write_at(&[1; 512], 0).expect("write");
    drop(img);
    let img = Qcow2::open(st, OpenOptions::default()).expect("reopen");
    let b = img.load_bitmaps().expect("load").remove(0);
    assert!(b.inconsistent && !b.recovered);
}
