//! Compressed streams are packed after the previous one in the same host cluster; once that
//! cluster is freed (discard, snapshot deletion) and handed out again, nothing more may be
//! packed into it.

mod common;
use common::*;

#[test]
fn no_compressed_stream_lands_in_a_freed_and_reused_cluster() {
    assert!(have_qemu());
    let dir = TempDir::new("tailreuse");
    let path = dir.path("t.qcow2");
    qemu_create(&path, "", "4M");
    let img = open(&path, true);
    let cs = 65536usize;
    // Compressible cluster: small stream, tail stays inside its host cluster.
    img.write_compressed(0, &vec![0x11u8; cs]).expect("c1");
    img.discard(0, cs as u64).expect("discard");
    img.flush().expect("flush");
    img.write_at(&vec![0x22u8; cs], cs as u64).expect("plain");
    img.write_compressed(2 * cs as u64, &vec![0x33u8; cs])
        .expect("c2");
    let mut b = vec![0u8; cs];
    img.read_at(&mut b, cs as u64).expect("read");
    img.close().expect("close");
    assert!(b.iter().all(|&x| x == 0x22), "plain data damaged");
    assert_check_clean(&path);
    qemu_io(&path, &["read -P 0x22 64k 64k", "read -P 0x33 128k 64k"]);
}
