//! Images with internal snapshots: the active layer reads and writes, snapshots stay intact.

mod common;

use common::*;

#[test]
fn active_layer_of_an_image_with_snapshots_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("snap-read");
    let path = dir.path("s.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "", "4M");
    qemu_io(&path, &["write -P 0x11 0 64k"]);
    qemu_img(&["snapshot", "-c", "snap1", p]);
    qemu_io(&path, &["write -P 0x22 0 4k"]);
    let img = open(&path, false);
    assert_same(&read_all(&img, 65536), &to_raw(&dir, &path), "active layer");
}

#[test]
fn writes_beside_snapshots_keep_the_snapshots_intact() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("snap-write");
    let path = dir.path("s.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "cluster_size=4096", "8M");
    qemu_io(&path, &["write -P 0x11 0 6M", "write -c -P 0x33 6M 64k"]);
    qemu_img(&["snapshot", "-c", "s1", p]);
    let s1 = to_raw(&dir, &path);
    let mut shadow = s1.clone();
    let img = open(&path, true);
    let mut rng = Rng(21);
    for i in 0..300u64 {
        let len = 1 + rng.below(20_000);
        let off = rng.below((8 << 20) - len);
        let (s, e) = (off as usize, (off + len) as usize);
        match i % 6 {
            0 => {
                img.discard(off, len).expect("discard");
                let (a, b) = (off.next_multiple_of(4096), (off + len) / 4096 * 4096);
                if b > a {
                    shadow[a as usize..b as usize].fill(0);
                }
            }
            1 => {
                img.write_zeroes(off, len, i % 12 == 1).expect("zero");
                shadow[s..e].fill(0);
            }
            _ => {
                let d = vec![(i as u8) | 0x80; len as usize];
                img.write_at(&d, off).expect("write");
                shadow[s..e].copy_from_slice(&d);
            }
        }
    }
    img.close().expect("close");
    assert_check_clean(&path);
    assert_same(&to_raw(&dir, &path), &shadow, "active layer");
    assert_same(
        &qemu_snapshot_content(&dir, &path, "s1"),
        &s1,
        "snapshot s1",
    );
    // A second snapshot over our writes, then more writes.
    qemu_img(&["snapshot", "-c", "s2", p]);
    let img = open(&path, true);
    img.write_at(&vec![0x44; 3 << 20], 1 << 20).expect("write");
    img.close().expect("close");
    assert_check_clean(&path);
    assert_same(
        &qemu_snapshot_content(&dir, &path, "s2"),
        &shadow,
        "snapshot s2",
    );
    assert_same(
        &qemu_snapshot_content(&dir, &path, "s1"),
        &s1,
        "snapshot s1 again",
    );
}
