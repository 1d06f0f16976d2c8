//! The checked I/O path: data lands where it should, ranges and read-only are enforced.

use block::graph::{ChildRef, DriverOptions};
use block::Graph;

use crate::common::*;

const MIB: usize = 1 << 20;

#[test]
fn write_through_raw_lands_in_file() {
    let img = image(MIB, 0);
    let (_graph, raw) = raw_graph(&path(&img));

    raw.write(4096, &[0xab; 1000]).unwrap();

    let data = contents(&img);
    assert!(data[4096..5096].iter().all(|&b| b == 0xab));
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[5096..].iter().all(|&b| b == 0));
}

#[test]
fn read_through_raw_returns_file_contents() {
    let img = image(MIB, 0);
    std::fs::write(
        img.path(),
        (0..MIB).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let (_graph, raw) = raw_graph(&path(&img));
    let mut buf = vec![0u8; 3000];

    raw.read(70_000, &mut buf).unwrap();

    let expected: Vec<u8> = (70_000..73_000).map(|i| (i % 251) as u8).collect();
    assert_eq!(buf, expected);
}

#[test]
fn write_zeroes_through_raw_zeroes_file_range() {
    let img = image(MIB, 0x55);
    let (_graph, raw) = raw_graph(&path(&img));

    raw.write_zeroes(65536, 65536, false).unwrap();

    let data = contents(&img);
    assert!(data[65536..131072].iter().all(|&b| b == 0));
    assert!(data[..65536].iter().all(|&b| b == 0x55));
    assert!(data[131072..].iter().all(|&b| b == 0x55));
}

#[test]
fn write_zeroes_with_unmap_through_raw_zeroes_file_range() {
    let img = image(MIB, 0x55);
    let (_graph, raw) = raw_graph(&path(&img));

    raw.write_zeroes(65536, 65536, true).unwrap();

    let data = contents(&img);
    assert_eq!(data.len(), MIB);
    assert!(data[65536..131072].iter().all(|&b| b == 0));
    assert!(data[131072..].iter().all(|&b| b == 0x55));
}

#[test]
fn unaligned_write_zeroes_zeroes_exactly_the_range() {
    let img = image(8192, 0x55);
    let (_graph, raw) = raw_graph(&path(&img));

    raw.write_zeroes(100, 33, false).unwrap();

    let data = contents(&img);
    assert!(data[100..133].iter().all(|&b| b == 0));
    assert_eq!(data[99], 0x55);
    assert_eq!(data[133], 0x55);
}

#[test]
fn discard_with_unmap_punches_range_to_zeros() {
    let img = image(MIB, 0x55);
    let mut graph = Graph::new();
    let raw = graph
        .add(&with_unmap(raw_inline_opts("disk", &path(&img))))
        .unwrap();

    raw.discard(0, 65536).unwrap();

    let data = contents(&img);
    assert_eq!(data.len(), MIB);
    assert!(data[..65536].iter().all(|&b| b == 0));
    assert!(data[65536..].iter().all(|&b| b == 0x55));
}

#[test]
fn discard_without_unmap_leaves_file_unchanged() {
    let img = image(MIB, 0x55);
    let (_graph, raw) = raw_graph(&path(&img));

    raw.discard(0, 65536).unwrap();

    assert!(contents(&img).iter().all(|&b| b == 0x55));
}

#[test]
fn read_past_end_of_raw_fails_with_einval() {
    let img = image(8192, 0);
    let (_graph, raw) = raw_graph(&path(&img));
    let mut buf = [0u8; 512];

    let err = raw.read(8192 - 256, &mut buf).unwrap_err();

    assert_eq!(errno(err), libc::EINVAL);
}

#[test]
fn write_past_end_of_raw_fails_with_einval_and_file_keeps_size() {
    let img = image(8192, 0);
    let (_graph, raw) = raw_graph(&path(&img));

    let err = raw.write(8192, &[1; 512]).unwrap_err();

    assert_eq!(errno(err), libc::EINVAL);
    assert_eq!(contents(&img).len(), 8192);
}

#[test]
fn write_zeroes_and_discard_past_end_of_raw_fail_with_einval() {
    let img = image(8192, 0);
    let mut graph = Graph::new();
    let raw = graph
        .add(&with_unmap(raw_inline_opts("disk", &path(&img))))
        .unwrap();

    let zero = raw.write_zeroes(4096, 8192, false).unwrap_err();
    let discard = raw.discard(4096, 8192).unwrap_err();

    assert_eq!(errno(zero), libc::EINVAL);
    assert_eq!(errno(discard), libc::EINVAL);
}

#[test]
fn request_whose_end_overflows_fails_with_einval() {
    let img = image(8192, 0);
    let mut graph = Graph::new();
    let file = graph.add(&file_opts(Some("f"), &path(&img))).unwrap();

    let err = file.write(u64::MAX - 10, &[1; 512]).unwrap_err();

    assert_eq!(errno(err), libc::EINVAL);
}

#[test]
fn write_past_end_of_file_node_grows_the_file() {
    let img = image(8192, 0);
    let mut graph = Graph::new();
    let file = graph.add(&file_opts(Some("f"), &path(&img))).unwrap();

    file.write(16384, &[7; 512]).unwrap();

    let data = contents(&img);
    assert_eq!(data.len(), 16384 + 512);
    assert!(data[16384..].iter().all(|&b| b == 7));
    assert_eq!(file.size(), 16384 + 512);
}

#[test]
fn read_past_end_of_file_node_returns_zeros() {
    let img = image(8192, 0x55);
    let mut graph = Graph::new();
    let file = graph.add(&file_opts(Some("f"), &path(&img))).unwrap();
    let mut buf = [0xffu8; 1024];

    file.read(8192 - 512, &mut buf).unwrap();

    assert!(buf[..512].iter().all(|&b| b == 0x55));
    assert!(buf[512..].iter().all(|&b| b == 0));
}

#[test]
fn write_to_read_only_node_fails_with_eperm() {
    let img = image(8192, 0);
    let mut graph = Graph::new();
    let mut opts = raw_inline_opts("disk", &path(&img));
    opts.read_only = true;
    let raw = graph.add(&opts).unwrap();

    let err = raw.write(0, &[1; 512]).unwrap_err();

    assert_eq!(errno(err), libc::EPERM);
    assert!(contents(&img).iter().all(|&b| b == 0));
}

#[test]
fn write_zeroes_to_read_only_node_fails_with_eperm() {
    let img = image(8192, 0x55);
    let mut graph = Graph::new();
    let mut opts = file_opts(Some("f"), &path(&img));
    opts.read_only = true;
    let file = graph.add(&opts).unwrap();

    let err = file.write_zeroes(0, 4096, false).unwrap_err();

    assert_eq!(errno(err), libc::EPERM);
    assert!(contents(&img).iter().all(|&b| b == 0x55));
}

#[test]
fn discard_on_read_only_node_fails_with_eperm() {
    let img = image(8192, 0x55);
    let mut graph = Graph::new();
    let mut opts = with_unmap(raw_inline_opts("disk", &path(&img)));
    opts.read_only = true;
    let raw = graph.add(&opts).unwrap();

    let err = raw.discard(0, 4096).unwrap_err();

    assert_eq!(errno(err), libc::EPERM);
}

#[test]
fn read_only_node_still_reads() {
    let img = image(8192, 0x55);
    let mut graph = Graph::new();
    let mut opts = raw_inline_opts("disk", &path(&img));
    opts.read_only = true;
    let raw = graph.add(&opts).unwrap();
    let mut buf = [0u8; 512];

    raw.read(0, &mut buf).unwrap();

    assert!(buf.iter().all(|&b| b == 0x55));
}

fn windowed(filename: &str, offset: Option<u64>, size: Option<u64>) -> block::graph::NodeOptions {
    let mut opts = raw_inline_opts("disk", filename);
    if let DriverOptions::Raw {
        offset: o, size: s, ..
    } = &mut opts.driver
    {
        *o = offset;
        *s = size;
    }
    opts
}

#[test]
fn raw_window_maps_node_offsets_onto_file_offsets() {
    let img = image(MIB, 0);
    let mut graph = Graph::new();
    let raw = graph
        .add(&windowed(&path(&img), Some(65536), Some(131072)))
        .unwrap();

    raw.write(0, &[1; 512]).unwrap();
    raw.write(131072 - 512, &[2; 512]).unwrap();

    let data = contents(&img);
    assert!(data[65536..66048].iter().all(|&b| b == 1));
    assert!(data[196608 - 512..196608].iter().all(|&b| b == 2));
    assert!(data[..65536].iter().all(|&b| b == 0));
    assert!(data[196608..].iter().all(|&b| b == 0));
}

#[test]
fn raw_window_reads_from_the_window() {
    let img = image(MIB, 0);
    std::fs::write(
        img.path(),
        (0..MIB).map(|i| (i / 4096) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let mut graph = Graph::new();
    let raw = graph
        .add(&windowed(&path(&img), Some(8192), Some(8192)))
        .unwrap();
    let mut buf = [0u8; 8192];

    raw.read(0, &mut buf).unwrap();

    assert!(buf[..4096].iter().all(|&b| b == 2));
    assert!(buf[4096..].iter().all(|&b| b == 3));
}

#[test]
fn raw_window_size_is_the_node_size_and_its_end_is_enforced() {
    let img = image(MIB, 0);
    let mut graph = Graph::new();
    let raw = graph
        .add(&windowed(&path(&img), Some(65536), Some(131072)))
        .unwrap();

    let err = raw.write(131072, &[1; 512]).unwrap_err();

    assert_eq!(raw.size(), 131072);
    assert_eq!(errno(err), libc::EINVAL);
}

#[test]
fn raw_offset_without_size_follows_rest_of_child() {
    let img = image(MIB, 0);
    let mut graph = Graph::new();

    let raw = graph.add(&windowed(&path(&img), Some(4096), None)).unwrap();

    assert_eq!(raw.size(), MIB as u64 - 4096);
}

#[test]
fn raw_size_not_multiple_of_512_is_refused() {
    let img = image(MIB, 0);
    let mut graph = Graph::new();

    let err = graph
        .add(&windowed(&path(&img), None, Some(1000)))
        .refused();

    assert_eq!(err.message(), "Specified size is not multiple of 512");
}

#[test]
fn raw_window_past_child_end_is_refused_with_qemu_text() {
    let img = image(8192, 0);
    let mut graph = Graph::new();

    let err = graph
        .add(&windowed(&path(&img), Some(4096), Some(8192)))
        .refused();

    assert_eq!(
        err.message(),
        "The sum of offset (4096) and size (8192) has to be smaller or equal to the  actual size of the containing file (8192)"
    );
}

#[test]
fn raw_over_named_file_and_file_itself_see_the_same_bytes() {
    let img = image(8192, 0);
    let mut graph = Graph::new();
    let file = graph.add(&file_opts(Some("f"), &path(&img))).unwrap();
    let raw = graph
        .add(&raw_opts("r", ChildRef::Name("f".into())))
        .unwrap();
    let mut buf = [0u8; 512];

    raw.write(512, &[9; 512]).unwrap();
    file.read(512, &mut buf).unwrap();

    assert!(buf.iter().all(|&b| b == 9));
}

#[test]
fn null_node_accepts_writes_and_still_reads_zeros() {
    let mut graph = Graph::new();
    let null = graph.add(&null_opts("n", MIB as u64)).unwrap();
    let mut buf = [0xffu8; 512];

    null.write(0, &[1; 512]).unwrap();
    null.read(0, &mut buf).unwrap();

    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn null_node_refuses_access_past_its_size() {
    let mut graph = Graph::new();
    let null = graph.add(&null_opts("n", 4096)).unwrap();

    let err = null.write(4096, &[1; 1]).unwrap_err();

    assert_eq!(errno(err), libc::EINVAL);
}
