//! Malformed and unsupported images give clear errors (never panics, hangs or wrong reads).

mod common;

use std::sync::Arc;

use common::*;
use qcow2::{CreateOptions, ErrorKind, MemStorage, OpenOptions, Qcow2, StoreBitmap};

/// A valid 4 MiB image (64 KiB clusters) with data in guest cluster 0, as bytes.
fn good_image() -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 4 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open");
    img.write_at(&[0x5a; 65536], 0).expect("write");
    img.close().expect("close");
    mem.to_bytes()
}

/// Open bytes, returning the error kind and message.
fn open_err(bytes: Vec<u8>, read_only: bool) -> (ErrorKind, String) {
    let mem = Arc::new(MemStorage::from_bytes(bytes));
    match Qcow2::open(mem, OpenOptions { read_only }) {
        Ok(_) => panic!("open unexpectedly succeeded"),
        Err(e) => (e.kind(), e.to_string()),
    }
}

/// Open bytes (must succeed).
fn open_ok(bytes: Vec<u8>, read_only: bool) -> (Arc<MemStorage>, Qcow2) {
    let mem = Arc::new(MemStorage::from_bytes(bytes));
    let img = Qcow2::open(mem.clone(), OpenOptions { read_only }).expect("open");
    (mem, img)
}

/// A good image, changed by `edit`, is refused at open as an invalid image.
fn assert_invalid_after(edit: impl FnOnce(&mut [u8])) {
    let mut b = good_image();
    edit(&mut b);
    assert_eq!(open_err(b, true).0, ErrorKind::InvalidImage);
}

/// Offset of the L2 table of guest cluster 0, and of its first entry's data.
fn l2_and_data(b: &[u8]) -> (usize, usize) {
    let l1 = be64(b, 40) as usize;
    let l2 = (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be64(b, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    (l2, data)
}

#[test]
fn bad_magic_is_an_invalid_image() {
    let mut b = good_image();
    b[0] = b'X';
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::InvalidImage);
    assert_eq!(msg, "Image is not in qcow2 format");
}

#[test]
fn empty_file_is_an_invalid_image() {
    assert_eq!(open_err(Vec::new(), true).0, ErrorKind::InvalidImage);
}

#[test]
fn truncated_header_is_an_invalid_image() {
    let b = good_image()[..50].to_vec();
    assert_eq!(open_err(b, true).0, ErrorKind::InvalidImage);
}

#[test]
fn file_truncated_before_its_tables_is_an_invalid_image() {
    let b = good_image()[..0x18000].to_vec();
    assert_eq!(open_err(b, true).0, ErrorKind::InvalidImage);
}

#[test]
fn unknown_version_is_unsupported() {
    let mut b = good_image();
    put32(&mut b, 4, 4);
    assert_eq!(open_err(b, true).0, ErrorKind::Unsupported);
}

#[test]
fn cluster_bits_out_of_range_are_rejected() {
    for bits in [0u32, 8, 22, 63, u32::MAX] {
        let mut b = good_image();
        put32(&mut b, 20, bits);
        assert_eq!(
            open_err(b, true).0,
            ErrorKind::Unsupported,
            "cluster_bits {bits}"
        );
    }
}

#[test]
fn huge_l1_size_is_rejected_without_allocating() {
    let mut b = good_image();
    put32(&mut b, 36, u32::MAX);
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::InvalidImage);
    assert!(msg.contains("L1"), "{msg}");
}

#[test]
fn l1_smaller_than_virtual_size_needs_is_rejected() {
    assert_invalid_after(|b| put64(b, 24, 1 << 40));
}

#[test]
fn l1_table_beyond_end_of_file_is_rejected() {
    assert_invalid_after(|b| put64(b, 40, 1 << 40));
}

#[test]
fn unaligned_l1_table_is_rejected() {
    assert_invalid_after(|b| put64(b, 40, 0x30200));
}

#[test]
fn huge_refcount_table_is_rejected() {
    assert_invalid_after(|b| put32(b, 56, u32::MAX));
}

