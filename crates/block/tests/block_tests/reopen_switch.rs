//! blockdev-reopen's switch between read-only and read-write with no disk I/O under the graph
//! lock ([`Graph::reopen_switch`]): a qcow2 node over a test disk whose reads are held or
//! failed. While the driver reopens its image, other graph commands answer and a delete of
//! the node waits; a failure at each step leaves the node, its permissions and its image as
//! they were.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use block::drivers::lock::lock_perm;
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::perm::Perm;
use block::testing::{Controls, Op, TestDriver};
use block::{Graph, NodeRef};
use qcow2::{FileStorage, Qcow2};

use crate::common::{
    create_corrupt_qcow2, create_qcow2, file_opts, held, lock, meanwhile, names, null_opts,
    writer_root,
};

const WAIT: Duration = Duration::from_secs(20);
const DISK: usize = 4 << 20;

struct Setup {
    graph: Arc<Mutex<Graph>>,
    q: NodeRef,
    disk: NodeRef,
    ctl: Arc<Controls>,
}

/// A graph with a qcow2 node "q" (`read_only` or not, with a persistent bitmap "b") over a
/// test disk "disk", and a null node "other".
fn setup(read_only: bool) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("img.qcow2");
    create_qcow2(&path, 1 << 20, None);
    let bytes = std::fs::read(&path).expect("read image");
    let graph = Arc::new(Mutex::new(Graph::new()));
    let (disk, ctl) = TestDriver::node("disk", DISK);
    disk.write(0, &bytes).expect("image onto the disk");
    lock(&graph).add_node_ref(disk.clone()).expect("add disk");
    lock(&graph)
        .add(&null_opts("other", 4096))
        .expect("add other");
    let opts = |ro| NodeOptions {
        node_name: Some("q".to_string()),
        read_only: ro,
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Name("disk".to_string()),
            backing: Some(None),
            cache: Default::default(),
        },
        ..NodeOptions::default()
    };
    let q = lock(&graph).add(&opts(false)).expect("add q");
    block::bitmap_ops::add(&q, "b", None, true, false).expect("add bitmap");
    q.write(0, &[9; 4096]).expect("write");
    if read_only {
        Graph::reopen_staged(&graph, &q, true).expect("to read-only");
    }
    assert_eq!(q.read_only(), read_only);
    Setup {
        graph,
        q,
        disk,
        ctl,
    }
}

/// (bitmap, in_use) as stored in the image on the test disk.
fn in_use(disk: &NodeRef) -> Vec<(String, bool)> {
    let mut bytes = vec![0; DISK];
    disk.read(0, &mut bytes).expect("read disk");
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), &bytes).expect("copy image");
    let storage = FileStorage::open(f.path(), false).expect("open copy");
    let image = Qcow2::open(Arc::new(storage), qcow2::OpenOptions { read_only: true })
        .expect("parse image");
    image
        .bitmaps()
        .into_iter()
        .map(|b| (b.name, b.in_use))
        .collect()
}

fn writes_disk(disk: &NodeRef) -> bool {
    disk.applied_needs().perm.contains(Perm::WRITE)
}

fn read_back(q: &NodeRef) -> Vec<u8> {
    let mut buf = vec![0; 4096];
    q.read(0, &mut buf).expect("read");
    buf
}

/// Hold the reads (the driver's reopen of its image reads the header first), switch `q` to
/// `read_only` on another thread, and check that graph commands answer meanwhile and a
/// delete of `q` waits. Returns the switch's result.
fn switch_while_reads_are_held(s: &Setup, read_only: bool) -> block::Result<()> {
    s.ctl.hold(Op::Read);
    let (g, node) = (s.graph.clone(), s.q.clone());
    let switch = thread::spawn(move || Graph::reopen_staged(&g, &node, read_only));
    held(&s.ctl, 1);

    let g = s.graph.clone();
    let rx = meanwhile(move || {
        let listed = names(&lock(&g));
        let added = Graph::add_staged(&g, &null_opts("n2", 512)).map(|_| ());
        let del_other = Graph::del_staged(&g, "other");
        (listed, added, del_other)
    });
    let got = rx.recv_timeout(WAIT);
    let g = s.graph.clone();
    let del = thread::spawn(move || Graph::del_staged(&g, "q"));
    thread::sleep(Duration::from_millis(100));
    let del_waited = !del.is_finished();
    assert_eq!(s.q.read_only(), !read_only, "switched before its I/O ended");
    // Either way the write permission is held while the image is reopened: going read-write
    // it was taken before the driver touched the image, going read-only it goes last.
    assert!(writes_disk(&s.disk));
    s.ctl.release(Op::Read);
    let r = switch.join().expect("switch thread");
    let (listed, added, del_other) = got.expect("graph commands waited for the image's reopen");
    assert_eq!(listed, ["disk", "other", "q"]);
    added.expect("an unrelated add runs");
    del_other.expect("an unrelated del runs");
    assert!(del_waited, "the delete did not wait for the switch");
    // The delete ran after the switch: q is gone, its bitmap stored not in use.
    del.join().expect("del thread").expect("delete after it");
    assert_eq!(names(&lock(&s.graph)), ["disk", "n2"]);
    r
}

