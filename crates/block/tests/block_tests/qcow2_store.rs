//! Storing persistent bitmaps of a big, sparsely written qcow2 through the block layer (issue
//! 15 memory): the store serialises each bitmap one cluster at a time from its sparse form, and
//! the result is what QEMU reads back bit for bit.

use std::process::Command;
use std::sync::Arc;

use block::bitmap_ops;
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::Graph;

use crate::common::{file_opts, path};

const TIB: u64 = 1 << 40;

fn qcow2_opts(name: &str, filename: &str) -> NodeOptions {
    NodeOptions {
        node_name: Some(name.to_string()),
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Inline(Box::new(file_opts(None, filename))),
            backing: Some(None),
            cache: Default::default(),
        },
        ..NodeOptions::default()
    }
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required (oracle of this test)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dense bits expected for writes at `offsets` (4 KiB each) at `granularity`.
fn expected(offsets: &[u64], granularity: u64) -> Vec<u8> {
    let mut d = vec![0u8; TIB.div_ceil(granularity).div_ceil(8) as usize];
    for &o in offsets {
        for g in o / granularity..=(o + 4095) / granularity {
            d[(g / 8) as usize] |= 1 << (g % 8);
        }
    }
    d
}

fn load(file: &std::path::Path) -> Vec<qcow2::LoadedBitmap> {
    let st = Arc::new(qcow2::FileStorage::open(file, false).expect("open"));
    let img = qcow2::Qcow2::open(st, qcow2::OpenOptions { read_only: true }).expect("open");
    img.load_bitmaps().expect("load")
}

#[test]
fn sparse_bitmaps_of_a_tib_disk_store_exactly_and_qemu_reads_them_back() {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    let st = Arc::new(qcow2::FileStorage::open(f.path(), true).expect("open"));
    qcow2::Qcow2::create(
        st.as_ref(),
        &qcow2::CreateOptions {
            size: TIB,
            ..Default::default()
        },
    )
    .expect("create");
    drop(st);
    let mut graph = Graph::new();
    let node = graph.add(&qcow2_opts("n", &path(&f))).expect("add");
    bitmap_ops::add(&node, "b64k", Some(64 << 10), true, false).expect("bitmap");
    bitmap_ops::add(&node, "b8k", Some(8 << 10), true, false).expect("bitmap");
    // Scattered writes: the first and last granule, chunk and cluster boundaries of the
    // serialised form (a 64 KiB data cluster holds 2^19 granules), the middle of the disk.
    let offsets = [
        0,
        (1 << 19) * (64 << 10) - 4096,
        (1 << 19) * (64 << 10),
        3 << 30,
        TIB / 2 + 12345 * 4096,
        TIB - 4096,
    ];
    for &o in &offsets {
        node.write(o, &[0x5a; 4096]).expect("write");
    }
    assert!(node.checkpoint_bitmaps().expect("checkpoint"));
    graph.del("n").expect("del");

    let p = path(&f);
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", &p])
        .output()
        .expect("qemu-img is required");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let ours = load(f.path());
    for (name, g) in [("b64k", 64u64 << 10), ("b8k", 8 << 10)] {
        let b = ours.iter().find(|b| b.name == name).expect("stored");
        assert!(!b.inconsistent && !b.recovered);
        assert!(
            b.data == expected(&offsets, g),
            "{name}: stored bits differ"
        );
    }
    // QEMU reads the same bits: it copies the bitmaps into a new image.
    let dir = tempfile::tempdir().expect("dir");
    let copy = dir.path().join("copy.qcow2");
    let c = copy.to_str().expect("utf-8");
    qemu_img(&["convert", "-q", "--bitmaps", "-O", "qcow2", &p, c]);
    let theirs = load(&copy);
    for b in &ours {
        let t = theirs.iter().find(|t| t.name == b.name).expect("copied");
        assert!(t.data == b.data, "{}: QEMU's copy differs", b.name);
    }
}
