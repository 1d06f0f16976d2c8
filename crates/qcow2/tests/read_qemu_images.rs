//! Images made and written by qemu-img/qemu-io read back the same through our driver.

mod common;

use std::sync::Arc;

use common::*;
use qcow2::{BlockStatus, FileStorage, Qcow2};

/// Create an image with qemu-img, write patterns with qemu-io (including across cluster and
/// L2 boundaries and zeroed ranges), and compare our full read to `qemu-img convert`.
fn check_qemu_image(opts: &str, cluster: u64, size: u64) {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("read");
    let img = dir.path("a.qcow2");
    qemu_create(
        &img,
        &format!("{opts},cluster_size={cluster}"),
        &size.to_string(),
    );
    let l2_span = cluster * (cluster / 8);
    let cmds = [
        "write -P 0xab 0 4k".to_string(),
        format!("write -P 0xcd {} 1024", cluster - 512),
        format!("write -P 0x11 {} {}", l2_span.min(size / 2) - 1536, 3072),
        format!("write -P 0x22 {} {}", size - 8192, 8192),
        format!("write -P 0x33 {} {}", size / 3, cluster * 3),
        format!("write -z {} {}", size / 3 + cluster, cluster),
        format!("write -P 0x44 {} 777", size / 4 + 123),
    ];
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(&img, &refs);
    let ours = read_all(&open(&img, false), 256 * 1024 + 512);
    assert_same(
        &ours,
        &to_raw(&dir, &img),
        &format!("{opts} cluster {cluster}"),
    );
}

#[test]
fn v2_image_reads_like_qemu() {
    check_qemu_image("compat=0.10", 65536, 64 << 20);
}

#[test]
fn v3_image_reads_like_qemu() {
    check_qemu_image("compat=1.1", 65536, 64 << 20);
}

#[test]
fn v3_512_byte_clusters_read_like_qemu() {
    check_qemu_image("compat=1.1", 512, 8 << 20);
}

#[test]
fn v2_512_byte_clusters_read_like_qemu() {
    check_qemu_image("compat=0.10", 512, 4 << 20);
}

#[test]
fn v3_4k_clusters_read_like_qemu() {
    check_qemu_image("compat=1.1", 4096, 32 << 20);
}

#[test]
fn v3_2m_clusters_read_like_qemu() {
    check_qemu_image("compat=1.1", 2 << 20, 64 << 20);
}

#[test]
fn refcount_bits_1_image_reads_like_qemu() {
    check_qemu_image("compat=1.1,refcount_bits=1", 65536, 32 << 20);
}

#[test]
fn refcount_bits_64_image_reads_like_qemu() {
    check_qemu_image("compat=1.1,refcount_bits=64", 4096, 16 << 20);
}

#[test]
fn lazy_refcounts_image_reads_like_qemu() {
    check_qemu_image("compat=1.1,lazy_refcounts=on", 65536, 16 << 20);
}

#[test]
fn header_fields_are_reported() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("hdr");
    let base = dir.path("base.qcow2");
    let img = dir.path("top.qcow2");
    qemu_create(&base, "", "10M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        base.to_str().expect("p"),
        "-F",
        "qcow2",
        img.to_str().expect("p"),
    ]);
    let q = open(&img, false);
    assert_eq!(q.virtual_size(), 10 << 20);
    assert_eq!(q.cluster_size(), 4096);
    assert_eq!(q.version(), 3);
    assert_eq!(q.backing_file().as_deref(), base.to_str());
    assert_eq!(q.backing_format().as_deref(), Some("qcow2"));
}

#[test]
fn backing_chain_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("chain");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    let (b, t) = (base.to_str().expect("p"), top.to_str().expect("p"));
    qemu_create(&base, "cluster_size=65536", "8M");
    qemu_io(&base, &["write -P 0x5a 0 8M"]);
    // The overlay is larger than its backing file: bytes past the base read as zeros.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        b,
        "-F",
        "qcow2",
        t,
        "10M",
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x01 4096 100",
            "write -z 65536 65536",
            "write -P 0x02 9437184 4096",
        ],
    );
    let base_img = Arc::new(open(&base, false));
    let top_img = open(&top, false);
    top_img.set_backing(Some(Arc::new(ImageStorage(base_img))));
    let ours = read_all(&top_img, 1 << 20);
    assert_same(&ours, &to_raw(&dir, &top), "overlay");
}

#[test]
fn unallocated_clusters_read_zero_without_backing_attached() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("nob");
    let img = dir.path("a.qcow2");
    qemu_create(&img, "", "1M");
    let q = open(&img, false);
    let mut buf = vec![0xffu8; 4096];
    q.read_at(&mut buf, 8192).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn block_status_distinguishes_data_zero_and_unallocated() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bs");
    let img = dir.path("a.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io(&img, &["write -P 1 0 128k", "write -z 128k 64k"]);
    let q = open(&img, false);
    assert_eq!(
        q.block_status(0, 4 << 20).expect("bs"),
        (BlockStatus::Data, 128 << 10)
    );
    assert_eq!(
        q.block_status(128 << 10, 4 << 20).expect("bs"),
        (BlockStatus::Zero, 64 << 10)
    );
    assert_eq!(
        q.block_status(192 << 10, 4 << 20).expect("bs"),
        (BlockStatus::Unallocated, (4 << 20) - (192 << 10))
    );
}

#[test]
fn read_only_open_refuses_writes() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("ro");
    let img = dir.path("a.qcow2");
    qemu_create(&img, "", "1M");
    let st = FileStorage::open(&img, false).expect("open");
    let q = Qcow2::open(Arc::new(st), qcow2::OpenOptions { read_only: true }).expect("open");
    let err = q.write_at(&[1], 0).expect_err("must fail");
    assert_eq!(err.kind(), qcow2::ErrorKind::ReadOnly);
}

#[test]
fn format_info_matches_qemu_img_info() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("fmtinfo");
    let img = dir.path("a.qcow2");
    qemu_create(&img, "lazy_refcounts=on,refcount_bits=8", "1M");
    let info = open(&img, false).format_info();
    assert_eq!(
        info,
        qcow2::FormatInfo {
            compat: "1.1",
            lazy_refcounts: true,
            refcount_bits: 8,
            corrupt: false,
            extended_l2: false,
            compression_type: "zlib",
            dirty: false,
        }
    );
}
