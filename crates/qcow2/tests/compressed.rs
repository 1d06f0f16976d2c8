//! Compressed clusters written by `qemu-img convert -c` read back right, and can be
//! overwritten (copy-on-write out of the compressed cluster).

mod common;

use common::*;

/// Mixed content: text, incompressible noise, zeros, runs of varying length.
fn source(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(size);
    let words = [
        "qcow2 ",
        "cluster ",
        "refcount ",
        "bitmap ",
        "deflate ",
        "backing ",
        "L2 ",
        "\n",
    ];
    while out.len() < size {
        let len = (1 + rng.below(40_000)) as usize;
        match rng.below(4) {
            0 => {
                while out.len() < size && len > 0 && out.len() % 40_000 != 39_999 {
                    out.extend_from_slice(words[rng.below(8) as usize].as_bytes());
                    if rng.below(50) == 0 {
                        break;
                    }
                }
            }
            1 => out.extend((0..len).map(|_| rng.next() as u8)),
            2 => out.resize(out.len() + len, 0),
            _ => {
                while out.len() < size && rng.below(200) != 0 {
                    let b = rng.next() as u8;
                    let n = 1 + rng.below(300) as usize;
                    out.resize(out.len() + n, b);
                }
            }
        }
    }
    out.truncate(size);
    out
}

/// Convert `data` with compression at `cluster` size; returns the image path.
fn compressed_image(dir: &TempDir, data: &[u8], cluster: u64) -> std::path::PathBuf {
    let raw = dir.path("src.raw");
    std::fs::write(&raw, data).expect("write");
    let img = dir.path("c.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        raw.to_str().expect("p"),
        img.to_str().expect("p"),
    ]);
    img
}

fn check_read(cluster: u64, size: usize, seed: u64) {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("zread");
    let data = source(size, seed);
    let img = compressed_image(&dir, &data, cluster);
    let ours = open(&img, false);
    assert_same(
        &read_all(&ours, 4096 + 512),
        &data,
        &format!("compressed, cluster {cluster}"),
    );
    // The image really has compressed clusters.
    let check = qemu_img(&["check", img.to_str().expect("p")]);
    assert!(!check.contains(" 0.00% compressed"), "{check}");
}

#[test]
fn compressed_512_byte_clusters_read_like_the_source() {
    check_read(512, 2 << 20, 1);
}

#[test]
fn compressed_4k_clusters_read_like_the_source() {
    check_read(4096, 4 << 20, 2);
}

#[test]
fn compressed_64k_clusters_read_like_the_source() {
    check_read(65536, 6 << 20, 3);
}

#[test]
fn compressed_2m_clusters_read_like_the_source() {
    check_read(2 << 20, 12 << 20, 4);
}

#[test]
fn writes_into_compressed_clusters_copy_on_write() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("zwrite");
    let mut shadow = source(4 << 20, 5);
    let path = compressed_image(&dir, &shadow, 4096);
    let img = open(&path, true);
    let mut rng = Rng(6);
    for i in 0..200u64 {
        let len = 1 + rng.below(10_000);
        let off = rng.below((4 << 20) - len);
        let (s, e) = (off as usize, (off + len) as usize);
        match i % 5 {
            0 => {
                img.discard(off, len).expect("discard");
                let (a, b) = (off.next_multiple_of(4096), (off + len) / 4096 * 4096);
                if b > a {
                    shadow[a as usize..b as usize].fill(0);
                }
            }
            1 => {
                img.write_zeroes(off, len, true).expect("zero");
                shadow[s..e].fill(0);
            }
            _ => {
                let d = vec![i as u8; len as usize];
                img.write_at(&d, off).expect("write");
                shadow[s..e].copy_from_slice(&d);
            }
        }
    }
    assert_same(&read_all(&img, 1 << 20), &shadow, "after writes");
    img.close().expect("close");
    assert_check_clean(&path);
    assert_same(&to_raw(&dir, &path), &shadow, "qemu's view");
}
