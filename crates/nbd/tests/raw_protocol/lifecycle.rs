//! Clients that vanish, concurrency and limits, and an export's lifecycle.

use super::*;

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
