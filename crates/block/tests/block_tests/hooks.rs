//! Write hooks (copy-before-write): they run before the driver writes and can veto the write.

use std::io;
use std::sync::{Arc, Mutex};

use block::bitmap_ops;
use block::node::{Node, WriteHook};
use block::{Graph, NodeRef};

use crate::common::*;

const MIB: usize = 1 << 20;
const G64K: u64 = 65536;

/// Records each range it sees with the bytes the node held there at that moment.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(u64, u64, Vec<u8>)>>,
}

impl WriteHook for Recorder {
    fn before_write(&self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        let mut old = vec![0u8; len as usize];
        node.read(offset, &mut old)?;
        self.seen.lock().unwrap().push((offset, len, old));
        Ok(())
    }
}

/// Refuses every write with ENOSPC.
struct Veto;

impl WriteHook for Veto {
    fn before_write(&self, _node: &Node, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }
}

fn disk(fill: u8, unmap: bool) -> (tempfile::NamedTempFile, Graph, NodeRef) {
    let img = image(MIB, fill);
    let mut graph = Graph::new();
    let mut opts = raw_inline_opts("disk", &path(&img));
    if unmap {
        opts = with_unmap(opts);
    }
    let raw = graph.add(&opts).unwrap();
    (img, graph, raw)
}

#[test]
fn hook_sees_range_and_old_data_before_write_lands() {
    let (_img, _graph, raw) = disk(0x55, false);
    let hook = Arc::new(Recorder::default());
    raw.add_hook(hook.clone());

    raw.write(4096, &[1; 100]).unwrap();

    let seen = hook.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].0, seen[0].1), (4096, 100));
    assert!(seen[0].2.iter().all(|&b| b == 0x55));
}

#[test]
fn hook_sees_write_zeroes_range() {
    let (_img, _graph, raw) = disk(0x55, false);
    let hook = Arc::new(Recorder::default());
    raw.add_hook(hook.clone());

    raw.write_zeroes(8192, 4096, false).unwrap();

    let seen = hook.seen.lock().unwrap();
    assert_eq!((seen[0].0, seen[0].1), (8192, 4096));
    assert!(seen[0].2.iter().all(|&b| b == 0x55));
}

#[test]
fn hook_sees_discard_range_with_unmap() {
    let (_img, _graph, raw) = disk(0x55, true);
    let hook = Arc::new(Recorder::default());
    raw.add_hook(hook.clone());

    raw.discard(0, G64K).unwrap();

    let seen = hook.seen.lock().unwrap();
    assert_eq!((seen[0].0, seen[0].1), (0, G64K));
    assert!(seen[0].2.iter().all(|&b| b == 0x55));
}

#[test]
fn hook_is_not_called_for_ignored_discard() {
    let (_img, _graph, raw) = disk(0x55, false);
    let hook = Arc::new(Recorder::default());
    raw.add_hook(hook.clone());

    raw.discard(0, G64K).unwrap();

    assert!(hook.seen.lock().unwrap().is_empty());
}

#[test]
fn hook_is_not_called_for_reads() {
    let (_img, _graph, raw) = disk(0x55, false);
    let hook = Arc::new(Recorder::default());
    raw.add_hook(hook.clone());
    let mut buf = [0u8; 512];

    raw.read(0, &mut buf).unwrap();

    assert!(hook.seen.lock().unwrap().is_empty());
}

#[test]
fn hook_on_raw_is_not_called_for_writes_to_the_file_node_directly() {
    let (_img, _graph, raw) = disk(0x55, false);
    let hook = Arc::new(Recorder::default());
    raw.add_hook(hook.clone());
    let file = raw.child("file").unwrap().clone();

    file.write(0, &[1; 512]).unwrap();

    assert!(hook.seen.lock().unwrap().is_empty());
}

#[test]
fn failing_hook_fails_write_with_its_errno() {
    let (_img, _graph, raw) = disk(0x55, false);
    raw.add_hook(Arc::new(Veto));

    let err = raw.write(0, &[1; 512]).unwrap_err();

    assert_eq!(errno(err), libc::ENOSPC);
}

#[test]
fn failing_hook_leaves_data_unwritten() {
    let (img, _graph, raw) = disk(0x55, false);
    raw.add_hook(Arc::new(Veto));

    raw.write(0, &[1; 512]).unwrap_err();
    raw.write_zeroes(4096, 512, false).unwrap_err();

    assert!(contents(&img).iter().all(|&b| b == 0x55));
}

#[test]
fn failing_hook_leaves_bitmaps_unmarked() {
    // node.rs runs the hooks before the driver and returns early on failure, so nothing
    // changed and nothing is marked.
    let (_img, _graph, raw) = disk(0x55, false);
    bitmap_ops::add(&raw, "b", Some(G64K), false, false).unwrap();
    raw.add_hook(Arc::new(Veto));

    raw.write(0, &[1; 512]).unwrap_err();

    assert_eq!(count(&raw, "b"), 0);
}

#[test]
fn removed_hook_is_no_longer_called() {
    let (_img, _graph, raw) = disk(0x55, false);
    let hook = Arc::new(Recorder::default());
    let as_dyn: Arc<dyn WriteHook> = hook.clone();
    raw.add_hook(as_dyn.clone());

    raw.remove_hook(&as_dyn);
    raw.write(0, &[1; 512]).unwrap();

    assert!(hook.seen.lock().unwrap().is_empty());
}

#[test]
fn removing_a_veto_hook_lets_writes_through_again() {
    let (img, _graph, raw) = disk(0x55, false);
    let veto: Arc<dyn WriteHook> = Arc::new(Veto);
    raw.add_hook(veto.clone());
    raw.write(0, &[1; 512]).unwrap_err();

    raw.remove_hook(&veto);
    raw.write(0, &[1; 512]).unwrap();

    assert!(contents(&img)[..512].iter().all(|&b| b == 1));
}
