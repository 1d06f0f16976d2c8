//! Unit tests of the copy-before-write filter and its snapshot view, over in-memory nodes
//! that count and can fail or slow down the copies.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::drivers::snapshot_access::SnapshotAccessDriver;
use crate::node::{Child, Node, NodeFlags};

const MIB: u64 = 1 << 20;

/// Memory-backed driver; counts writes per 64 KiB cluster; fails writes with ENOSPC after
/// `budget` of them; sleeps `delay` per write.
struct Mem {
    data: Mutex<Vec<u8>>,
    writes: Mutex<HashMap<u64, usize>>,
    budget: AtomicUsize,
    delay: Duration,
}

impl Mem {
    fn new(size: u64, fill: u8) -> Mem {
        Mem {
            data: Mutex::new(vec![fill; size as usize]),
            writes: Mutex::new(HashMap::new()),
            budget: AtomicUsize::new(usize::MAX),
            delay: Duration::ZERO,
        }
    }
}

/// A `Mem` shared between its node and the test.
struct Shared(Arc<Mem>);

impl Driver for Shared {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.0.block_status(offset, len)
    }
    fn facts(&self) -> ImageFacts {
        ImageFacts::default()
    }
}

impl Driver for Mem {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::thread::sleep(self.delay);
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 {
            return Err(errno(libc::ENOSPC));
        }
        if left != usize::MAX {
            self.budget.fetch_sub(1, Ordering::SeqCst);
        }
        let mut w = self.writes.lock().unwrap();
        let c = DEFAULT_CLUSTER;
        for k in offset / c..(offset + data.len() as u64).div_ceil(c) {
            *w.entry(k).or_default() += 1;
        }
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.write(offset, &vec![0; len as usize])
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Data, len))
    }
    fn facts(&self) -> ImageFacts {
        ImageFacts::default()
    }
}

fn node(name: &str, driver: Box<dyn Driver>, children: Vec<Child>) -> NodeRef {
    let flags = NodeFlags {
        discard_unmap: true,
        ..NodeFlags::default()
    };
    Arc::new(Node::new(
        name.into(),
        false,
        driver,
        children,
        false,
        flags,
    ))
}

struct Fleece {
    disk: NodeRef,
    scratch: NodeRef,
    target: Arc<Mem>,
    cbw: NodeRef,
    access: NodeRef,
}

fn fleece(size: u64, target: Mem, cfg: CbwConfig, bitmap: Option<&HBitmap>) -> Fleece {
    let disk = node("disk", Box::new(Mem::new(size, 0x11)), vec![]);
    let target = Arc::new(target);
    let scratch = node("scratch", Box::new(Shared(target.clone())), vec![]);
    let drv = CbwDriver::open(
        disk.clone(),
        scratch.clone(),
        bitmap.map(|b| ("b", b)),
        &cfg,
    )
    .unwrap();
    let children = vec![
        Child {
            role: "file",
            node: disk.clone(),
        },
        Child {
            role: "target",
            node: scratch.clone(),
        },
    ];
    let cbw = node("cbw", Box::new(drv), children);
    let access = node(
        "access",
        Box::new(SnapshotAccessDriver::new(cbw.clone())),
        vec![],
    );
    Fleece {
        disk,
        scratch,
        target,
        cbw,
        access,
    }
}

fn cfg() -> CbwConfig {
    CbwConfig {
        min_cluster_size: 0,
        on_error: OnCbwError::BreakGuestWrite,
        timeout_secs: 0,
    }
}

fn target_writes(f: &Fleece) -> usize {
    f.target.writes.lock().unwrap().values().sum()
}

fn assert_view(f: &Fleece, offset: u64, len: u64, fill: u8) {
    let mut buf = vec![0; len as usize];
    f.access.read(offset, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == fill), "view at {offset}");
}

