//! Test harness: a real server on a Unix socket in a private temporary directory, a tiny
//! dispatcher, and a raw-bytes client.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qmp::{DispatchFuture, Dispatcher, EventBus, Greeting, QmpError, Server, ServerConfig};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Longest any single wait in a test may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Records what the test dispatcher saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands running right now.
    pub in_flight: AtomicUsize,
    /// Most commands ever running at once.
    pub max_in_flight: AtomicUsize,
    /// Commands started.
    pub started: AtomicUsize,
}

/// Commands: `echo` (returns its arguments), `slow` (`ms`, default 100), `fail` (`class`,
/// `desc`), `quit-like` (cancels `quit`), `emit` (`event`, `data`), `panic`.
pub struct TestDispatcher {
    pub quit: CancellationToken,
    pub events: EventBus,
    pub stats: Arc<Stats>,
}

impl Dispatcher for TestDispatcher {
    fn has_command(&self, name: &str) -> bool {
        matches!(
            name,
            "echo" | "slow" | "fail" | "quit-like" | "emit" | "panic"
        )
    }

    fn dispatch(&self, name: &str, args: Map<String, Value>) -> DispatchFuture {
        let stats = self.stats.clone();
        stats.started.fetch_add(1, Ordering::SeqCst);
        match name {
            "echo" => Box::pin(async move { Ok(Value::Object(args)) }),
            "slow" => {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(100);
                Box::pin(async move {
                    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok(json!({}))
                })
            }
            "fail" => {
                let class = args
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("GenericError")
                    .to_string();
                let desc = args
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("failed")
                    .to_string();
                Box::pin(async move { Err(QmpError::new(class, desc)) })
            }
            "quit-like" => {
                self.quit.cancel();
                Box::pin(async { Ok(json!({})) })
            }
            "emit" => {
                let event = args
                    .get("event")
                    .and_then(Value::as_str)
                    .unwrap_or("TEST_EVENT")
                    .to_string();
                self.events.emit(&event, args.get("data").cloned());
                Box::pin(async { Ok(json!({})) })
            }
            _ => Box::pin(async { panic!("test command panics") }),
        }
    }
}

/// A running server on a fresh socket.
pub struct Harness {
    pub server: Server,
    pub events: EventBus,
    pub quit: CancellationToken,
    pub stats: Arc<Stats>,
    pub dir: PathBuf,
    pub path: PathBuf,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

fn fresh_dir() -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("qmp-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

impl Harness {
    /// A server with default tunables.
    pub fn start() -> Harness {
        Self::with_config(ServerConfig::default())
    }

    /// A server with the given tunables.
    pub fn with_config(config: ServerConfig) -> Harness {
        let dir = fresh_dir();
        let path = dir.join("qmp.sock");
        let events = EventBus::new();
        let quit = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let dispatcher = Arc::new(TestDispatcher {
            quit: quit.clone(),
            events: events.clone(),
            stats: stats.clone(),
        });
        let greeting = Greeting {
            major: 10,
            minor: 0,
            micro: 2,
            package: "blockd-test".into(),
        };
        let server = Server::with_config(dispatcher, events.clone(), greeting, config);
        let listener = UnixListener::bind(&path).expect("bind");
        server.add_unix_monitor(listener, Some(path.clone()));
        Harness {
            server,
            events,
            quit,
            stats,
            dir,
            path,
        }
    }

    /// A connected client that has read the greeting.
    pub async fn client(&self) -> Client {
        let mut c = Client::connect(&self.path).await;
        c.line().await;
        c
    }

    /// A connected client that has completed negotiation.
    pub async fn ready_client(&self) -> Client {
        let mut c = self.client().await;
        c.negotiate().await;
        c
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.begin_shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw client: bytes in, lines out.
pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects without reading anything.
    pub async fn connect(path: &std::path::Path) -> Client {
        let stream = tokio::time::timeout(PATIENCE, UnixStream::connect(path))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next output line, without its `\r\n`. Fails the test on EOF or timeout.
    pub async fn line(&mut self) -> Vec<u8> {
        match tokio::time::timeout(PATIENCE, self.next_line()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("EOF while waiting for a line"),
            Err(_) => panic!("timed out waiting for a line"),
        }
    }

    /// The next line as text.
    pub async fn text(&mut self) -> String {
        String::from_utf8(self.line().await).expect("output is UTF-8")
    }

    /// The next line parsed as JSON.
    pub async fn recv(&mut self) -> Value {
        let line = self.line().await;
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", String::from_utf8_lossy(&line)))
    }

    /// Next line, or None at EOF. Every line must end with `\r\n`.
    async fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
                assert!(!line.contains(&b'\n'), "bare LF inside a line");
                return Some(line);
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                assert!(
                    self.buf.is_empty(),
                    "unterminated output at EOF: {:?}",
                    self.buf
                );
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Waits for EOF, failing if a line arrives first.
    pub async fn expect_eof(&mut self) {
        match tokio::time::timeout(PATIENCE, self.next_line()).await {
            Ok(None) => {}
            Ok(Some(line)) => panic!("expected EOF, got {:?}", String::from_utf8_lossy(&line)),
            Err(_) => panic!("timed out waiting for EOF"),
        }
    }

    /// Reads and discards everything up to EOF; returns the number of lines read.
    pub async fn drain_to_eof(&mut self) -> usize {
        let mut n = 0;
        loop {
            match tokio::time::timeout(PATIENCE, self.next_line()).await {
                Ok(Some(_)) => n += 1,
                Ok(None) => return n,
                Err(_) => panic!("timed out waiting for EOF"),
            }
        }
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(line) = tokio::time::timeout(wait, self.next_line()).await {
            panic!("expected silence, got {line:?}");
        }
    }

    /// Sends `qmp_capabilities` and expects `{"return": {}}`.
    pub async fn negotiate(&mut self) {
        self.send(br#"{"execute": "qmp_capabilities"}"#).await;
        assert_eq!(self.text().await, r#"{"return": {}}"#);
    }

    /// Sends a request and returns the next line parsed.
    pub async fn call(&mut self, request: &str) -> Value {
        self.send(request.as_bytes()).await;
        self.recv().await
    }
}

/// `{"error": {"class": class, "desc": desc}}` with an optional id.
pub fn error(class: &str, desc: &str, id: Option<Value>) -> Value {
    let mut v = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}
