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
mod crash;

use std::path::Path;
use std::sync::Arc;

use common::*;
use crash::*;
use qcow2::{
    CreateOptions, FileStorage, LoadedBitmap, MemStorage, OpenOptions, Qcow2, StoreBitmap,
};

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
            // Every other cut falls before the first checkpoint (the window where the marks
            // recovered by the first life must still be covered), the rest anywhere.
            let cut = if k == 0 {
                ops.len()
            } else if k % 2 == 1 {
                rng.below(first_store.min(ops.len()) as u64 + 1) as usize
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
