//! Many threads writing, zeroing, discarding, flushing and reading at once: no lost or double
//! allocation, no torn copy-on-write, no read of another cluster's data.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use qcow2::{CreateOptions, FileStorage, MemStorage, OpenOptions, Qcow2, Storage};

/// Threads in each test.
const THREADS: u64 = 8;

/// Run the mixed workload: thread t owns slot t (cs/8 bytes) of every cluster in the shared
/// half, and its own private region in the other half (whole-cluster writes, zeroes,
/// discards). Every thread checks its own bytes as it goes. Returns the expected content.
fn workload(img: Arc<Qcow2>, ops: u64) -> Vec<u8> {
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let slot = cs / THREADS;
    let shared_clusters = size / 2 / cs;
    let region = size / 2 / THREADS;
    let shadow = Arc::new(Mutex::new(vec![0u8; size as usize]));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            let shadow = shadow.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9 ^ ((t + 1) * 0x1234_5678));
                let mine = |off: u64, len: u64, data: Option<&[u8]>| {
                    let mut s = shadow.lock().expect("shadow");
                    match data {
                        Some(d) => s[off as usize..(off + len) as usize].copy_from_slice(d),
                        None => s[off as usize..(off + len) as usize].fill(0),
                    }
                };
                let base = size / 2 + t * region;
                for i in 0..ops {
                    let byte = ((t as u8) << 5) | ((i as u8) & 0x1f) | 1;
                    match rng.below(20) {
                        0..=11 => {
                            let off = rng.below(shared_clusters) * cs + t * slot;
                            let data = vec![byte; slot as usize];
                            img.write_at(&data, off).expect("shared write");
                            mine(off, slot, Some(&data));
                            let mut back = vec![0u8; slot as usize];
                            img.read_at(&mut back, off).expect("read");
                            assert_eq!(back, data, "thread {t} lost its write at {off:#x}");
                        }
                        12..=15 => {
                            let len = 1 + rng.below(3 * cs);
                            let off = base + rng.below(region - len);
                            let data: Vec<u8> = (0..len).map(|k| byte ^ (k as u8)).collect();
                            img.write_at(&data, off).expect("private write");
                            mine(off, len, Some(&data));
                        }
                        16 => {
                            let off = base + rng.below(region / cs - 4) * cs;
                            img.discard(off, 2 * cs).expect("discard");
                            mine(off, 2 * cs, None);
                        }
                        17 => {
                            let len = 1 + rng.below(2 * cs);
                            let off = base + rng.below(region - len);
                            img.write_zeroes(off, len, rng.below(2) == 0).expect("zero");
                            mine(off, len, None);
                        }
                        18 => img.flush().expect("flush"),
                        _ => {
                            // Verify a random piece of the private region.
                            let len = 1 + rng.below(2 * cs);
                            let off = base + rng.below(region - len);
                            let mut back = vec![0u8; len as usize];
                            img.read_at(&mut back, off).expect("read");
                            let s = shadow.lock().expect("shadow");
                            assert_same(
                                &back,
                                &s[off as usize..(off + len) as usize],
                                "private read",
                            );
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread panicked");
    }
    let s = shadow.lock().expect("shadow").clone();
    s
}

#[test]
fn eight_writer_threads_leave_a_consistent_image() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("conc");
    let path = dir.path("a.qcow2");
    let st = Arc::new(FileStorage::create(&path).expect("create"));
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: 32 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Arc::new(Qcow2::open(st, OpenOptions::default()).expect("open"));
    let shadow = workload(img.clone(), 400);
    assert_same(&read_all(&img, 1 << 20), &shadow, "after workload");
    img.close().expect("close");
    assert_check_clean(&path);
    assert_compares_to_raw(&dir, &path, &shadow);
}

#[test]
fn slow_storage_widens_races_without_losing_writes() {
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 8 << 20,
            cluster_size: 512,
            ..Default::default()
        },
    )
    .expect("create");
    mem.set_write_delay(Some(Duration::from_micros(200)));
    mem.set_read_delay(Some(Duration::from_micros(50)));
    let img = Arc::new(Qcow2::open(mem.clone(), OpenOptions::default()).expect("open"));
    let shadow = workload(img.clone(), 150);
    img.close().expect("close");
    mem.set_write_delay(None);
    mem.set_read_delay(None);
    let again = Qcow2::open(mem.clone(), OpenOptions { read_only: true }).expect("reopen");
    assert_same(&read_all(&again, 1 << 20), &shadow, "after reopen");
    if have_qemu() {
        let dir = TempDir::new("conc-mem");
        let path = dir.path("a.qcow2");
        std::fs::write(&path, mem.to_bytes()).expect("dump");
        assert_check_clean(&path);
    }
}

#[test]
fn readers_never_see_unwritten_clusters() {
    // One writer fills clusters with a non-zero pattern while readers poll them: a reader may
    // see zeros (not yet published) or the pattern, never anything else.
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .expect("create");
    mem.set_write_delay(Some(Duration::from_micros(300)));
    let img = Arc::new(
        Qcow2::open(mem.clone() as Arc<dyn Storage>, OpenOptions::default()).expect("open"),
    );
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (img, done) = (img.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(r + 77);
                let mut buf = vec![0u8; 4096];
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let c = rng.below(256);
                    img.read_at(&mut buf, c * 4096).expect("read");
                    let want = (c as u8) | 1;
                    assert!(
                        buf.iter().all(|&b| b == 0) || buf.iter().all(|&b| b == want),
                        "torn read of cluster {c}"
                    );
                }
            })
        })
        .collect();
    for c in 0..256u64 {
        img.write_at(&vec![(c as u8) | 1; 4096], c * 4096)
            .expect("write");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader panicked");
    }
}

#[test]
fn discarded_cluster_is_not_reused_while_a_read_of_it_is_in_flight() {
    // A slow read of guest cluster 0 is in flight when cluster 0 is discarded and the image
    // flushed; a new write then allocates the lowest free host cluster. The read must still
    // return cluster 0's data, so the freed host cluster may not be reused before it ends.
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Arc::new(Qcow2::open(mem.clone(), OpenOptions::default()).expect("open"));
    img.write_at(&[0x11; 4096], 0).expect("write");
    img.write_at(&[0x22; 4096], 4096).expect("write");
    img.flush().expect("flush");
    mem.set_read_delay(Some(Duration::from_millis(100)));
    let reader = {
        let img = img.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            img.read_at(&mut buf, 0).expect("read");
            buf
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    img.discard(0, 4096).expect("discard");
    img.flush().expect("flush");
    mem.set_read_delay(None);
    img.write_at(&[0xee; 4096], 5 * 4096).expect("write");
    let seen = reader.join().expect("reader");
    assert!(
        seen.iter().all(|&b| b == 0x11),
        "read returned data written after the discard"
    );
}
