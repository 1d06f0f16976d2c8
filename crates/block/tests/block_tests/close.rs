//! Closing nodes without the graph lock over disk I/O ([`Graph::del_staged`], detached
//! closes, the staged add's fallback and orphans, shutdown): a held flush or close leaves
//! queries, adds and deletes of other nodes running, and each still ends as QEMU's would.

use std::fs::OpenOptions;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use block::graph::{CbwOptions, ChildChange, ChildRef, DriverOptions, NodeOptions};
use block::node::{Child, Node, NodeFlags};
use block::testing::{Controls, Op, TestDriver};
use block::{Graph, NodeRef};

use crate::common::{file_opts, held, lock, meanwhile, names, null_opts};

const WAIT: Duration = Duration::from_secs(20);

/// A graph with a test node "t" and a null node "other".
fn graph_with_test_node() -> (Arc<Mutex<Graph>>, NodeRef, Arc<Controls>) {
    let graph = Arc::new(Mutex::new(Graph::new()));
    let (t, ctl) = TestDriver::node("t", 1 << 20);
    lock(&graph).add_node_ref(t.clone()).expect("add t");
    lock(&graph)
        .add(&null_opts("other", 4096))
        .expect("add other");
    (graph, t, ctl)
}

fn start_del(graph: &Arc<Mutex<Graph>>, name: &str) -> thread::JoinHandle<block::Result<()>> {
    let g = graph.clone();
    let name = name.to_string();
    thread::spawn(move || Graph::del_staged(&g, &name))
}

#[test]
fn del_does_not_hold_the_graph_over_a_flush() {
    let (graph, t, ctl) = graph_with_test_node();
    ctl.hold(Op::Flush);
    let del = start_del(&graph, "t");
    held(&ctl, 1);

    // Meanwhile, on another thread (a lock held over the flush fails the test, not hangs it).
    let g = graph.clone();
    let rx = meanwhile(move || {
        let listed = names(&lock(&g));
        let dup = Graph::add_staged(&g, &null_opts("t", 512)).map(|_| ());
        let added = Graph::add_staged(&g, &null_opts("n2", 512)).map(|_| ());
        let del_other = Graph::del_staged(&g, "other");
        (listed, dup, added, del_other)
    });
    let got = rx.recv_timeout(WAIT);
    ctl.release(Op::Flush);
    let deleted = del.join().expect("del thread");
    let (listed, dup, added, del_other) = got.expect("graph commands waited for the flush");

    // While it flushes the node is still in the graph, its name taken.
    assert_eq!(listed, ["t", "other"]);
    assert_eq!(
        dup.expect_err("name in use").to_string(),
        "Duplicate nodes with node-name='t'"
    );
    added.expect("an unrelated add runs");
    del_other.expect("an unrelated del runs");
    deleted.expect("the delete completes");
    assert_eq!(names(&lock(&graph)), ["n2"]);
    assert!(
        t.write(0, &[1; 512]).is_err(),
        "the deleted node is closed when del returns"
    );
    assert!(ctl.log().iter().any(|(op, ..)| *op == Op::Close));
}

#[test]
fn del_with_a_failed_flush_changes_nothing() {
    let (graph, t, ctl) = graph_with_test_node();
    ctl.fail(Op::Flush, libc::EIO, 1);
    let err = Graph::del_staged(&graph, "t").expect_err("flush fails");
    assert!(
        err.to_string().starts_with("Flushing node 't'"),
        "unexpected error: {err}"
    );
    assert_eq!(names(&lock(&graph)), ["t", "other"]);
    t.write(0, &[1; 512]).expect("the node is still open");
    assert!(!ctl.log().iter().any(|(op, ..)| *op == Op::Close));
    Graph::del_staged(&graph, "t").expect("del once the flush works");
    assert_eq!(names(&lock(&graph)), ["other"]);
}

