//! Images we create and write pass `qemu-img check` and compare equal to a raw shadow copy.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use qcow2::{CreateOptions, FileStorage, OpenOptions, Qcow2};

/// Create an image with our driver.
fn create(path: &Path, opts: &CreateOptions) -> Qcow2 {
    let st = Arc::new(FileStorage::create(path).expect("create file"));
    Qcow2::create(st.as_ref(), opts).expect("create image");
    Qcow2::open(st, OpenOptions::default()).expect("open new image")
}

/// Write the shadow to a raw file and run qemu-img check + compare against it.
fn verify(dir: &TempDir, img: &Path, shadow: &[u8]) {
    assert_check_clean(img);
    assert_compares_to_raw(dir, img, shadow);
}

/// Random writes (aligned and not, some spanning L2 tables), zeroes and discards, mirrored
/// into a shadow; our own reads are checked along the way.
fn random_ops(img: &Qcow2, shadow: &mut [u8], seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let size = shadow.len() as u64;
    let cs = img.cluster_size();
    let l2_span = cs * cs / 8;
    for i in 0..ops {
        let kind = rng.below(10);
        let len = match rng.below(4) {
            0 => 1 + rng.below(700),
            1 => cs * (1 + rng.below(3)),
            2 => 1 + rng.below(3 * cs),
            _ => 4096 + rng.below(64 * 1024),
        }
        .min(size);
        let mut off = rng.below(size - len + 1);
        if rng.below(4) == 0 {
            off = off / cs * cs;
        }
        if rng.below(6) == 0 && l2_span < size {
            // Straddle an L2 boundary.
            let b = (1 + rng.below(size / l2_span)) * l2_span;
            off = b.saturating_sub(len / 2).min(size - len);
        }
        let (s, e) = (off as usize, (off + len) as usize);
        match kind {
            0 => {
                img.write_zeroes(off, len, rng.below(2) == 0)
                    .expect("write_zeroes");
                shadow[s..e].fill(0);
            }
            1 => {
                img.discard(off, len).expect("discard");
                // Only whole clusters are discarded; they read as zeros without a backing file.
                let a = off.next_multiple_of(cs);
                let b = (off + len) / cs * cs;
                if b > a {
                    shadow[a as usize..b as usize].fill(0);
                }
            }
            _ => {
                let byte = (i as u8).wrapping_mul(37).wrapping_add(1);
                let data: Vec<u8> = (0..len).map(|k| byte ^ (k as u8 & 0x0f)).collect();
                img.write_at(&data, off).expect("write");
                shadow[s..e].copy_from_slice(&data);
            }
        }
        if i % 16 == 0 {
            let mut back = vec![0u8; len as usize];
            img.read_at(&mut back, off).expect("read back");
            assert_same(&back, &shadow[s..e], "read back");
        }
        if i % 50 == 49 {
            img.flush().expect("flush");
        }
    }
}

/// Create with `opts`, run random ops, close, verify with qemu-img.
fn roundtrip(opts: CreateOptions, seed: u64, ops: usize) {
    if !have_qemu() {
        return;
    }
    roundtrip_with(opts, seed, ops, |_, _| {});
}

/// [`roundtrip`] with `setup(image, half)` called before the ops (0) and halfway (1).
fn roundtrip_with(opts: CreateOptions, seed: u64, ops: usize, setup: impl Fn(&Qcow2, u32)) {
    let dir = TempDir::new("rt");
    let path = dir.path("a.qcow2");
    let img = create(&path, &opts);
    let mut shadow = vec![0u8; opts.size as usize];
    setup(&img, 0);
    random_ops(&img, &mut shadow, seed, ops / 2);
    setup(&img, 1);
    random_ops(&img, &mut shadow, seed + 1000, ops - ops / 2);
    assert_same(&read_all(&img, 1 << 20), &shadow, "full read before close");
    img.close().expect("close");
    verify(&dir, &path, &shadow);
    // And once more after reopening.
    let again = open(&path, false);
    assert_same(
        &read_all(&again, 1 << 20),
        &shadow,
        "full read after reopen",
    );
}

