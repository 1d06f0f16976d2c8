//! Many threads writing through one node while bitmaps record.

use std::sync::Arc;
use std::thread;

use block::bitmap_ops;

use crate::common::*;

const THREADS: u64 = 8;
const WRITES_PER_THREAD: u64 = 64;
const CHUNK: u64 = 4096;

#[test]
fn parallel_disjoint_writes_all_land_and_mark_both_bitmaps() {
    // Thread t writes chunks t, t+8, t+16, ...: interleaved, disjoint ranges.
    let size = THREADS * WRITES_PER_THREAD * CHUNK;
    let img = image(size as usize, 0);
    let (_graph, raw) = raw_graph(&path(&img));
    bitmap_ops::add(&raw, "fine", Some(512), false, false).unwrap();
    bitmap_ops::add(&raw, "coarse", Some(65536), false, false).unwrap();

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let node = Arc::clone(&raw);
            thread::spawn(move || {
                for i in 0..WRITES_PER_THREAD {
                    let chunk = i * THREADS + t;
                    // Write only the middle of the chunk to leave clean fine granules around it.
                    let data = vec![t as u8 + 1; 1024];
                    node.write(chunk * CHUNK + 1024, &data).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    let data = contents(&img);
    for chunk in 0..THREADS * WRITES_PER_THREAD {
        let t = chunk % THREADS;
        let base = (chunk * CHUNK) as usize;
        assert!(data[base..base + 1024].iter().all(|&b| b == 0));
        assert!(
            data[base + 1024..base + 2048]
                .iter()
                .all(|&b| b == t as u8 + 1),
            "chunk {chunk}"
        );
        assert!(data[base + 2048..base + CHUNK as usize]
            .iter()
            .all(|&b| b == 0));
        let written = chunk * CHUNK + 1024;
        assert!(dirty_at(&raw, "fine", written), "chunk {chunk}");
        assert!(dirty_at(&raw, "fine", written + 512), "chunk {chunk}");
        assert!(!dirty_at(&raw, "fine", chunk * CHUNK), "chunk {chunk}");
    }
    // Two 512-byte granules per write; every 64 KiB granule of the disk was touched.
    assert_eq!(count(&raw, "fine"), THREADS * WRITES_PER_THREAD * 1024);
    assert_eq!(count(&raw, "coarse"), size);
}

const TIB: u64 = 1 << 40;
const CLUSTER: u64 = 65536;

/// `n` pseudo-random cluster offsets on 1 TiB from `seed`.
fn scattered(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (TIB / CLUSTER)) * CLUSTER
        })
        .collect()
}

fn bits_of(node: &block::NodeRef, name: &str) -> hbitmap::HBitmap {
    node.bitmaps()
        .find(name)
        .expect("bitmap exists")
        .bits
        .clone()
}

/// Bitmaps that share leaf blocks under concurrent writers, a job's frozen copies taken and
/// checked meanwhile, merges into a disabled bitmap, a bitmap disabled while sharing and one
/// added late: every bitmap ends with exactly the clusters written while it recorded (the
/// merge target with the source's), every frozen copy unchanged while held.
#[test]
fn shared_bitmap_blocks_stay_exact_under_writers_frozen_copies_and_merges() {
    let mut graph = block::Graph::new();
    let node = graph.add(&null_opts("null", TIB)).expect("add null node");
    for name in ["a", "b", "c", "d"] {
        bitmap_ops::add(&node, name, Some(CLUSTER), false, false).unwrap();
    }
    bitmap_ops::add(&node, "m", Some(CLUSTER), false, true).unwrap();
    let data = vec![7u8; CLUSTER as usize];
    let before = scattered(99, 500);
    for &off in &before {
        node.write(off, &data).unwrap();
    }
    bitmap_ops::set_recording(&node, "d", false).unwrap();
    // Starts recording later: shares with a, b, c only blocks first dirtied after it began.
    bitmap_ops::add(&node, "e", Some(CLUSTER), false, false).unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let node = Arc::clone(&node);
            thread::spawn(move || {
                let data = vec![t as u8; CLUSTER as usize];
                for off in scattered(1000 + t, 4000) {
                    node.write(off, &data).unwrap();
                }
            })
        })
        .collect();
    let freezer = {
        let (node, stop) = (Arc::clone(&node), Arc::clone(&stop));
        thread::spawn(move || {
            let mut checked = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) || checked == 0 {
                let frozen = bits_of(&node, "a");
                let (count, hash) = (frozen.count(), frozen.qemu_sha256());
                thread::yield_now();
                assert_eq!(frozen.count(), count);
                assert_eq!(frozen.qemu_sha256(), hash, "a frozen copy changed");
                checked += 1;
            }
        })
    };
    let merger = {
        let (node, stop) = (Arc::clone(&node), Arc::clone(&stop));
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                bitmap_ops::merge(&node, "m", &[(Arc::clone(&node), "a".to_string())]).unwrap();
                thread::yield_now();
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    freezer.join().unwrap();
    merger.join().unwrap();
    bitmap_ops::merge(&node, "m", &[(Arc::clone(&node), "a".to_string())]).unwrap();

    let mut all: Vec<u64> = before.clone();
    (0..4u64).for_each(|t| all.extend(scattered(1000 + t, 4000)));
    let (mut expected, mut expected_before) = (all.clone(), before.clone());
    expected.sort_unstable();
    expected.dedup();
    expected_before.sort_unstable();
    expected_before.dedup();
    for name in ["a", "b", "c", "m"] {
        let bits = bits_of(&node, name);
        assert_eq!(bits.count(), expected.len() as u64 * CLUSTER, "{name}");
        assert!(expected.iter().all(|&off| bits.get(off)), "{name}");
    }
    let mut expected_after: Vec<u64> = all[before.len()..].to_vec();
    expected_after.sort_unstable();
    expected_after.dedup();
    let e = bits_of(&node, "e");
    assert_eq!(e.count(), expected_after.len() as u64 * CLUSTER);
    assert!(expected_after.iter().all(|&off| e.get(off)));
    let d = bits_of(&node, "d");
    assert_eq!(d.count(), expected_before.len() as u64 * CLUSTER);
    assert!(expected_before.iter().all(|&off| d.get(off)));
    let list = node.bitmaps();
    let abc = ["a", "b", "c"].map(|n| &list.find(n).expect("bitmap exists").bits);
    assert_eq!(
        hbitmap::HBitmap::distinct_chunks(abc),
        abc[0].allocated_chunks(),
        "bitmaps recording the same writes share their blocks"
    );
}
