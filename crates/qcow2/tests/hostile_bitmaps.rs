//! Crafted images from the adversarial run (issue 15, defects 1-3): a bitmap needing absurd
//! memory, a damaged refcount under guest data, bitmap tables overlapping other metadata.
//! Each is built with the crate itself, then patched byte by byte.

mod common;

use std::sync::Arc;

use common::{be32, be64, put64};
use qcow2::{CreateOptions, ErrorKind, MemStorage, OpenOptions, Qcow2, StoreBitmap};

/// An image of `size` bytes (clusters of `1 << cluster_bits`) with guest data in cluster 0
/// and the named bitmaps stored (not in use) at `granularity`, as bytes.
fn image_with_bitmaps(size: u64, cluster_bits: u32, names: &[&str], granularity: u64) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size,
            cluster_size: 1 << cluster_bits,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open");
    img.write_at(&vec![0x5a; 1 << cluster_bits], 0)
        .expect("write guest data");
    let list: Vec<StoreBitmap> = names
        .iter()
        .map(|n| StoreBitmap {
            name: n.to_string(),
            granularity,
            auto: true,
            inconsistent_keep_in_use: false,
            data: vec![0x01],
        })
        .collect();
    img.store_bitmaps(&list, false).expect("store bitmaps");
    img.close().expect("close");
    mem.to_bytes()
}

/// Offset of the directory entry of bitmap `name` (found by its name in the directory).
fn dir_entry(b: &[u8], name: &str) -> usize {
    let needle = name.as_bytes();
    let pos = b
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("bitmap name in the file");
    pos - 24
}

