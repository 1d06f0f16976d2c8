//! The handshake: options, negotiation, refusals.

use super::*;

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
