//! `Node::write_compressed`: checks, hooks and bitmaps as `Node::write`; qcow2 stores
//! compressed clusters (qemu-img reads them), other drivers refuse with ENOTSUP.

use std::io;
use std::process::Command;
use std::sync::{Arc, Mutex};

use block::bitmap_ops;
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::node::{Node, WriteHook};
use block::{Graph, NodeRef};

use crate::common::*;

const G64K: u64 = 65536;

#[derive(Default)]
struct Seen(Mutex<Vec<(u64, u64)>>);

impl WriteHook for Seen {
    fn before_write(&self, _node: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.0.lock().unwrap().push((offset, len));
        Ok(())
    }
}

fn qcow2_node(dir: &tempfile::TempDir) -> (String, Graph, NodeRef) {
    let p = dir.path().join("c.qcow2");
    let p = p.to_str().unwrap().to_string();
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &p, "1M"])
        .output()
        .expect("qemu-img is needed for this test");
    assert!(out.status.success(), "{out:?}");
    let mut graph = Graph::new();
    let node = graph
        .add(&NodeOptions {
            node_name: Some("q".into()),
            driver: DriverOptions::Qcow2 {
                file: ChildRef::Inline(Box::new(file_opts(None, &p))),
                backing: Some(None),
                cache: Default::default(),
            },
            ..NodeOptions::default()
        })
        .unwrap();
    (p, graph, node)
}

#[test]
fn qcow2_compressed_write_runs_hooks_marks_bitmaps_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut graph, q) = qcow2_node(&dir);
    assert!(q.supports_compressed_writes());
    bitmap_ops::add(&q, "b", Some(G64K), false, false).unwrap();
    let hook = Arc::new(Seen::default());
    q.add_hook(hook.clone());
    let data: Vec<u8> = b"blockd "
        .iter()
        .cycle()
        .take(128 * 1024)
        .copied()
        .collect();
    q.write_compressed(G64K, &data).unwrap();
    assert_eq!(*hook.0.lock().unwrap(), vec![(G64K, 2 * G64K)]);
    assert_eq!(count(&q, "b"), 2 * G64K);
    let mut back = vec![0u8; data.len()];
    q.read(G64K, &mut back).unwrap();
    assert_eq!(back, data);
    // Never over an allocated cluster; unaligned requests are invalid.
    let e = q.write_compressed(G64K, &data[..65536]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let e = q.write_compressed(4096, &data[..65536]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    graph.close_all();
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", &p])
        .output()
        .unwrap();
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(map.contains("\"compressed\": true"), "{map}");
    let check = Command::new("qemu-img")
        .args(["check", &p])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn read_only_and_raw_nodes_refuse_compressed_writes() {
    let img = image(1 << 20, 0x55);
    let (_graph, raw) = raw_graph(&path(&img));
    assert!(!raw.supports_compressed_writes());
    bitmap_ops::add(&raw, "b", Some(G64K), false, false).unwrap();
    let e = raw.write_compressed(0, &[0u8; 65536]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTSUP));
    assert_eq!(count(&raw, "b"), 0, "nothing written, nothing marked");
    assert!(contents(&img).iter().all(|&b| b == 0x55));
    let e = raw.write_compressed(1 << 20, &[0u8; 512]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
}
