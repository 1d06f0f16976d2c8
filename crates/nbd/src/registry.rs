//! The export table and per-export client accounting.
//!
//! ```text
//!  Registry ──(std Mutex)──> Vec<Arc<Export>>        lookup by name, LIST order = insertion
//!                               │
//!  Export ──(std Mutex)──> ExportState { clients, removed, on_gone, peers }
//!     └── kill: CancellationToken   (hard removal closes every connection of the export)
//!
//!  Lease (one per connection that reached transmission; cloned into every in-flight request)
//!     drop of the last clone ─> clients -= 1 ─> if removed && clients == 0: fire on_gone
//! ```
//!
//! Lock order: the registry lock, then an export's state lock, then a connection's
//! [`PeerProbe`] lock. None is held across `.await`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::backend::ExportConfig;
use crate::error::{Error, ErrorKind};
use crate::proto::MAX_STRING;

/// One export as the server sees it.
pub(crate) struct Export {
    /// Immutable configuration.
    pub(crate) cfg: ExportConfig,
    /// Client count and removal state. Guarded by its own mutex; never held across `.await`.
    state: Mutex<ExportState>,
    /// Cancelled on hard removal: every connection to this export closes.
    pub(crate) kill: CancellationToken,
}

#[derive(Default)]
struct ExportState {
    /// Connections in transmission phase (leases alive).
    clients: usize,
    /// Removed from the table; `on_gone` fires when `clients` reaches 0.
    removed: bool,
    /// Notified once no client (and no in-flight request) of a removed export remains.
    on_gone: Vec<oneshot::Sender<()>>,
    /// One probe per counted connection, to tell a client that has already hung up (its
    /// socket closed, the server not yet at the end of its stream) from a live one.
    peers: Vec<Arc<PeerProbe>>,
}

/// Whether the client of one connection has hung up, asked of its socket directly.
///
/// Holds a duplicate of the connection's socket descriptor until [`detach`](Self::detach)
/// (called when the connection task ends, so the duplicate never keeps the socket open
/// longer than the connection itself); detached means the connection has ended.
#[derive(Debug)]
pub(crate) struct PeerProbe {
    fd: Mutex<Option<OwnedFd>>,
}

impl PeerProbe {
    /// A probe on `sock`. If the descriptor cannot be duplicated the probe reports the peer
    /// as connected (the connection then counts until the server sees it end).
    pub(crate) fn new(sock: &impl AsFd) -> Arc<PeerProbe> {
        let fd = sock.as_fd().try_clone_to_owned().ok();
        Arc::new(PeerProbe { fd: Mutex::new(fd) })
    }

    fn fd(&self) -> MutexGuard<'_, Option<OwnedFd>> {
        self.fd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection ended: close the duplicate descriptor.
    pub(crate) fn detach(&self) {
        self.fd().take();
    }