#[test]
fn l2_cache_slices_random_writes_zeroes_discards_match_raw() {
    // QEMU's l2-cache-entry-size: slices from 512 bytes, a cache of a few slices so they are
    // evicted and written back all the time; halfway the slice size changes on the open image.
    for (cluster_size, size, first, second, seed) in [
        (65536u64, 48u64 << 20, 512usize, 4096usize, 21u64),
        (4096, 24 << 20, 512, 2048, 22),
        (65536, 48 << 20, 16384, 512, 23),
    ] {
        roundtrip_with(
            CreateOptions {
                size,
                cluster_size,
                ..Default::default()
            },
            seed,
            400,
            |img, half| {
                let bytes = if half == 0 { first } else { second };
                img.set_l2_slice_size(bytes).expect("slice size");
                img.set_cache_capacity(3, 4).expect("capacity");
            },
        );
    }
}

#[test]
fn new_v3_image_passes_qemu_check() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("new");
    let path = dir.path("a.qcow2");
    create(
        &path,
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    )
    .close()
    .expect("close");
    assert_check_clean(&path);
    let info = qemu_img(&["info", path.to_str().expect("p")]);
    assert!(info.contains("virtual size: 1 GiB"), "{info}");
    assert!(info.contains("compat: 1.1"), "{info}");
}

#[test]
fn v3_64k_random_writes_match_raw() {
    roundtrip(
        CreateOptions {
            size: 48 << 20,
            ..Default::default()
        },
        1,
        400,
    );
}

#[test]
fn v2_random_writes_match_raw() {
    roundtrip(
        CreateOptions {
            size: 16 << 20,
            version: 2,
            ..Default::default()
        },
        2,
        300,
    );
}

#[test]
fn v3_512_byte_clusters_random_writes_match_raw() {
    roundtrip(
        CreateOptions {
            size: 6 << 20,
            cluster_size: 512,
            ..Default::default()
        },
        3,
        300,
    );
}

#[test]
fn v3_4k_clusters_random_writes_match_raw() {
    roundtrip(
        CreateOptions {
            size: 24 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
        4,
        300,
    );
}

#[test]
fn v3_2m_clusters_random_writes_match_raw() {
    roundtrip(
        CreateOptions {
            size: 40 << 20,
            cluster_size: 2 << 20,
            ..Default::default()
        },
        5,
        120,
    );
}

#[test]
fn refcount_bits_1_random_writes_match_raw() {
    roundtrip(
        CreateOptions {
            size: 16 << 20,
            refcount_bits: 1,
            ..Default::default()
        },
        6,
        300,
    );
}

#[test]
fn refcount_bits_64_with_small_clusters_grows_the_refcount_table() {
    if !have_qemu() {
        return;
    }
    // 512-byte clusters with 64-bit refcounts: one table cluster covers only 2 MiB of file.
    let dir = TempDir::new("grow");
    let path = dir.path("a.qcow2");
    let opts = CreateOptions {
        size: 8 << 20,
        cluster_size: 512,
        refcount_bits: 64,
        ..Default::default()
    };
    let img = create(&path, &opts);
    let mut shadow = vec![0u8; opts.size as usize];
    let data: Vec<u8> = (0..opts.size).map(|i| (i * 7 % 251) as u8).collect();
    for off in (0..opts.size).step_by(64 * 1024) {
        let (s, e) = (off as usize, off as usize + 64 * 1024);
        img.write_at(&data[s..e], off).expect("write");
        shadow[s..e].copy_from_slice(&data[s..e]);
    }
    img.close().expect("close");
    verify(&dir, &path, &shadow);
}

#[test]
fn odd_refcount_widths_match_raw() {
    for (bits, seed) in [(2u32, 7u64), (4, 8), (8, 9), (32, 10)] {
        roundtrip(
            CreateOptions {
                size: 4 << 20,
                cluster_size: 4096,
                refcount_bits: bits,
                ..Default::default()
            },
            seed,
            120,
        );
    }
}

#[test]
fn writes_to_a_qemu_created_image_match_raw() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("qemu-made");
    let path = dir.path("a.qcow2");
    qemu_create(&path, "", "32M");
    qemu_io(&path, &["write -P 0x77 1M 3M"]);
    let mut shadow = vec![0u8; 32 << 20];
    shadow[1 << 20..4 << 20].fill(0x77);
    let img = open(&path, true);
    random_ops(&img, &mut shadow, 11, 300);
    img.close().expect("close");
    verify(&dir, &path, &shadow);
}

