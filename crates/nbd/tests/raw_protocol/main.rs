//! Protocol edge cases driven by a hand-written client speaking raw bytes.

#[path = "../common/mod.rs"]
mod common;

mod garbage;
mod handshake;
mod lifecycle;
mod requests;

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
