//! Safe-mode removal (`block-export-del` mode `safe`) right after a client hung up: a client
//! whose socket is closed no longer counts, even before the server has seen its disconnect.

mod common;

use std::time::Duration;

use common::{RawClient, TestServer};
use nbd::proto;
use nbd::ExportConfig;
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 1 << 20;
const SHORT: Duration = Duration::from_secs(5);

/// Wait until the backend holds `n` writes.
async fn wait_for_held_writes(t: &TestServer, n: usize) {
    for _ in 0..500 {
        if t.backend.waiting_writes() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("backend never held {n} writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_removal_ignores_a_client_that_hung_up_while_its_write_runs() {
    // The connection stays counted while its write runs (the backend holds it), so without
    // asking the socket the removal would be refused although the client is gone.
    let t = TestServer::start(SIZE).await;
    t.backend.hold_writes(true);
    let mut c = RawClient::open(&t.sock, "disk").await;
    c.send_request(proto::CMD_WRITE, 0, 1, 0, 512, &[7; 512])
        .await;
    wait_for_held_writes(&t, 1).await;
    drop(c);
    assert_eq!(t.server.export_clients("disk"), 1);

    let mut removed = t.server.remove_export_if_unused("disk");
    let listed = t.server.export_names().contains(&"disk".to_string());
    // The export is gone for new clients, but the running write keeps it until it finishes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let early = removed.as_mut().ok().map(|gone| gone.try_recv().is_ok());
    t.backend.hold_writes(false);

    let gone = removed.expect("a client that hung up must not make the export in use");
    assert!(!listed, "still listed after removal");
    assert_eq!(early, Some(false), "notified while a write runs");
    tokio::time::timeout(SHORT, gone).await.unwrap().unwrap();
    assert_eq!(&t.backend.contents()[..512], &[7; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_removal_still_refuses_a_connected_client_with_a_write_running() {
    let t = TestServer::start(SIZE).await;
    t.backend.hold_writes(true);
    let mut c = RawClient::open(&t.sock, "disk").await;
    c.send_request(proto::CMD_WRITE, 0, 1, 0, 512, &[7; 512])
        .await;
    wait_for_held_writes(&t, 1).await;

    let removed = t.server.remove_export_if_unused("disk");
    t.backend.hold_writes(false);

    let err = removed.map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), nbd::ErrorKind::ExportInUse);
    assert_eq!(err.to_string(), "export 'disk' still in use");
    let reply = tokio::time::timeout(SHORT, c.read_reply())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((reply.cookie, reply.error), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_removal_right_after_disconnect_never_finds_the_client() {
    // The reported race: the client sends NBD_CMD_DISC, closes its socket, and the removal
    // comes before the server has read the request. Repeated so that the server loses the race
    // many times; every removal must succeed.
    let t = TestServer::start(SIZE).await;
    for i in 0..200 {
        let name = format!("e{i}");
        t.server
            .add_export(ExportConfig::new(&name, true, t.backend.clone()))
            .unwrap();
        let mut c = RawClient::open(&t.sock, &name).await;
        c.send_request(proto::CMD_DISC, 0, 9, 0, 0, &[]).await;
        c.s.shutdown().await.unwrap();
        drop(c);

        let gone = match t.server.remove_export_if_unused(&name) {
            Ok(rx) => rx,
            Err(e) => panic!("iteration {i}: {e}"),
        };
        tokio::time::timeout(SHORT, gone).await.unwrap().unwrap();
    }
}
