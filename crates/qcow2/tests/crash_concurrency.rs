//! Crash-image harness, concurrent modifications: writers racing each other on the dirty-region
//! log (shared mark flushes, the first claim after a checkpoint) and every modification path
//! (compressed writes too) still leave every power-cut state with consistent bitmaps that hold
//! every acknowledged write.

mod common;
mod crash;

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use crash::*;
use qcow2::{OpenOptions, Qcow2, StoreBitmap};

/// The exact bitmaps after the writes `done` (as a checkpoint stores them).
fn exact_bitmaps(done: &[(u64, u64)]) -> Vec<StoreBitmap> {
    BITMAPS
        .iter()
        .map(|(n, g, r)| {
            let mut bits = vec![false; DISK.div_ceil(*g) as usize];
            if *r {
                for &(o, l) in done {
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
        .collect()
}

/// The base image, a recorder over it and the image opened on the recorder, bitmaps loaded.
fn recorded_image() -> (Vec<u8>, Arc<Recorder>, Arc<Qcow2>) {
    qcow2::dirty_log::set_region_bytes(REGION);
    let base = base_image();
    let rec = Arc::new(Recorder::new(base.clone()));
    let img = Arc::new(Qcow2::open(rec.clone(), OpenOptions::default()).expect("open"));
    img.load_bitmaps().expect("load");
    (base, rec, img)
}

/// Every cut of `ops` twice: with only the flushed writes kept and with every write kept; and
/// when the last write before the cut is a small one (a header), every way it can tear.
/// Each state must open with consistent bitmaps holding the writes acknowledged before the cut.
fn check_every_cut(base: &[u8], ops: &[Op], acked: &[Acked]) -> usize {
    let mut states = 0;
    for cut in 0..=ops.len() {
        let must: Vec<(u64, u64)> = acked
            .iter()
            .filter(|a| a.0 <= cut)
            .map(|a| (a.1, a.2))
            .collect();
        check_state(durable_state(base, ops, cut, false), &must);
        check_state(durable_state(base, ops, cut, true), &must);
        states += 2;
        for torn in torn_states(base, ops, cut) {
            check_state(torn, &must);
            states += 1;
        }
    }
    states
}

/// The id of the calling thread (Linux).
fn current_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self (Linux)");
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("thread id")
}

/// Wait until thread `tid` of this process sleeps (blocked on a lock).
fn wait_until_blocked(tid: u32) {
    let path = format!("/proc/self/task/{tid}/stat");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stat = std::fs::read_to_string(&path).expect("thread stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if state == Some('S') {
            return;
        }
        assert!(Instant::now() < deadline, "thread {tid} never blocked");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The first modifications after a checkpoint claim the bitmaps again (flag them in use with a
/// new log covering them). A second writer arriving while the first one's claim is under way
/// must not claim once more: a repeated claim found every bitmap already in use, wrote a log
/// covering none of them and stopped marking, so every power cut after it left the bitmaps
/// in use with no log for them (inconsistent). Deterministic: the first writer's claim is held
/// in its flush until the second writer, past its "already claimed?" check, is blocked behind
/// it (in the suite's concurrent test below that interleaving happened about once in 30 runs).
#[test]
fn a_writer_racing_the_first_claim_after_a_checkpoint_leaves_the_bitmaps_covered() {
    let (base, rec, img) = recorded_image();
    let mut acked: Vec<Acked> = Vec::new();
    img.write_at(&[1u8; 4096], 0).expect("write");
    acked.push((rec.len(), 0, 4096));
    img.store_bitmaps(&exact_bitmaps(&[(0, 4096)]), false)
        .expect("checkpoint");
    img.flush().expect("flush");

    let (started, release) = rec.hold_next_flush();
    let first = {
        let (img, rec) = (img.clone(), rec.clone());
        std::thread::spawn(move || {
            img.write_at(&[2u8; 4096], 5 << 20).expect("first write");
            (rec.len(), 5 << 20, 4096)
        })
    };
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the first writer's claim flushes");
    let (tid_tx, tid_rx) = mpsc::channel();
    let second = {
        let (img, rec) = (img.clone(), rec.clone());
        std::thread::spawn(move || {
            tid_tx.send(current_tid()).expect("tid");
            // What a write does first (after its checks, which briefly take the metadata lock
            // and so would wait here for the first claim instead of racing it): claim the
            // bitmaps unless already claimed.
            img.claim_bitmaps().expect("second claim");
            img.write_at(&[3u8; 4096], 9 << 20).expect("second write");
            (rec.len(), 9 << 20, 4096)
        })
    };
    wait_until_blocked(tid_rx.recv().expect("tid"));
    release.send(()).expect("release");
    acked.push(first.join().expect("first writer"));
    acked.push(second.join().expect("second writer"));

    let ops = rec.ops();
    let states = check_every_cut(&base, &ops, &acked);
    // The image as it is now (every write landed) needs the log for both writes.
    let (_, recovered) = check_state(
        rec.contents(),
        &acked.iter().map(|a| (a.1, a.2)).collect::<Vec<_>>(),
    );
    assert!(
        recovered,
        "the bitmaps are in use after the writes: recovered from the log"
    );
    eprintln!("{states} crash states consistent and complete");
}

/// Checkpoints between writes, each state of every cut including every torn header write: the
/// store switches to the new directory and only then, in a later write, empties the log, so no
/// mix of old and new header sectors pairs the old (in use) directory with an emptied log.
#[test]
fn every_cut_around_checkpoints_including_torn_header_writes_keeps_bitmaps_consistent() {
    let (base, rec, img) = recorded_image();
    let mut acked: Vec<Acked> = Vec::new();
    for k in 0..4u64 {
        for j in 0..3u64 {
            let off = (k * 7 + j * 13) << 20;
            img.write_at(&[k as u8 + 1; 8192], off).expect("write");
            acked.push((rec.len(), off, 8192));
        }
        let done: Vec<(u64, u64)> = acked.iter().map(|a| (a.1, a.2)).collect();
        img.store_bitmaps(&exact_bitmaps(&done), false)
            .expect("checkpoint");
        img.flush().expect("flush");
    }
    let ops = rec.ops();
    let states = check_every_cut(&base, &ops, &acked);
    eprintln!("{states} crash states consistent and complete");
}

/// Compressed writes (backup targets) modify the disk like any write: their regions are marked
/// before the data is written.
#[test]
fn compressed_writes_are_marked_before_they_land() {
    let (base, rec, img) = recorded_image();
    let mut acked: Vec<Acked> = Vec::new();
    let mut rng = Rng(7);
    for k in 0..6u64 {
        let off = (k * 10 + 3) << 20;
        let data: Vec<u8> = (0..65536).map(|i| (i % 7 + k) as u8).collect();
        img.write_compressed(off, &data).expect("compressed write");
        acked.push((rec.len(), off, 65536));
        if rng.below(2) == 0 {
            img.flush().expect("flush");
        }
    }
    let ops = rec.ops();
    check_every_cut(&base, &ops, &acked);
}

#[test]
fn concurrent_writers_sharing_mark_flushes_lose_no_acknowledged_write_at_a_power_cut() {
    let (base, rec, img) = recorded_image();
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
            img.store_bitmaps(&exact_bitmaps(&done), false)
                .expect("checkpoint");
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
