//! External snapshots through the core: prepare re-wires parents and roots onto the overlay
//! (writes land in the overlay, unwritten reads come from the base); undo puts the graph,
//! the roots and every file back as they were; refusals change nothing.

use std::sync::Arc;

use block::edge::Root;
use block::graph::{ChildRef, SnapshotSync};
use block::Graph;

use crate::common::{create_qcow2, qcow2_opts, raw_opts, writer_root};

const SIZE: u64 = 1 << 20;

fn write_through(root: &Arc<Root>, offset: u64, byte: u8) {
    let n = root.begin();
    n.write(offset, &[byte; 4096]).expect("write");
}

fn read_through(root: &Arc<Root>, offset: u64) -> Vec<u8> {
    let n = root.begin();
    let mut buf = vec![0; 4096];
    n.read(offset, &mut buf).expect("read");
    buf
}

/// Node names, each with its children's names.
fn wiring(graph: &Graph) -> Vec<(String, Vec<(String, String)>)> {
    graph
        .nodes()
        .iter()
        .map(|n| {
            let kids = n
                .children()
                .into_iter()
                .map(|c| (c.role.to_string(), c.node.name().to_string()))
                .collect();
            (n.name().to_string(), kids)
        })
        .collect()
}

#[test]
fn prepare_moves_the_writer_onto_the_overlay_and_undo_puts_everything_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (base_p, ov_p) = (dir.path().join("base.qcow2"), dir.path().join("ov.qcow2"));
    create_qcow2(&base_p, SIZE, None);
    create_qcow2(&ov_p, SIZE, None);
    let mut graph = Graph::new();
    let base = graph
        .add(&qcow2_opts("base", &base_p, false, None))
        .unwrap();
    let top = graph
        .add(&raw_opts("top", ChildRef::Name("base".into())))
        .unwrap();
    let root = writer_root(&mut graph, &base);
    write_through(&root, 0, 0x11);
    let ov = graph
        .add(&qcow2_opts("ov", &ov_p, false, Some(None)))
        .unwrap();
    let before = wiring(&graph);
    let needs_before: Vec<_> = graph.nodes().iter().map(|n| n.applied_needs()).collect();

    let prepared = graph.snapshot_prepare(&base, &ov).unwrap();

    assert!(Arc::ptr_eq(&root.node(), &ov));
    assert!(Arc::ptr_eq(&top.child("file").unwrap(), &ov));
    assert!(Arc::ptr_eq(&ov.child("backing").unwrap(), &base));
    write_through(&root, 65536, 0x22);
    assert_eq!(
        read_through(&root, 0),
        vec![0x11; 4096],
        "unwritten: from the base"
    );
    assert_eq!(read_through(&root, 65536), vec![0x22; 4096]);
    let mut buf = vec![0; 4096];
    base.read(65536, &mut buf).unwrap();
    assert_eq!(buf, vec![0; 4096], "the base does not see the new write");

    prepared.undo(&mut graph);

    assert_eq!(wiring(&graph), before);
    let needs_after: Vec<_> = graph.nodes().iter().map(|n| n.applied_needs()).collect();
    assert_eq!(needs_after, needs_before);
    assert!(Arc::ptr_eq(&root.node(), &base));
    assert!(ov.child("backing").is_none());
    assert_eq!(read_through(&root, 0), vec![0x11; 4096]);
    assert_eq!(read_through(&root, 65536), vec![0; 4096]);
    // The overlay reads its own (unallocated: zero) data again, not the base's.
    ov.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0; 4096]);
    drop(root);
    graph.close_all();
}

#[test]
fn sync_prepare_creates_and_opens_the_overlay_and_undo_closes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base_p = dir.path().join("base.qcow2");
    let snap_p = dir.path().join("snap.qcow2");
    create_qcow2(&base_p, SIZE, None);
    let mut graph = Graph::new();
    let base = graph
        .add(&qcow2_opts("base", &base_p, false, None))
        .unwrap();
    base.write(0, &[0x33; 4096]).unwrap();
    let root = writer_root(&mut graph, &base);
    let names_before: Vec<String> = graph.nodes().iter().map(|n| n.name().into()).collect();
    let req = SnapshotSync {
        file: snap_p.to_str().unwrap().to_string(),
        node_name: "snap".into(),
        format: "qcow2".into(),
        existing: false,
    };

    let prepared = graph.snapshot_sync_prepare(&base, &req).unwrap();

    let snap = graph.get("snap").expect("overlay opened");
    assert!(Arc::ptr_eq(&root.node(), &snap));
    assert_eq!(read_through(&root, 0), vec![0x33; 4096]);
    let facts = snap.facts();
    assert_eq!(facts.backing_filename.as_deref(), base_p.to_str());
    assert_eq!(facts.backing_format.as_deref(), Some("qcow2"));

    prepared.undo(&mut graph);

    let names_after: Vec<String> = graph.nodes().iter().map(|n| n.name().into()).collect();
    assert_eq!(names_after, names_before);
    assert!(Arc::ptr_eq(&root.node(), &base));
    assert!(snap_p.exists(), "a created file stays, as in QEMU");
    // Nothing holds the created file any more: it opens read-write again.
    let again = graph
        .add(&qcow2_opts("again", &snap_p, false, Some(None)))
        .expect("created file released");
    assert_eq!(again.size(), SIZE);
    drop(root);
    graph.close_all();
}

