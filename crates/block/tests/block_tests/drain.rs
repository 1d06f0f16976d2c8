//! Drained sections whose wait for requests in flight runs without the graph lock: while a
//! request is held in a driver (a stalled disk) and a re-wiring waits for it, other graph
//! commands answer; a root attached meanwhile sends nothing before the change; once the
//! request is released the change is made and every write is where it belongs.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use block::edge::Root;
use block::graph::ChildRef;
use block::testing::{Controls, Op, TestDriver};
use block::{Graph, NodeRef};

use crate::common::{create_qcow2, meanwhile, null_opts, qcow2_opts, raw_opts, writer_root};

const SIZE: usize = 1 << 20;
const BLOCK: usize = 4096;
/// Long enough for anything that does not wait on the held request.
const ANSWER: Duration = Duration::from_secs(10);
/// How long something that must wait is watched not to finish.
const STILL: Duration = Duration::from_millis(300);

/// A graph with a test node "t" and an export-like root writing through it, whose next write
/// is held in the driver: returns them and the writer's thread (which then writes 0x22 over
/// the held 0x11 at offset 0 and returns the node each write started on).
struct Stalled {
    graph: Arc<Mutex<Graph>>,
    t: NodeRef,
    ctl: Arc<Controls>,
    root: Arc<Root>,
    writer: JoinHandle<Vec<String>>,
}

fn stalled() -> Stalled {
    let (t, ctl) = TestDriver::node("t", SIZE);
    let mut g = Graph::new();
    g.add_node_ref(t.clone()).expect("add t");
    let root = writer_root(&mut g, &t);
    let graph = Arc::new(Mutex::new(g));
    ctl.hold(Op::Write);
    let writer = {
        let root = root.clone();
        std::thread::spawn(move || {
            let mut on = Vec::new();
            for byte in [0x11u8, 0x22] {
                let r = root.begin();
                on.push(r.name().to_string());
                r.write(0, &[byte; BLOCK]).expect("write");
            }
            on
        })
    };
    ctl.wait_for_waiting(1);
    Stalled {
        graph,
        t,
        ctl,
        root,
        writer,
    }
}

/// Graph commands that must answer while a re-wiring waits: an add of an unrelated node, a
/// read-only reopen of it and a query of the nodes.
fn graph_answers(graph: &Arc<Mutex<Graph>>, name: &str) {
    let (g, n) = (graph.clone(), name.to_string());
    let names = meanwhile(move || {
        let node = g
            .lock()
            .unwrap()
            .add(&null_opts(&n, 4096))
            .expect("add an unrelated node");
        Graph::reopen_read_only_staged(&g, &node).expect("reopen it read-only");
        assert!(node.read_only());
        let g = g.lock().unwrap();
        g.nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect::<Vec<_>>()
    });
    let names = names
        .recv_timeout(ANSWER)
        .expect("the graph lock was held while a drained section waited for a request");
    assert!(names.iter().any(|n| n == name));
}

fn not_yet<T>(rx: &Receiver<T>, what: &str) {
    assert!(rx.recv_timeout(STILL).is_err(), "{what} went ahead");
}

fn read0(node: &NodeRef) -> Vec<u8> {
    let mut buf = vec![0; BLOCK];
    node.read(0, &mut buf).expect("read");
    buf
}

#[test]
fn a_filter_goes_in_over_a_held_request_while_the_graph_answers() {
    let s = stalled();
    let rewire = {
        let (graph, t) = (s.graph.clone(), s.t.clone());
        meanwhile(move || {
            Graph::drained_staged(&graph, std::slice::from_ref(&t), |g| {
                g.insert_above(&t, &raw_opts("f", ChildRef::Name("t".into())))
            })
        })
    };
    not_yet(&rewire, "the re-wiring (a request is in flight)");
    graph_answers(&s.graph, "other");

    // A root attached now (it reaches "t") starts stopped: nothing of it gets through
    // before the change, and what it sends then starts on the new wiring.
    let late = writer_root(&mut s.graph.lock().unwrap(), &s.t);
    let late_io = {
        let late = late.clone();
        meanwhile(move || {
            let r = late.begin();
            r.write(BLOCK as u64, &[0x77; BLOCK]).expect("write");
            r.name().to_string()
        })
    };
    not_yet(&late_io, "a request of a root attached during the wait");
    assert_eq!(s.ctl.waiting(), 1);

    s.ctl.release(Op::Write);
    let f = rewire
        .recv_timeout(ANSWER)
        .expect("re-wiring")
        .expect("insert");
    assert_eq!(late_io.recv_timeout(ANSWER).expect("late write"), "f");
    // The held write finished on the wiring it started on; the next one went through "f".
    assert_eq!(s.writer.join().expect("writer"), ["t", "f"]);
    assert!(Arc::ptr_eq(&s.root.node(), &f));
    assert!(Arc::ptr_eq(&late.node(), &f));
    assert_eq!(
        read0(&s.t),
        vec![0x22; BLOCK],
        "the writer's last write won"
    );
    let mut buf = vec![0; BLOCK];
    s.t.read(BLOCK as u64, &mut buf).expect("read");
    assert_eq!(buf, vec![0x77; BLOCK]);
    let writes: Vec<u64> = s
        .ctl
        .log()
        .into_iter()
        .filter(|(op, ..)| *op == Op::Write)
        .map(|(_, off, _)| off)
        .collect();
    assert_eq!(writes.iter().filter(|o| **o == 0).count(), 2);
}