#[test]
fn a_closing_node_keeps_its_name_and_its_edges_until_closed() {
    let graph = Arc::new(Mutex::new(Graph::new()));
    let (f, _) = TestDriver::node("f", 1 << 20);
    lock(&graph).add_node_ref(f.clone()).expect("add f");
    let (d, ctl) = TestDriver::new(1 << 20);
    let p: NodeRef = Arc::new(Node::new(
        "p".to_string(),
        false,
        Box::new(d),
        vec![Child {
            role: "file",
            node: f.clone(),
        }],
        false,
        NodeFlags::default(),
    ));
    lock(&graph).add_node_ref(p).expect("add p");
    ctl.hold(Op::Close);
    let del = start_del(&graph, "p");
    held(&ctl, 1);

    let (tx, rx) = mpsc::channel();
    let g = graph.clone();
    let adder = thread::spawn(move || {
        let r = Graph::add_staged(&g, &null_opts("p", 512)).map(|_| ());
        let _ = tx.send(());
        r
    });
    // Detached, but its name is not free yet: the add waits for the close.
    thread::sleep(Duration::from_millis(300));
    let during = {
        let g = lock(&graph);
        let edges: Vec<String> = g.edges_into(&f).into_iter().map(|e| e.who).collect();
        (names(&g), edges, g.get("p").is_none())
    };
    let waited = rx.try_recv().is_err();
    let again = Graph::del_staged(&graph, "p");
    ctl.release(Op::Close);
    del.join().expect("del thread").expect("del p");
    adder
        .join()
        .expect("add thread")
        .expect("add after the close");

    assert_eq!(during.0, ["f"], "p is out of the name table while closing");
    assert!(during.2);
    assert_eq!(
        during.1,
        ["node 'p'"],
        "the closing node keeps its edge onto f"
    );
    assert!(
        waited,
        "an add of the closing node's name waits for the close"
    );
    assert_eq!(
        again.expect_err("gone").to_string(),
        "Failed to find node with node-name='p'"
    );
    let g = lock(&graph);
    assert_eq!(names(&g), ["f", "p"]);
    assert!(
        g.edges_into(&f).is_empty(),
        "the closed node's edge is gone"
    );
}

/// A FIFO in `dir` (opening it read-only stalls until a writer comes).
fn fifo(dir: &tempfile::TempDir) -> String {
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    fifo.to_str().expect("utf-8 path").to_string()
}

fn unstall(fifo: &str) {
    drop(
        OpenOptions::new()
            .write(true)
            .open(fifo)
            .expect("open FIFO writer"),
    );
}

/// A read-only copy-before-write "x": its `file` an inline file over `fifo` (opened first,
/// stalls), its `target` `target`.
fn cbw_opts(fifo: &str, target: ChildRef) -> NodeOptions {
    NodeOptions {
        node_name: Some("x".to_string()),
        read_only: true,
        driver: DriverOptions::CopyBeforeWrite {
            file: ChildRef::Inline(Box::new(file_opts(None, fifo))),
            target,
            bitmap: None,
            config: CbwOptions::default(),
        },
        ..NodeOptions::default()
    }
}

