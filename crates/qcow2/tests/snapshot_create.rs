//! Creating and deleting internal snapshots: the images pass `qemu-img check`, QEMU lists and
//! reads the snapshots exactly as they were, writes after a snapshot leave it unchanged, QEMU's
//! snapshots are deleted by us and ours by QEMU, and a power cut at any point leaves the old or
//! the new state.

mod common;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use qcow2::{ErrorKind, MemStorage, OpenOptions, Qcow2, SnapshotTime, Storage};

fn when(sec: u32) -> SnapshotTime {
    SnapshotTime {
        date_sec: sec,
        date_nsec: 5000,
        vm_clock_nsec: sec as u64 * 1_000_000_000 + 5000,
    }
}

/// `qemu-img snapshot -l` rows as (id, tag).
fn qemu_list(path: &Path) -> Vec<(String, String)> {
    let out = qemu_img(&["snapshot", "-l", path.to_str().expect("p")]);
    out.lines()
        .skip(2)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

fn fill(img: &Qcow2, shadow: &mut [u8], rng: &mut Rng, n: u64, tag: u8) {
    let size = shadow.len() as u64;
    for i in 0..n {
        let len = 1 + rng.below(40_000);
        let off = rng.below(size - len);
        let (s, e) = (off as usize, (off + len) as usize);
        if i % 5 == 0 {
            img.write_zeroes(off, len, i % 10 == 0).expect("zero");
            shadow[s..e].fill(0);
        } else {
            let d = vec![tag ^ (i as u8); len as usize];
            img.write_at(&d, off).expect("write");
            shadow[s..e].copy_from_slice(&d);
        }
    }
}

#[test]
fn snapshots_we_take_read_back_in_qemu_and_stay_unchanged_by_later_writes() {
    assert!(have_qemu());
    let dir = TempDir::new("snapc");
    let path = dir.path("s.qcow2");
    qemu_create(&path, "cluster_size=4096", "6M");
    // Data, compressed data and zeros from QEMU first.
    qemu_io(
        &path,
        &[
            "write -P 0x11 0 2M",
            "write -c -P 0x33 3M 64k",
            "write -z 1M 64k",
        ],
    );
    let mut shadow = to_raw(&dir, &path);
    let img = open(&path, true);
    let mut rng = Rng(7);
    fill(&img, &mut shadow, &mut rng, 100, 0x40);
    let s1 = shadow.clone();
    let info = img.create_snapshot("first", when(100)).expect("create");
    assert_eq!((info.id.as_str(), info.name.as_str()), ("1", "first"));
    assert_eq!(info.disk_size, Some(6 << 20));
    fill(&img, &mut shadow, &mut rng, 200, 0x80);
    let s2 = shadow.clone();
    img.create_snapshot("second", when(200)).expect("create");
    fill(&img, &mut shadow, &mut rng, 200, 0xc0);
    assert_same(&read_all(&img, 1 << 20), &shadow, "active layer (ours)");
    let ours: Vec<(String, String)> = img
        .snapshots()
        .expect("list")
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    img.close().expect("close");
    assert_check_clean(&path);
    let listed = qemu_list(&path);
    assert_eq!(
        listed,
        vec![("1".into(), "first".into()), ("2".into(), "second".into())]
    );
    assert_eq!(ours, listed);
    assert_same(&to_raw(&dir, &path), &shadow, "active layer");
    assert_same(&qemu_snapshot_content(&dir, &path, "first"), &s1, "first");
    assert_same(&qemu_snapshot_content(&dir, &path, "second"), &s2, "second");

    // Delete the first: the second and the active layer stay; the image is clean.
    let img = open(&path, true);
    let gone = img.delete_snapshot(None, Some("first")).expect("delete");
    assert_eq!(gone.map(|g| g.id), Some("1".to_string()));
    assert_eq!(img.delete_snapshot(Some("1"), None).expect("again"), None);
    fill(&img, &mut shadow, &mut rng, 50, 0x20);
    img.close().expect("close");
    assert_check_clean(&path);
    assert_eq!(qemu_list(&path), vec![("2".into(), "second".into())]);
    assert_same(&qemu_snapshot_content(&dir, &path, "second"), &s2, "second");
    assert_same(&to_raw(&dir, &path), &shadow, "active layer");

    // Delete the last: COPIED flags return, the file holds no snapshot table.
    let img = open(&path, true);
    img.delete_snapshot(Some("2"), Some("second"))
        .expect("delete")
        .expect("found");
    // A new snapshot after deletions takes the next id after the highest one left (none).
    img.close().expect("close");
    assert_check_clean(&path);
    assert!(qemu_list(&path).is_empty());
    assert_same(&to_raw(&dir, &path), &shadow, "active layer");
}

#[test]
fn qemu_snapshots_deleted_by_us_and_ours_by_qemu() {
    assert!(have_qemu());
    let dir = TempDir::new("snapx");
    let path = dir.path("x.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "", "4M");
    qemu_io(&path, &["write -P 0x11 0 1M"]);
    qemu_img(&["snapshot", "-c", "qemu1", p]);
    let q1 = to_raw(&dir, &path);
    qemu_io(&path, &["write -P 0x22 512k 1M"]);
    let img = open(&path, true);
    // Ids follow QEMU's: the next number after the highest.
    let ours = img.create_snapshot("ours", when(1)).expect("create");
    assert_eq!(ours.id, "2");
    let o = {
        let mut b = vec![0u8; 4 << 20];
        img.read_at(&mut b, 0).expect("read");
        b
    };
    img.write_at(&vec![0x33; 100_000], 3 << 20).expect("write");
    let qemu_snap = img.snapshots().expect("list");
    assert_eq!(qemu_snap[0].name, "qemu1");
    assert_eq!(qemu_snap[0].icount, Some(0));
    assert_eq!(qemu_snap[1].icount, None);
    assert!(img
        .delete_snapshot(None, Some("qemu1"))
        .expect("d")
        .is_some());
    img.close().expect("close");
    assert_check_clean(&path);
    assert_same(&qemu_snapshot_content(&dir, &path, "ours"), &o, "ours");
    // QEMU deletes ours; then takes one, which we read and keep intact.
    qemu_img(&["snapshot", "-d", "ours", p]);
    assert_check_clean(&path);
    qemu_img(&["snapshot", "-c", "qemu2", p]);
    let q2 = to_raw(&dir, &path);
    let img = open(&path, true);
    img.write_at(&vec![0x44; 2 << 20], 0).expect("write");
    img.close().expect("close");
    assert_check_clean(&path);
    assert_same(&qemu_snapshot_content(&dir, &path, "qemu2"), &q2, "qemu2");
    assert_ne!(q1, q2);
}

#[test]
fn one_bit_refcounts_refuse_snapshots_and_leave_the_file_alone() {
    assert!(have_qemu());
    let dir = TempDir::new("snap1bit");
    let path = dir.path("r.qcow2");
    qemu_create(&path, "refcount_bits=1", "1M");
    qemu_io(&path, &["write -P 0x11 0 64k"]);
    let before = std::fs::read(&path).expect("read");
    let img = open(&path, true);
    let err = img.create_snapshot("s", when(1)).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(err.errno(), libc::EINVAL);
    img.close().expect("close");
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[test]
fn read_only_images_refuse_snapshot_changes() {
    assert!(have_qemu());
    let dir = TempDir::new("snapro");
    let path = dir.path("r.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "", "1M");
    qemu_img(&["snapshot", "-c", "q", p]);
    let img = open(&path, false);
    assert_eq!(img.snapshots().expect("list").len(), 1);
    let e = img.create_snapshot("s", when(1)).expect_err("ro");
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    let e = img.delete_snapshot(None, Some("q")).expect_err("ro");
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert_eq!(e.errno(), libc::EPERM);
}

/// Storage that keeps the file content after every write and flush: each is a state a
/// power cut may leave (writes reach the disk in order).
struct Recorder {
    inner: MemStorage,
    states: Mutex<Vec<Vec<u8>>>,
}

impl Recorder {
    fn keep(&self) {
        if let Ok(mut s) = self.states.lock() {
            s.push(self.inner.to_bytes());
        }
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.keep();
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn truncate(&self, size: u64) -> io::Result<()> {
        self.inner.truncate(size)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)?;
        self.keep();
        Ok(())
    }
}

/// Every state a power cut can leave during a create and a delete: QEMU opens it, its
/// snapshot list is the old or the new one, the active layer and any listed snapshot read
/// exactly as they should, and `qemu-img check` finds nothing beyond leaks and the COPIED
/// flags it repairs (see `snapshot_ops`), so `-r all` makes it clean.
#[test]
fn a_power_cut_at_any_point_leaves_the_old_or_the_new_state() {
    assert!(have_qemu());
    let dir = TempDir::new("snapcrash");
    let path = dir.path("c.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "cluster_size=4096", "1M");
    qemu_io(&path, &["write -P 0x11 0 300k", "write -c -P 0x22 600k 8k"]);
    qemu_img(&["snapshot", "-c", "old", p]);
    qemu_io(&path, &["write -P 0x33 100k 100k"]);
    let active = to_raw(&dir, &path);
    let old = qemu_snapshot_content(&dir, &path, "old");
    let rec = Arc::new(Recorder {
        inner: MemStorage::from_bytes(std::fs::read(&path).expect("read")),
        states: Mutex::new(Vec::new()),
    });
    let img = Qcow2::open(rec.clone(), OpenOptions { read_only: false }).expect("open");
    img.create_snapshot("new", when(3)).expect("create");
    let created = rec.states.lock().expect("l").len();
    img.delete_snapshot(None, Some("old")).expect("delete");
    img.close().expect("close");
    let states = rec.states.lock().expect("l").clone();
    assert!(
        created > 4 && states.len() > created + 2,
        "{created} {}",
        states.len()
    );
    for (k, state) in states.iter().enumerate() {
        let f = dir.path("state.qcow2");
        std::fs::write(&f, state).expect("write");
        let fp = f.to_str().expect("p");
        let list: Vec<String> = qemu_list(&f).into_iter().map(|x| x.1).collect();
        let expect_any = [
            vec!["old".to_string()],
            vec!["old".to_string(), "new".to_string()],
            vec!["new".to_string()],
        ];
        assert!(expect_any.contains(&list), "state {k}: snapshots {list:?}");
        assert_same(&to_raw(&dir, &f), &active, &format!("state {k}: active"));
        if list.contains(&"old".to_string()) {
            assert_same(&qemu_snapshot_content(&dir, &f, "old"), &old, "old");
        }
        if list.contains(&"new".to_string()) {
            assert_same(&qemu_snapshot_content(&dir, &f, "new"), &active, "new");
        }
        let (_, text) = run_status("qemu-img", &["check", "-f", "qcow2", fp]);
        for line in text.lines().filter(|l| l.starts_with("ERROR")) {
            assert!(
                line.starts_with("ERROR OFLAG_COPIED"),
                "state {k}: check found more than leaks and COPIED flags:\n{text}"
            );
        }
        run_status("qemu-img", &["check", "-q", "-r", "all", "-f", "qcow2", fp]);
        assert_check_clean(&f);
    }
    let end = dir.path("end.qcow2");
    std::fs::write(&end, states.last().expect("some")).expect("write");
    assert_check_clean(&end);
}

/// Writers on several threads keep overwriting while snapshots are taken: each snapshot
/// holds, per thread, exactly the blocks that thread wrote before it (whole blocks, in order)
/// and the old content after them.
#[test]
fn snapshots_taken_under_concurrent_writers_hold_whole_writes() {
    assert!(have_qemu());
    let dir = TempDir::new("snapconc");
    let path = dir.path("c.qcow2");
    qemu_create(&path, "cluster_size=4096", "4M");
    // Every block written once before: the writers overwrite clusters the snapshots share.
    qemu_io(&path, &["write -P 0xee 0 4M"]);
    let img = Arc::new(open(&path, true));
    const THREADS: u64 = 4;
    const BLOCK: u64 = 4096;
    let per = (4 << 20) / THREADS / BLOCK;
    // Every writer has finished its first half when the first snapshot starts.
    let half = Arc::new(std::sync::Barrier::new(THREADS as usize + 1));
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            let half = half.clone();
            std::thread::spawn(move || {
                for k in 0..per {
                    if k == per / 2 {
                        half.wait();
                    }
                    let off = (t * per + k) * BLOCK;
                    img.write_at(&vec![(k % 250 + 1) as u8; BLOCK as usize], off)
                        .expect("write");
                }
            })
        })
        .collect();
    half.wait();
    let mut names = Vec::new();
    let mut i = 0;
    while names.len() < 3 || (i < 40 && !writers.iter().all(|w| w.is_finished())) {
        let n = format!("s{i}");
        img.create_snapshot(&n, when(i)).expect("create");
        names.push(n);
        i += 1;
    }
    for w in writers {
        w.join().expect("writer");
    }
    img.create_snapshot("final", when(99)).expect("create");
    names.push("final".into());
    img.close().expect("close");
    assert_check_clean(&path);
    let mut last = vec![per / 2; THREADS as usize];
    for n in &names {
        let data = qemu_snapshot_content(&dir, &path, n);
        for t in 0..THREADS {
            let region = &data[(t * per * BLOCK) as usize..((t + 1) * per * BLOCK) as usize];
            let mut k = 0;
            while k < per {
                let b = &region[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize];
                if b != vec![(k % 250 + 1) as u8; BLOCK as usize].as_slice() {
                    break;
                }
                k += 1;
            }
            let rest = &region[(k * BLOCK) as usize..];
            assert!(
                rest.iter().all(|&x| x == 0xee),
                "{n}, thread {t}: block {k} neither whole nor untouched"
            );
            assert!(k >= last[t as usize], "{n}: thread {t} went back");
            last[t as usize] = k;
        }
    }
    assert_eq!(last, vec![per; THREADS as usize]);
}

/// Persistent bitmaps (loaded, so in use with the dirty-region log) survive snapshot
/// creation and deletion, and are stored cleanly afterwards.
#[test]
fn persistent_bitmaps_survive_snapshots() {
    assert!(have_qemu());
    let dir = TempDir::new("snapbm");
    let path = dir.path("b.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "", "4M");
    qemu_img(&["bitmap", "--add", p, "b1"]);
    qemu_io(&path, &["write -P 0x11 0 1M"]);
    let img = open(&path, true);
    let loaded = img.load_bitmaps().expect("load");
    assert_eq!(loaded.len(), 1);
    img.create_snapshot("s", when(1)).expect("create");
    img.write_at(&vec![0x22; 65536], 2 << 20).expect("write");
    img.create_snapshot("t", when(2)).expect("create");
    img.delete_snapshot(None, Some("s")).expect("delete");
    let mut data = loaded[0].data.clone();
    // Mark the write at 2M (64 KiB granularity: bit 32).
    data[4] |= 1;
    img.store_bitmaps(
        &[qcow2::StoreBitmap {
            name: "b1".into(),
            granularity: loaded[0].granularity,
            auto: true,
            inconsistent_keep_in_use: false,
            data,
        }],
        false,
    )
    .expect("store");
    img.close().expect("close");
    assert_check_clean(&path);
    assert_eq!(qemu_list(&path), vec![("2".into(), "t".into())]);
    let info = qemu_img(&["info", "--output=json", p]);
    assert!(info.contains("\"b1\""), "{info}");
    assert!(!info.contains("in-use"), "{info}");
    let t = qemu_snapshot_content(&dir, &path, "t");
    assert!(t[..1 << 20].iter().all(|&b| b == 0x11));
    assert!(t[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0x22));
}

/// A snapshot table larger than the first read (64 KiB) is read whole, by us and by QEMU.
#[test]
fn a_large_snapshot_table_reads_back_whole() {
    assert!(have_qemu());
    let dir = TempDir::new("snapbig");
    let path = dir.path("big.qcow2");
    qemu_create(&path, "", "1M");
    qemu_io(&path, &["write -P 0x11 0 64k"]);
    let img = open(&path, true);
    let names: Vec<String> = (0..200)
        .map(|i| format!("{i:03}-{}", "n".repeat(400)))
        .collect();
    for (i, n) in names.iter().enumerate() {
        img.create_snapshot(n, when(i as u32)).expect("create");
    }
    img.close().expect("close");
    let img = open(&path, true);
    let listed: Vec<String> = img
        .snapshots()
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, names);
    img.delete_snapshot(Some("100"), None)
        .expect("delete")
        .expect("found");
    img.close().expect("close");
    assert_check_clean(&path);
    let q: Vec<String> = qemu_list(&path).into_iter().map(|r| r.1).collect();
    assert_eq!(q.len(), 199);
    assert!(!q.contains(&names[99]));
}

#[test]
fn snapshots_with_a_cache_of_small_l2_slices() {
    // Unsharing copies L2 tables through the cache and deleting the last snapshot rewrites
    // COPIED flags: with 512-byte slices and a cache of three, every table spans many slices.
    let dir = TempDir::new("snapslice");
    let path = dir.path("s.qcow2");
    qemu_create(&path, "cluster_size=4096", "6M");
    qemu_io(&path, &["write -P 0x11 0 2M", "write -c -P 0x33 3M 64k"]);
    let mut shadow = to_raw(&dir, &path);
    let img = open(&path, true);
    img.set_l2_slice_size(512).expect("slices");
    img.set_cache_capacity(3, 4).expect("capacity");
    let mut rng = Rng(17);
    fill(&img, &mut shadow, &mut rng, 100, 0x40);
    let s1 = shadow.clone();
    img.create_snapshot("first", when(100)).expect("create");
    fill(&img, &mut shadow, &mut rng, 150, 0x80);
    assert_same(&read_all(&img, 1 << 20), &shadow, "active layer (ours)");
    img.close().expect("close");
    assert_check_clean(&path);
    assert_same(&to_raw(&dir, &path), &shadow, "active layer");
    assert_same(&qemu_snapshot_content(&dir, &path, "first"), &s1, "first");
    let img = open(&path, true);
    img.set_l2_slice_size(1024).expect("slices");
    img.set_cache_capacity(2, 4).expect("capacity");
    img.delete_snapshot(None, Some("first"))
        .expect("delete")
        .expect("found");
    fill(&img, &mut shadow, &mut rng, 50, 0x20);
    img.close().expect("close");
    assert_check_clean(&path);
    assert!(qemu_list(&path).is_empty());
    assert_same(&to_raw(&dir, &path), &shadow, "active layer after delete");
}
