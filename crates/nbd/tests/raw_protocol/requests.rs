//! Bad requests and the replies to good ones.

use super::*;

// ---------------------------------------------------------------------------------------------
// Bad requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_past_the_end_fails_with_enospc() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c
        .request(proto::CMD_WRITE, 0, SIZE - 512, 1024, &[7; 1024])
        .await;

    assert_eq!(r.error, proto::ENOSPC);
    assert!(t.backend.contents()[SIZE as usize - 512..]
        .iter()
        .all(|&b| b == 0));
    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_past_the_end_fails_with_enospc() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c.request(proto::CMD_WRITE_ZEROES, 0, SIZE, 1, &[]).await;

    assert_eq!(r.error, proto::ENOSPC);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_trim_cache_and_block_status_past_the_end_fail_with_einval() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    for cmd in [
        proto::CMD_READ,
        proto::CMD_TRIM,
        proto::CMD_CACHE,
        proto::CMD_BLOCK_STATUS,
    ] {
        let r = c.request(cmd, 0, SIZE - 512, 4096, &[]).await;
        assert_eq!(r.error, proto::EINVAL, "command {cmd}");
    }
    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_read_only_export_fails_with_eperm() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "ro").await;

    let w = c.request(proto::CMD_WRITE, 0, 0, 512, &[9; 512]).await;
    let z = c.request(proto::CMD_WRITE_ZEROES, 0, 0, 512, &[]).await;
    let d = c.request(proto::CMD_TRIM, 0, 0, 512, &[]).await;

    assert_eq!(
        (w.error, z.error, d.error),
        (proto::EPERM, proto::EPERM, proto::EPERM)
    );
    assert!(t.backend.contents()[..512].iter().all(|&b| b == 0));
    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_fails_with_einval() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c.request(42, 0, 0, 0, &[]).await;

    assert_eq!(r.error, proto::EINVAL);
    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_flag_fails_with_einval() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c
        .request(proto::CMD_READ, proto::CMD_FLAG_REQ_ONE, 0, 512, &[])
        .await;

    assert_eq!(r.error, proto::EINVAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_larger_than_max_payload_fails_with_einval_and_connection_survives() {
    let t = TestServer::start_with(MemBackend::new(64 << 20), ServerOptions::default()).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c
        .request(proto::CMD_READ, 0, 0, (32 << 20) + 512, &[])
        .await;

    assert_eq!(r.error, proto::EINVAL);
    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_larger_than_max_payload_gets_einval_then_disconnect() {
    let t = TestServer::start_with(MemBackend::new(64 << 20), ServerOptions::default()).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    // Only the header: the server must not wait for 33 MiB of payload.
    c.send_request(proto::CMD_WRITE, 0, 5, 0, (32 << 20) + 512, &[])
        .await;
    let r = c.read_reply().await.unwrap();

    assert_eq!((r.cookie, r.error), (5, proto::EINVAL));
    assert!(c.closed_within(SHORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_disconnects() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    c.s.write_all(&[0xde; 28]).await.unwrap();

    assert!(c.closed_within(SHORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_without_selected_context_fails_with_einval() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;
    c.structured().await;
    c.go("disk").await;

    let r = c.request(proto::CMD_BLOCK_STATUS, 0, 0, 4096, &[]).await;

    assert_eq!(r.error, proto::EINVAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_that_cannot_be_fast_fails_with_enotsup() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let flags = proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_NO_HOLE;
    let r = c
        .request(proto::CMD_WRITE_ZEROES, flags, 0, 4096, &[])
        .await;

    assert_eq!(r.error, proto::ENOTSUP);
}

// ---------------------------------------------------------------------------------------------
// Replies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_read_of_unallocated_range_is_a_hole_chunk() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c.request(proto::CMD_READ, 0, 0, 65536, &[]).await;

    assert_eq!(r.error, 0);
    assert_eq!(r.chunk_types, [proto::REPLY_TYPE_OFFSET_HOLE]);
    assert_eq!(r.data, vec![0; 65536]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_read_of_data_is_one_data_chunk() {
    let t = TestServer::start(SIZE).await;
    let data = pattern(8192, 5);
    t.backend.fill(4096, &data);
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c.request(proto::CMD_READ, 0, 4096, 8192, &[]).await;

    assert_eq!(r.chunk_types, [proto::REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(r.data, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_answers_every_selected_context() {
    let t = TestServer::start(SIZE).await;
    t.backend.fill(CLUSTER, &[1; 10]);
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c.request(proto::CMD_BLOCK_STATUS, 0, 0, SIZE, &[]).await;

    assert_eq!(r.error, 0);
    let rest = SIZE - 2 * CLUSTER;
    assert_eq!(
        r.extents,
        [
            (0, vec![(CLUSTER, 3), (CLUSTER, 0), (rest, 3)]),
            (1, vec![(CLUSTER, 0), (CLUSTER, 1), (rest, 0)]),
            (2, vec![(CLUSTER, 0), (CLUSTER, 1), (rest, 0)]),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_req_one_returns_one_extent_within_the_request() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let r = c
        .request(
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_REQ_ONE,
            512,
            1000,
            &[],
        )
        .await;

    assert_eq!(r.extents.len(), CONTEXTS.len());
    for (_, ext) in &r.extents {
        assert_eq!(ext.len(), 1);
        assert_eq!(ext[0].0, 1000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_headers_carry_64_bit_block_status() {
    let tib = 1u64 << 40;
    let t = TestServer::start(SIZE).await;
    let sparse = std::sync::Arc::new(common::SparseBackend::new(tib, 1 << 20));
    t.server
        .add_export(nbd::ExportConfig::new("huge", false, sparse))
        .unwrap();
    let mut c = RawClient::connect(&t.sock).await;
    c.extended().await;
    c.set_meta("huge", &["base:allocation"]).await;
    c.go("huge").await;

    let status = c.request(proto::CMD_BLOCK_STATUS, 0, 0, tib, &[]).await;
    let read = c.request(proto::CMD_READ, 0, (1 << 20) - 2, 4, &[]).await;
    let flush = c.request(proto::CMD_FLUSH, 0, 0, 0, &[]).await;

    assert_eq!(c.mode, HeaderMode::Extended);
    assert_eq!(status.chunk_types, [proto::REPLY_TYPE_BLOCK_STATUS_EXT]);
    assert_eq!(
        status.extents,
        [(0, vec![(1 << 20, 0), (tib - (1 << 20), 3)])]
    );
    assert_eq!(read.data, [0xab, 0xab, 0, 0]);
    assert_eq!(
        (flush.error, flush.chunk_types),
        (0, vec![proto::REPLY_TYPE_NONE])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_payload_on_a_non_write_command_is_consumed_and_refused() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;
    c.extended().await;
    c.go("disk").await;

    let r = c
        .request(
            proto::CMD_FLUSH,
            proto::CMD_FLAG_PAYLOAD_LEN,
            0,
            16,
            &[0; 16],
        )
        .await;

    assert_eq!(r.error, proto::EINVAL);
    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_with_fua_and_flush_reach_the_backend() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let w = c
        .request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 512, 3, b"abc")
        .await;
    let f = c.request(proto::CMD_FLUSH, 0, 0, 0, &[]).await;
    let cache = c.request(proto::CMD_CACHE, 0, 0, 4096, &[]).await;

    assert_eq!((w.error, f.error, cache.error), (0, 0, 0));
    assert_eq!(&t.backend.contents()[512..515], b"abc");
    assert!(t.backend.flushes.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_request_closes_after_pending_replies() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    c.send_request(proto::CMD_WRITE, 0, 11, 0, 4, b"wxyz").await;
    c.send_request(proto::CMD_DISC, 0, 12, 0, 0, &[]).await;
    let r = c.read_reply().await.unwrap();

    assert_eq!((r.cookie, r.error), (11, 0));
    assert!(c.closed_within(SHORT).await);
    assert_eq!(&t.backend.contents()[..4], b"wxyz");
}