#[test]
fn unaligned_refcount_block_entry_is_rejected() {
    let mut b = good_image();
    let rt = be64(&b, 48) as usize;
    put64(&mut b, rt, 0x20100);
    assert_eq!(open_err(b, true).0, ErrorKind::InvalidImage);
}

#[test]
fn l1_entry_beyond_end_of_file_is_rejected() {
    let mut b = good_image();
    let l1 = be64(&b, 40) as usize;
    put64(&mut b, l1, (1u64 << 63) | (1 << 40));
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::InvalidImage);
    assert!(msg.contains("L1 table entry 0"), "{msg}");
}

#[test]
fn l1_entry_pointing_at_the_header_is_rejected() {
    let mut b = good_image();
    let l1 = be64(&b, 40) as usize;
    // Offset 0 would mean unallocated; point it at the refcount table instead.
    let rt = be64(&b, 48);
    put64(&mut b, l1, (1u64 << 63) | rt);
    assert_eq!(open_err(b, true).0, ErrorKind::InvalidImage);
}

#[test]
fn l2_entry_beyond_end_of_file_fails_the_read() {
    let mut b = good_image();
    let (l2, _) = l2_and_data(&b);
    put64(&mut b, l2, (1u64 << 63) | (1 << 40));
    let (_, img) = open_ok(b, true);
    let mut buf = vec![0u8; 512];
    let err = img.read_at(&mut buf, 0).expect_err("must fail");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    // Other clusters still read.
    img.read_at(&mut buf, 1 << 20).expect("other cluster");
}

#[test]
fn l2_entry_pointing_at_metadata_fails_the_read() {
    let mut b = good_image();
    let (l2, _) = l2_and_data(&b);
    let l1 = be64(&b, 40);
    put64(&mut b, l2, (1u64 << 63) | l1);
    let (_, img) = open_ok(b, true);
    let err = img.read_at(&mut [0u8; 512], 0).expect_err("must fail");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn unaligned_l2_entry_fails_the_read() {
    let mut b = good_image();
    let (l2, data) = l2_and_data(&b);
    put64(&mut b, l2, (1u64 << 63) | (data as u64 + 0x200));
    let (_, img) = open_ok(b, true);
    assert_eq!(
        img.read_at(&mut [0u8; 512], 0)
            .expect_err("must fail")
            .kind(),
        ErrorKind::Corrupt
    );
}

#[test]
fn runtime_corruption_marks_the_image_corrupt_and_refuses_writes() {
    let mut b = good_image();
    let (l2, _) = l2_and_data(&b);
    let rt = be64(&b, 48);
    put64(&mut b, l2, (1u64 << 63) | rt);
    let (mem, img) = open_ok(b, false);
    assert!(!img.is_corrupt());
    let err = img.write_at(&[1u8; 512], 0).expect_err("must fail");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(img.is_corrupt());
    assert_eq!(
        img.write_at(&[1u8; 512], 1 << 20)
            .expect_err("refused")
            .kind(),
        ErrorKind::Corrupt
    );
    let bytes = mem.to_bytes();
    assert_eq!(be64(&bytes, 72) & 2, 2, "corrupt bit written to the header");
    // Writable reopen is refused; read-only works.
    assert_eq!(open_err(bytes.clone(), false).0, ErrorKind::Corrupt);
    open_ok(bytes, true);
}

#[test]
fn unknown_incompatible_feature_is_refused_with_qemus_wording() {
    let mut b = good_image();
    put64(&mut b, 72, 1 << 20);
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::Unsupported);
    assert_eq!(
        msg,
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"
    );
}

#[test]
fn external_data_file_is_unsupported() {
    let mut b = good_image();
    put64(&mut b, 72, 1 << 2);
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::Unsupported);
    assert!(msg.contains("external data file"), "{msg}");
}

#[test]
fn extended_l2_is_unsupported() {
    let mut b = good_image();
    put64(&mut b, 72, 1 << 4);
    assert_eq!(open_err(b, true).0, ErrorKind::Unsupported);
}

