//! libnbd's tools (nbdinfo, nbdcopy) as real clients. A missing tool fails the test unless
//! the developer opted out (`BLOCKD_ALLOW_MISSING_ORACLES=1`, see `tests/oracles.rs`).

mod common;

use std::sync::Arc;

use common::{oracles, pattern, run, SparseBackend, TestServer, CLUSTER};
use nbd::ExportConfig;

const SIZE: u64 = 4 << 20;

/// True only when `tool` is missing and the developer opted out; a missing tool panics otherwise.
fn skip(tool: &str) -> bool {
    oracles::require(tool).is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_shows_exports_flags_contexts_and_block_sizes() {
    if skip("nbdinfo") {
        return;
    }
    let t = TestServer::start(SIZE).await;

    let r = run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", t.sock.display()),
        ],
    )
    .await;

    assert!(r.ok, "{}", r.stderr);
    let out = &r.stdout;
    for needle in [
        "export=\"disk\":",
        "description: a writable test disk",
        "export=\"ro\":",
        "export-size: 4194304",
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
        "can_multi_conn: true",
        "can_fast_zero: true",
        "is_read_only: true",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_base_allocation() {
    if skip("nbdinfo") {
        return;
    }
    let t = TestServer::start(SIZE).await;
    t.backend.fill(2 * CLUSTER, &pattern(CLUSTER as usize, 2));

    let r = run("nbdinfo", &["--map", &t.url("disk")]).await;

    assert!(r.ok, "{}", r.stderr);
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{}", r.stdout);
    assert_eq!(rows[0][..3], ["0", "131072", "3"]);
    assert_eq!(rows[1][..3], ["131072", "65536", "0"]);
    assert_eq!(rows[2][..3], ["196608", "3997696", "3"]);
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_dirty_bitmap() {
    if skip("nbdinfo") {
        return;
    }
    let t = TestServer::start(SIZE).await;
    t.backend.fill(CLUSTER + 5, &[1; 3]);

    let r = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &t.url("ro")]).await;

    assert!(r.ok, "{}", r.stderr);
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{}", r.stdout);
    assert_eq!(rows[0][..4], ["0", "65536", "0", "clean"]);
    assert_eq!(rows[1][..4], ["65536", "65536", "1", "dirty"]);
    assert_eq!(rows[2][..4], ["131072", "4063232", "0", "clean"]);
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_of_a_one_tib_export_takes_few_requests() {
    if skip("nbdinfo") {
        return;
    }
    let t = TestServer::start(SIZE).await;
    let tib = 1u64 << 40;
    let sparse = Arc::new(SparseBackend::new(tib, 1 << 20));
    t.server
        .add_export(ExportConfig::new("huge", false, sparse.clone()))
        .unwrap();

    let r = run("nbdinfo", &["--map", &t.url("huge")]).await;

    assert!(r.ok, "{}", r.stderr);
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{}", r.stdout);
    assert_eq!(rows[0][..3], ["0", "1048576", "0"]);
    assert_eq!(rows[1][..3], ["1048576", "1099510579200", "3"]);
    // Compact requests cover < 4 GiB each: 1 TiB needs about 256 of them, not thousands.
    let calls = sparse
        .status_calls
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(calls <= 300, "{calls} block status calls");
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_export_to_file_and_back() {
    if skip("nbdcopy") {
        return;
    }
    let t = TestServer::start(SIZE).await;
    let data = pattern(SIZE as usize / 2, 7);
    t.backend.fill(SIZE / 4, &data);
    let file = t.dir.path("copy.raw");
    let file_s = file.to_str().unwrap();

    let out = run("nbdcopy", &[&t.url("ro"), file_s]).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(std::fs::read(&file).unwrap() == t.backend.contents());

    let mut changed = std::fs::read(&file).unwrap();
    changed[..CLUSTER as usize].copy_from_slice(&pattern(CLUSTER as usize, 8));
    std::fs::write(&file, &changed).unwrap();
    let back = run("nbdcopy", &["--flush", file_s, &t.url("disk")]).await;

    assert!(back.ok, "{}", back.stderr);
    assert!(t.backend.contents() == changed);
    t.server.stop().await;
}