/// The host offset guest cluster 0 maps to.
fn guest_cluster0_host(b: &[u8]) -> u64 {
    let l1 = be64(b, 40) as usize;
    let l2 = (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    be64(b, l2) & 0x00ff_ffff_ffff_fe00
}

fn open_err(bytes: Vec<u8>, read_only: bool) -> qcow2::Error {
    let mem = Arc::new(MemStorage::from_bytes(bytes));
    match Qcow2::open(mem, OpenOptions { read_only }) {
        Ok(_) => panic!("open of a crafted image unexpectedly succeeded"),
        Err(e) => e,
    }
}

#[test]
fn in_use_bitmap_needing_absurd_memory_is_refused_as_too_big() {
    // 1 PiB disk with 2 MiB clusters; a bitmap stored at 2 GiB granularity, then patched to
    // in-use with granularity 512 B: 256 GiB of bitmap if anything tried to allocate it.
    let mut b = image_with_bitmaps(1 << 50, 21, &["huge"], 1 << 31);
    let e = dir_entry(&b, "huge");
    b[e + 12..e + 16].copy_from_slice(&1u32.to_be_bytes());
    b[e + 17] = 9;
    for read_only in [true, false] {
        let mem = Arc::new(MemStorage::from_bytes(b.clone()));
        let img = Qcow2::open(mem, OpenOptions { read_only }).expect("the directory is valid");
        let err = img.load_bitmaps().expect_err("must be refused");
        assert_eq!(err.kind(), ErrorKind::InvalidImage);
        let msg = err.to_string();
        assert!(msg.contains("Bitmap 'huge' is too big"), "{msg}");
        assert!(msg.contains("274877906944 bytes"), "{msg}");
    }
}

#[test]
fn in_use_bitmap_within_the_limit_loads_as_inconsistent() {
    let mut b = image_with_bitmaps(64 << 20, 16, &["b"], 65536);
    let e = dir_entry(&b, "b");
    b[e + 12..e + 16].copy_from_slice(&3u32.to_be_bytes());
    let mem = Arc::new(MemStorage::from_bytes(b));
    let img = Qcow2::open(mem, OpenOptions { read_only: true }).expect("open");
    let loaded = img.load_bitmaps().expect("load");
    assert!(loaded[0].inconsistent);
    assert_eq!(loaded[0].data.len(), 128);
}

/// An image whose guest data cluster has refcount 0 (the refcount block entry zeroed).
fn image_with_unrefcounted_guest_data() -> (Vec<u8>, u64) {
    let mut b = image_with_bitmaps(64 << 20, 16, &["b"], 65536);
    let host = guest_cluster0_host(&b);
    let rt = be64(&b, 48) as usize;
    let block = (be64(&b, rt) & !511) as usize;
    let order = be32(&b, 96);
    assert_eq!(order, 4, "default 16-bit refcounts");
    let i = block + (host as usize >> 16) * 2;
    assert_eq!(
        &b[i..i + 2],
        &[0, 1],
        "guest cluster refcount before the damage"
    );
    b[i..i + 2].copy_from_slice(&[0, 0]);
    (b, host)
}

#[test]
fn claiming_bitmaps_updates_flags_in_place_and_never_allocates() {
    let (b, host) = image_with_unrefcounted_guest_data();
    let mem = Arc::new(MemStorage::from_bytes(b.clone()));
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open read-write");
    let loaded = img.load_bitmaps().expect("load + claim");
    assert!(!loaded[0].inconsistent);
    assert!(img.bitmaps()[0].in_use, "in_use is set in the file");
    let after = mem.to_bytes();
    assert_eq!(after.len(), b.len(), "nothing was allocated");
    let h = host as usize;
    assert!(
        after[h..h + 65536].iter().all(|&x| x == 0x5a),
        "guest data overwritten by the flag change"
    );
    let e = dir_entry(&after, "b");
    assert_eq!(be32(&after, e + 12) & 1, 1, "in_use written in place");
    assert_eq!(dir_entry(&b, "b"), e, "the directory did not move");
}

#[test]
fn a_cluster_the_guest_maps_is_never_reused_even_with_refcount_zero() {
    let (b, host) = image_with_unrefcounted_guest_data();
    let mem = Arc::new(MemStorage::from_bytes(b));
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open read-write");
    img.load_bitmaps().expect("claim");
    // A new guest cluster needs an allocation: the "free" cluster is the guest's data.
    let err = img
        .write_at(&[0x11; 65536], 1 << 20)
        .expect_err("allocation must be refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("mapped by the guest"), "{err}");
    assert!(img.is_corrupt());
    let after = mem.to_bytes();
    let h = host as usize;
    assert!(after[h..h + 65536].iter().all(|&x| x == 0x5a));
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).expect("reads still work");
    assert!(buf.iter().all(|&x| x == 0x5a));
}

/// Point bitmap `name`'s table at `target` and expect the image refused with `what`.
fn assert_table_overlap_refused(b: &[u8], name: &str, target: u64, what: &str) {
    let mut b = b.to_vec();
    let e = dir_entry(&b, name);
    put64(&mut b, e, target);
    for read_only in [true, false] {
        let err = open_err(b.clone(), read_only);
        assert_eq!(err.kind(), ErrorKind::InvalidImage, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("overlaps") && msg.contains(what), "{msg}");
    }
}

#[test]
fn bitmap_table_overlapping_other_metadata_is_refused_at_open() {
    let b = image_with_bitmaps(64 << 20, 16, &["a", "b"], 65536);
    let l1 = be64(&b, 40);
    let rt = be64(&b, 48);
    let a_table = be64(&b, dir_entry(&b, "a"));
    let l2 = be64(&b, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let block = be64(&b, rt as usize) & !511;
    assert_table_overlap_refused(&b, "b", l1, "the active L1 table");
    assert_table_overlap_refused(&b, "b", rt, "the refcount table");
    assert_table_overlap_refused(&b, "b", block, "a refcount block");
    assert_table_overlap_refused(&b, "b", l2, "an active L2 table");
    assert_table_overlap_refused(&b, "b", a_table, "the bitmap table of 'a'");
}

#[test]
fn bitmap_data_cluster_overlapping_metadata_is_refused_at_open() {
    let b = image_with_bitmaps(64 << 20, 16, &["a", "b"], 65536);
    let l1 = be64(&b, 40);
    let table_a = be64(&b, dir_entry(&b, "a")) as usize;
    let table_b = be64(&b, dir_entry(&b, "b")) as usize;
    let data_a = be64(&b, table_a);
    assert_ne!(data_a, 0, "bitmap 'a' has a data cluster");
    for (target, what) in [(l1, "the active L1 table"), (data_a, "data of bitmap 'a'")] {
        let mut m = b.clone();
        put64(&mut m, table_b, target);
        let err = open_err(m, true);
        assert_eq!(err.kind(), ErrorKind::InvalidImage, "{err}");
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[test]
fn bits_lent_past_the_end_of_the_disk_are_not_stored() {
    // 3 granules of 64 KiB on a 192 KiB disk: one byte of bitmap, only its low 3 bits count.
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 3 * 65536,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open");
    let data = [0xffu8, 0xff, 0xff];
    let lent = qcow2::StoreBitmapRef {
        name: "t",
        granularity: 65536,
        auto: false,
        inconsistent_keep_in_use: false,
        data: &data,
    };
    img.store_bitmaps_ref(&[lent], false).expect("store");
    let tail_only = qcow2::StoreBitmapRef {
        name: "u",
        data: &[0xf8],
        ..lent
    };
    img.store_bitmaps_ref(&[lent, tail_only], false)
        .expect("store");
    let loaded = img.load_bitmaps().expect("load");
    assert_eq!(loaded[0].data, vec![0b111]);
    assert_eq!(
        loaded[1].data,
        vec![0],
        "only bits past the disk: nothing stored"
    );
}

#[test]
fn bitmaps_needing_too_much_memory_together_are_refused() {
    // 2 TiB disk, 9 bitmaps each patched to 512 B granularity: 512 MiB each (QEMU's limit
    // for one), 4.5 GiB together. Tables cost nothing in the file when all-zero.
    let names = ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8"];
    let mut b = image_with_bitmaps(2 << 40, 16, &names, 1 << 20);
    for n in names {
        let e = dir_entry(&b, n);
        b[e + 12..e + 16].copy_from_slice(&1u32.to_be_bytes());
        b[e + 17] = 9;
    }
    let mem = Arc::new(MemStorage::from_bytes(b));
    let img = Qcow2::open(mem, OpenOptions { read_only: true }).expect("open");
    let err = img.load_bitmaps().expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidImage);
    assert!(
        err.to_string()
            .contains("too big: together they need 4831838208 bytes"),
        "{err}"
    );
}