#[test]
fn zstd_compression_is_unsupported() {
    let mut b = good_image();
    put64(&mut b, 72, 1 << 3);
    b[104] = 1;
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::Unsupported);
    assert!(msg.contains("zstd"), "{msg}");
}

#[test]
fn encryption_is_unsupported() {
    let mut b = good_image();
    put32(&mut b, 32, 2);
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::Unsupported);
    assert!(msg.contains("encryption"), "{msg}");
}

#[test]
fn dirty_lazy_refcounts_image_reads_when_opened_read_only() {
    let mut b = good_image();
    put64(&mut b, 72, 1);
    let (_, img) = open_ok(b, true);
    let mut buf = [0u8; 16];
    img.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, [0x5a; 16]);
}

#[test]
fn crashed_lazy_refcounts_image_is_repaired_at_writable_open() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("lazy");
    let path = dir.path("l.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "lazy_refcounts=on", "16M");
    qemu_img(&["bitmap", "--add", p, "bm"]);
    // qemu-io's abort leaves the dirty bit set and the refcounts stale.
    let _ = run_status(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x3c 0 3M",
            "-c",
            "write -P 0x4d 8M 64k",
            "-c",
            "abort",
            p,
        ],
    );
    let before = std::fs::read(&path).expect("read");
    assert_eq!(be64(&before, 72) & 1, 1, "qemu-io left the dirty bit");
    let (ok, _) = run_status("qemu-img", &["check", p]);
    assert!(!ok, "refcounts are stale before the repair");
    let img = open(&path, true);
    img.write_at(&[0x77; 4096], 12 << 20)
        .expect("write after repair");
    img.close().expect("close");
    assert_eq!(
        be64(&std::fs::read(&path).expect("read"), 72) & 1,
        0,
        "dirty bit cleared"
    );
    assert_check_clean(&path);
    let mut shadow = vec![0u8; 16 << 20];
    shadow[..3 << 20].fill(0x3c);
    shadow[8 << 20..(8 << 20) + 65536].fill(0x4d);
    shadow[12 << 20..(12 << 20) + 4096].fill(0x77);
    assert_same(&to_raw(&dir, &path), &shadow, "after repair");
}

#[test]
fn header_extension_running_past_the_cluster_is_rejected() {
    let mut b = good_image();
    let hl = be32(&b, 100) as usize;
    put32(&mut b, hl + 4, 0x7fff_ffff);
    assert_eq!(open_err(b, true).0, ErrorKind::InvalidImage);
}

#[test]
fn overlong_backing_file_name_is_rejected() {
    assert_invalid_after(|b| {
        put64(b, 8, 0x200);
        put32(b, 16, 5000);
    });
}

#[test]
fn header_length_beyond_cluster_is_rejected() {
    assert_invalid_after(|b| put32(b, 100, 1 << 20));
}

#[test]
fn refcount_order_above_six_is_rejected() {
    assert_invalid_after(|b| put32(b, 96, 7));
}

#[test]
fn unknown_autoclear_bits_are_cleared_on_writable_open_but_bitmaps_bit_kept() {
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open");
    let bm = StoreBitmap {
        name: "b".into(),
        granularity: 65536,
        auto: true,
        inconsistent_keep_in_use: false,
        data: vec![1, 0],
    };
    img.store_bitmaps(&[bm], false).expect("store");
    img.close().expect("close");
    let mut b = mem.to_bytes();
    let auto = be64(&b, 88);
    put64(&mut b, 88, auto | (1 << 1) | (1 << 40));
    let (mem, img) = open_ok(b, false);
    assert_eq!(be64(&mem.to_bytes(), 88), 1);
    assert_eq!(img.bitmaps().len(), 1);
}

/// An image with one stored bitmap, and the offset of its directory.
fn image_with_bitmap() -> (Vec<u8>, usize) {
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open");
    let bm = StoreBitmap {
        name: "b".into(),
        granularity: 65536,
        auto: true,
        inconsistent_keep_in_use: false,
        data: vec![3, 0],
    };
    img.store_bitmaps(&[bm], false).expect("store");
    img.close().expect("close");
    let b = mem.to_bytes();
    // The bitmaps extension is the first one after the 112-byte header.
    assert_eq!(be32(&b, 112), 0x2385_2875);
    let dir = be64(&b, 120 + 16) as usize;
    (b, dir)
}