#[test]
fn an_add_that_must_fail_opens_without_the_lock_and_gives_the_plain_error() {
    let cases = [
        (
            ChildRef::Inline(Box::new(null_opts("other", 512))),
            "Duplicate nodes with node-name='other'",
        ),
        (
            ChildRef::Name("ghost".to_string()),
            "Cannot find device='ghost' nor node-name='ghost'",
        ),
    ];
    for (target, want) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = fifo(&dir);
        let graph = Arc::new(Mutex::new(Graph::new()));
        lock(&graph)
            .add(&null_opts("other", 4096))
            .expect("add other");
        let g = graph.clone();
        let opts = cbw_opts(&fifo, target);
        let adder = thread::spawn(move || Graph::add_staged(&g, &opts));
        // The open stalls in its first child; the graph answers meanwhile.
        let g = graph.clone();
        let rx = meanwhile(move || {
            thread::sleep(Duration::from_millis(200));
            let listed = names(&lock(&g));
            let added = Graph::add_staged(&g, &null_opts("n2", 512)).map(|_| ());
            (listed, added)
        });
        let got = rx.recv_timeout(WAIT);
        unstall(&fifo);
        let Err(err) = adder.join().expect("add thread") else {
            panic!("the add must fail");
        };
        let (listed, added) = got.expect("the graph was locked over the open");
        assert_eq!(listed, ["other"]);
        added.expect("another add runs");
        assert_eq!(err.to_string(), want);
        assert_eq!(names(&lock(&graph)), ["other", "n2"]);
        let g = lock(&graph);
        let other = g.get("other").expect("other");
        assert!(g.edges_into(&other).is_empty());
    }
}

/// Open file descriptors of this process on `path`.
fn fds_on(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t == path)
        .count()
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed for this test");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

#[test]
fn an_orphan_backing_pinned_by_a_failed_add_is_closed_when_the_add_ends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    let (bs, ts) = (base.to_str().expect("utf-8"), top.to_str().expect("utf-8"));
    qemu_img(&["create", "-q", "-f", "raw", bs, "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", bs, "-F", "raw", ts]);
    let fifo = fifo(&dir);
    let base = std::fs::canonicalize(&base).expect("canonical path");

    let graph = Arc::new(Mutex::new(Graph::new()));
    let top_opts = NodeOptions {
        node_name: Some("top".to_string()),
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Inline(Box::new(file_opts(None, ts))),
            backing: None,
            cache: Default::default(),
        },
        ..NodeOptions::default()
    };
    let top = lock(&graph).add(&top_opts).expect("open top");
    let backing = top.child("backing").expect("backing from the header");
    let backing_name = backing.name().to_string();
    assert!(fds_on(&base) > 0);

    // An add naming the backing, stalled in its first child, then failing (an empty FIFO
    // is no qcow2 image).
    let g = graph.clone();
    let opts = NodeOptions {
        node_name: Some("y".to_string()),
        read_only: true,
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Inline(Box::new(file_opts(None, &fifo))),
            backing: Some(Some(ChildRef::Name(backing.name().to_string()))),
            cache: Default::default(),
        },
        ..NodeOptions::default()
    };
    let adder = thread::spawn(move || Graph::add_staged(&g, &opts));
    let start = Instant::now();
    while !lock(&graph).opening() {
        assert!(start.elapsed() < WAIT, "the add never started");
        thread::sleep(Duration::from_millis(5));
    }
    // A reopen drops the backing meanwhile: an orphan, but pinned by the add.
    let orphans = {
        let mut g = lock(&graph);
        g.reopen_child(
            &top,
            &ChildChange {
                role: "backing",
                to: None,
            },
        )
        .expect("drop backing");
        g.close_orphans(std::slice::from_ref(&backing))
    };
    assert!(orphans.nodes().is_empty(), "pinned: not closed yet");
    Graph::close_detached(&graph, orphans);
    assert!(lock(&graph).get(backing.name()).is_some());
    unstall(&fifo);
    let result = adder.join().expect("add thread");
    assert!(result.is_err(), "the add must fail");
    assert!(
        lock(&graph).get(&backing_name).is_none(),
        "the orphan left the graph when the add ended"
    );
    drop(backing);
    assert_eq!(fds_on(&base), 0, "the orphan's file is closed");
    let left = names(&lock(&graph));
    assert_eq!(left.len(), 2, "top and its file: {left:?}");
    assert_eq!(left[1], "top");
}