/// A section that has finished waiting still stops roots attached while it lasts (a
/// transaction's drain, which ends only after its actions), and resumes them at its end.
#[test]
fn a_root_attached_inside_a_staged_section_waits_for_its_end() {
    let s = stalled();
    let section = {
        let (graph, t) = (s.graph.clone(), s.t.clone());
        meanwhile(move || Graph::drain_begin_staged(&graph, std::slice::from_ref(&t)))
    };
    not_yet(&section, "the drain (a request is in flight)");
    graph_answers(&s.graph, "other");
    s.ctl.release(Op::Write);
    let section = section.recv_timeout(ANSWER).expect("drained");
    assert_eq!(s.root.in_flight(), 0);

    let late = writer_root(&mut s.graph.lock().unwrap(), &s.t);
    let late_io = {
        let late = late.clone();
        meanwhile(move || late.begin().write(BLOCK as u64, &[0x77; BLOCK]))
    };
    not_yet(&late_io, "a request of a root attached inside the section");
    // A nested in-lock section finds every root idle.
    let nested = {
        let (graph, t) = (s.graph.clone(), s.t.clone());
        meanwhile(move || graph.lock().unwrap().drained(&[t], |_| ()))
    };
    nested
        .recv_timeout(ANSWER)
        .expect("a nested section waited");
    drop(section);
    late_io
        .recv_timeout(ANSWER)
        .expect("resumed")
        .expect("write");
    assert_eq!(s.writer.join().expect("writer"), ["t", "t"]);
    assert_eq!(read0(&s.t), vec![0x22; BLOCK]);
}

/// `blockdev-snapshot`'s wiring and a transaction abort's undo over a held request: the graph
/// answers meanwhile, the writer moves onto the overlay and back, its writes land in the
/// overlay while it is on top.
#[test]
fn a_snapshot_goes_on_and_off_over_a_held_request_while_the_graph_answers() {
    let s = stalled();
    let dir = tempfile::tempdir().expect("temp dir");
    let ov_p = dir.path().join("ov.qcow2");
    create_qcow2(&ov_p, SIZE as u64, None);
    let ov = s
        .graph
        .lock()
        .unwrap()
        .add(&qcow2_opts("ov", &ov_p, false, Some(None)))
        .expect("add overlay");
    let prepare = {
        let (graph, t, ov) = (s.graph.clone(), s.t.clone(), ov.clone());
        meanwhile(move || Graph::snapshot_prepare_staged(&graph, &t, &ov))
    };
    not_yet(&prepare, "the snapshot (a request is in flight)");
    graph_answers(&s.graph, "other");
    s.ctl.release(Op::Write);
    let prepared = prepare
        .recv_timeout(ANSWER)
        .expect("snapshot")
        .expect("prepare");
    assert_eq!(s.writer.join().expect("writer"), ["t", "ov"]);
    assert!(Arc::ptr_eq(&s.root.node(), &ov));
    assert_eq!(
        read0(&s.t),
        vec![0x11; BLOCK],
        "the held write is in the base"
    );
    assert_eq!(read0(&ov), vec![0x22; BLOCK], "the next one in the overlay");

    // Undo over another held request.
    s.ctl.hold(Op::Write);
    let base_writer = {
        let t = s.t.clone();
        meanwhile(move || t.write(2 * BLOCK as u64, &[0x33; BLOCK]))
    };
    s.ctl.wait_for_waiting(1);
    s.ctl.hold(Op::Read);
    let held_read = {
        let root = s.root.clone();
        meanwhile(move || {
            let r = root.begin();
            // A read the overlay leaves to its backing (a cluster it has not allocated):
            // held in "t".
            r.read(SIZE as u64 / 2, &mut [0; BLOCK]).expect("read");
            r.name().to_string()
        })
    };
    s.ctl.wait_for_waiting(2);
    let undo = {
        let graph = s.graph.clone();
        meanwhile(move || prepared.undo_staged(&graph))
    };
    not_yet(&undo, "the undo (a request is in flight)");
    graph_answers(&s.graph, "other2");
    s.ctl.release(Op::Read);
    s.ctl.release(Op::Write);
    undo.recv_timeout(ANSWER).expect("undo");
    assert_eq!(held_read.recv_timeout(ANSWER).expect("read"), "ov");
    base_writer
        .recv_timeout(ANSWER)
        .expect("base write")
        .expect("write");
    assert!(Arc::ptr_eq(&s.root.node(), &s.t));
    assert!(ov.child("backing").is_none());
}

/// A root that a change made while a section lives re-wires onto the section's nodes is
/// stopped by it too (not only roots attached meanwhile): its requests wait for the end.
#[test]
fn a_root_rewired_onto_a_drained_node_waits_for_the_sections_end() {
    let (x, _xctl) = TestDriver::node("x", SIZE);
    let (q, _qctl) = TestDriver::node("q", SIZE);
    let mut g = Graph::new();
    g.add_node_ref(x.clone()).expect("add x");
    g.add_node_ref(q.clone()).expect("add q");
    let p = g
        .add(&raw_opts("p", ChildRef::Name("q".into())))
        .expect("add p");
    let on_p = writer_root(&mut g, &p);
    let graph = Arc::new(Mutex::new(g));
    let section = Graph::drain_begin_staged(&graph, std::slice::from_ref(&x));
    // p's file moves onto x: on_p now reaches the drained node.
    graph
        .lock()
        .unwrap()
        .set_child(&p, "file", &x)
        .expect("set_child");
    let io = {
        let on_p = on_p.clone();
        meanwhile(move || on_p.begin().write(0, &[0x44; BLOCK]))
    };
    not_yet(&io, "a request of a root re-wired onto a drained node");
    drop(section);
    io.recv_timeout(ANSWER).expect("resumed").expect("write");
    assert_eq!(read0(&x), vec![0x44; BLOCK]);
    assert_eq!(read0(&q), vec![0; BLOCK]);
}