#[test]
fn overlay_partial_writes_copy_on_write_from_backing() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("cow");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    qemu_create(&base, "", "6M");
    qemu_io(&base, &["write -P 0x5a 0 6M"]);
    let opts = CreateOptions {
        size: 8 << 20,
        backing_file: Some(base.to_str().expect("p").to_string()),
        backing_fmt: Some("qcow2".into()),
        ..Default::default()
    };
    let img = create(&top, &opts);
    img.set_backing(Some(Arc::new(ImageStorage(Arc::new(open(&base, false))))));
    let mut shadow = vec![0u8; 8 << 20];
    shadow[..6 << 20].fill(0x5a);
    let mut rng = Rng(12);
    for i in 0..200u64 {
        let len = 1 + rng.below(100_000);
        let off = rng.below((8 << 20) - len);
        if i % 7 == 0 {
            img.write_zeroes(off, len, true).expect("zero");
            shadow[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = vec![(i as u8) | 1; len as usize];
            img.write_at(&data, off).expect("write");
            shadow[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
    assert_same(&read_all(&img, 1 << 20), &shadow, "overlay read");
    img.close().expect("close");
    assert_check_clean(&top);
    assert_compares_to_raw(&dir, &top, &shadow);
}

#[test]
fn qemu_io_writes_into_our_image_read_back() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("interop");
    let path = dir.path("a.qcow2");
    create(
        &path,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .close()
    .expect("close");
    qemu_io(&path, &["write -P 0xab 12345 70000"]);
    let img = open(&path, false);
    let mut buf = vec![0u8; 70000];
    img.read_at(&mut buf, 12345).expect("read");
    assert!(buf.iter().all(|&b| b == 0xab));
}

#[test]
fn discarded_space_is_reused_after_flush() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("reuse");
    let path = dir.path("a.qcow2");
    let img = create(
        &path,
        &CreateOptions {
            size: 16 << 20,
            ..Default::default()
        },
    );
    img.write_at(&vec![1u8; 8 << 20], 0).expect("write");
    img.flush().expect("flush");
    let size1 = img.actual_size().expect("size");
    img.discard(0, 8 << 20).expect("discard");
    img.flush().expect("flush");
    img.write_at(&vec![2u8; 8 << 20], 8 << 20).expect("write");
    img.close().expect("close");
    assert!(
        img.actual_size().expect("size") <= size1 + 65536,
        "freed clusters were not reused"
    );
    let mut shadow = vec![0u8; 16 << 20];
    shadow[8 << 20..].fill(2);
    verify(&dir, &path, &shadow);
}

#[test]
fn writes_beyond_the_disk_are_refused() {
    let st = Arc::new(qcow2::MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st, OpenOptions::default()).expect("open");
    let err = img.write_at(&[0; 2], (1 << 20) - 1).expect_err("must fail");
    assert_eq!(err.kind(), qcow2::ErrorKind::OutOfRange);
}

#[test]
fn growing_the_disk_moves_the_l1_table_and_keeps_data() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("resize");
    let path = dir.path("a.qcow2");
    // 512-byte clusters: one L1 entry covers 32 KiB, so growing needs a larger L1 table.
    let img = create(
        &path,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            ..Default::default()
        },
    );
    let mut shadow = vec![0u8; 1 << 20];
    random_ops(&img, &mut shadow, 13, 100);
    img.resize(3 << 20).expect("resize");
    assert_eq!(img.virtual_size(), 3 << 20);
    shadow.resize(3 << 20, 0);
    random_ops(&img, &mut shadow, 14, 100);
    img.close().expect("close");
    verify(&dir, &path, &shadow);
    let info = qemu_img(&["info", path.to_str().expect("p")]);
    assert!(info.contains("virtual size: 3 MiB"), "{info}");
}