#[test]
fn shutdown_waits_for_an_add_in_progress_and_refuses_new_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = fifo(&dir);
    let graph = Arc::new(Mutex::new(Graph::new()));
    let g = graph.clone();
    let slow = NodeOptions {
        node_name: Some("slow".to_string()),
        read_only: true,
        driver: DriverOptions::Raw {
            file: ChildRef::Inline(Box::new(file_opts(None, &fifo))),
            offset: None,
            size: None,
        },
        ..NodeOptions::default()
    };
    let adder = thread::spawn(move || Graph::add_staged(&g, &slow));
    let start = Instant::now();
    while !lock(&graph).opening() {
        assert!(start.elapsed() < WAIT, "the add never started");
        thread::sleep(Duration::from_millis(5));
    }
    assert!(lock(&graph).begin_shutdown().is_none(), "an add is opening");
    let late = Graph::add_staged(&graph, &null_opts("late", 512));
    let Err(late) = late else {
        panic!("an add after shutdown began must be refused");
    };
    assert_eq!(late.to_string(), "blockd is shutting down");
    unstall(&fifo);
    adder
        .join()
        .expect("add thread")
        .expect("the add in progress completes");
    let closing = lock(&graph).begin_shutdown().expect("nothing in progress");
    let closed: Vec<&str> = closing.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(closed.len(), 2);
    assert_eq!(closed[0], "slow", "parents first");
    Graph::close_detached(&graph, closing);
    assert!(names(&lock(&graph)).is_empty());
}

fn flushes(ctl: &Controls) -> usize {
    ctl.log().iter().filter(|(op, ..)| *op == Op::Flush).count()
}

#[test]
fn reopen_read_only_does_not_hold_the_graph_over_a_flush() {
    let (graph, t, ctl) = graph_with_test_node();
    ctl.hold(Op::Flush);
    let g = graph.clone();
    let node = t.clone();
    let reopen = thread::spawn(move || Graph::reopen_read_only_staged(&g, &node));
    held(&ctl, 1);

    // Meanwhile, on another thread (a lock held over the flush fails the test, not hangs it).
    let g = graph.clone();
    let rx = meanwhile(move || {
        let listed = names(&lock(&g));
        let added = Graph::add_staged(&g, &null_opts("n2", 512)).map(|_| ());
        let del_other = Graph::del_staged(&g, "other");
        (listed, added, del_other)
    });
    let got = rx.recv_timeout(WAIT);
    // A delete of the node being reopened waits for the reopen.
    let del = start_del(&graph, "t");
    thread::sleep(Duration::from_millis(100));
    let del_waited = !del.is_finished();
    assert!(!t.read_only(), "switched before the flush ended");
    ctl.release(Op::Flush);
    let reopened = reopen.join().expect("reopen thread");
    let (listed, added, del_other) = got.expect("graph commands waited for the flush");

    assert_eq!(listed, ["t", "other"]);
    added.expect("an unrelated add runs");
    del_other.expect("an unrelated del runs");
    reopened.expect("the reopen completes");
    assert!(del_waited, "the delete did not wait for the reopen");
    del.join()
        .expect("del thread")
        .expect("the delete after it");
    assert_eq!(names(&lock(&graph)), ["n2"]);
    // One flush by the reopen (none again under the lock), one by the delete.
    assert_eq!(flushes(&ctl), 2);
}

#[test]
fn reopen_read_only_flushes_again_what_was_written_during_its_flush() {
    let (graph, t, ctl) = graph_with_test_node();
    ctl.hold(Op::Flush);
    let g = graph.clone();
    let node = t.clone();
    let reopen = thread::spawn(move || Graph::reopen_read_only_staged(&g, &node));
    held(&ctl, 1);
    // A direct write (no root to drain) while the reopen flushes.
    t.write(0, &[7; 512]).expect("still writable");
    ctl.release(Op::Flush);
    reopen.join().expect("reopen thread").expect("reopen");
    assert!(t.read_only());
    assert_eq!(
        flushes(&ctl),
        2,
        "the write was not flushed before the switch"
    );
    let mut buf = [0u8; 512];
    t.read(0, &mut buf).expect("read");
    assert_eq!(buf, [7; 512]);
}

