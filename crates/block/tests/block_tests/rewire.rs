//! Re-wiring while in use: roots follow replace/insert/remove, refused changes leave the
//! wiring as it was, and writers running through a root while a pass-through filter is
//! inserted and removed over and over lose and reorder nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use block::edge::{Root, RootKind};
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::perm::Perm;
use block::Graph;

use crate::common::*;

fn filter_opts(name: &str, below: &str) -> NodeOptions {
    raw_opts(name, ChildRef::Name(below.to_string()))
}

#[test]
fn insert_and_remove_a_filter_moves_roots_and_parents() {
    let img = image(1 << 20, 0);
    let (mut graph, disk) = raw_graph(&path(&img));
    let top = graph.add(&filter_opts("top", "disk")).unwrap();
    let root = writer_root(&mut graph, &disk);

    let f = graph
        .insert_above(&disk, &filter_opts("f", "disk"))
        .unwrap();

    assert!(Arc::ptr_eq(&root.node(), &f));
    assert!(Arc::ptr_eq(&top.child("file").unwrap(), &f));
    assert!(Arc::ptr_eq(&f.child("file").unwrap(), &disk));
    assert_eq!(
        graph.del("disk").unwrap_err().message(),
        "Block device disk is in use"
    );

    graph.remove_filter(&f).unwrap();

    assert!(Arc::ptr_eq(&root.node(), &disk));
    assert!(Arc::ptr_eq(&top.child("file").unwrap(), &disk));
    assert!(graph.get("f").is_none());
}

#[test]
fn refused_replace_leaves_the_wiring_and_locks_as_they_were() {
    let img = image(1 << 20, 0);
    let other = image(1 << 20, 0);
    let mut graph = Graph::new();
    let mut locked = |name: &str, file: &str| {
        let mut f = file_opts(None, file);
        f.driver = DriverOptions::File {
            filename: file.to_string(),
            locking: true,
        };
        graph_add(&mut graph, raw_opts(name, ChildRef::Inline(Box::new(f))))
    };
    fn graph_add(g: &mut Graph, o: NodeOptions) -> block::NodeRef {
        g.add(&o).expect("add")
    }
    let a = locked("a", &path(&img));
    let b = locked("b", &path(&other));
    let root = writer_root(&mut graph, &a);
    // Someone else holds `other` exclusively: moving the writer onto it must fail.
    let holder = std::fs::File::open(other.path()).unwrap();
    block::drivers::lock::lock_perm(&holder, 0x3, 0).unwrap();
    let before: Vec<_> = graph.nodes().iter().map(|n| n.applied_needs()).collect();

    let err = graph.replace_node(&a, &b).unwrap_err();

    assert!(err.message().contains("lock"), "{}", err.message());
    assert!(Arc::ptr_eq(&root.node(), &a));
    let after: Vec<_> = graph.nodes().iter().map(|n| n.applied_needs()).collect();
    assert_eq!(before, after);
}

#[test]
fn a_cycle_is_refused() {
    let img = image(1 << 20, 0);
    let (mut graph, disk) = raw_graph(&path(&img));
    let top = graph.add(&filter_opts("top", "disk")).unwrap();

    let err = graph.set_child(&disk, "file", &top).unwrap_err();

    assert!(err.message().contains("cycle"));
}

