//! Request tracking, serialising, observers, node options on the write path, and the test
//! driver that holds and fails requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block::node::{Node, NodeFlags, WriteObserver};
use block::testing::{Op, TestDriver};

#[test]
fn a_write_waits_for_a_serialising_copy_of_the_same_region() {
    let (node, _ctl) = TestDriver::node("t", 1 << 16);
    let copy = node.track_serialising(0, 4096);
    let writer = {
        let node = node.clone();
        std::thread::spawn(move || node.write(1024, &[9; 512]).unwrap())
    };
    std::thread::sleep(Duration::from_millis(50));
    let mut old = [0u8; 512];
    node.read(1024, &mut old).unwrap();
    assert_eq!(old, [0; 512], "the write landed during the copy");
    assert!(!writer.is_finished());

    drop(copy);
    writer.join().unwrap();

    node.read(1024, &mut old).unwrap();
    assert_eq!(old, [9; 512]);
}

#[test]
fn a_serialising_copy_waits_for_an_overlapping_write_in_flight() {
    let (node, ctl) = TestDriver::node("t", 1 << 16);
    ctl.hold(Op::Write);
    let writer = {
        let node = node.clone();
        std::thread::spawn(move || node.write(0, &[5; 4096]).unwrap())
    };
    ctl.wait_for_waiting(1);
    assert_eq!(node.in_flight(), 1);
    let copier = {
        let node = node.clone();
        std::thread::spawn(move || {
            let _copy = node.track_serialising(2048, 4096);
            let mut buf = [0u8; 4096];
            node.read(2048, &mut buf).unwrap();
            buf
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!copier.is_finished(), "the copy must wait for the write");

    ctl.release(Op::Write);
    writer.join().unwrap();
    let seen = copier.join().unwrap();

    assert_eq!(&seen[..2048], &[5; 2048][..]);
    assert_eq!(node.in_flight(), 0);
}

#[test]
fn failed_requests_reach_observers_and_the_log() {
    struct Count(AtomicUsize, AtomicUsize);
    impl WriteObserver for Count {
        fn after_write(&self, _n: &Node, _o: u64, _l: u64, r: &std::io::Result<()>) {
            if r.is_ok() { &self.0 } else { &self.1 }.fetch_add(1, Ordering::SeqCst);
        }
    }
    let (node, ctl) = TestDriver::node("t", 1 << 16);
    let obs = Arc::new(Count(AtomicUsize::new(0), AtomicUsize::new(0)));
    node.add_observer(obs.clone());
    ctl.fail(Op::Write, libc::ENOSPC, 1);

    let err = node.write(0, &[1; 512]).unwrap_err();
    node.write(0, &[1; 512]).unwrap();

    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(obs.0.load(Ordering::SeqCst), 1);
    assert_eq!(obs.1.load(Ordering::SeqCst), 1);
    assert_eq!(ctl.log(), vec![(Op::Write, 0, 512), (Op::Write, 0, 512)]);
}

#[test]
fn detect_zeroes_turns_zero_writes_into_write_zeroes() {
    for (setting, unmap, expect) in [
        ("off", false, Op::Write),
        ("on", false, Op::WriteZeroes),
        ("unmap", true, Op::WriteZeroes),
    ] {
        let flags = NodeFlags {
            detect_zeroes: setting.to_string(),
            discard_unmap: unmap,
            ..NodeFlags::default()
        };
        let (node, ctl) = TestDriver::node_with("t", 1 << 16, flags);
        node.write(4096, &[0; 4096]).unwrap();
        node.write(0, &[1; 512]).unwrap();
        assert_eq!(
            ctl.log(),
            vec![(expect, 4096, 4096), (Op::Write, 0, 512)],
            "{setting}"
        );
    }
}

#[test]
fn cache_no_flush_does_not_reach_the_driver() {
    let flags = NodeFlags {
        cache_no_flush: true,
        ..NodeFlags::default()
    };
    let (node, ctl) = TestDriver::node_with("t", 4096, flags);
    node.flush().unwrap();
    assert!(ctl.log().is_empty());
    let (plain, ctl) = TestDriver::node("p", 4096);
    plain.flush().unwrap();
    assert_eq!(ctl.log(), vec![(Op::Flush, 0, 0)]);
}

#[test]
fn fast_zero_is_claimed_only_where_zeroing_writes_no_data() {
    let img = crate::common::image(1 << 20, 7);
    let (_graph, raw) = crate::common::raw_graph(&crate::common::path(&img));
    let (test, _ctl) = TestDriver::node("t", 4096);
    let mut g = block::Graph::new();
    let null = g.add(&crate::common::null_opts("n", 4096)).unwrap();

    assert!(raw.zero_is_fast(0, 65536), "host file with fallocate");
    assert!(
        !raw.zero_is_fast(1 << 20, 4096),
        "past the end the file would be written"
    );
    assert!(null.zero_is_fast(0, 4096));
    assert!(
        !test.zero_is_fast(0, 4096),
        "drivers that cannot say are slow"
    );
}

/// blockdev-del runs in a drained section: a request that reached the node (here without a
/// root, as a job's copy does) finishes before the node is flushed and closed.
#[test]
fn blockdev_del_waits_for_the_nodes_requests_in_flight() {
    let (node, ctl) = TestDriver::node("t", 1 << 16);
    let mut graph = block::Graph::new();
    graph.add_node_ref(node.clone()).unwrap();
    ctl.hold(Op::Write);
    let writer = {
        let node = node.clone();
        std::thread::spawn(move || node.write(0, &[7; 4096]).unwrap())
    };
    ctl.wait_for_waiting(1);
    // Set just before the held write is let through: a delete that returns with it unset
    // did not wait for the write.
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deleter = {
        let released = released.clone();
        std::thread::spawn(move || {
            graph.del("t").unwrap();
            released.load(std::sync::atomic::Ordering::Acquire)
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!deleter.is_finished(), "the delete must wait for the write");
    released.store(true, std::sync::atomic::Ordering::Release);
    ctl.release(Op::Write);
    writer.join().unwrap();
    assert!(
        deleter.join().unwrap(),
        "the node was closed before its write was let through"
    );
    assert_eq!(node.in_flight(), 0);
}
