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
