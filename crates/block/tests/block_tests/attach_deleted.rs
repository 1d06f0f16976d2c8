//! A command that looked a node up, released the graph lock and then attaches to it (an
//! export's root, a backup's filter over it) while another monitor's blockdev-del took the
//! node out and closed it: the attach must fail as if the node had never been there, never
//! give a user of a closed node (whose file and locks are gone).
//! (From a review of block-export-add running beside blockdev-del.)

use std::sync::{Arc, Mutex};

use block::node::Child;
use block::testing::TestDriver;
use block::Graph;

use crate::common::{export_root, file_opts};

/// A graph with the raw file node `f` over a new 1 MiB file; the node as a command's lookup
/// would have found it.
fn graph_with_file(dir: &tempfile::TempDir) -> (Arc<Mutex<Graph>>, block::NodeRef, String) {
    let p = dir.path().join("f.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).expect("file");
    let path = p.to_str().expect("utf-8 path").to_string();
    let graph = Arc::new(Mutex::new(Graph::new()));
    let node = graph
        .lock()
        .unwrap()
        .add(&file_opts(Some("f"), &path))
        .expect("add f");
    (graph, node, path)
}

/// qemu-io writes the file: nothing of ours still locks it.
fn qemu_io_writes(path: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", path, "-c", "write -P 0x22 0 512"])
        .output()
        .expect("qemu-io (oracle) must be installed");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_root_on_a_node_deleted_after_its_lookup_is_refused_as_not_found() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (graph, node, path) = graph_with_file(&dir);
    // block-export-add: lookup (lock released) ... a blockdev-del runs to its end ...
    Graph::del_staged(&graph, "f").expect("del");
    assert!(graph.lock().unwrap().get("f").is_none());
    let root = export_root(&node);
    let err = graph
        .lock()
        .unwrap()
        .attach_root(&root)
        .expect_err("a root on a deleted node must be refused");
    assert_eq!(err.to_string(), "Cannot find device='f' nor node-name='f'");
    assert!(
        graph.lock().unwrap().roots().is_empty(),
        "refused root stays registered"
    );
    drop(root);
    qemu_io_writes(&path);
}

#[test]
fn a_root_on_a_node_being_deleted_makes_the_delete_fail_in_use() {
    // The other order: the root attaches while the delete still flushes (node in the table,
    // marked deleting); the delete re-checks and is refused, the node stays usable.
    let dir = tempfile::tempdir().expect("temp dir");
    let (graph, node, _path) = graph_with_file(&dir);
    let root = export_root(&node);
    graph.lock().unwrap().attach_root(&root).expect("attach");
    let err = Graph::del_staged(&graph, "f").expect_err("delete of a used node");
    assert_eq!(err.to_string(), "Node f is in use");
    root.begin()
        .write(0, &[0x11; 512])
        .expect("write through the root");
}

#[test]
fn a_filter_over_a_node_deleted_after_its_lookup_is_refused_as_not_found() {
    // A backup's filter node is put in with edges onto its source (and target): a source
    // deleted after the backup looked it up must not get a new parent.
    let dir = tempfile::tempdir().expect("temp dir");
    let (graph, node, path) = graph_with_file(&dir);
    Graph::del_staged(&graph, "f").expect("del");
    let (driver, _ctl) = TestDriver::new(4096);
    let mut g = graph.lock().unwrap();
    let inserted = g.insert_internal(
        Some("flt"),
        Box::new(driver),
        vec![Child {
            role: "file",
            node: node.clone(),
        }],
    );
    let Err(err) = inserted else {
        panic!("a filter over a deleted node must be refused");
    };
    assert_eq!(err.to_string(), "Cannot find device='f' nor node-name='f'");
    assert!(g.get("flt").is_none(), "refused filter stays in the table");
    drop(g);
    qemu_io_writes(&path);
}
