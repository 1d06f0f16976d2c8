//! `Qcow2::allocated_ranges` (the image's own allocation map, walked per L2 table) against
//! `qemu-img map` of images written by qemu-io: data, zero and compressed clusters, partial
//! writes over a backing file, ranges across L2 tables, a virtual size that is not a multiple
//! of the cluster size, sub-ranges, and mappings still only in our cache.

mod common;

use common::*;
use qcow2::{AllocKind, AllocatedRange, BlockStatus};

/// What a normalised range holds: data (with its host offset), zeros or compressed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum K {
    Data(u64),
    Zero,
    Compressed,
}

/// Merge adjacent ranges of one kind (data while the host offsets continue), so the two
/// sides' different splitting rules (QEMU splits zero runs at preallocated host offsets)
/// compare equal.
fn normalise(v: impl IntoIterator<Item = (u64, u64, K)>) -> Vec<(u64, u64, K)> {
    let mut out: Vec<(u64, u64, K)> = Vec::new();
    for (o, l, k) in v {
        if let Some(last) = out.last_mut() {
            let cont = match (last.2, k) {
                (K::Data(a), K::Data(b)) => a + last.1 == b,
                (a, b) => a == b,
            };
            if last.0 + last.1 == o && cont {
                last.1 += l;
                continue;
            }
        }
        out.push((o, l, k));
    }
    out
}

fn ours(v: &[AllocatedRange]) -> Vec<(u64, u64, K)> {
    normalise(v.iter().map(|r| {
        let k = match r.kind {
            AllocKind::Data { host } => K::Data(host),
            AllocKind::Zero => K::Zero,
            AllocKind::Compressed => K::Compressed,
        };
        (r.offset, r.len, k)
    }))
}

/// `qemu-img map --output=json` of `path`, the extents its own file allocates (depth 0,
/// present).
fn qemu_own_map(path: &std::path::Path) -> Vec<(u64, u64, K)> {
    normalise(qemu_map_json(path).iter().filter_map(|e| {
        let own = e["depth"].as_u64() == Some(0) && e["present"].as_bool() == Some(true);
        if !own {
            return None;
        }
        let start = e["start"].as_u64().expect("start");
        let len = e["length"].as_u64().expect("length");
        let k = if e["compressed"].as_bool() == Some(true) {
            K::Compressed
        } else if e["data"].as_bool() == Some(true) {
            K::Data(e["offset"].as_u64().expect("data extent with an offset"))
        } else {
            assert_eq!(e["zero"].as_bool(), Some(true), "{e}");
            K::Zero
        };
        Some((start, len, k))
    }))
}

/// The part of a normalised map inside `[a, b)`.
fn clip(v: &[(u64, u64, K)], a: u64, b: u64) -> Vec<(u64, u64, K)> {
    v.iter()
        .filter_map(|&(o, l, k)| {
            let (s, e) = (o.max(a), (o + l).min(b));
            (s < e).then(|| {
                let k = match k {
                    K::Data(h) => K::Data(h + (s - o)),
                    k => k,
                };
                (s, e - s, k)
            })
        })
        .collect()
}

