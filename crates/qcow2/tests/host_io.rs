//! Kernel-copy requests (`read_host` / `write_host`): guest ranges handed out as host-file
//! ranges. What `write_host` fills reads back through `read_at` and through QEMU
//! (`qemu-img compare`, `check` clean); scattered clusters and overwrites; ranges that are not
//! plain data or not cluster-aligned are refused without any change. Missing qemu-img fails.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::*;

const CS: u64 = 65536;

fn fill(img: &qcow2::Qcow2, off: u64, data: &[u8]) -> bool {
    let mut at = 0usize;
    img.write_host(
        off,
        data.len() as u64,
        &mut |f: &File, host: u64, n: u64| {
            f.write_all_at(&data[at..at + n as usize], host)?;
            at += n as usize;
            Ok(())
        },
    )
    .expect("write_host")
}

#[test]
fn write_host_then_read_back_everywhere() {
    let dir = TempDir::new("host-io");
    let p = dir.path("h.qcow2");
    qemu_create(&p, "", "8M");
    let mut want = vec![0u8; 8 << 20];
    let img = open(&p, true);
    let mut rng = Rng(5);
    // Scattered single clusters, a long run, then an overwrite across allocated and new.
    for &(c, n) in &[(3u64, 1u64), (17, 1), (40, 24), (20, 30), (127, 1)] {
        let data: Vec<u8> = (0..n * CS).map(|_| rng.next() as u8).collect();
        assert!(fill(&img, c * CS, &data));
        want[(c * CS) as usize..((c + n) * CS) as usize].copy_from_slice(&data);
    }
    // Unaligned: refused, nothing written.
    assert!(!fill(&img, 100, &[1u8; CS as usize]));
    assert!(!fill(&img, 0, &[1u8; 1000]));
    assert_same(&read_all(&img, 1 << 20), &want, "read_at after write_host");
    // Reading back through host ranges: data clusters only.
    let mut got = vec![0u8; (24 * CS) as usize];
    let mut at = 0usize;
    let ok = img
        .read_host(40 * CS, 24 * CS, &mut |f: &File, host: u64, n: u64| {
            f.read_exact_at(&mut got[at..at + n as usize], host)?;
            at += n as usize;
            Ok(())
        })
        .expect("read_host");
    assert!(ok);
    assert_same(
        &got,
        &want[(40 * CS) as usize..(64 * CS) as usize],
        "read_host",
    );
    // A range with an unallocated cluster is not plain data.
    let ok = img
        .read_host(0, 4 * CS, &mut |_: &File, _: u64, _: u64| panic!("called"))
        .expect("read_host");
    assert!(!ok);
    img.close().expect("close");
    assert_check_clean(&p);
    assert_same(&to_raw(&dir, &p), &want, "qemu-img view");
}

fn fill_batch(img: &qcow2::Qcow2, runs: &[(u64, u64)], data: &[u8]) -> bool {
    let mut at = 0usize;
    img.write_batch_host(runs, &mut |f: &File, host: u64, n: u64| {
        f.write_all_at(&data[at..at + n as usize], host)?;
        at += n as usize;
        Ok(())
    })
    .expect("write_batch_host")
}

#[test]
fn write_batch_host_places_scattered_runs_in_one_allocation() {
    let dir = TempDir::new("host-batch");
    let p = dir.path("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().expect("p"), "64M"]);
    let mut want = vec![0u8; 64 << 20];
    let img = open(&p, true);
    let mut rng = Rng(9);
    // Scattered clusters and runs over several L2 ranges, one batch.
    let runs: Vec<(u64, u64)> = [(1u64, 1u64), (5, 3), (200, 1), (700, 2), (1023, 1)]
        .iter()
        .map(|&(c, n)| (c * CS, n * CS))
        .collect();
    let total: u64 = runs.iter().map(|r| r.1).sum();
    let data: Vec<u8> = (0..total).map(|_| rng.next() as u8).collect();
    assert!(fill_batch(&img, &runs, &data));
    let mut at = 0usize;
    for &(o, l) in &runs {
        want[o as usize..(o + l) as usize].copy_from_slice(&data[at..at + l as usize]);
        at += l as usize;
    }
    // Refused without a change: an unaligned run, and a batch touching an allocated cluster
    // (it would be written in place).
    assert!(!fill_batch(&img, &[(100, CS)], &[1u8; CS as usize]));
    assert!(!fill_batch(
        &img,
        &[(2 * CS, CS), (5 * CS, CS)],
        &[7u8; 2 * CS as usize]
    ));
    assert_same(
        &read_all(&img, 1 << 20),
        &want,
        "read_at after write_batch_host",
    );
    // A second batch (fresh clusters) lands after the first.
    let runs2 = [(10 * CS, CS), (300 * CS, CS)];
    let data2: Vec<u8> = (0..2 * CS).map(|_| rng.next() as u8).collect();
    assert!(fill_batch(&img, &runs2, &data2));
    want[(10 * CS) as usize..(11 * CS) as usize].copy_from_slice(&data2[..CS as usize]);
    want[(300 * CS) as usize..(301 * CS) as usize].copy_from_slice(&data2[CS as usize..]);
    assert_same(&read_all(&img, 1 << 20), &want, "read_at after two batches");
    img.close().expect("close");
    assert_check_clean(&p);
    assert_same(&to_raw(&dir, &p), &want, "qemu-img view");
}
