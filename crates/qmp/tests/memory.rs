//! Memory stays bounded under an endless line. Alone in its own test binary so that no
//! concurrently running test disturbs the measurement of the process's resident memory.

mod common;

use common::{error, Harness};
use serde_json::json;

const GENERIC: &str = "GenericError";

/// Resident memory of this process, from /proc.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test]
async fn endless_line_does_not_grow_memory() {
    let mut config = qmp::ServerConfig::default();
    config.input.max_bytes = 64 * 1024;
    let h = Harness::with_config(config);
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"echo","arguments":{"s":""#).await;
    let chunk = vec![b'a'; 1 << 20];
    c.send(&chunk).await;
    let before = resident_bytes();
    for _ in 0..32 {
        c.send(&chunk).await;
    }
    c.send(b"\n{\"execute\":\"echo\",\"id\":5}").await;
    assert_eq!(
        c.recv().await,
        error(GENERIC, "JSON token size limit exceeded", None)
    );
    assert_eq!(c.recv().await, json!({"return": {}, "id": 5}));
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "memory grew by {grown} bytes for 32 MiB of input"
    );
    eprintln!("resident memory grew by {grown} bytes");
}