#[test]
fn reopen_read_only_with_a_failed_flush_changes_nothing() {
    let (graph, t, ctl) = graph_with_test_node();
    ctl.fail(Op::Flush, libc::EIO, 1);
    let err = Graph::reopen_read_only_staged(&graph, &t).expect_err("flush fails");
    assert!(
        err.to_string()
            .starts_with("Could not flush before reopening"),
        "unexpected error: {err}"
    );
    assert!(!t.read_only());
    t.write(0, &[1; 512]).expect("the node is still writable");
    // Not left marked as being reopened: a delete goes through at once.
    Graph::del_staged(&graph, "t").expect("del after the failed reopen");
    assert_eq!(names(&lock(&graph)), ["other"]);
}

#[test]
fn a_command_holding_a_node_delays_its_delete_and_a_deleted_one_is_gone() {
    let (graph, t, ctl) = graph_with_test_node();
    // Held first: the delete waits for the command.
    let hold = Graph::hold_node(&graph, &t).expect("t is in the graph");
    let del = start_del(&graph, "t");
    thread::sleep(Duration::from_millis(100));
    assert!(
        !del.is_finished(),
        "the delete did not wait for the command"
    );
    assert!(!ctl.log().iter().any(|(op, ..)| *op == Op::Flush));
    drop(hold);
    del.join()
        .expect("del thread")
        .expect("the delete after it");
    // Looked up before the delete, held after it: gone.
    assert!(Graph::hold_node(&graph, &t).is_none());

    // Held while a delete flushes: waits for the delete, then finds the node gone.
    let other = lock(&graph).get("other").expect("other");
    let (o, octl) = TestDriver::node("o", 1 << 20);
    lock(&graph).add_node_ref(o.clone()).expect("add o");
    octl.hold(Op::Flush);
    let del = start_del(&graph, "o");
    held(&octl, 1);
    let g = graph.clone();
    let looked_up = o.clone();
    let late = thread::spawn(move || Graph::hold_node(&g, &looked_up).is_none());
    thread::sleep(Duration::from_millis(100));
    assert!(!late.is_finished(), "the hold did not wait for the delete");
    octl.release(Op::Flush);
    del.join().expect("del thread").expect("delete");
    assert!(late.join().expect("hold thread"), "acted on a deleted node");
    // A node that stays is held at once.
    assert!(Graph::hold_node(&graph, &other).is_some());
    // And a reopen of a deleted node gives QEMU's text for an unknown node.
    let err = Graph::reopen_read_only_staged(&graph, &o).expect_err("gone");
    assert_eq!(err.to_string(), "Failed to find node with node-name='o'");
}

#[test]
fn shutdown_waits_for_a_hold_and_wakes_when_it_ends() {
    let (graph, t, _ctl) = graph_with_test_node();
    let hold = Graph::hold_node(&graph, &t).expect("t is in the graph");
    let g = graph.clone();
    let (tx, rx) = mpsc::channel();
    let shut = thread::spawn(move || {
        let d = Graph::shutdown_wait(&g);
        let _ = tx.send(Instant::now());
        lock(&g).close_detached_now(d);
    });
    thread::sleep(Duration::from_millis(300));
    assert!(!shut.is_finished(), "shutdown did not wait for the hold");
    // Adds are refused once shutdown began, while it waits.
    assert!(lock(&graph).is_shut());
    let released = Instant::now();
    drop(hold);
    let woke = rx.recv_timeout(WAIT).expect("shutdown went on");
    shut.join().expect("shutdown thread");
    // Woken by the hold's end (the graph's condvar), not by a poll or the 200 ms bound.
    assert!(
        woke.duration_since(released) < Duration::from_millis(150),
        "shutdown woke {:?} after the hold ended",
        woke.duration_since(released)
    );
    assert!(names(&lock(&graph)).is_empty());
}
