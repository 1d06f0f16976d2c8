//! Re-wiring while in use: roots follow replace/insert/remove, refused changes leave the
//! wiring as it was, and writers running through a root while a pass-through filter is
//! inserted and removed over and over lose and reorder nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use block::edge::Root;
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::perm::Perm;
use block::Graph;

use crate::common::*;

fn filter_opts(name: &str, below: &str) -> NodeOptions {
    raw_opts(name, ChildRef::Name(below.to_string()))
}

fn rw_root(graph: &mut Graph, node: &block::NodeRef) -> Arc<Root> {
    let root = Root::new(
        "export 'e'".into(),
        "an unnamed block device".into(),
        node.clone(),
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::ALL & !Perm::RESIZE,
    );
    graph.attach_root(&root).expect("attach root");
    root
}

#[test]
fn insert_and_remove_a_filter_moves_roots_and_parents() {
    let img = image(1 << 20, 0);
    let (mut graph, disk) = raw_graph(&path(&img));
    let top = graph.add(&filter_opts("top", "disk")).unwrap();
    let root = rw_root(&mut graph, &disk);

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
    let root = rw_root(&mut graph, &a);
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
    let root = rw_root(&mut graph.lock().unwrap(), &disk);
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
