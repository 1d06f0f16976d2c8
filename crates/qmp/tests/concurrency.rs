//! Events, many clients, slow clients, command serialisation and shutdown, end to end.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Harness, PATIENCE};
use qmp::{OutboxLimits, ServerConfig};
use serde_json::json;

#[tokio::test]
async fn events_are_not_delivered_before_negotiation() {
    let h = Harness::start();
    let mut c = h.client().await;
    h.events.emit("BEFORE", None);
    c.negotiate().await;
    h.events.emit("AFTER", None);
    let event = c.recv().await;
    assert_eq!(event["event"], json!("AFTER"));
}

#[tokio::test]
async fn events_reach_every_negotiated_connection() {
    let h = Harness::start();
    let mut a = h.ready_client().await;
    let mut b = h.ready_client().await;
    h.events.emit(
        "JOB_STATUS_CHANGE",
        Some(json!({"id": "j", "status": "created"})),
    );
    for c in [&mut a, &mut b] {
        let event = c.recv().await;
        assert_eq!(event["event"], json!("JOB_STATUS_CHANGE"));
        assert_eq!(event["data"], json!({"id": "j", "status": "created"}));
    }
}

#[tokio::test]
async fn event_line_has_qemu_shape_and_wall_clock_timestamp() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    h.events.emit("BLOCK_JOB_READY", None);
    let line = c.text().await;
    assert!(line.starts_with(r#"{"timestamp": {"seconds": "#), "{line}");
    assert!(
        line.ends_with(r#"}, "event": "BLOCK_JOB_READY"}"#),
        "{line}"
    );
    let event: serde_json::Value = serde_json::from_str(&line).expect("json");
    let seconds = event["timestamp"]["seconds"].as_u64().unwrap_or(0);
    let micros = event["timestamp"]["microseconds"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(seconds >= before && seconds <= before + 60);
    assert!(micros < 1_000_000);
    assert!(event.get("data").is_none());
}

#[tokio::test]
async fn event_emitted_by_a_command_precedes_its_reply() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"emit","arguments":{"event":"E"},"id":1}"#)
        .await;
    assert_eq!(c.recv().await["event"], json!("E"));
    assert_eq!(c.recv().await, json!({"return": {}, "id": 1}));
}

#[tokio::test]
async fn events_flow_while_a_command_runs() {
    let h = Harness::start();
    let mut a = h.ready_client().await;
    a.send(br#"{"execute":"slow","arguments":{"ms":2000},"id":1}"#)
        .await;
    while h.stats.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.events.emit("DURING", None);
    assert_eq!(a.recv().await["event"], json!("DURING"));
    assert_eq!(a.recv().await, json!({"return": {}, "id": 1}));
}

#[tokio::test]
async fn commands_run_one_at_a_time_across_connections() {
    let h = Harness::start();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(h.ready_client().await);
    }
    for c in &mut clients {
        c.send(
            br#"{"execute":"slow","arguments":{"ms":20}}{"execute":"slow","arguments":{"ms":20}}"#,
        )
        .await;
    }
    for c in &mut clients {
        assert_eq!(c.recv().await, json!({"return": {}}));
        assert_eq!(c.recv().await, json!({"return": {}}));
    }
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 8);
    assert_eq!(h.stats.max_in_flight.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn fifty_concurrent_connections_are_served_at_once() {
    let h = Harness::start();
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(h.client().await);
    }
    for c in &mut clients {
        c.negotiate().await;
    }
    h.events.emit("ALL", None);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                assert_eq!(c.recv().await["event"], json!("ALL"));
                let reply = c.call(&format!(r#"{{"execute":"echo","id":{i}}}"#)).await;
                assert_eq!(reply, json!({"return": {}, "id": i}));
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
}

fn small_queue_config() -> ServerConfig {
    ServerConfig {
        output: OutboxLimits {
            max_messages: 64,
            max_bytes: 1 << 20,
        },
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn client_that_never_reads_is_dropped_without_blocking_others() {
    let h = Harness::with_config(small_queue_config());
    let mut idle = h.ready_client().await;
    let mut active = h.ready_client().await;
    let data = json!({"filler": "x".repeat(200)});
    let mut received = 0;
    for _round in 0..100 {
        for _ in 0..50 {
            h.events.emit("TICK", Some(data.clone()));
        }
        for _ in 0..50 {
            assert_eq!(active.recv().await["event"], json!("TICK"));
            received += 1;
        }
    }
    assert_eq!(received, 5000);
    assert_eq!(
        h.events.subscriber_count(),
        1,
        "the idle client was not dropped"
    );
    let reply = active.call(r#"{"execute":"echo","id":"still-here"}"#).await;
    assert_eq!(reply, json!({"return": {}, "id": "still-here"}));
    // The dropped client finds what fitted into its socket, then EOF.
    let lines = idle.drain_to_eof().await;
    assert!(lines < 5000);
}

#[tokio::test]
async fn emit_never_waits_for_a_client_that_does_not_read() {
    let h = Harness::with_config(small_queue_config());
    let _idle = h.ready_client().await;
    let start = Instant::now();
    for _ in 0..20_000 {
        h.events.emit("FLOOD", Some(json!({"n": 1})));
    }
    assert!(start.elapsed() < PATIENCE);
    assert_eq!(h.events.subscriber_count(), 0);
}

#[tokio::test]
async fn command_replies_reach_others_while_a_client_does_not_read() {
    let h = Harness::with_config(small_queue_config());
    let mut idle = h.ready_client().await;
    // The idle client piles up requests whose replies it never reads.
    let mut flood = Vec::new();
    for _ in 0..20_000 {
        flood.extend_from_slice(br#"{"execute":"echo","arguments":{"pad":"................................................"}}"#);
    }
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_millis(500), idle.send(&flood)).await;
        idle
    });
    let mut active = h.ready_client().await;
    for i in 0..20 {
        let reply = active
            .call(&format!(r#"{{"execute":"echo","id":{i}}}"#))
            .await;
        assert_eq!(reply, json!({"return": {}, "id": i}));
    }
    drop(writer.await);
}

#[tokio::test]
async fn quit_reply_is_delivered_before_the_socket_closes() {
    let h = Harness::start();
    let server = h.server.clone();
    let quit = h.quit.clone();
    let daemon = tokio::spawn(async move {
        quit.cancelled().await;
        server.shutdown().await;
    });
    let mut other = h.ready_client().await;
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"quit-like","id":1}"#).await;
    assert_eq!(c.text().await, r#"{"return": {}, "id": 1}"#);
    c.expect_eof().await;
    other.expect_eof().await;
    tokio::time::timeout(PATIENCE, daemon)
        .await
        .expect("shutdown finished")
        .expect("daemon task");
    assert!(!h.path.exists(), "socket file left behind");
}

#[tokio::test]
async fn shutdown_waits_for_a_running_command_and_delivers_its_reply() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"slow","arguments":{"ms":300},"id":"last"}"#)
        .await;
    while h.stats.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let server = h.server.clone();
    let shutdown = tokio::spawn(async move { server.shutdown().await });
    assert_eq!(c.recv().await, json!({"return": {}, "id": "last"}));
    c.expect_eof().await;
    tokio::time::timeout(PATIENCE, shutdown)
        .await
        .expect("shutdown finished")
        .expect("shutdown task");
}

#[tokio::test]
async fn commands_queued_behind_the_running_one_do_not_start_after_shutdown() {
    let h = Harness::start();
    let mut a = h.ready_client().await;
    let mut b = h.ready_client().await;
    a.send(br#"{"execute":"slow","arguments":{"ms":300}}"#)
        .await;
    while h.stats.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.send(br#"{"execute":"slow","arguments":{"ms":1}}"#).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.server.shutdown().await;
    assert_eq!(a.recv().await, json!({"return": {}}));
    b.expect_eof().await;
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shutdown_cuts_off_a_client_that_does_not_read_after_the_grace_period() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let h = Harness::with_config(config);
    let _idle = h.ready_client().await;
    let big = json!({"filler": "y".repeat(64 * 1024)});
    for _ in 0..40 {
        h.events.emit("BIG", Some(big.clone()));
    }
    let start = Instant::now();
    tokio::time::timeout(PATIENCE, h.server.shutdown())
        .await
        .expect("shutdown finished");
    assert!(start.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn half_closed_client_still_gets_its_replies() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"slow","arguments":{"ms":50},"id":1}{"execute":"echo","id":2}"#)
        .await;
    c.stream.shutdown().await.expect("half-close");
    assert_eq!(c.recv().await, json!({"return": {}, "id": 1}));
    assert_eq!(c.recv().await, json!({"return": {}, "id": 2}));
    c.expect_eof().await;
}

#[tokio::test]
async fn several_monitors_share_one_event_stream() {
    let h = Harness::start();
    let second = h.dir.join("second.sock");
    let listener = tokio::net::UnixListener::bind(&second).expect("bind");
    h.server.add_unix_monitor(listener, Some(second.clone()));
    let mut a = h.ready_client().await;
    let mut b = common::Client::connect(&second).await;
    b.line().await;
    b.negotiate().await;
    h.events.emit("BOTH", None);
    assert_eq!(a.recv().await["event"], json!("BOTH"));
    assert_eq!(b.recv().await["event"], json!("BOTH"));
    h.server.shutdown().await;
    assert!(!second.exists());
}
