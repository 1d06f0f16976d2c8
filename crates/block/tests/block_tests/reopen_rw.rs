//! Switches to read-write over host files: a qcow2 node with a persistent bitmap over an
//! inline file writes its bitmaps' in-use flags through the file's new writable descriptor
//! (swapped in before the format's prepare, put back if the switch fails); write permission
//! on a read-only node is refused with QEMU's text; a reopen list is switched in an order
//! that lets each node find its children as the list leaves them.

use std::path::Path;
use std::sync::{Arc, Mutex};

use block::graph::{switch_order, ChildRef, DriverOptions, NodeOptions};
use block::{Graph, NodeRef};
use qcow2::{FileStorage, Qcow2};

use crate::common::{create_corrupt_qcow2, create_qcow2, lock, qcow2_opts};

/// (bitmap, in_use) as stored in the image at `path`.
fn in_use(path: &Path) -> Vec<(String, bool)> {
    let storage = FileStorage::open(path, false).expect("open image");
    let image = Qcow2::open(Arc::new(storage), qcow2::OpenOptions { read_only: true })
        .expect("parse image");
    image
        .bitmaps()
        .into_iter()
        .map(|b| (b.name, b.in_use))
        .collect()
}

/// How many descriptors of this process are open for writing on `path`.
fn writable_fds(path: &Path) -> usize {
    let want = std::fs::canonicalize(path).expect("canonical path");
    let dir = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd");
    dir.filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == want))
        .filter(|e| {
            let info = format!("/proc/self/fdinfo/{}", e.file_name().to_string_lossy());
            let text = std::fs::read_to_string(info).unwrap_or_default();
            let flags = text
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32
        })
        .count()
}

/// A qcow2 node "q" opened read-only over an inline file (a read-only descriptor), its
/// image holding a persistent bitmap "b".
fn read_only_with_bitmap(path: &Path) -> (Arc<Mutex<Graph>>, NodeRef) {
    create_qcow2(path, 1 << 20, None);
    let writer = Graph::new();
    let mut writer = Mutex::new(writer);
    let q = lock(&writer)
        .add(&qcow2_opts("q", path, false, Some(None)))
        .expect("open read-write");
    block::bitmap_ops::add(&q, "b", None, true, false).expect("add bitmap");
    q.write(0, &[7; 4096]).expect("write");
    writer
        .get_mut()
        .unwrap_or_else(|e| e.into_inner())
        .close_all();
    assert_eq!(in_use(path), vec![("b".to_string(), false)]);
    let graph = Arc::new(Mutex::new(Graph::new()));
    let q = lock(&graph)
        .add(&qcow2_opts("q", path, true, Some(None)))
        .expect("open read-only");
    (graph, q)
}

#[test]
fn a_read_only_qcow2_with_a_bitmap_over_an_inline_file_goes_read_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("b.qcow2");
    let (graph, q) = read_only_with_bitmap(&path);
    let file = q.child("file").expect("inline file");
    assert_eq!(writable_fds(&path), 0);

    Graph::reopen_staged(&graph, &q, false).expect("to read-write");

    assert!(!q.read_only() && !file.read_only());
    assert_eq!(in_use(&path), vec![("b".to_string(), true)]);
    q.write(4096, &[8; 4096]).expect("writable");
    let mut buf = vec![0; 4096];
    q.read(0, &mut buf).expect("read");
    assert!(buf == vec![7; 4096], "data changed");
    // Only the new descriptor is left open for writing.
    assert_eq!(writable_fds(&path), 1);
    lock(&graph).close_all();
    assert_eq!(in_use(&path), vec![("b".to_string(), false)]);
}

#[test]
fn a_failed_format_switch_puts_the_inline_files_descriptor_back() {
    // A corrupt image opens read-only; going read-write the format refuses it after its
    // file's writable descriptor was swapped in.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.qcow2");
    create_corrupt_qcow2(&path);
    let img = std::fs::read(&path).expect("read");
    let graph = Arc::new(Mutex::new(Graph::new()));
    let q = lock(&graph)
        .add(&qcow2_opts("q", &path, true, Some(None)))
        .expect("open read-only");
    let file = q.child("file").expect("inline file");

    let err = Graph::reopen_staged(&graph, &q, false).expect_err("refused");

    assert!(
        err.to_string().contains("corrupt"),
        "unexpected error: {err}"
    );
    assert!(q.read_only() && file.read_only());
    assert_eq!(writable_fds(&path), 0, "a writable descriptor was kept");
    assert_eq!(std::fs::read(&path).expect("read"), img, "image changed");
    let mut buf = vec![0; 512];
    q.read(0, &mut buf).expect("still readable");
}

fn named_file_and_format(path: &Path, file_ro: bool) -> (Arc<Mutex<Graph>>, NodeRef, NodeRef) {
    create_qcow2(path, 1 << 20, None);
    let graph = Arc::new(Mutex::new(Graph::new()));
    let f = lock(&graph)
        .add(&NodeOptions {
            read_only: file_ro,
            ..crate::common::file_opts(Some("f"), path.to_str().expect("utf-8"))
        })
        .expect("add f");
    let q = lock(&graph)
        .add(&format_over_f(true))
        .expect("add q read-only");
    (graph, f, q)
}

fn format_over_f(read_only: bool) -> NodeOptions {
    NodeOptions {
        node_name: Some(format!("q{}", if read_only { "" } else { "w" })),
        read_only,
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Name("f".to_string()),
            backing: Some(None),
            cache: Default::default(),
        },
        ..NodeOptions::default()
    }
}

#[test]
fn write_on_a_read_only_named_file_is_refused_with_qemus_text() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("r.qcow2");
    let (graph, f, q) = named_file_and_format(&path, true);
    let before = std::fs::read(&path).expect("read");

    let err = Graph::reopen_staged(&graph, &q, false).expect_err("refused");
    assert_eq!(err.to_string(), "Block node is read-only");
    assert!(q.read_only() && f.read_only());
    let added = lock(&graph).add(&format_over_f(false)).map(|_| ());
    let err = added.expect_err("a writer over a read-only file");
    assert_eq!(err.to_string(), "Block node is read-only");
    assert!(lock(&graph).get("qw").is_none());

    assert_eq!(std::fs::read(&path).expect("read"), before, "image changed");
    // Once the file is read-write, the format follows.
    Graph::reopen_staged(&graph, &f, false).expect("file to read-write");
    Graph::reopen_staged(&graph, &q, false).expect("format to read-write");
    q.write(0, &[3; 512]).expect("writable");
}

#[test]
fn a_reopen_list_switches_read_only_parents_first_and_read_write_children_first() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("o.qcow2");
    let (_graph, f, q) = named_file_and_format(&path, false);
    let (qs, fs) = (q.clone(), f.clone());
    assert_eq!(
        switch_order(&[(q.clone(), false), (f.clone(), false)]),
        [1, 0]
    );
    assert_eq!(
        switch_order(&[(f.clone(), false), (q.clone(), false)]),
        [0, 1]
    );
    assert_eq!(
        switch_order(&[(fs.clone(), true), (qs.clone(), true)]),
        [1, 0]
    );
    assert_eq!(
        switch_order(&[(qs.clone(), true), (fs.clone(), true)]),
        [0, 1]
    );
    // Read-only switches first, then read-write ones.
    assert_eq!(switch_order(&[(f, false), (q, true)]), [1, 0]);
}
