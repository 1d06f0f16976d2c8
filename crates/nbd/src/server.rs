//! [`NbdServer`]: listeners, connection tasks, export table, shutdown.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::ExportConfig;
use crate::error::Error;
use crate::handshake::{self, Outcome};
use crate::registry::{PeerProbe, Registry};
use crate::transmission;

/// Server-wide settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Most simultaneous connections (handshake or transmission); `None` or `Some(0)`: no limit.
    /// When the limit is reached the server stops accepting, so further clients wait in the
    /// listen backlog until a connection ends (QEMU's behaviour). `Some(1)` also withdraws
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub max_connections: Option<u32>,
    /// A client that has not finished the handshake within this time is disconnected
    /// (QEMU's `handshake-max-seconds`, default 10). `None`: wait forever.
    pub handshake_timeout: Option<Duration>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: None,
            handshake_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// An NBD server: any number of listeners sharing one export table. Cheap to clone.
///
/// Listener and connection tasks keep the server alive: dropping every handle does not stop
/// it; call [`stop`](Self::stop).
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

struct Inner {
    options: ServerOptions,
    /// The exports. Lookups and leases happen under its lock.
    registry: Registry,
    /// One permit per allowed connection; `None`: unlimited. Permits live in connection tasks.
    conn_limit: Option<Arc<Semaphore>>,
    /// Cancelled by [`NbdServer::stop`]: listeners stop, every connection closes.
    shutdown: CancellationToken,
    /// Every task the server spawned (listeners, connections, requests, writers), so that
    /// `stop` can wait until no backend call is running.
    tasks: TaskTracker,
    /// Unix socket files to remove on stop. Std mutex, never held across `.await`.
    sockets: Mutex<Vec<PathBuf>>,
}

impl NbdServer {
    /// A server with the given connection limit and the default 10 s handshake timeout.
    pub fn new(max_connections: Option<u32>) -> NbdServer {
        NbdServer::with_options(ServerOptions {
            max_connections,
            ..ServerOptions::default()
        })
    }