#[test]
fn racing_writers_copy_each_cluster_once_and_readers_see_the_old_data() {
    let f = Arc::new(fleece(8 * MIB, Mem::new(8 * MIB, 0), cfg(), None));
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let w = f.clone();
        threads.push(std::thread::spawn(move || {
            let f = w;
            for i in 0..64u64 {
                // overlapping, unaligned writes from every thread
                let off = (i * 128 * 1024 + t * 4096) % (8 * MIB - 200_000);
                f.cbw.write(off, &[0x22 + t as u8; 100_000]).unwrap();
            }
        }));
        let f = f.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..32u64 {
                assert_view(&f, (i * 256 * 1024 + t * 512) % (7 * MIB), 300_000, 0x11);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let writes = f.target.writes.lock().unwrap().clone();
    assert!(!writes.is_empty());
    assert!(writes.values().all(|&n| n == 1), "{writes:?}");
    assert_view(&f, 0, 8 * MIB, 0x11);
}

#[test]
fn copies_whole_clusters_at_the_largest_granularity() {
    let mut c = cfg();
    c.min_cluster_size = 256 * 1024;
    let f = fleece(4 * MIB, Mem::new(4 * MIB, 0), c, None);
    f.cbw.write(MIB + 4096, &[0x33; 4096]).unwrap();
    assert_eq!(target_writes(&f), 4);
    let mut buf = vec![0; 4096];
    f.disk.read(MIB + 4096, &mut buf).unwrap();
    assert_eq!(buf, vec![0x33; 4096]);
    assert_view(&f, MIB, 256 * 1024, 0x11);
    // a second write in the same cluster copies nothing
    f.cbw.write(MIB, &[0x44; 512]).unwrap();
    assert_eq!(target_writes(&f), 4);
    assert!(CbwDriver::open(f.disk.clone(), f.scratch.clone(), None, &{
        let mut c = cfg();
        c.min_cluster_size = 100_000;
        c
    })
    .is_err_and(
        |e| e == "Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
    ));
}

#[test]
fn bitmap_limits_protection_and_reads() {
    let mut b = HBitmap::new(4 * MIB, 4096).unwrap();
    b.set(MIB, 4096);
    let f = fleece(4 * MIB, Mem::new(4 * MIB, 0), cfg(), Some(&b));
    f.cbw.write(0, &[0x33; 2 * MIB as usize]).unwrap();
    assert_eq!(target_writes(&f), 1);
    assert_view(&f, MIB, DEFAULT_CLUSTER, 0x11);
    let mut buf = vec![0; 512];
    let err = f.access.read(0, &mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    let err = f.access.block_status(MIB, 2 * DEFAULT_CLUSTER).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    assert_eq!(
        f.access.write(MIB, &buf).unwrap_err().raw_os_error(),
        Some(libc::ENOTSUP)
    );
}

#[test]
fn discard_releases_whole_clusters_only() {
    let f = fleece(4 * MIB, Mem::new(4 * MIB, 0), cfg(), None);
    f.access.discard(4096, 3 * DEFAULT_CLUSTER).unwrap();
    // clusters 1 and 2 released; 0 and 3 still readable
    assert_view(&f, 0, DEFAULT_CLUSTER, 0x11);
    assert_view(&f, 3 * DEFAULT_CLUSTER, DEFAULT_CLUSTER, 0x11);
    let mut buf = vec![0; 512];
    assert!(f.access.read(DEFAULT_CLUSTER, &mut buf).is_err());
    let before = target_writes(&f);
    f.cbw.write(DEFAULT_CLUSTER, &[0x55; 65536]).unwrap();
    // nothing copied for the released cluster (the discard itself wrote the target)
    assert_eq!(target_writes(&f), before);
}

#[test]
fn full_target_fails_guest_writes_or_breaks_the_snapshot() {
    let target = Mem::new(4 * MIB, 0);
    target.budget.store(1, Ordering::SeqCst);
    let f = fleece(4 * MIB, target, cfg(), None);
    f.cbw.write(0, &[0x33; 512]).unwrap();
    let err = f.cbw.write(MIB, &[0x33; 512]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_view(&f, 0, 4 * MIB, 0x11);
    let mut buf = vec![0; 512];
    f.disk.read(MIB, &mut buf).unwrap();
    assert_eq!(buf, vec![0x11; 512]);

    let target = Mem::new(4 * MIB, 0);
    target.budget.store(1, Ordering::SeqCst);
    let mut c = cfg();
    c.on_error = OnCbwError::BreakSnapshot;
    let f = fleece(4 * MIB, target, c, None);
    f.cbw.write(0, &[0x33; 512]).unwrap();
    f.cbw.write(MIB, &[0x33; 512]).unwrap();
    f.cbw.write(2 * MIB, &[0x33; 512]).unwrap();
    f.disk.read(2 * MIB, &mut buf).unwrap();
    assert_eq!(buf, vec![0x33; 512]);
    let err = f.access.read(0, &mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
}

#[test]
fn timed_out_copy_fails_the_write_and_finishes_in_the_background() {
    let mut target = Mem::new(4 * MIB, 0);
    target.delay = Duration::from_millis(1500);
    let mut c = cfg();
    c.timeout_secs = 1;
    let f = fleece(4 * MIB, target, c, None);
    let err = f.cbw.write(0, &[0x33; 512]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT));
    let mut buf = vec![0; 512];
    f.disk.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x11; 512]);
    // close waits for the copy still running
    f.cbw.close().unwrap();
    assert_eq!(target_writes(&f), 1);
    assert_view(&f, 0, DEFAULT_CLUSTER, 0x11);
}
