//! Start-up and shutdown: apply the command line in order, serve, and close cleanly.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::{Map, Value};

use qapi::types::{BlockExportOptions, BlockdevOptions};

use crate::checkpoint::Checkpointer;
use crate::cli::{default_qmp_socket, Opt};
use crate::convert::{export_args, node_options};
use crate::daemon::Daemon;
use crate::dispatch::QmpDispatcher;
use crate::exports::{ExportArgs, NbdAddr};

/// A bound chardev waiting for its monitor.
enum Listener {
    Unix(std::os::unix::net::UnixListener, PathBuf),
    Tcp(std::net::TcpListener),
}

/// Fork into the background. The parent waits until the child reports readiness (exit 0) or
/// fails (exit 1); the child returns the pipe end on which to report.
pub fn daemonize() -> Result<OwnedFd, String> {
    let (rd, wr) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    // SAFETY: called before any thread or runtime exists, so the child is a full copy.
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            // The parent creates nothing: a signal may end it the default way.
            release_termination_signals();
            let mut byte = [0u8; 1];
            let ok =
                matches!(nix::unistd::read(rd.as_raw_fd(), &mut byte), Ok(1) if byte[0] == b'1');
            std::process::exit(if ok { 0 } else { 1 });
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let _ = nix::unistd::setsid();
            Ok(wr)
        }
    }
}

fn report_ready(fd: OwnedFd) {
    let _ = nix::unistd::write(&fd, b"1");
    // Detach stdio as a daemon does.
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for target in 0..=2 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), target);
        }
    }
}

fn keyval(s: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    qapi::parse_keyval(s, implied).map_err(|e| e.desc)
}

fn flag_on(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k)
        .and_then(Value::as_str)
        .map(|v| matches!(v, "on" | "yes" | "true" | "y"))
}

fn bind_chardev(m: &Map<String, Value>) -> Result<(String, Listener), String> {
    let backend = m.get("backend").and_then(Value::as_str).unwrap_or("");
    let id = m
        .get("id")
        .and_then(Value::as_str)
        .ok_or("chardev: \"id\" is required")?
        .to_string();
    if backend != "socket" {
        return Err(format!(
            "chardev '{id}': backend '{backend}' is not supported (only socket)"
        ));
    }
    if flag_on(m, "server") == Some(false) {
        return Err(format!(
            "chardev '{id}': only server=on sockets are supported"
        ));
    }
    if let Some(path) = m.get("path").and_then(Value::as_str) {
        clear_socket_path(path)?;
        let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
            format!(
                "Failed to bind socket to {path}: {}",
                block::error::strerror(&e)
            )
        })?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        return Ok((id, Listener::Unix(l, PathBuf::from(path))));
    }
    let host = m.get("host").and_then(Value::as_str).unwrap_or("127.0.0.1");
    let port = m
        .get("port")
        .and_then(Value::as_str)
        .ok_or("chardev: \"path\" or \"port\" is required")?;
    let l = std::net::TcpListener::bind(format!("{host}:{port}"))
        .map_err(|e| format!("Failed to bind socket: {}", block::error::strerror(&e)))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok((id, Listener::Tcp(l)))
}

/// Makes room for a Unix socket at `path`. Only a stale socket (one nobody accepts on) is
/// removed. QSD 10.0.2 unlinks whatever is there, a regular file or a socket another daemon
/// serves; blockd refuses both, so a typo in a path never destroys a file.
fn clear_socket_path(path: &str) -> Result<(), String> {
    use std::io::ErrorKind;
    use std::os::unix::fs::FileTypeExt;
    let strerror = |e: &std::io::Error| block::error::strerror(e);
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("Failed to unlink socket {path}: {}", strerror(&e))),
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        // QSD's text (its unlink fails with EISDIR).
        return Err(format!("Failed to unlink socket {path}: Is a directory"));
    }
    if !kind.is_socket() {
        return Err(format!(
            "Failed to unlink socket {path}: not a socket (only a stale socket is replaced)"
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "Failed to bind socket to {path}: Address already in use (another process serves it)"
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| format!("Failed to unlink socket {path}: {}", strerror(&e))),
        Err(e) => Err(format!(
            "Failed to unlink socket {path}: cannot tell whether it is stale: {}",
            strerror(&e)
        )),
    }
}

