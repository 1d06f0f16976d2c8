//! Permissions before bytes: a blockdev-add that fails at any step of a nested open (file
//! open, image lock, header, bitmap load, backing chain at depth 2, going writable) leaves
//! every file of the chain byte-identical, no bitmap flagged in use, and no lock held.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use block::drivers::lock::lock_perm;
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::perm::Perm;
use block::Graph;
use qcow2::{FileStorage, Qcow2};

use crate::common::{create_qcow2, qcow2_opts, Refused};

const SIZE: u64 = 1 << 20;

/// base.qcow2 <- mid.qcow2 <- top.qcow2, top with a persistent bitmap `b` holding dirty bits.
struct Chain {
    _dir: tempfile::TempDir,
    top: PathBuf,
    mid: PathBuf,
    base: PathBuf,
}

fn chain() -> Chain {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&base, SIZE, None);
    create_qcow2(&mid, SIZE, Some("base.qcow2"));
    create_qcow2(&top, SIZE, Some("mid.qcow2"));
    let mut graph = Graph::new();
    let node = graph
        .add(&qcow2_opts("t", &top, false, Some(None)))
        .expect("open top");
    block::bitmap_ops::add(&node, "b", None, true, false).expect("add bitmap");
    node.write(65536, &[7; 4096]).expect("write");
    graph.close_all();
    let c = Chain {
        _dir: dir,
        top,
        mid,
        base,
    };
    assert_eq!(in_use(&c.top), vec![("b".to_string(), false)]);
    c
}

impl Chain {
    fn files(&self) -> [&Path; 3] {
        [&self.top, &self.mid, &self.base]
    }
    fn snapshot(&self) -> Vec<Option<Vec<u8>>> {
        self.files().iter().map(|p| std::fs::read(p).ok()).collect()
    }
}

/// (bitmap, in_use) as stored in the image.
fn in_use(path: &Path) -> Vec<(String, bool)> {
    let storage = FileStorage::open(path, false).expect("open image");
    let image = Qcow2::open(
        std::sync::Arc::new(storage),
        qcow2::OpenOptions { read_only: true },
    )
    .expect("parse image");
    image
        .bitmaps()
        .into_iter()
        .map(|b| (b.name, b.in_use))
        .collect()
}