#[test]
fn refusals_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = |n: &str| dir.path().join(n);
    for n in ["base.qcow2", "ov.qcow2", "b2.qcow2"] {
        create_qcow2(&p(n), SIZE, None);
    }
    let mut graph = Graph::new();
    let base = graph
        .add(&qcow2_opts("base", &p("base.qcow2"), false, None))
        .unwrap();
    let b2 = graph
        .add(&qcow2_opts("b2", &p("b2.qcow2"), false, None))
        .unwrap();
    let hasb = graph
        .add(&qcow2_opts(
            "ov",
            &p("ov.qcow2"),
            false,
            Some(Some(ChildRef::Name("b2".into()))),
        ))
        .unwrap();
    let before = wiring(&graph);
    let err = |r: block::Result<block::graph::SnapshotUndo>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.message().to_string(),
    };

    assert_eq!(
        err(graph.snapshot_prepare(&base, &hasb)),
        "The overlay already has a backing image"
    );
    assert_eq!(
        err(graph.snapshot_prepare(&base, &base)),
        "Making 'base' a backing child of 'base' would create a cycle"
    );
    assert_eq!(
        err(graph.snapshot_prepare(&b2, &base)),
        "Node 'b2' is busy: node is used as backing hd of 'ov'"
    );
    let file = base.child("file").unwrap();
    assert_eq!(
        err(graph.snapshot_prepare(&b2, &file)),
        "Node 'b2' is busy: node is used as backing hd of 'ov'"
    );
    // A user holding the node directly could not follow it onto the overlay.
    create_qcow2(&p("o2.qcow2"), SIZE, None);
    let o2 = graph
        .add(&qcow2_opts("o2", &p("o2.qcow2"), false, Some(None)))
        .unwrap();
    base.add_user("job 'j'".into());
    assert_eq!(
        err(graph.snapshot_prepare(&base, &o2)),
        "Node 'base' is in use by job 'j', which cannot move to an overlay"
    );
    base.remove_user("job 'j'");
    graph.del("o2").unwrap();
    assert_eq!(wiring(&graph), before);
    let raw = graph
        .add(&raw_opts("raw", ChildRef::Name("b2".into())))
        .unwrap();
    assert_eq!(
        err(graph.snapshot_prepare(&base, &raw)),
        "The overlay does not support backing images"
    );
    assert!(raw.child("backing").is_none());
    create_qcow2(&p("free.qcow2"), SIZE, None);
    let free = graph
        .add(&qcow2_opts("free", &p("free.qcow2"), false, Some(None)))
        .unwrap();
    let reader = writer_root(&mut graph, &free);
    let before = wiring(&graph);
    assert_eq!(
        err(graph.snapshot_prepare(&base, &free)),
        "The overlay is already in use"
    );
    assert_eq!(wiring(&graph), before);
    assert!(Arc::ptr_eq(&reader.node(), &free));
    drop(reader);
    graph.close_all();
}

#[test]
fn writers_running_through_a_snapshot_lose_nothing_and_switch_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (base_p, ov_p) = (dir.path().join("base.qcow2"), dir.path().join("ov.qcow2"));
    create_qcow2(&base_p, SIZE, None);
    create_qcow2(&ov_p, SIZE, None);
    let mut graph = Graph::new();
    let base = graph
        .add(&qcow2_opts("base", &base_p, false, None))
        .unwrap();
    let ov = graph
        .add(&qcow2_opts("ov", &ov_p, false, Some(None)))
        .unwrap();
    let root = writer_root(&mut graph, &base);
    // 512-byte blocks: the writer stops 50 writes after it saw the overlay (or at the end).
    const BS: u64 = 512;
    const BLOCKS: u64 = SIZE / BS;
    let started = Arc::new(std::sync::Barrier::new(2));
    let w = {
        let (root, started) = (root.clone(), started.clone());
        std::thread::spawn(move || {
            let mut went: Vec<String> = Vec::new();
            for i in 0..BLOCKS {
                if i == 20 {
                    started.wait();
                }
                let n = root.begin();
                n.write(i * BS, &[(i % 250) as u8 + 1; BS as usize])
                    .expect("write");
                went.push(n.name().to_string());
                if went.iter().filter(|n| *n == "ov").count() == 50 {
                    break;
                }
            }
            went
        })
    };
    started.wait();
    let prepared = graph.snapshot_prepare(&base, &ov).unwrap();
    prepared.commit(&mut graph);
    let went = w.join().expect("writer");

    // Every write went to the base, then (from some point on) every one to the overlay.
    let switch = went.iter().position(|n| n == "ov").unwrap_or(went.len());
    assert!(
        switch >= 20,
        "the writes before the snapshot went to the base"
    );
    assert!(
        switch < went.len(),
        "the snapshot came while the writer ran"
    );
    assert!(went[switch..].iter().all(|n| n == "ov"));
    assert!(went[..switch].iter().all(|n| n == "base"));
    assert!(base.read_only(), "commit reopened the base read-only");
    for (i, _) in went.iter().enumerate() {
        let off = i as u64 * BS;
        let want = vec![(i % 250) as u8 + 1; BS as usize];
        let mut got = vec![0; BS as usize];
        root.begin().read(off, &mut got).unwrap();
        assert_eq!(got, want, "block {i} through the root");
        base.read(off, &mut got).unwrap();
        if i < switch {
            assert_eq!(got, want, "block {i} written before the snapshot");
        } else {
            assert_eq!(
                got,
                vec![0; BS as usize],
                "block {i} must not reach the base"
            );
        }
    }
    drop(root);
    graph.close_all();
}