/// `--nbd-server` keyval, checked and typed as QSD's `NbdServerOptions`.
fn nbd_server_options(v: &str) -> Result<(NbdAddr, Option<u32>, Option<u32>), String> {
    let m = keyval(v, None)?;
    let value = qapi::Schema::get()
        .coerce_keyval("NbdServerOptions", Value::Object(m))
        .map_err(|e| e.desc)?;
    let o: qapi::types::NbdServerOptions =
        serde_json::from_value(value).map_err(|e| e.to_string())?;
    if o.tls_creds.is_some() {
        return Err("TLS is not supported by blockd".to_string());
    }
    let addr = match o.addr {
        qapi::types::SocketAddress::Unix(u) => NbdAddr::Unix(PathBuf::from(u.path)),
        qapi::types::SocketAddress::Inet(i) => NbdAddr::Inet(i.host, i.port),
        qapi::types::SocketAddress::Vsock(_) => {
            return Err("NBD server address type 'vsock' is not supported".to_string())
        }
        qapi::types::SocketAddress::Fd(_) => {
            return Err("NBD server address type 'fd' is not supported".to_string())
        }
    };
    Ok((addr, o.max_connections, o.handshake_max_seconds))
}

/// The `--image` node: the probed format over a file node.
fn image_options(format: &str, path: &str) -> Result<BlockdevOptions, String> {
    let v = serde_json::json!({
        "driver": format, "node-name": "drive0-fmt",
        "file": {"driver": "file", "filename": path}
    });
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// Everything the options set up before serving; on a failed or interrupted start-up, what to
/// remove again.
#[derive(Default)]
struct Setup {
    /// Chardevs bound and not (yet) claimed by a `--monitor`.
    chardevs: HashMap<String, Listener>,
    monitors: Vec<Listener>,
    pidfile: Option<PathBuf>,
}

impl Setup {
    /// Remove the socket files bound and the pid file written (start-up did not complete).
    fn undo(self) {
        let listeners = self.chardevs.into_values().chain(self.monitors);
        for l in listeners {
            if let Listener::Unix(l, path) = l {
                drop(l);
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(p) = self.pidfile {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Why start-up stopped before serving.
enum Stopped {
    /// An option failed: the message to print, exit status 1.
    Failed(String),
    /// A termination signal (or nothing else to do): a clean exit, status 0.
    Interrupted,
}

impl From<String> for Stopped {
    fn from(e: String) -> Self {
        Stopped::Failed(e)
    }
}

async fn apply(daemon: &Arc<Daemon>, opts: &[Opt], setup: &mut Setup) -> Result<(), Stopped> {
    let schema = qapi::Schema::get();
    let mut short_qmp: Option<String> = None;
    let mut short_image = false;
    let create = crate::image::create_option(opts)?;
    for opt in opts {
        // A termination signal during start-up: stop before the next option, then clean up.
        if daemon.shutdown.is_cancelled() {
            return Err(Stopped::Interrupted);
        }
        let ctx = |name: &str, v: &str, e: String| format!("--{name} {v}: {e}");
        match opt {
            Opt::Chardev(v) => {
                let m = keyval(v, Some("backend")).map_err(|e| ctx("chardev", v, e))?;
                let (id, l) = bind_chardev(&m).map_err(|e| ctx("chardev", v, e))?;
                if setup.chardevs.contains_key(&id) {
                    return Err(ctx("chardev", v, format!("Duplicate chardev id '{id}'")).into());
                }
                setup.chardevs.insert(id, l);
            }
            Opt::Monitor(v) => {
                let m = keyval(v, Some("chardev")).map_err(|e| ctx("monitor", v, e))?;
                let id = m.get("chardev").and_then(Value::as_str).unwrap_or("");
                let l = setup
                    .chardevs
                    .remove(id)
                    .ok_or_else(|| ctx("monitor", v, format!("chardev \"{id}\" not found")))?;
                setup.monitors.push(l);
            }
            Opt::Blockdev(v) => {
                let value = if v.trim_start().starts_with('{') {
                    let j: Value = serde_json::from_str(v)
                        .map_err(|e| ctx("blockdev", v, format!("JSON parse error, {e}")))?;
                    schema
                        .normalize_type("BlockdevOptions", &j)
                        .map_err(|e| ctx("blockdev", v, e.desc))?
                } else {
                    let m = keyval(v, Some("driver")).map_err(|e| ctx("blockdev", v, e))?;
                    schema
                        .coerce_keyval("BlockdevOptions", Value::Object(m))
                        .map_err(|e| ctx("blockdev", v, e.desc))?
                };
                let typed: BlockdevOptions =
                    serde_json::from_value(value).map_err(|e| ctx("blockdev", v, e.to_string()))?;
                let opts = node_options(&typed).map_err(|e| ctx("blockdev", v, e))?;
                daemon
                    .blockdev_add(&opts)
                    .map_err(|e| ctx("blockdev", v, e.to_string()))?;
            }
            Opt::NbdServer(v) => {
                let (addr, max, handshake) =
                    nbd_server_options(v).map_err(|e| ctx("nbd-server", v, e))?;
                daemon
                    .nbd_server_start(addr, max, handshake)
                    .await
                    .map_err(|e| ctx("nbd-server", v, e.to_string()))?;
            }
            Opt::Export(v) => {
                let m = keyval(v, Some("type")).map_err(|e| ctx("export", v, e))?;
                let value = schema
                    .coerce_keyval("BlockExportOptions", Value::Object(m))
                    .map_err(|e| ctx("export", v, e.desc))?;
                let typed: BlockExportOptions =
                    serde_json::from_value(value).map_err(|e| ctx("export", v, e.to_string()))?;
                let args = export_args(&typed).map_err(|e| ctx("export", v, e))?;
                daemon
                    .export_add(args)
                    .map_err(|e| ctx("export", v, e.to_string()))?;
            }
            Opt::Pidfile(p) => {
                std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| {
                    format!(
                        "cannot create PID file '{p}': {}",
                        block::error::strerror(&e)
                    )
                })?;
                setup.pidfile = Some(PathBuf::from(p));
            }
            Opt::Daemonize => {}
            Opt::Create(_) => {}
            Opt::Image(path) => {
                short_image = true;
                if let Some(size) = create {
                    crate::image::create_if_missing(path, size)
                        .map_err(|e| format!("--create: {path}: {e}"))?;
                }
                let format = block::graph::probe_format(path).map_err(|e| {
                    format!(
                        "--image {path}: Could not open '{path}': {}",
                        block::error::strerror(&e)
                    )
                })?;
                let file = image_options(&format, path)
                    .and_then(|o| node_options(&o))
                    .map_err(|e| format!("--image {path}: {e}"))?;
                let node = daemon
                    .blockdev_add(&file)
                    .map_err(|e| format!("--image {path}: {e}"))?;
                daemon.add_device("drive0", node);
            }
            Opt::Qmp(p) => short_qmp = Some(p.clone()),
            Opt::Nbd(p) => {
                daemon
                    .nbd_server_start(NbdAddr::Unix(PathBuf::from(p)), None, None)
                    .await
                    .map_err(|e| format!("--nbd {p}: {e}"))?;
                if short_image {
                    daemon
                        .export_add(ExportArgs {
                            id: "drive0".into(),
                            node_name: "drive0".into(),
                            name: Some("drive0".into()),
                            description: None,
                            writable: true,
                            bitmaps: Vec::new(),
                            allocation_depth: true,
                        })
                        .map_err(|e| format!("--nbd {p}: {e}"))?;
                }
            }
        }
    }
    if short_image || short_qmp.is_some() {
        let path = short_qmp.unwrap_or_else(default_qmp_socket);
        let mut m = Map::new();
        m.insert("backend".into(), "socket".into());
        m.insert("id".into(), "qmp-short".into());
        m.insert("path".into(), path.clone().into());
        let (_, l) = bind_chardev(&m).map_err(|e| format!("--qmp {path}: {e}"))?;
        eprintln!("blockd: QMP on {path}");
        setup.monitors.push(l);
    }
    if daemon.shutdown.is_cancelled() {
        return Err(Stopped::Interrupted);
    }
    Ok(())
}

/// Run the daemon until `quit` or a signal; returns the exit status.
pub async fn run(opts: Vec<Opt>, ready: Option<OwnedFd>) -> ExitCode {
    configure_dirty_log();
    let events = qmp::EventBus::new();
    let daemon = Daemon::new(events.clone());
    let dispatcher = QmpDispatcher::new(daemon.clone());
    let greeting = qmp::Greeting {
        major: 10,
        minor: 0,
        micro: 2,
        package: format!("blockd {}", env!("CARGO_PKG_VERSION")),
    };
    let server = qmp::Server::new(dispatcher.clone(), events, greeting);
    dispatcher.set_server(server.clone());

    // First of all, before anything exists that needs cleaning up: signals end start-up
    // cleanly from now on (until here they were held pending, see `hold_termination_signals`).
    watch_termination_signals(&daemon);

    let mut setup = Setup::default();
    if let Err(stopped) = apply(&daemon, &opts, &mut setup).await {
        daemon.close_all().await;
        setup.undo();
        return match stopped {
            Stopped::Failed(e) => {
                eprintln!("blockd: {e}");
                ExitCode::from(1)
            }
            Stopped::Interrupted => {
                tracing::info!("terminated during start-up");
                ExitCode::SUCCESS
            }
        };
    }
    for l in std::mem::take(&mut setup.monitors) {
        let added = match l {
            Listener::Unix(l, path) => tokio::net::UnixListener::from_std(l)
                .map(|l| server.add_unix_monitor(l, Some(path))),
            Listener::Tcp(l) => {
                tokio::net::TcpListener::from_std(l).map(|l| server.add_tcp_monitor(l))
            }
        };
        if let Err(e) = added {
            eprintln!("blockd: monitor: {e}");
            server.begin_shutdown();
            daemon.close_all().await;
            server.shutdown().await;
            setup.undo();
            return ExitCode::from(1);
        }
    }
    if let Some(fd) = ready {
        report_ready(fd);
    }
    let checkpointer = Checkpointer::start(daemon.clone());
    wait_for_shutdown(&daemon).await;
    tracing::info!("shutting down");
    server.begin_shutdown();
    // The checkpoint task ends (after its round in flight) before any node closes.
    let panics = match checkpointer {
        Some(c) => c.stop().await,
        None => Vec::new(),
    };
    daemon.close_all().await;
    server.shutdown().await;
    if let Some(p) = setup.pidfile {
        let _ = std::fs::remove_file(p);
    }
    if panics.is_empty() {
        ExitCode::SUCCESS
    } else {
        // Already logged when they happened; a supervisor sees the failure in the status.
        ExitCode::from(1)
    }
}

/// The dirty-region log's region size for images opened from now on (see `qcow2::dirty_log`):
/// `BLOCKD_DIRTY_LOG_REGION_BYTES` (0 = off), off when checkpoints are off (QEMU's behaviour).
fn configure_dirty_log() {
    let bytes = std::env::var("BLOCKD_DIRTY_LOG_REGION_BYTES")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(qcow2::dirty_log::region_bytes());
    let on = crate::checkpoint::checkpoint_interval().is_some();
    qcow2::dirty_log::set_region_bytes(if on { bytes } else { 0 });
}

async fn wait_for_shutdown(daemon: &Arc<Daemon>) {
    daemon.shutdown.cancelled().await;
}

/// The signals that ask the daemon to end (QSD's: SIGTERM, SIGINT, SIGHUP).
fn termination_sigset() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    set
}

/// Block the termination signals in the calling thread (and every thread it starts later):
/// one arriving from now on stays pending instead of killing the process before its handlers
/// exist. Called first thing in `main`; [`watch_termination_signals`] takes them over.
pub fn hold_termination_signals() {
    if let Err(e) = termination_sigset().thread_block() {
        tracing::warn!("cannot block termination signals: {e}");
    }
}

/// Unblock the termination signals in the calling thread: a pending one is delivered now.
fn release_termination_signals() {
    if let Err(e) = termination_sigset().thread_unblock() {
        tracing::warn!("cannot unblock termination signals: {e}");
    }
}

/// Install the handlers, then unblock the signals in this (the main) thread, which then takes
/// every termination signal, one held since `main` began included. Any of them cancels
/// `daemon.shutdown`: start-up stops before its next option, a running daemon shuts down.
/// The runtime's worker threads keep them blocked (they were started with the mask of `main`).
fn watch_termination_signals(daemon: &Arc<Daemon>) {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => {
            let token = daemon.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = term.recv() => token.cancel(),
                    _ = int.recv() => token.cancel(),
                    _ = hup.recv() => token.cancel(),
                }
            });
        }
        _ => tracing::warn!("cannot install signal handlers; signals end blockd abruptly"),
    }
    release_termination_signals();
}
