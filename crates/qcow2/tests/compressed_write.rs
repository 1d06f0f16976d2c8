//! Compressed clusters written by us are read by QEMU: `qemu-img check` clean (refcounts of
//! shared host clusters included), `qemu-img compare` identical with the data, `qemu-img map`
//! reporting them compressed, for every cluster size, v2 and v3 images. Missing qemu-img
//! fails these tests (no silent skip).

mod common;

use std::path::Path;

use common::*;
use qcow2::ErrorKind;

/// Cluster `i` of the test pattern: compressible text, zeros, noise, or runs.
fn pattern(cs: usize, clusters: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(cs * clusters);
    for i in 0..clusters {
        let start = out.len();
        match i % 4 {
            0 => {
                while out.len() < start + cs {
                    out.extend_from_slice(
                        format!("cluster {i} line {} ", rng.below(100)).as_bytes(),
                    );
                }
            }
            1 => out.resize(start + cs, 0),
            2 => out.extend((0..cs).map(|_| rng.next() as u8)),
            _ => {
                while out.len() < start + cs {
                    let b = rng.next() as u8;
                    let n = 1 + rng.below(64) as usize;
                    out.resize(out.len() + n, b);
                }
            }
        }
        out.truncate(start + cs);
    }
    out
}

fn create(path: &Path, size: u64, cluster: u64, compat: &str) {
    qemu_create(
        path,
        &format!("cluster_size={cluster},compat={compat}"),
        &size.to_string(),
    );
}

/// Compressed data clusters per `qemu-img map`, in bytes.
fn compressed_bytes(img: &Path) -> u64 {
    qemu_map(img).iter().filter(|e| e.2).map(|e| e.1).sum()
}