/// An image with one bitmap, changed by `edit` (given the directory offset), is refused at
/// open as an invalid image.
fn assert_bitmap_image_invalid_after(edit: impl FnOnce(&mut [u8], usize)) {
    let (mut b, dir) = image_with_bitmap();
    edit(&mut b, dir);
    assert_eq!(open_err(b, true).0, ErrorKind::InvalidImage);
}

#[test]
fn bitmap_directory_with_reserved_flag_is_rejected() {
    let (mut b, dir) = image_with_bitmap();
    put32(&mut b, dir + 12, 1 << 5);
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::InvalidImage);
    assert!(msg.contains("bitmap directory"), "{msg}");
}

#[test]
fn bitmap_directory_with_bad_granularity_is_rejected() {
    assert_bitmap_image_invalid_after(|b, dir| b[dir + 17] = 40);
}

#[test]
fn bitmap_directory_with_extra_data_is_rejected() {
    assert_bitmap_image_invalid_after(|b, dir| put32(b, dir + 20, 8));
}

#[test]
fn bitmap_directory_beyond_end_of_file_is_rejected() {
    assert_bitmap_image_invalid_after(|b, _| put64(b, 120 + 16, 1 << 40));
}

#[test]
fn bitmaps_extension_with_zero_bitmaps_is_rejected() {
    assert_bitmap_image_invalid_after(|b, _| put32(b, 120, 0));
}

#[test]
fn stale_bitmaps_extension_is_ignored_and_dropped_on_writable_open() {
    let (mut b, _) = image_with_bitmap();
    put64(&mut b, 88, 0);
    let (_, ro) = open_ok(b.clone(), true);
    assert!(ro.bitmaps().is_empty());
    let (mem, _rw) = open_ok(b, false);
    assert_ne!(
        be32(&mem.to_bytes(), 112),
        0x2385_2875,
        "stale extension dropped"
    );
}

#[test]
fn bad_bitmap_table_entry_refuses_the_image() {
    // Tables are read at open for the overlap checks, so a bad entry is found there.
    let (mut b, dir) = image_with_bitmap();
    let table = be64(&b, dir) as usize;
    put64(&mut b, table, 0x0100_0000_0000_0000);
    let (kind, msg) = open_err(b, true);
    assert_eq!(kind, ErrorKind::InvalidImage);
    assert!(msg.contains("bad table entry 0"), "{msg}");
}

#[test]
fn garbage_compressed_cluster_fails_the_read() {
    let mut b = good_image();
    let (l2, data) = l2_and_data(&b);
    // Compressed descriptor (64 KiB clusters: 8 sector-count bits at 54..=61): one sector at
    // the data cluster, which holds 0x5a bytes, not a deflate stream.
    put64(&mut b, l2, (1u64 << 62) | data as u64);
    let (_, img) = open_ok(b, true);
    let err = img.read_at(&mut [0u8; 512], 0).expect_err("must fail");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn failing_storage_gives_io_errors_not_panics() {
    let b = good_image();
    let (mem, img) = open_ok(b, false);
    mem.set_fail_writes(true);
    let err = img.write_at(&[1u8; 4096], 1 << 20).expect_err("must fail");
    assert_eq!(err.kind(), ErrorKind::Io);
    mem.set_fail_writes(false);
    mem.set_fail_reads(true);
    assert_eq!(
        img.read_at(&mut [0u8; 16], 0)
            .expect_err("must fail")
            .kind(),
        ErrorKind::Io
    );
    mem.set_fail_reads(false);
    // After the failures the image still works and stays consistent.
    img.write_at(&[2u8; 4096], 1 << 20).expect("write");
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 1 << 20).expect("read");
    assert_eq!(buf, [2u8; 4096]);
    img.close().expect("close");
}