#[test]
fn switch_to_read_write_does_not_hold_the_graph_over_the_image_reopen() {
    let s = setup(true);
    assert!(!writes_disk(&s.disk));
    switch_while_reads_are_held(&s, false).expect("the switch completes");
}

#[test]
fn a_node_going_read_write_stays_read_only_to_its_users_until_it_is() {
    // What exports and devices ask before they write (`Cannot export read-only node as
    // writable`): still read-only while the image reopens, though the locks are taken.
    let s = setup(true);
    s.ctl.hold(Op::Read);
    let (g, node) = (s.graph.clone(), s.q.clone());
    let switch = thread::spawn(move || Graph::reopen_staged(&g, &node, false));
    held(&s.ctl, 1);
    assert!(s.q.read_only());
    assert!(writes_disk(&s.disk));
    assert_eq!(
        s.q.write(0, &[1; 512]).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    s.ctl.release(Op::Read);
    switch
        .join()
        .expect("switch thread")
        .expect("the switch completes");
    assert!(!s.q.read_only());
    s.q.write(0, &[1; 512]).expect("writable once switched");
}

#[test]
fn switch_to_read_only_does_not_hold_the_graph_over_the_image_reopen() {
    let s = setup(false);
    switch_while_reads_are_held(&s, true).expect("the switch completes");
    assert_eq!(in_use(&s.disk), vec![("b".to_string(), false)]);
}

#[test]
fn switches_keep_data_bitmaps_and_permissions() {
    let s = setup(false);
    assert!(writes_disk(&s.disk));
    Graph::reopen_staged(&s.graph, &s.q, true).expect("to read-only");
    assert!(s.q.read_only());
    assert!(!writes_disk(&s.disk));
    assert_eq!(in_use(&s.disk), vec![("b".to_string(), false)]);
    assert_eq!(
        s.q.write(0, &[1; 512]).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    assert!(read_back(&s.q) == vec![9; 4096], "data changed");
    Graph::reopen_staged(&s.graph, &s.q, false).expect("to read-write");
    assert!(!s.q.read_only());
    assert!(writes_disk(&s.disk));
    assert_eq!(in_use(&s.disk), vec![("b".to_string(), true)]);
    s.q.write(4096, &[5; 512]).expect("writable again");
    assert!(read_back(&s.q) == vec![9; 4096], "data changed");
}

/// `q` read-only as set up: still readable, nothing writes the disk, the bitmap stored not
/// in use, and nothing left marked (a delete of another node and a later switch go through).
fn still_read_only(s: &Setup) {
    assert!(s.q.read_only());
    assert!(!writes_disk(&s.disk), "the write permission was kept");
    assert_eq!(in_use(&s.disk), vec![("b".to_string(), false)]);
    assert!(read_back(&s.q) == vec![9; 4096], "data changed");
    Graph::reopen_staged(&s.graph, &s.q, false).expect("a later switch");
    assert_eq!(in_use(&s.disk), vec![("b".to_string(), true)]);
}

#[test]
fn failed_read_of_the_image_going_read_write_changes_nothing() {
    let s = setup(true);
    s.ctl.fail(Op::Read, libc::EIO, 1);
    let err = Graph::reopen_staged(&s.graph, &s.q, false).expect_err("the reopen fails");
    assert!(
        err.to_string().starts_with("Could not reopen: "),
        "unexpected error: {err}"
    );
    still_read_only(&s);
}

#[test]
fn failed_claim_of_the_bitmaps_going_read_write_changes_nothing() {
    let s = setup(true);
    // The image opens for writing, then flagging its bitmap in use fails.
    s.ctl.fail(Op::Write, libc::EIO, 1);
    let err = Graph::reopen_staged(&s.graph, &s.q, false).expect_err("the reopen fails");
    assert!(
        err.to_string().starts_with("Could not reopen: "),
        "unexpected error: {err}"
    );
    still_read_only(&s);
}

/// `q` read-write as set up: writable, data kept (`byte` at 0), and nothing left marked (a
/// later switch goes through).
fn still_read_write(s: &Setup, byte: u8) {
    assert!(!s.q.read_only());
    assert!(writes_disk(&s.disk), "the write permission was dropped");
    s.q.write(8192, &[6; 512]).expect("still writable");
    assert!(read_back(&s.q) == vec![byte; 4096], "data changed");
    Graph::reopen_staged(&s.graph, &s.q, true).expect("a later switch");
    assert_eq!(in_use(&s.disk), vec![("b".to_string(), false)]);
}

#[test]
fn failed_read_of_the_image_going_read_only_changes_nothing() {
    let s = setup(false);
    s.ctl.fail(Op::Read, libc::EIO, 1);
    let err = Graph::reopen_staged(&s.graph, &s.q, true).expect_err("the reopen fails");
    assert_eq!(err.to_string(), "Could not reopen: Input/output error");
    still_read_write(&s, 9);
}

#[test]
fn a_writer_attached_during_the_switch_to_read_only_refuses_it() {
    let s = setup(false);
    s.ctl.hold(Op::Read);
    let (g, node) = (s.graph.clone(), s.q.clone());
    let switch = thread::spawn(move || Graph::reopen_staged(&g, &node, true));
    held(&s.ctl, 1);
    // Still read-write while the image reopens: an export writing through it is allowed.
    let (g, node) = (s.graph.clone(), s.q.clone());
    let attached = meanwhile(move || writer_root(&mut lock(&g), &node)).recv_timeout(WAIT);
    s.ctl.release(Op::Read);
    let root = attached.expect("the attach waited for the image's reopen");
    let err = switch.join().expect("switch thread").expect_err("refused");
    assert_eq!(
        err.to_string(),
        "Read-only block node 'q' cannot support read-write users"
    );
    {
        let n = root.begin();
        n.write(0, &[4; 4096]).expect("the writer writes");
    }
    lock(&s.graph).detach_root(&root);
    still_read_write(&s, 4);
}

/// Lock bytes another process could take on `path`: for each permission, whether it can be
/// held alone, and whether a reader can refuse it to others.
fn lock_probe(path: &Path) -> Vec<(bool, bool)> {
    (0..4)
        .map(|bit| {
            let f = File::open(path).expect("open for lock");
            let p = 1u32 << bit;
            let alone = lock_perm(&f, p, 0xf).is_ok();
            let g = File::open(path).expect("open for lock");
            let refuse = lock_perm(&g, 1, 0xf & !p).is_ok();
            (alone, refuse)
        })
        .collect()
}

#[test]
fn refused_switch_to_read_write_of_a_file_gives_its_locks_back() {
    // A corrupt image opens read-only; going read-write it is refused when reopened.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.qcow2");
    create_corrupt_qcow2(&path);
    let graph = Arc::new(Mutex::new(Graph::new()));
    let file = lock(&graph)
        .add(&file_opts(Some("f"), path.to_str().expect("utf-8")))
        .expect("open the file read-write");
    let q = lock(&graph)
        .add(&NodeOptions {
            node_name: Some("q".to_string()),
            read_only: true,
            driver: DriverOptions::Qcow2 {
                file: ChildRef::Name("f".to_string()),
                backing: Some(None),
                cache: Default::default(),
            },
            ..NodeOptions::default()
        })
        .expect("open read-only");
    let locks = lock_probe(&path);
    let before = std::fs::read(&path).expect("read");

    let err = Graph::reopen_staged(&graph, &q, false).expect_err("refused");

    assert!(
        err.to_string().contains("corrupt"),
        "unexpected error: {err}"
    );
    assert!(q.read_only());
    assert_eq!(lock_probe(&path), locks, "locks changed");
    assert_eq!(std::fs::read(&path).expect("read"), before, "image changed");
    assert!(!file.applied_needs().perm.contains(Perm::WRITE));
}

#[test]
fn snapshot_commit_switches_its_base_without_holding_the_graph() {
    // blockdev-snapshot's commit: the base goes read-only as a reopen's switch does.
    let s = setup(false);
    let dir = tempfile::tempdir().expect("temp dir");
    let ov_path = dir.path().join("ov.qcow2");
    create_qcow2(&ov_path, 1 << 20, None);
    let ov = lock(&s.graph)
        .add(&crate::common::qcow2_opts(
            "ov",
            &ov_path,
            false,
            Some(None),
        ))
        .expect("add overlay");
    let prepared = lock(&s.graph).snapshot_prepare(&s.q, &ov).expect("prepare");
    s.ctl.hold(Op::Read);
    let (g, base) = (s.graph.clone(), s.q.clone());
    let commit = thread::spawn(move || {
        let prep = Graph::prepare_read_only(&g, std::slice::from_ref(&base)).expect("flush");
        prepared.commit_staged(&g, &prep);
        lock(&g).reopen_done(prep);
    });
    held(&s.ctl, 1);
    let g = s.graph.clone();
    let got = meanwhile(move || {
        let listed = names(&lock(&g));
        let del_other = Graph::del_staged(&g, "other");
        (listed, del_other)
    })
    .recv_timeout(WAIT);
    assert!(!s.q.read_only(), "switched before its I/O ended");
    s.ctl.release(Op::Read);
    commit.join().expect("commit thread");
    let (listed, del_other) = got.expect("graph commands waited for the base's reopen");
    assert!(listed.iter().any(|n| n == "ov") && listed.iter().any(|n| n == "other"));
    del_other.expect("an unrelated del runs");
    assert!(s.q.read_only());
    assert!(!writes_disk(&s.disk));
    assert_eq!(in_use(&s.disk), vec![("b".to_string(), false)]);
    // Unwritten reads through the overlay come from the base.
    let mut buf = vec![0; 4096];
    ov.read(0, &mut buf).expect("read through the overlay");
    assert!(buf == vec![9; 4096], "data changed");
}

#[test]
fn a_file_opened_read_only_goes_read_write_on_a_new_descriptor_holding_the_locks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("r.qcow2");
    create_qcow2(&path, 1 << 20, None);
    let graph = Arc::new(Mutex::new(Graph::new()));
    let q = lock(&graph)
        .add(&crate::common::qcow2_opts("q", &path, true, Some(None)))
        .expect("open read-only");
    let file = q.child("file").expect("inline file");
    let ro_locks = lock_probe(&path);

    Graph::reopen_staged(&graph, &q, false).expect("to read-write");

    assert!(!q.read_only() && !file.read_only());
    q.write(0, &[0x42; 4096])
        .expect("writes through the new descriptor");
    // The writer's locks are held (by the new descriptor): another writer is refused.
    let f = File::open(&path).expect("open");
    assert_eq!(
        lock_perm(&f, Perm::WRITE.bits().into(), 0xf),
        Err("Failed to get \"write\" lock".to_string())
    );
    let rw_locks = lock_probe(&path);
    assert_ne!(rw_locks, ro_locks);
    // And back: the locks are a reader's again.
    Graph::reopen_staged(&graph, &q, true).expect("to read-only");
    assert_eq!(lock_probe(&path), ro_locks, "a reader's locks");
    assert!(read_back(&q) == vec![0x42; 4096], "data changed");
    Graph::reopen_staged(&graph, &q, false).expect("read-write again");
    assert_eq!(lock_probe(&path), rw_locks);
    lock(&graph).close_all();
    // Every lock released at close (the old descriptors' too).
    let f = File::open(&path).expect("open");
    lock_perm(&f, 0xf, 0).expect("all locks free after close");
    drop(f);
    let out = std::process::Command::new("qemu-img")
        .args(["check", path.to_str().expect("utf-8")])
        .output()
        .expect("qemu-img must be installed for this test");
    assert!(out.status.success(), "qemu-img check: {out:?}");
}