    /// A server with explicit options.
    pub fn with_options(options: ServerOptions) -> NbdServer {
        let conn_limit = match options.max_connections {
            Some(n) if n > 0 => Some(Arc::new(Semaphore::new(n as usize))),
            _ => None,
        };
        NbdServer {
            inner: Arc::new(Inner {
                options,
                registry: Registry::default(),
                conn_limit,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                sockets: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Bind a Unix socket at `path` (replacing a stale socket file) and start accepting.
    pub async fn listen_unix(&self, path: &Path) -> io::Result<()> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        self.sockets().push(path.to_owned());
        let inner = self.inner.clone();
        let listener = Arc::new(listener);
        self.inner.tasks.spawn(async move {
            accept_loop(inner, move || {
                let listener = listener.clone();
                async move { listener.accept().await.map(|(s, _)| Stream::Unix(s)) }
            })
            .await;
        });
        Ok(())
    }

    /// Bind every address `host`:`port` resolves to and start accepting. Returns the bound
    /// addresses (useful with port "0").
    pub async fn listen_tcp(&self, host: &str, port: &str) -> io::Result<Vec<SocketAddr>> {
        let port: u16 = port.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid port '{port}'"),
            )
        })?;
        let mut bound = Vec::new();
        let mut last_err = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    bound.push(listener.local_addr()?);
                    let inner = self.inner.clone();
                    let listener = Arc::new(listener);
                    self.inner.tasks.spawn(async move {
                        accept_loop(inner, move || {
                            let listener = listener.clone();
                            async move {
                                let (s, _) = listener.accept().await?;
                                s.set_nodelay(true)?;
                                Ok(Stream::Tcp(s))
                            }
                        })
                        .await;
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        if bound.is_empty() {
            return Err(last_err.unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("'{host}' resolves to nothing"),
                )
            }));
        }
        Ok(bound)
    }

    /// Add an export. A duplicate name is refused with "NBD server already has export named".
    pub fn add_export(&self, cfg: ExportConfig) -> Result<(), Error> {
        self.inner.registry.add(cfg)
    }

    /// Remove an export: new clients no longer find it. With `hard`, its connections are closed
    /// now; otherwise they may finish. The receiver fires once no connection to it remains and
    /// no request on it is running (the moment to emit `BLOCK_EXPORT_DELETED`).
    pub fn remove_export(&self, name: &str, hard: bool) -> Result<oneshot::Receiver<()>, Error> {
        self.inner.registry.remove(name, hard, false)
    }

    /// QEMU's `block-export-del` mode `safe`: remove only if no client is connected, else fail
    /// with [`ErrorKind::ExportInUse`](crate::ErrorKind::ExportInUse) ("export 'NAME' still in
    /// use"). Checked and removed under one lock, so no client can slip in between.
    pub fn remove_export_if_unused(&self, name: &str) -> Result<oneshot::Receiver<()>, Error> {
        self.inner.registry.remove(name, false, true)
    }

    /// Connections currently in transmission with the named export (0 if unknown, including
    /// an export already removed whose clients are still draining).
    pub fn export_clients(&self, name: &str) -> usize {
        self.inner.registry.clients(name)
    }

    /// Names of the current exports, in the order they were added.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .registry
            .all()
            .iter()
            .map(|e| e.cfg.name.clone())
            .collect()
    }

    /// Stop listening, close every connection, remove all exports and the socket files, and
    /// wait until no backend call is running. Returns the names of the exports removed.
    pub async fn stop(&self) -> Vec<String> {
        let names = self.export_names();
        let gone: Vec<_> = names
            .iter()
            .filter_map(|n| self.inner.registry.remove(n, true, false).ok())
            .collect();
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        for rx in gone {
            let _ = rx.await;
        }
        for path in self.sockets().drain(..) {
            let _ = std::fs::remove_file(path);
        }
        names
    }

    fn sockets(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.inner.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An accepted connection of either family.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

impl Stream {
    fn probe(&self) -> Arc<PeerProbe> {
        match self {
            Stream::Unix(s) => PeerProbe::new(s),
            Stream::Tcp(s) => PeerProbe::new(s),
        }
    }

    fn split(self) -> (BoxRead, BoxWrite) {
        match self {
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
}

async fn accept_loop<F, Fut>(inner: Arc<Inner>, accept: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<Stream>>,
{
    loop {
        // Take a connection slot first: while the server is full, clients wait in the backlog.
        let permit = match &inner.conn_limit {
            Some(sem) => tokio::select! {
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                _ = inner.shutdown.cancelled() => return,
            },
            None => None,
        };
        let stream = tokio::select! {
            s = accept() => s,
            _ = inner.shutdown.cancelled() => return,
        };
        match stream {
            Ok(stream) => {
                let conn_inner = inner.clone();
                inner.tasks.spawn(serve(conn_inner, stream, permit));
            }
            Err(e) => {
                // Typically EMFILE/ENFILE: back off instead of spinning.
                tracing::warn!("nbd: accept failed: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = inner.shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// One connection: handshake (bounded in time), then transmission.
async fn serve(inner: Arc<Inner>, stream: Stream, _permit: Option<OwnedSemaphorePermit>) {
    let peer = stream.probe();
    // However this task ends, the probe's descriptor closes with it.
    let _detach = Detach(peer.clone());
    let (r, mut w) = stream.split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let multi_conn = inner.options.max_connections != Some(1);
    let handshake = handshake::negotiate(&mut r, &mut w, &inner.registry, &peer, multi_conn);
    let timed = async {
        match inner.options.handshake_timeout {
            Some(t) => tokio::time::timeout(t, handshake)
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timeout"))
                }),
            None => handshake.await,
        }
    };
    let outcome = tokio::select! {
        o = timed => o,
        _ = inner.shutdown.cancelled() => return,
    };
    match outcome {
        Ok(Outcome::Transmission(session)) => {
            transmission::run(session, r, w, &inner.tasks, &inner.shutdown).await;
        }
        Ok(Outcome::Aborted) => {}
        Err(e) => tracing::debug!("nbd: handshake ended: {e}"),
    }
}

/// Closes a connection's [`PeerProbe`] descriptor when the connection task ends.
struct Detach(Arc<PeerProbe>);

impl Drop for Detach {
    fn drop(&mut self) {
        self.0.detach();
    }
}
