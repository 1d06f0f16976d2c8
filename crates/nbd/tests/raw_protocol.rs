//! Protocol edge cases driven by a hand-written client speaking raw bytes.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{pattern, MemBackend, RawClient, TestServer, CLUSTER, CONTEXTS};
use nbd::proto::{self, HeaderMode};
use nbd::ServerOptions;
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 1 << 20;
const SHORT: Duration = Duration::from_secs(5);

/// The connection still serves requests: a 512-byte read succeeds.
async fn assert_alive(c: &mut RawClient) {
    let r = c.request(proto::CMD_READ, 0, 0, 512, &[]).await;
    assert_eq!(r.error, 0);
    assert_eq!(r.data.len(), 512);
}

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
// Handshake

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_option_gets_unsup_then_go_works() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    let r = c.option(99, b"some data to skip").await;
    assert_eq!(r[0].reply, proto::REP_ERR_UNSUP);
    assert_eq!(r[0].option, 99);
    c.go("disk").await;

    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_option_magic_disconnects() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    c.s.write_all(&[0x55; 16]).await.unwrap();

    assert!(c.closed_within(SHORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_flags_disconnect() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect_raw(&t.sock).await;
    let mut greet = [0u8; 18];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut greet)
        .await
        .unwrap();

    c.s.write_all(&0x8000_0001u32.to_be_bytes()).await.unwrap();

    assert!(c.closed_within(SHORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_to_unknown_export_gets_err_unknown_and_negotiation_continues() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    let r = c
        .option(proto::OPT_GO, &RawClient::info_data("nosuch", &[]))
        .await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply, proto::REP_ERR_UNKNOWN);
    assert_eq!(r[0].data, b"export 'nosuch' not present");
    c.go("ro").await;

    assert_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_with_truncated_data_gets_err_invalid() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    let mut data = RawClient::info_data("disk", &[proto::INFO_NAME]);
    data.pop();
    let r = c.option(proto::OPT_INFO, &data).await;

    assert_eq!(r[0].reply, proto::REP_ERR_INVALID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_name_description_block_size_and_export() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    let r = c
        .option(
            proto::OPT_INFO,
            &RawClient::info_data("disk", &[proto::INFO_NAME]),
        )
        .await;

    let kinds: Vec<u16> = r
        .iter()
        .filter(|r| r.reply == proto::REP_INFO)
        .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
        .collect();
    assert_eq!(
        kinds,
        [
            proto::INFO_NAME,
            proto::INFO_DESCRIPTION,
            proto::INFO_BLOCK_SIZE,
            proto::INFO_EXPORT
        ]
    );
    assert_eq!(r[0].data[2..], *b"disk");
    assert_eq!(r[1].data[2..], *b"a writable test disk");
    assert_eq!(r[2].data[2..], [0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    let flags = u16::from_be_bytes([r[3].data[10], r[3].data[11]]);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN,
    // SEND_CACHE, SEND_FAST_ZERO; no DF before structured replies.
    assert_eq!(flags, 0x0d6d);
    assert_eq!(r.last().unwrap().reply, proto::REP_ACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_flags_match_qsd() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;
    c.structured().await;

    let (size, flags) = c.go("ro").await;

    assert_eq!(size, SIZE);
    // HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA, SEND_DF, CAN_MULTI_CONN, SEND_CACHE.
    assert_eq!(flags, 0x058f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_names_every_export_with_its_description() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    let r = c.option(proto::OPT_LIST, &[]).await;

    assert_eq!(r.len(), 3);
    assert_eq!(r[0].data, b"\0\0\0\x04diska writable test disk");
    assert_eq!(r[1].data, b"\0\0\0\x02ro");
    assert_eq!(r[2].reply, proto::REP_ACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_meta_context_with_namespace_query_lists_that_namespace() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;
    c.structured().await;

    let data = RawClient::meta_data("disk", &["qemu:"]);
    let r = c.option(proto::OPT_LIST_META_CONTEXT, &data).await;

    let names: Vec<&[u8]> = r
        .iter()
        .filter(|r| r.reply == proto::REP_META_CONTEXT)
        .map(|r| &r.data[4..])
        .collect();
    assert_eq!(
        names,
        [&b"qemu:allocation-depth"[..], b"qemu:dirty-bitmap:b0"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_meta_context_before_structured_replies_is_invalid() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    let r = c
        .option(
            proto::OPT_SET_META_CONTEXT,
            &RawClient::meta_data("disk", &["base:allocation"]),
        )
        .await;

    assert_eq!(r[0].reply, proto::REP_ERR_INVALID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_meta_context_ignores_unknown_names_and_ids_are_list_positions() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;
    c.structured().await;

    let ids = c
        .set_meta(
            "disk",
            &[
                "qemu:dirty-bitmap:b0",
                "qemu:dirty-bitmap:nosuch",
                "base:allocation",
            ],
        )
        .await;

    assert_eq!(
        ids,
        [
            (0, "base:allocation".to_string()),
            (2, "qemu:dirty-bitmap:b0".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_selected_for_another_export_are_dropped_at_go() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;
    c.structured().await;
    c.set_meta("disk", &["base:allocation"]).await;
    c.go("ro").await;

    let r = c.request(proto::CMD_BLOCK_STATUS, 0, 0, 4096, &[]).await;

    assert_eq!(r.error, proto::EINVAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_enters_transmission_with_simple_replies() {
    let t = TestServer::start(SIZE).await;
    t.backend.fill(0, &[0x42; 512]);
    let mut c = RawClient::connect(&t.sock).await;

    c.send_option(proto::OPT_EXPORT_NAME, b"disk").await;
    let mut reply = [0u8; 10];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut reply)
        .await
        .unwrap();
    let r = c.request(proto::CMD_READ, 0, 0, 512, &[]).await;

    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
    assert_eq!(r.chunk_types, Vec::<u16>::new(), "simple reply expected");
    assert_eq!(r.data, [0x42; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_for_unknown_export_disconnects() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    c.send_option(proto::OPT_EXPORT_NAME, b"nosuch").await;

    assert!(c.closed_within(SHORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_acknowledged_then_closed() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::connect(&t.sock).await;

    c.send_option(proto::OPT_ABORT, &[]).await;
    let r = c.read_option_reply().await.unwrap();

    assert_eq!(r.reply, proto::REP_ACK);
    assert!(c.closed_within(SHORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_is_dropped_after_the_handshake_timeout() {
    let options = ServerOptions {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..ServerOptions::default()
    };
    let t = TestServer::start_with(MemBackend::new(SIZE), options).await;
    let mut c = RawClient::connect(&t.sock).await;

    assert!(c.closed_within(SHORT).await);
}

// ---------------------------------------------------------------------------------------------
// Clients that vanish

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_handshake_leaves_others_working() {
    let t = TestServer::start(SIZE).await;
    let mut other = RawClient::open(&t.sock, "disk").await;
    let mut c = RawClient::connect(&t.sock).await;

    // Half an option header, then gone.
    c.s.write_all(&proto::IHAVEOPT.to_be_bytes()).await.unwrap();
    drop(c);
    let mut late = RawClient::open(&t.sock, "disk").await;

    assert_alive(&mut other).await;
    assert_alive(&mut late).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_write_payload_leaves_others_working() {
    let t = TestServer::start(SIZE).await;
    let mut other = RawClient::open(&t.sock, "disk").await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    c.send_request(proto::CMD_WRITE, 0, 1, 0, 65536, &[0xcc; 1000])
        .await;
    drop(c);
    let mut late = RawClient::open(&t.sock, "disk").await;

    assert_alive(&mut other).await;
    assert_alive(&mut late).await;
    assert!(t.backend.contents()[..65536].iter().all(|&b| b == 0));
    for _ in 0..50 {
        if t.server.export_clients("disk") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.server.export_clients("disk"), 2);
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

// ---------------------------------------------------------------------------------------------
// Concurrency and limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_complete_out_of_order() {
    let mut backend = MemBackend::new(SIZE);
    backend.slow_below = 4096;
    backend.delay = Duration::from_millis(400);
    let t = TestServer::start_with(backend, ServerOptions::default()).await;
    t.backend.fill(0, &pattern(SIZE as usize, 1));
    let mut c = RawClient::open(&t.sock, "disk").await;

    // Cookie 1 reads the slow region; cookies 2..=8 are fast. Give the slow read a head
    // start so it is surely running while the fast ones are served (a loaded machine may
    // otherwise start it last).
    c.send_request(proto::CMD_READ, 0, 1, 0, 4096, &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for cookie in 2..=8u64 {
        c.send_request(proto::CMD_READ, 0, cookie, (cookie - 1) * 8192, 4096, &[])
            .await;
    }
    let mut order = Vec::new();
    for _ in 0..8 {
        let r = c.read_reply().await.unwrap();
        assert_eq!(r.error, 0);
        let at = ((r.cookie - 1) * 8192) as usize;
        assert_eq!(r.data, pattern(SIZE as usize, 1)[at..at + 4096]);
        order.push(r.cookie);
    }

    assert_eq!(
        order.last(),
        Some(&1),
        "slow read should finish last: {order:?}"
    );
    assert!(t.backend.max_running.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_per_connection_are_capped() {
    let mut backend = MemBackend::new(8 << 20);
    backend.slow_writes = true;
    backend.delay = Duration::from_millis(50);
    let t = TestServer::start_with(backend, ServerOptions::default()).await;
    let c = RawClient::open(&t.sock, "disk").await;

    let start = Instant::now();
    let n = 40u64;
    let (mut rd, mut wr) = c.s.into_split();
    let writer = tokio::spawn(async move {
        for cookie in 0..n {
            let req = proto::RequestHeader {
                flags: 0,
                command: proto::CMD_WRITE,
                cookie,
                offset: cookie * 65536,
                length: 65536,
            };
            let mut out = proto::encode_request(HeaderMode::Structured, &req);
            out.extend_from_slice(&[1; 65536]);
            wr.write_all(&out).await.unwrap();
        }
        wr
    });
    let mut replies = 0;
    while replies < n {
        let mut hdr = [0u8; 16];
        tokio::io::AsyncReadExt::read_exact(&mut rd, &mut hdr)
            .await
            .unwrap();
        assert_eq!(&hdr[4..8], &[0, 0, 0, 0]);
        replies += 1;
    }
    let _ = writer.await.unwrap();

    let max = t.backend.max_running.load(Ordering::SeqCst);
    assert!(
        max <= nbd::limits::MAX_IN_FLIGHT_REQUESTS,
        "{max} ran at once"
    );
    assert!(max >= 2, "requests were not concurrent");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_makes_extra_clients_wait_for_a_free_slot() {
    let options = ServerOptions {
        max_connections: Some(1),
        ..ServerOptions::default()
    };
    let t = TestServer::start_with(MemBackend::new(SIZE), options).await;
    let mut first = RawClient::open(&t.sock, "disk").await;

    let sock = t.sock.clone();
    let second = tokio::spawn(async move { RawClient::open(&sock, "ro").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "second client got in while the first was connected"
    );
    assert_alive(&mut first).await;
    drop(first);
    let mut second = tokio::time::timeout(SHORT, second).await.unwrap().unwrap();

    assert_alive(&mut second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_connection_server_does_not_offer_multi_conn() {
    let options = ServerOptions {
        max_connections: Some(1),
        ..ServerOptions::default()
    };
    let t = TestServer::start_with(MemBackend::new(SIZE), options).await;
    let mut c = RawClient::connect(&t.sock).await;

    let (_, flags) = c.go("disk").await;

    assert_eq!(flags & proto::TFLAG_CAN_MULTI_CONN, 0);
}

// ---------------------------------------------------------------------------------------------
// Export lifecycle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_export_name_is_refused() {
    let t = TestServer::start(SIZE).await;

    let err = t
        .server
        .add_export(nbd::ExportConfig::new("disk", true, t.backend.clone()))
        .unwrap_err();

    assert_eq!(err.kind(), nbd::ErrorKind::DuplicateExport);
    assert_eq!(
        err.to_string(),
        "NBD server already has export named 'disk'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_removal_closes_clients_and_notifies() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;
    assert_eq!(t.server.export_clients("disk"), 1);

    let gone = t.server.remove_export("disk", true).unwrap();

    assert!(c.closed_within(SHORT).await);
    tokio::time::timeout(SHORT, gone).await.unwrap().unwrap();
    let mut again = RawClient::connect(&t.sock).await;
    let r = again
        .option(proto::OPT_GO, &RawClient::info_data("disk", &[]))
        .await;
    assert_eq!(r[0].reply, proto::REP_ERR_UNKNOWN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_removal_lets_clients_finish_then_notifies() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;

    let mut gone = t.server.remove_export("disk", false).unwrap();
    assert_alive(&mut c).await;
    assert!(
        gone.try_recv().is_err(),
        "notified while a client is connected"
    );
    drop(c);

    tokio::time::timeout(SHORT, gone).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_if_unused_refuses_while_a_client_is_connected() {
    let t = TestServer::start(SIZE).await;
    let c = RawClient::open(&t.sock, "disk").await;

    let err = t.server.remove_export_if_unused("disk").unwrap_err();
    assert_eq!(err.kind(), nbd::ErrorKind::ExportInUse);
    assert_eq!(err.to_string(), "export 'disk' still in use");
    drop(c);
    let mut removed = None;
    for _ in 0..100 {
        if let Ok(rx) = t.server.remove_export_if_unused("disk") {
            removed = Some(rx);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    tokio::time::timeout(SHORT, removed.expect("removable once idle"))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_unknown_export_fails_with_qemu_text() {
    let t = TestServer::start(SIZE).await;

    let err = t.server.remove_export("e1", false).unwrap_err();

    assert_eq!(err.kind(), nbd::ErrorKind::ExportNotFound);
    assert_eq!(err.to_string(), "Export 'e1' is not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_connections_and_removes_the_socket() {
    let t = TestServer::start(SIZE).await;
    let mut c = RawClient::open(&t.sock, "disk").await;
    let mut pending = RawClient::connect(&t.sock).await;

    let removed = tokio::time::timeout(SHORT, t.server.stop()).await.unwrap();

    assert_eq!(removed, ["disk", "ro"]);
    assert!(c.closed_within(SHORT).await);
    assert!(pending.closed_within(SHORT).await);
    assert!(!t.sock.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_budget_stops_reading_the_socket() {
    let t = TestServer::start(64 << 20).await;
    t.backend.hold_writes(true);
    let c = RawClient::open(&t.sock, "disk").await;
    let (mut rd, mut wr) = c.s.into_split();

    // 24 writes of 1 MiB: 16 fit the request budget, the rest must stay in the client's pipe.
    let n = 24u64;
    let writer = tokio::spawn(async move {
        for cookie in 0..n {
            let req = proto::RequestHeader {
                flags: 0,
                command: proto::CMD_WRITE,
                cookie,
                offset: cookie << 20,
                length: 1 << 20,
            };
            let mut out = proto::encode_request(HeaderMode::Structured, &req);
            out.extend_from_slice(&vec![2; 1 << 20]);
            wr.write_all(&out).await.unwrap();
        }
        wr
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let blocked = !writer.is_finished();
    let waiting = t.backend.waiting_writes();
    t.backend.hold_writes(false);
    for _ in 0..n {
        let mut hdr = [0u8; 16];
        tokio::io::AsyncReadExt::read_exact(&mut rd, &mut hdr)
            .await
            .unwrap();
        assert_eq!(&hdr[4..8], &[0, 0, 0, 0]);
    }
    let _ = writer.await.unwrap();

    assert!(blocked, "the server kept reading while its budget was full");
    assert_eq!(waiting, nbd::limits::MAX_IN_FLIGHT_REQUESTS);
    assert!(t.backend.contents()[..(n << 20) as usize]
        .iter()
        .all(|&b| b == 2));
}

// ---------------------------------------------------------------------------------------------
// Garbage

/// xorshift64*: deterministic noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_handshakes_and_requests_never_disturb_a_good_client() {
    let t = TestServer::start(SIZE).await;
    let mut good = RawClient::open(&t.sock, "disk").await;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);

    for round in 0..60u64 {
        if round % 2 == 0 {
            // Handshake noise: a real option header with random option/length/data, or junk.
            let mut c = RawClient::connect(&t.sock).await;
            let option = (noise.next() % 16) as u32;
            let len = noise.next() % 64;
            let mut out = proto::IHAVEOPT.to_be_bytes().to_vec();
            out.extend_from_slice(&option.to_be_bytes());
            out.extend_from_slice(&(len as u32).to_be_bytes());
            let junk = (noise.next() % 80) as usize;
            out.extend(noise.bytes(junk));
            let _ = c.s.write_all(&out).await;
        } else {
            // Transmission noise: well-framed headers with random fields and payload.
            let mut c = RawClient::open(&t.sock, if round % 3 == 0 { "ro" } else { "disk" }).await;
            let mut out = Vec::new();
            for _ in 0..8 {
                let req = proto::RequestHeader {
                    flags: (noise.next() % 64) as u16,
                    command: (noise.next() % 10) as u16,
                    cookie: noise.next(),
                    offset: noise.next() % (2 * SIZE),
                    length: noise.next() % (SIZE / 4),
                };
                out.extend(proto::encode_request(HeaderMode::Structured, &req));
                if req.command == proto::CMD_WRITE {
                    out.extend(noise.bytes(req.length as usize));
                }
            }
            let _ = c.s.write_all(&out).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    assert_alive(&mut good).await;
    let mut late = RawClient::open(&t.sock, "disk").await;
    assert_alive(&mut late).await;
    for _ in 0..100 {
        if t.server.export_clients("disk") + t.server.export_clients("ro") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        t.server.export_clients("disk") + t.server.export_clients("ro"),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_is_notified_only_after_running_backend_calls_finish() {
    let t = TestServer::start(SIZE).await;
    t.backend.hold_writes(true);
    let mut c = RawClient::open(&t.sock, "disk").await;
    c.send_request(proto::CMD_WRITE, 0, 1, 0, 512, &[3; 512])
        .await;
    for _ in 0..100 {
        if t.backend.waiting_writes() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.backend.waiting_writes(), 1);

    let mut gone = t.server.remove_export("disk", true).unwrap();
    assert!(c.closed_within(SHORT).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let early = gone.try_recv().is_ok();
    t.backend.hold_writes(false);

    assert!(!early, "removal notified while a write was still running");
    tokio::time::timeout(SHORT, gone).await.unwrap().unwrap();
}