#[test]
fn writers_keep_every_write_in_order_while_a_filter_comes_and_goes() {
    const BLOCK: usize = 4096;
    const WRITERS: usize = 4;
    const ROUNDS: usize = 300;
    let img = image(WRITERS * 8 * BLOCK, 0);
    let (graph, disk) = raw_graph(&path(&img));
    let graph = Arc::new(Mutex::new(graph));
    let root = writer_root(&mut graph.lock().unwrap(), &disk);
    let stop = Arc::new(AtomicBool::new(false));

    let rewirer = {
        let (graph, stop, disk) = (graph.clone(), stop.clone(), disk.clone());
        std::thread::spawn(move || {
            let mut cycles = 0;
            while !stop.load(Ordering::Acquire) {
                let mut g = graph.lock().unwrap();
                let f = g
                    .insert_above(&disk, &filter_opts("f", "disk"))
                    .expect("insert");
                drop(g);
                std::thread::yield_now();
                let mut g = graph.lock().unwrap();
                g.remove_filter(&f).expect("remove");
                cycles += 1;
            }
            cycles
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let root = root.clone();
            std::thread::spawn(move || {
                // Each writer owns 8 blocks and rewrites them round after round; every write
                // is read back at once (through whatever wiring is current then).
                let mut last = vec![0u8; 8];
                for round in 0..ROUNDS {
                    let blk = (round * 5 + w) % 8;
                    let val = (round % 251 + 1) as u8;
                    let off = ((w * 8 + blk) * BLOCK) as u64;
                    root.begin().write(off, &vec![val; BLOCK]).expect("write");
                    let mut back = vec![0u8; BLOCK];
                    root.begin().read(off, &mut back).expect("read");
                    assert!(back.iter().all(|&b| b == val), "writer {w} round {round}");
                    last[blk] = val;
                }
                last
            })
        })
        .collect();
    let results: Vec<Vec<u8>> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Release);
    let cycles = rewirer.join().unwrap();

    assert!(cycles > 0, "the filter was never inserted");
    for (w, last) in results.iter().enumerate() {
        for (blk, &val) in last.iter().enumerate() {
            let mut back = vec![0u8; BLOCK];
            disk.read(((w * 8 + blk) * BLOCK) as u64, &mut back)
                .unwrap();
            assert!(back.iter().all(|&b| b == val), "writer {w} block {blk}");
        }
    }
    assert_eq!(root.in_flight(), 0);
    assert!(Arc::ptr_eq(&root.node(), &disk));
}

/// A transaction's hold on a source: a drained section, then the node's write gate. A filter
/// inserted inside it (a nested drained section) must not wait for the writers the outer
/// section already stopped, and a job's root stays on its node while backends move.
#[test]
fn a_nested_drained_section_inside_a_held_one_does_not_wait() {
    const BLOCK: usize = 4096;
    let img = image(64 * BLOCK, 0);
    let (graph, disk) = raw_graph(&path(&img));
    let graph = Arc::new(Mutex::new(graph));
    let root = writer_root(&mut graph.lock().unwrap(), &disk);
    let job = Root::with_kind(
        RootKind::Job,
        "block job 'j'".into(),
        "backup job 'j'".into(),
        disk.clone(),
        Perm::NONE,
        Perm::ALL,
    );
    graph.lock().unwrap().attach_root(&job).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let val = (n % 251 + 1) as u8;
                root.begin()
                    .write((n % 64) * BLOCK as u64, &[val; BLOCK])
                    .expect("write");
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let (graph, disk) = (graph.clone(), disk.clone());
        std::thread::spawn(move || {
            let mut g = graph.lock().unwrap();
            let outer = g.drain_begin(std::slice::from_ref(&disk));
            let gate = disk.quiesce();
            // Writers that try now wait at the root, not at the gate.
            std::thread::sleep(std::time::Duration::from_millis(10));
            let f = g.insert_above(&disk, &filter_opts("f", "disk"));
            drop(gate);
            drop(outer);
            let _ = done_tx.send(f.map(|f| f.name().to_string()));
        });
    }
    let inserted = done_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the nested drained section deadlocked");
    assert_eq!(inserted.expect("insert"), "f");
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, Ordering::Release);
    assert!(writer.join().unwrap() > 0);
    let g = graph.lock().unwrap();
    let f = g.get("f").unwrap();
    assert!(
        Arc::ptr_eq(&root.node(), &f),
        "the export moved onto the filter"
    );
    assert!(Arc::ptr_eq(&job.node(), &disk), "the job's root stayed");
    assert!(g.root_on(&disk).is_none(), "a job root is not a backend");
    assert!(g.root_on(&f).is_some());
}