/// A base image full of data and an overlay written by qemu-io with every kind of cluster;
/// our map of the overlay equals qemu-img's, for the whole disk and for random sub-ranges,
/// and agrees with `block_status` cluster by cluster.
fn check(cluster: u64, size: u64, seed: u64) {
    assert!(have_qemu(), "qemu-img and qemu-io are needed");
    let dir = TempDir::new("allocmap");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    qemu_create(&base, &format!("cluster_size={cluster}"), &size.to_string());
    qemu_io(&base, &[&format!("write -P 7 0 {size}")]);
    let b = base.to_str().expect("p");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        "-b",
        b,
        "-F",
        "qcow2",
        top.to_str().expect("p"),
        &size.to_string(),
    ]);
    let span = cluster * (cluster / 8);
    let clusters = size.div_ceil(cluster);
    let mut rng = Rng(seed);
    let mut cmds = vec![
        // Across the first L2 table's end (or mid-disk when one table covers it all), and up
        // to the disk's short last cluster.
        format!(
            "write -P 1 {} {}",
            span.min(size / 2) - cluster - 100,
            2 * cluster + 300
        ),
        format!("write -P 2 {} 512", size - 512),
        // Zero clusters: over the backing (a zero cluster), over own data kept preallocated,
        // and unmapped.
        format!("write -z {} {}", 3 * cluster, 2 * cluster),
        format!("write -P 3 {} {}", 8 * cluster, 3 * cluster),
        format!("write -z {} {}", 9 * cluster, cluster),
        format!("write -z -u {} {}", 10 * cluster, cluster),
        format!("discard {} {}", 12 * cluster, cluster),
        // Compressed clusters, two in a row and one between data.
        format!("write -c -P 4 {} {}", 20 * cluster, 2 * cluster),
        format!("write -P 5 {} {}", 23 * cluster, cluster),
        format!("write -c -P 6 {} {}", 24 * cluster, cluster),
        format!("write -P 5 {} {}", 25 * cluster, cluster),
    ];
    for _ in 0..40 {
        let c = rng.below(clusters - 1);
        let off = c * cluster + rng.below(cluster);
        let len = (1 + rng.below(3 * cluster)).min(size - off);
        cmds.push(match rng.below(4) {
            0 => format!("write -z {off} {len}"),
            _ => format!("write -P {} {off} {len}", 8 + rng.below(200)),
        });
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&top, &refs);

    let img = open(&top, false);
    let want = qemu_own_map(&top);
    assert!(want.iter().any(|r| matches!(r.2, K::Data(_))), "{want:?}");
    assert!(want.iter().any(|r| r.2 == K::Zero), "{want:?}");
    assert!(want.iter().any(|r| r.2 == K::Compressed), "{want:?}");
    let raw = img.allocated_ranges(0, size).expect("map");
    let got = ours(&raw);
    assert_eq!(got, want, "cluster {cluster}");
    // Ranges are in order, inside the disk, never empty; a request past the end is clipped.
    assert!(raw.windows(2).all(|w| w[0].end() <= w[1].offset));
    assert!(raw.iter().all(|r| r.len > 0 && r.end() <= size));
    assert_eq!(img.allocated_ranges(0, u64::MAX).expect("map"), raw);
    assert!(img.allocated_ranges(size, 1).expect("map").is_empty());
    // Sub-ranges, aligned or not, are the whole map clipped.
    for _ in 0..200 {
        let a = rng.below(size);
        let b = a + 1 + rng.below(size - a);
        let part = ours(&img.allocated_ranges(a, b - a).expect("map"));
        assert_eq!(part, clip(&want, a, b), "[{a:#x}, {b:#x})");
    }
    // Cluster by cluster, the same as block_status.
    for c in 0..clusters {
        let off = c * cluster;
        let (st, _) = img.block_status(off, cluster).expect("bs");
        let r = raw.iter().find(|r| r.offset <= off && off < r.end());
        let kind = match r.map(|r| r.kind) {
            None => BlockStatus::Unallocated,
            Some(AllocKind::Zero) => BlockStatus::Zero,
            Some(_) => BlockStatus::Data,
        };
        assert_eq!(kind, st, "cluster {c}");
    }
}

#[test]
fn own_map_matches_qemu_img_map_64k_clusters() {
    check(64 << 10, (64 << 20) + 3 * 512, 1);
}

#[test]
fn own_map_matches_qemu_img_map_4k_clusters_across_l2_tables() {
    // 4 KiB clusters: one L2 table covers 2 MiB, so the disk spans nine tables.
    check(4096, (16 << 20) + 1024, 2);
}

#[test]
fn own_map_matches_qemu_img_map_512_byte_clusters() {
    check(512, 1 << 20, 3);
}

/// Mappings our writer has only in its cache (not yet written back) are in the map, and the
/// map of the file after close is qemu-img's.
#[test]
fn mappings_still_in_the_cache_are_seen() {
    assert!(have_qemu(), "qemu-img and qemu-io are needed");
    let dir = TempDir::new("allocmap-cache");
    let p = dir.path("a.qcow2");
    let cluster = 65536u64;
    let size = 8u64 << 20;
    qemu_create(&p, "", &size.to_string());
    let img = open(&p, true);
    assert!(img.allocated_ranges(0, size).expect("map").is_empty());
    img.write_at(&vec![9u8; 3 * cluster as usize], cluster)
        .expect("write");
    img.write_at(&vec![8u8; 2 * cluster as usize], 6 * cluster)
        .expect("write");
    // Zeroes over own data keep the host cluster: a zero range, split from the data.
    img.write_zeroes(7 * cluster, cluster, false)
        .expect("zeroes");
    img.write_at(&[1u8; 10], size - 10).expect("write");
    let got = img.allocated_ranges(0, size).expect("map");
    let kinds: Vec<(u64, u64, bool)> = got
        .iter()
        .map(|r| (r.offset, r.len, matches!(r.kind, AllocKind::Data { .. })))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (cluster, 3 * cluster, true),
            (6 * cluster, cluster, true),
            (7 * cluster, cluster, false),
            (size - cluster, cluster, true),
        ]
    );
    // The host offsets name the bytes written.
    let bytes = |r: &AllocatedRange| match r.kind {
        AllocKind::Data { host } => {
            let mut b = vec![0u8; r.len as usize];
            std::os::unix::fs::FileExt::read_exact_at(
                &std::fs::File::open(&p).expect("open"),
                &mut b,
                host,
            )
            .expect("read");
            b
        }
        _ => Vec::new(),
    };
    assert!(bytes(&got[0]).iter().all(|&x| x == 9));
    img.flush().expect("flush");
    img.close().expect("close");
    drop(img);
    assert_eq!(ours(&got), qemu_own_map(&p));
    assert_check_clean(&p);
}