#[test]
fn shrinking_is_refused() {
    let st = Arc::new(qcow2::MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st, OpenOptions::default()).expect("open");
    assert_eq!(
        img.resize(1 << 19).expect_err("shrink").kind(),
        qcow2::ErrorKind::Unsupported
    );
}

#[test]
fn io_after_close_is_refused() {
    let st = Arc::new(qcow2::MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st, OpenOptions::default()).expect("open");
    img.close().expect("close");
    assert_eq!(
        img.read_at(&mut [0u8; 1], 0).expect_err("closed").kind(),
        qcow2::ErrorKind::Closed
    );
    assert_eq!(
        img.write_at(&[0u8; 1], 0).expect_err("closed").kind(),
        qcow2::ErrorKind::Closed
    );
}

#[test]
fn failed_flush_is_reported_and_a_later_flush_succeeds() {
    let st = Arc::new(qcow2::MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st.clone(), OpenOptions::default()).expect("open");
    img.write_at(&[7u8; 4096], 0).expect("write");
    st.set_fail_flush(true);
    assert_eq!(
        img.flush().expect_err("flush fails").kind(),
        qcow2::ErrorKind::Io
    );
    st.set_fail_flush(false);
    img.flush().expect("flush");
    img.close().expect("close");
    let again = Qcow2::open(st, OpenOptions { read_only: true }).expect("reopen");
    let mut buf = [0u8; 4096];
    again.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, [7u8; 4096]);
}

#[test]
fn zeroing_without_unmap_keeps_clusters_preallocated() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("prealloc");
    let path = dir.path("a.qcow2");
    let img = create(
        &path,
        &CreateOptions {
            size: 4 << 20,
            ..Default::default()
        },
    );
    img.write_at(&vec![3u8; 1 << 20], 0).expect("write");
    img.write_zeroes(0, 1 << 20, false).expect("zero");
    assert_eq!(
        img.block_status(0, 1 << 20).expect("bs"),
        (qcow2::BlockStatus::Zero, 1 << 20)
    );
    img.write_at(&[9u8; 100], 4096)
        .expect("write into preallocated zero cluster");
    img.close().expect("close");
    let mut shadow = vec![0u8; 4 << 20];
    shadow[4096..4196].fill(9);
    verify(&dir, &path, &shadow);
}

/// An overlay whose header names no backing file but which has a backing image attached (a
/// fleecing target given `backing` by node): zeroing must set the zero flag, or the
/// "zeroed" clusters would read the backing image's data.
#[test]
fn zeroing_with_an_attached_backing_reads_zeros() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("attached");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    qemu_create(&base, "", "2M");
    qemu_io(&base, &["write -P 0x5a 0 2M"]);
    let opts = CreateOptions {
        size: 2 << 20,
        ..Default::default()
    };
    let img = create(&top, &opts);
    img.set_backing(Some(Arc::new(ImageStorage(Arc::new(open(&base, false))))));
    img.write_zeroes(0, 1 << 20, false).expect("zero");
    img.write_zeroes(1 << 20, 512 << 10, true)
        .expect("zero, may unmap");
    let data = read_all(&img, 1 << 20);
    assert!(
        data[..(3 << 20) / 2].iter().all(|&b| b == 0),
        "zeroed range reads backing data"
    );
    assert!(data[(3 << 20) / 2..].iter().all(|&b| b == 0x5a));
}
