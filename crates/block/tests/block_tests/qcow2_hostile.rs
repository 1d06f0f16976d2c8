//! Crafted qcow2 images in the graph (issue 15): refused with a clear error, nothing
//! allocated, the graph keeps working.

use std::sync::Arc;

use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::Graph;

use crate::common::{contents, file_opts, image, names, path, raw_inline_opts};

fn qcow2_opts(name: &str, filename: &str, read_only: bool) -> NodeOptions {
    let mut file = file_opts(None, filename);
    file.read_only = read_only;
    NodeOptions {
        node_name: Some(name.to_string()),
        read_only,
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Inline(Box::new(file)),
            backing: Some(None),
            cache: Default::default(),
        },
        ..NodeOptions::default()
    }
}

/// A 1 PiB image (2 MiB clusters) whose bitmap 'b0' is in use with granularity 512 B:
/// 256 GiB of bitmap if anything allocated it.
fn huge_bitmap_image() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    let storage = Arc::new(qcow2::FileStorage::open(f.path(), true).expect("open"));
    qcow2::Qcow2::create(
        storage.as_ref(),
        &qcow2::CreateOptions {
            size: 1 << 50,
            cluster_size: 2 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = qcow2::Qcow2::open(storage, qcow2::OpenOptions::default()).expect("open");
    let b0 = qcow2::StoreBitmap {
        name: "b0".into(),
        granularity: 1 << 31,
        auto: true,
        inconsistent_keep_in_use: false,
        data: Vec::new(),
    };
    img.store_bitmaps(&[b0], false).expect("store");
    img.close().expect("close");
    let mut bytes = std::fs::read(f.path()).expect("read");
    let e = bytes
        .windows(2)
        .rposition(|w| w == b"b0")
        .expect("bitmap name")
        - 24;
    bytes[e + 12..e + 16].copy_from_slice(&3u32.to_be_bytes());
    bytes[e + 17] = 9;
    std::fs::write(f.path(), &bytes).expect("write");
    f
}

#[test]
fn bitmap_needing_absurd_memory_refuses_the_node_and_the_graph_serves_on() {
    let img = huge_bitmap_image();
    let before = contents(&img);
    let mut graph = Graph::new();
    for read_only in [false, true] {
        let err = graph
            .add(&qcow2_opts("n", &path(&img), read_only))
            .err()
            .expect("must be refused");
        assert!(
            err.message().contains("Bitmap 'b0' is too big"),
            "{}",
            err.message()
        );
    }
    assert!(!names(&graph).contains(&"n".to_string()));
    assert_eq!(contents(&img), before, "the refused image was not touched");
    let raw = image(1 << 20, 0);
    let node = graph
        .add(&raw_inline_opts("ok", &path(&raw)))
        .expect("the graph still works");
    node.write(0, &[7u8; 4096]).expect("write");
}