    /// True once the client can send nothing more: it shut its side of the socket down or
    /// closed it (`POLLRDHUP`/`POLLHUP`/`POLLERR`), or the connection task has ended.
    fn peer_gone(&self) -> bool {
        let guard = self.fd();
        let Some(fd) = guard.as_ref() else {
            return true;
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a descriptor we own for the duration of the call, and a
        // zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

impl Export {
    fn state(&self) -> MutexGuard<'_, ExportState> {
        // A poisoned lock only means a panic elsewhere; the counters stay meaningful.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Keeps an export's client count up while a connection (or one of its requests) lives.
#[derive(Clone)]
pub(crate) struct Lease(Arc<LeaseInner>);

struct LeaseInner {
    export: Arc<Export>,
    peer: Arc<PeerProbe>,
}

impl Lease {
    /// The export this lease is on.
    pub(crate) fn export(&self) -> &Arc<Export> {
        &self.0.export
    }
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        let waiters = {
            let mut st = self.export.state();
            st.clients = st.clients.saturating_sub(1);
            st.peers.retain(|p| !Arc::ptr_eq(p, &self.peer));
            if st.removed && st.clients == 0 {
                std::mem::take(&mut st.on_gone)
            } else {
                Vec::new()
            }
        };
        for tx in waiters {
            let _ = tx.send(());
        }
    }
}

/// The table of exports.
#[derive(Default)]
pub(crate) struct Registry {
    /// Exports in insertion order. Guarded by a std mutex, never held across `.await`.
    exports: Mutex<Vec<Arc<Export>>>,
}

impl Registry {
    fn table(&self) -> MutexGuard<'_, Vec<Arc<Export>>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add an export; its name must be new.
    pub(crate) fn add(&self, cfg: ExportConfig) -> Result<(), Error> {
        if cfg.name.len() > MAX_STRING {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("export name '{}' too long", cfg.name),
            ));
        }
        if cfg
            .description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_STRING)
        {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("description of export '{}' too long", cfg.name),
            ));
        }
        if !cfg.min_block.is_power_of_two() || cfg.min_block > 65536 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "minimum block size {} is not a power of two up to 64 KiB",
                    cfg.min_block
                ),
            ));
        }
        let mut table = self.table();
        if table.iter().any(|e| e.cfg.name == cfg.name) {
            return Err(Error::new(
                ErrorKind::DuplicateExport,
                format!("NBD server already has export named '{}'", cfg.name),
            ));
        }
        table.push(Arc::new(Export {
            cfg,
            state: Mutex::new(ExportState::default()),
            kill: CancellationToken::new(),
        }));
        Ok(())
    }

    /// Look an export up by its wire name.
    pub(crate) fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        self.table()
            .iter()
            .find(|e| e.cfg.name.as_bytes() == name)
            .cloned()
    }

    /// Look an export up and take a client lease on it, atomically with respect to removal.
    /// `peer` tells whether the connection's client has hung up (see [`remove`](Self::remove)).
    pub(crate) fn lease(&self, name: &[u8], peer: &Arc<PeerProbe>) -> Option<Lease> {
        let table = self.table();
        let export = table
            .iter()
            .find(|e| e.cfg.name.as_bytes() == name)?
            .clone();
        {
            let mut st = export.state();
            st.clients += 1;
            st.peers.push(peer.clone());
        }
        Some(Lease(Arc::new(LeaseInner {
            export,
            peer: peer.clone(),
        })))
    }

    /// Snapshot of all exports, in insertion order.
    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        self.table().clone()
    }

    /// Remove an export. `if_unused` refuses while clients are connected (QEMU's safe mode);
    /// a client that has already hung up does not count, even if the server has not reached
    /// the end of its stream yet (its connection is ending; it drains like any other). `hard`
    /// closes its connections. The receiver fires once no client remains.
    pub(crate) fn remove(
        &self,
        name: &str,
        hard: bool,
        if_unused: bool,
    ) -> Result<oneshot::Receiver<()>, Error> {
        let export = {
            let mut table = self.table();
            let Some(pos) = table.iter().position(|e| e.cfg.name == name) else {
                return Err(Error::new(
                    ErrorKind::ExportNotFound,
                    format!("Export '{name}' is not found"),
                ));
            };
            if if_unused && table[pos].state().peers.iter().any(|p| !p.peer_gone()) {
                return Err(Error::new(
                    ErrorKind::ExportInUse,
                    format!("export '{name}' still in use"),
                ));
            }
            table.remove(pos)
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut st = export.state();
            st.removed = true;
            if st.clients == 0 {
                let _ = tx.send(());
            } else {
                st.on_gone.push(tx);
            }
        }
        if hard {
            export.kill.cancel();
        }
        Ok(rx)
    }

    /// Number of clients in transmission with the named export (0 if unknown).
    pub(crate) fn clients(&self, name: &str) -> usize {
        self.table()
            .iter()
            .find(|e| e.cfg.name == name)
            .map_or(0, |e| e.state().clients)
    }
}
