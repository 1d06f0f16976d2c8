//! The server: monitors (listeners), their accept loops, and shutdown.
//!
//! ```text
//!  Server ──add_unix_monitor / add_tcp_monitor──> accept loop (task per monitor)
//!    │                                               │ one task per connection,
//!    │                                               │ at most `max_connections` at once
//!    │                                               v
//!    │                                        connection task ──> writer task
//!    │                                               │
//!    ├── command_lock: one command at a time ◄───────┤
//!    ├── EventBus ──events──> negotiated connections ┘
//!    └── shutdown token + task tracker: shutdown() cancels, then waits for every task
//! ```
//!
//! Shutdown: [`Server::shutdown`] cancels a token seen by every task. Accept loops drop their
//! listener and remove its socket file. A connection stops reading; a command already running
//! completes and its reply is queued; commands not yet started never start. The writer then
//! flushes everything queued (that is how `quit`'s reply reaches the client before the socket
//! closes) and shuts the socket down; if the client does not read, it is cut off after
//! [`ServerConfig::shutdown_grace`]. `shutdown` returns once every task has finished.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::connection;
use crate::dispatch::Dispatcher;
use crate::events::EventBus;
use crate::json::{self, Limits};
use crate::outbox::OutboxLimits;
use crate::protocol::Greeting;

/// Tunables of a [`Server`]. The defaults suit a daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Limits on one incoming message (default: 1 MiB of tokens, 64 Ki tokens, depth 1024).
    pub input: Limits,
    /// Limits on one connection's queue of outgoing messages (default: 10 000 messages,
    /// 8 MiB). Replies wait for room; an event that does not fit drops the connection.
    pub output: OutboxLimits,
    /// Most connections served at once over all monitors (default 1024); further clients
    /// wait in the listen backlog.
    pub max_connections: usize,
    /// How long shutdown waits for a client to read what is queued for it (default 5 s).
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            input: Limits::default(),
            output: OutboxLimits {
                max_messages: 10_000,
                max_bytes: 8 << 20,
            },
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// State shared by the server handle and all its tasks. Every field lives as long as the
/// server; at shutdown only `shutdown` changes (it is cancelled).
pub(crate) struct Shared {
    /// Runs the commands.
    pub(crate) dispatcher: Arc<dyn Dispatcher>,
    /// Where negotiated connections subscribe.
    pub(crate) events: EventBus,
    /// The greeting line, serialised once.
    pub(crate) greeting: Arc<[u8]>,
    /// Tunables.
    pub(crate) config: ServerConfig,
    /// Serialises command execution across all connections. A tokio mutex because it is
    /// held across the command's `.await`.
    pub(crate) command_lock: tokio::sync::Mutex<()>,
    /// Cancelled when shutdown begins.
    pub(crate) shutdown: CancellationToken,
    /// Every accept loop and connection task, so that shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Connection slots.
    connections: Arc<Semaphore>,
    /// Numbers connections for log messages.
    next_connection: AtomicU64,
}

/// The QMP server. Cheap to clone; all clones control the same server. Methods that start
/// tasks must be called inside a Tokio runtime.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .field("shutting_down", &self.shared.shutdown.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server with the default [`ServerConfig`].
    pub fn new(dispatcher: Arc<dyn Dispatcher>, events: EventBus, greeting: Greeting) -> Self {
        Self::with_config(dispatcher, events, greeting, ServerConfig::default())
    }

    /// A server with explicit tunables.
    pub fn with_config(
        dispatcher: Arc<dyn Dispatcher>,
        events: EventBus,
        greeting: Greeting,
        config: ServerConfig,
    ) -> Self {
        let mut line = json::to_string(&greeting.to_json());
        line.push_str("\r\n");
        let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
        Server {
            shared: Arc::new(Shared {
                dispatcher,
                events,
                greeting: Arc::from(line.into_bytes()),
                config,
                command_lock: tokio::sync::Mutex::new(()),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                connections,
                next_connection: AtomicU64::new(1),
            }),
        }
    }

    /// The event bus this server delivers.
    pub fn events(&self) -> &EventBus {
        &self.shared.events
    }

    /// Serves a monitor on a bound Unix listener: spawns its accept loop and returns at once.
    /// Several monitors may be added; any number of clients may use each at the same time.
    /// `path_to_remove_at_shutdown` is deleted when the listener closes.
    pub fn add_unix_monitor(
        &self,
        listener: UnixListener,
        path_to_remove_at_shutdown: Option<PathBuf>,
    ) {
        let name = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "unix".into());
        self.add_monitor(listener, name, path_to_remove_at_shutdown);
    }

    /// Serves a monitor on a bound TCP listener (QEMU's `--chardev socket,host=,port=`).
    pub fn add_tcp_monitor(&self, listener: TcpListener) {
        let name = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".into());
        self.add_monitor(listener, name, None);
    }

    fn add_monitor<L: Listen>(&self, listener: L, name: String, remove: Option<PathBuf>) {
        if self.shared.shutdown.is_cancelled() {
            warn!(monitor = %name, "QMP monitor added after shutdown; closing it");
            drop(listener);
            remove_socket(remove);
            return;
        }
        info!(monitor = %name, "QMP monitor listening");
        let shared = self.shared.clone();
        self.shared
            .tasks
            .spawn(accept_loop(shared, listener, name, remove));
    }

    /// Starts shutting down without waiting: listeners close, no new command starts.
    /// Non-blocking, so a `quit` command may call it before it returns.
    pub fn begin_shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Closes every listener (removing socket files) and every connection, after delivering
    /// replies already produced (see the module documentation). Resolves when every
    /// connection task is gone. Safe to call more than once.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

fn remove_socket(path: Option<PathBuf>) {
    if let Some(path) = path {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %path.display(), error = %e, "cannot remove QMP socket"),
        }
    }
}

/// A listener the accept loop can serve.
trait Listen: Send + 'static {
    /// The connection type.
    type Stream: AsyncRead + AsyncWrite + Send + 'static;
    /// Accepts one connection, with a description of the peer for logs.
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listen for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> io::Result<(UnixStream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, String::new()))
    }
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> io::Result<(TcpStream, String)> {
        let (stream, addr) = self.accept().await?;
        Ok((stream, addr.to_string()))
    }
}

async fn accept_loop<L: Listen>(
    shared: Arc<Shared>,
    listener: L,
    monitor: String,
    remove: Option<PathBuf>,
) {
    loop {
        let permit = tokio::select! {
            p = shared.connections.clone().acquire_owned() => p,
            _ = shared.shutdown.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            r = listener.accept_one() => r,
            _ = shared.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, from)) => {
                let n = shared.next_connection.fetch_add(1, Ordering::Relaxed);
                let peer: Arc<str> = if from.is_empty() {
                    format!("{monitor}#{n}").into()
                } else {
                    format!("{monitor}#{n}({from})").into()
                };
                debug!(%peer, "QMP connection accepted");
                let shared2 = shared.clone();
                shared
                    .tasks
                    .spawn(connection::serve(shared2, stream, peer, permit));
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!(monitor = %monitor, error = %e, "QMP accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shared.shutdown.cancelled() => break,
                }
            }
        }
    }
    drop(listener);
    remove_socket(remove);
    debug!(monitor = %monitor, "QMP monitor closed");
}