/// Another process's view: an independent descriptor holding lock bytes.
fn hold(path: &Path, perm: Perm, shared: Perm) -> File {
    let f = File::open(path).expect("open for lock");
    lock_perm(&f, perm.bits().into(), shared.bits().into()).expect("take lock");
    f
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Offset of the first entry of bitmap `b`'s table (found through the header extension).
fn bitmap_table_entry(path: &Path) -> u64 {
    let img = std::fs::read(path).expect("read image");
    let mut at = be32(&img, 100) as usize;
    loop {
        let (kind, len) = (be32(&img, at), be32(&img, at + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            let dir = be64(&img, at + 8 + 16) as usize;
            return be64(&img, dir);
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open to patch");
    f.write_all_at(bytes, offset).expect("patch");
}

/// Try to add top read-write with its backing chain from the image; it must fail with
/// `expect` in the message and change nothing.
fn refused_and_untouched(c: &Chain, expect: &str, holders: Vec<File>) -> block::Error {
    let before = c.snapshot();
    let mut graph = Graph::new();
    let existing = graph
        .add(&NodeOptions {
            node_name: Some("other".to_string()),
            driver: DriverOptions::Null {
                size: 512,
                read_zeroes: true,
            },
            ..NodeOptions::default()
        })
        .expect("unrelated node");

    let err = graph.add(&qcow2_opts("t", &c.top, false, None)).refused();

    assert!(
        err.message().contains(expect),
        "expected '{expect}' in '{}'",
        err.message()
    );
    assert_eq!(graph.nodes().len(), 1, "only the unrelated node is left");
    assert!(std::sync::Arc::ptr_eq(&graph.nodes()[0], &existing));
    assert!(c.snapshot() == before, "an image changed");
    // No lock left behind: once the other holders are gone, a writer gets everything.
    drop(holders);
    for path in c.files() {
        if path.exists() {
            let f = File::open(path).expect("open");
            lock_perm(&f, 0xf, 0).expect("all locks free after the failed open");
        }
    }
    err
}

#[test]
fn chain_opens_when_nothing_fails() {
    let c = chain();
    let mut graph = Graph::new();
    let top = graph.add(&qcow2_opts("t", &c.top, false, None)).unwrap();
    assert_eq!(in_use(&c.top), vec![("b".to_string(), true)]);
    let depth = graph.nodes().len();
    assert_eq!(depth, 6, "top, mid, base and their files");
    graph.close_all();
    drop(top);
    assert_eq!(in_use(&c.top), vec![("b".to_string(), false)]);
}

#[test]
fn failed_file_open_changes_nothing() {
    let c = chain();
    std::fs::rename(&c.top, c.top.with_extension("gone")).unwrap();
    let err = refused_and_untouched(&c, "No such file or directory", vec![]);
    assert_eq!(err.errno(), Some(libc::ENOENT), "the cause is kept");
}

#[test]
fn top_held_read_only_elsewhere_is_refused_before_any_byte_is_written() {
    // The reported defect: another daemon has the image open read-only.
    let c = chain();
    let qsd = hold(
        &c.top,
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    );
    let _ = refused_and_untouched(&c, "Failed to get \"write\" lock", vec![qsd]);
    assert_eq!(in_use(&c.top), vec![("b".to_string(), false)]);
}

#[test]
fn bad_header_changes_nothing() {
    let c = chain();
    // cluster_bits = 40
    patch(&c.top, 20, &40u32.to_be_bytes());
    let _ = refused_and_untouched(&c, "cluster", vec![]);
}

#[test]
fn bitmap_that_cannot_be_loaded_changes_nothing() {
    let c = chain();
    let entry = bitmap_table_entry(&c.top);
    let mut raw = [0u8; 8];
    use std::os::unix::fs::FileExt;
    File::open(&c.top)
        .unwrap()
        .read_exact_at(&mut raw, entry)
        .unwrap();
    let bad = u64::from_be_bytes(raw) | 0x2; // a reserved bit
    patch(&c.top, entry, &bad.to_be_bytes());
    // Byte-identical files (checked by the helper) include the bitmap's in_use flag; the
    // qcow2 crate itself refuses this table at open, so it cannot be read back through it.
    let _ = refused_and_untouched(&c, "bitmap 'b'", vec![]);
}

#[test]
fn missing_backing_at_depth_two_changes_nothing() {
    let c = chain();
    std::fs::remove_file(&c.base).unwrap();
    let _ = refused_and_untouched(&c, "Could not open backing file", vec![]);
}

#[test]
fn backing_at_depth_two_locked_by_a_writer_changes_nothing() {
    let c = chain();
    let writer = hold(&c.base, Perm::CONSISTENT_READ | Perm::WRITE, Perm::NONE);
    let _ = refused_and_untouched(&c, "Failed to get \"consistent read\" lock", vec![writer]);
}

#[test]
fn corrupt_image_refused_when_going_writable_changes_nothing() {
    // Readable as a probe, refused only when it would become writable (the last step).
    let c = chain();
    let img = std::fs::read(&c.top).unwrap();
    let inc = be64(&img, 72) | 0x2;
    patch(&c.top, 72, &inc.to_be_bytes());
    let _ = refused_and_untouched(&c, "corrupt", vec![]);
}

#[test]
fn refused_format_over_a_named_file_puts_its_locks_back() {
    let c = chain();
    let mut graph = Graph::new();
    let file = graph
        .add(&NodeOptions {
            node_name: Some("f".to_string()),
            driver: DriverOptions::File {
                filename: c.top.to_str().unwrap().to_string(),
                locking: true,
            },
            ..NodeOptions::default()
        })
        .unwrap();
    let _qsd = hold(
        &c.top,
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    );
    let before = std::fs::read(&c.top).unwrap();
    let opts = NodeOptions {
        node_name: Some("t".to_string()),
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Name("f".to_string()),
            backing: Some(None),
            cache: Default::default(),
        },
        ..NodeOptions::default()
    };

    let err = graph.add(&opts).refused();

    assert_eq!(err.message(), "Failed to get \"write\" lock");
    assert_eq!(std::fs::read(&c.top).unwrap(), before);
    assert_eq!(file.applied_needs(), block::perm::Needs::default());
    assert_eq!(graph.nodes().len(), 1);
}

#[test]
fn reopen_read_only_stores_bitmaps_first_and_read_write_claims_them_again() {
    let c = chain();
    let mut graph = Graph::new();
    let top = graph
        .add(&qcow2_opts("t", &c.top, false, Some(None)))
        .unwrap();
    top.write(0, &[3; 4096]).unwrap();
    assert_eq!(in_use(&c.top), vec![("b".to_string(), true)]);

    graph.reopen_read_only(&top, true).unwrap();

    assert!(top.read_only());
    assert_eq!(in_use(&c.top), vec![("b".to_string(), false)]);
    assert_eq!(
        top.write(0, &[4; 512]).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    // Another reader may now share the image; a writer may not.
    let reader = hold(
        &c.top,
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    );
    let err = graph.reopen_read_only(&top, false).unwrap_err();
    assert_eq!(err.message(), "Failed to get \"write\" lock");
    assert!(top.read_only());
    assert_eq!(in_use(&c.top), vec![("b".to_string(), false)]);
    drop(reader);

    graph.reopen_read_only(&top, false).unwrap();

    assert_eq!(in_use(&c.top), vec![("b".to_string(), true)]);
    top.write(8192, &[5; 512]).unwrap();
    let mut back = [0u8; 4096];
    top.read(0, &mut back).unwrap();
    assert_eq!(back, [3; 4096]);
    assert!(crate::common::count(&top, "b") >= 2 * 65536);
    graph.close_all();
    assert_eq!(in_use(&c.top), vec![("b".to_string(), false)]);
}