fn write_and_check(cluster: u64, compat: &str) {
    let dir = TempDir::new(&format!("cw-{cluster}-{compat}"));
    let img_path = dir.path("c.qcow2");
    let clusters = 8usize;
    let size = cluster * clusters as u64;
    create(&img_path, size, cluster, compat);
    let data = pattern(cluster as usize, clusters, cluster);
    {
        let img = open(&img_path, true);
        // Halves in two requests, the second of several clusters.
        let half = data.len() / 2;
        img.write_compressed(0, &data[..half]).expect("first half");
        img.write_compressed(half as u64, &data[half..])
            .expect("second half");
        assert_same(&read_all(&img, 4096), &data, "read back before close");
        img.write_compressed(0, &[]).expect("zero-length pads");
        img.close().expect("close");
    }
    assert_check_clean(&img_path);
    assert_compares_to_raw(&dir, &img_path, &data);
    // Text and run clusters are compressed; noise stays a normal cluster. Zero clusters are
    // compressed too when written (as QEMU does for backup chunks).
    let compressed = compressed_bytes(&img_path);
    let expected_min = cluster * (clusters as u64 / 2);
    assert!(
        compressed >= expected_min && compressed < size,
        "cluster {cluster}: {compressed} compressed bytes, map {:?}",
        qemu_map(&img_path)
    );
    for e in qemu_map(&img_path) {
        if e.2 {
            assert!(e.3, "compressed extents are data: {e:?}");
        }
    }
    let info = qemu_img(&["info", "--output=json", img_path.to_str().expect("p")]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("info json");
    assert_eq!(v["virtual-size"].as_u64(), Some(size));
    assert_eq!(v["cluster-size"].as_u64(), Some(cluster));
    if compat == "1.1" {
        assert_eq!(v["format-specific"]["data"]["compression-type"], "zlib");
    }
    // Our reader agrees after reopening.
    let img = open(&img_path, false);
    assert_same(
        &read_all(&img, cluster.min(65536) as usize),
        &data,
        "reopened",
    );
}

#[test]
fn every_cluster_size_v3() {
    for bits in 9..=21u32 {
        write_and_check(1 << bits, "1.1");
    }
}

#[test]
fn v2_image() {
    write_and_check(65536, "0.10");
    write_and_check(512, "0.10");
}

#[test]
fn random_data_is_stored_uncompressed() {
    let dir = TempDir::new("cw-random");
    let p = dir.path("c.qcow2");
    create(&p, 1 << 20, 65536, "1.1");
    let mut rng = Rng(7);
    let data: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
    let img = open(&p, true);
    img.write_compressed(0, &data).expect("write");
    img.close().expect("close");
    assert_check_clean(&p);
    assert_compares_to_raw(&dir, &p, &data);
    assert_eq!(compressed_bytes(&p), 0);
}

#[test]
fn zero_data_compresses_and_packs_streams() {
    let dir = TempDir::new("cw-zero");
    let p = dir.path("c.qcow2");
    create(&p, 4 << 20, 65536, "1.1");
    let data = vec![0u8; 4 << 20];
    let img = open(&p, true);
    img.write_compressed(0, &data).expect("write");
    img.close().expect("close");
    assert_check_clean(&p);
    assert_compares_to_raw(&dir, &p, &data);
    assert_eq!(compressed_bytes(&p), 4 << 20);
    // 64 streams of a few bytes share one host cluster: the image stays small.
    let len = std::fs::metadata(&p).expect("stat").len();
    assert!(len < 6 * 65536, "file is {len} bytes");
    let check = qemu_img(&["check", "--output=json", p.to_str().expect("p")]);
    let v: serde_json::Value = serde_json::from_str(&check).expect("check json");
    assert_eq!(v["compressed-clusters"].as_u64(), Some(64));
}

#[test]
fn request_rules_match_qemu() {
    let dir = TempDir::new("cw-rules");
    let p = dir.path("c.qcow2");
    // 100 KiB: one full 64 KiB cluster and a 36 KiB last cluster.
    create(&p, 100 << 10, 65536, "1.1");
    let text: Vec<u8> = b"abcdefgh"
        .iter()
        .cycle()
        .take(100 << 10)
        .copied()
        .collect();
    let img = open(&p, true);
    let kind = |r: qcow2::Result<()>| r.expect_err("refused").kind();
    assert_eq!(
        kind(img.write_compressed(4096, &text[..65536])),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(img.write_compressed(65536, &text[..4096])),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(img.write_compressed(0, &text[..4096])),
        ErrorKind::InvalidArgument
    );
    // The last partial cluster ending at the disk end is allowed.
    img.write_compressed(65536, &text[65536..])
        .expect("last partial cluster");
    // Never overwrites: EIO, nothing changed.
    let e = img
        .write_compressed(65536, &text[65536..])
        .expect_err("allocated");
    assert_eq!(e.errno(), libc::EIO);
    // Zeroed (v3 zero flag without offset) and never-written clusters may be compressed into.
    img.write_zeroes(0, 65536, true).expect("zero");
    img.write_compressed(0, &text[..65536])
        .expect("over a zero cluster");
    assert_eq!(kind(img.write_compressed(0, &text[..65536])), ErrorKind::Io);
    img.close().expect("close");
    assert_check_clean(&p);
    assert_compares_to_raw(&dir, &p, &text);
    assert_eq!(compressed_bytes(&p), 100 << 10);
}

#[test]
fn normal_write_over_our_compressed_cluster() {
    let dir = TempDir::new("cw-cow");
    let p = dir.path("c.qcow2");
    create(&p, 1 << 20, 65536, "1.1");
    let mut data: Vec<u8> = b"0123456789"
        .iter()
        .cycle()
        .take(1 << 20)
        .copied()
        .collect();
    let img = open(&p, true);
    img.write_compressed(0, &data).expect("write");
    img.write_at(&[0xeeu8; 1000], 70_000)
        .expect("overwrite part of cluster 1");
    data[70_000..71_000].fill(0xee);
    img.close().expect("close");
    assert_check_clean(&p);
    assert_compares_to_raw(&dir, &p, &data);
    assert_eq!(compressed_bytes(&p), 15 * 65536);
}

#[test]
fn qemu_io_reads_and_rewrites_our_streams() {
    let dir = TempDir::new("cw-qemu-io");
    let p = dir.path("c.qcow2");
    create(&p, 1 << 20, 4096, "1.1");
    let data: Vec<u8> = b"qcow2 ".iter().cycle().take(1 << 20).copied().collect();
    let img = open(&p, true);
    img.write_compressed(0, &data).expect("write");
    img.close().expect("close");
    qemu_io(&p, &["write -P 0x5a 8k 4k"]);
    let mut expected = data.clone();
    expected[8192..12288].fill(0x5a);
    assert_check_clean(&p);
    assert_compares_to_raw(&dir, &p, &expected);
    // And QEMU's compressed writes land after ours without disturbing them.
    let q = dir.path("q.qcow2");
    create(&q, 1 << 20, 4096, "1.1");
    let img = open(&q, true);
    img.write_compressed(0, &data[..65536]).expect("write");
    img.close().expect("close");
    qemu_io(&q, &["write -c -P 0x11 64k 4k"]);
    let img = open(&q, true);
    img.write_compressed(69632, &data[69632..139264])
        .expect("after qemu's");
    img.close().expect("close");
    assert_check_clean(&q);
    let mut exp = vec![0u8; 1 << 20];
    exp[..65536].copy_from_slice(&data[..65536]);
    exp[65536..69632].fill(0x11);
    exp[69632..139264].copy_from_slice(&data[69632..139264]);
    assert_compares_to_raw(&dir, &q, &exp);
}

#[test]
fn concurrent_compressed_writes_pack_safely() {
    let dir = TempDir::new("cw-threads");
    let p = dir.path("c.qcow2");
    create(&p, 8 << 20, 4096, "1.1");
    let data = pattern(4096, 2048, 99);
    let img = std::sync::Arc::new(open(&p, true));
    std::thread::scope(|s| {
        for t in 0..8usize {
            let img = img.clone();
            let data = &data;
            s.spawn(move || {
                // Thread t writes clusters t, t+8, t+16, ... one by one.
                for c in (t..2048).step_by(8) {
                    let off = c * 4096;
                    img.write_compressed(off as u64, &data[off..off + 4096])
                        .expect("compressed write");
                }
            });
        }
    });
    // Every cluster is written now: compressing into any of them again fails, unchanged.
    assert_eq!(
        img.write_compressed(0, &data[..4096])
            .expect_err("allocated")
            .kind(),
        ErrorKind::Io
    );
    img.close().expect("close");
    assert_check_clean(&p);
    assert_compares_to_raw(&dir, &p, &data);
}

/// Raw L2 entries of the first L2 table and the 16-bit refcounts of the first refcount block,
/// read straight from the file.
fn raw_tables(path: &Path) -> (u32, Vec<u64>, Vec<u64>) {
    let f = std::fs::read(path).expect("read image");
    let bits = u32::from_be_bytes(f[20..24].try_into().expect("4"));
    let cs = 1usize << bits;
    let l1 = be64(&f, 40) as usize;
    let l2 = (be64(&f, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let l2_entries = (0..cs / 8).map(|i| be64(&f, l2 + i * 8)).collect();
    let rt = be64(&f, 48) as usize;
    let rb = be64(&f, rt) as usize;
    let refcounts = (0..cs / 2)
        .map(|i| u16::from_be_bytes([f[rb + 2 * i], f[rb + 2 * i + 1]]) as u64)
        .collect();
    (bits, l2_entries, refcounts)
}

#[test]
fn l2_descriptors_and_shared_refcounts_decode_as_specified() {
    for cluster in [4096u64, 65536, 2 << 20] {
        let dir = TempDir::new(&format!("cw-l2-{cluster}"));
        let p = dir.path("c.qcow2");
        create(&p, cluster * 8, cluster, "1.1");
        let data: Vec<u8> = b"descriptor "
            .iter()
            .cycle()
            .take(cluster as usize * 8)
            .copied()
            .collect();
        let img = open(&p, true);
        img.write_compressed(0, &data).expect("write");
        img.close().expect("close");
        assert_check_clean(&p);
        let (bits, l2, refcounts) = raw_tables(&p);
        let x = 62 - (bits - 8);
        let hosts: Vec<u64> = l2[..8].iter().map(|&e| e & ((1 << x) - 1)).collect();
        // Identical clusters give streams of one length, packed back to back.
        let len = hosts
            .windows(2)
            .map(|w| w[1] - w[0])
            .min()
            .expect("8 entries");
        assert!(len > 0 && len < cluster / 4, "stream length {len}");
        let mut per_cluster = std::collections::HashMap::<u64, u64>::new();
        for (&e, &host) in l2[..8].iter().zip(&hosts) {
            assert_eq!(e >> 62, 1, "bit 62 set, bit 63 clear: {e:#x}");
            let extra = (e >> x) & ((1 << (bits - 8)) - 1);
            assert_eq!(extra, (host + len - 1) / 512 - host / 512, "entry {e:#x}");
            for c in host >> bits..=(host + len - 1) >> bits {
                *per_cluster.entry(c).or_default() += 1;
            }
        }
        assert_eq!(hosts.windows(2).filter(|w| w[1] - w[0] == len).count(), 7);
        for (c, n) in per_cluster {
            assert_eq!(
                refcounts[c as usize], n,
                "host cluster {c}: one reference per stream"
            );
        }
    }
}

#[test]
fn one_bit_refcounts_give_every_stream_its_own_cluster() {
    let dir = TempDir::new("cw-rc1");
    let p = dir.path("c.qcow2");
    qemu_create(&p, "cluster_size=4096,refcount_bits=1", "1M");
    let data: Vec<u8> = b"refcount ".iter().cycle().take(1 << 20).copied().collect();
    let img = open(&p, true);
    img.write_compressed(0, &data).expect("write");
    img.close().expect("close");
    assert_check_clean(&p);
    assert_compares_to_raw(&dir, &p, &data);
    assert_eq!(compressed_bytes(&p), 1 << 20);
}
