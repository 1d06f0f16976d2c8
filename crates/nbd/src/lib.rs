//! nbd: an NBD server (fixed newstyle handshake, structured replies, extended headers, metadata
//! contexts) serving exports through the small [`ExportBackend`] trait. It knows nothing of
//! JSON, QMP or the block graph.
//!
//! ```no_run
//! # async fn demo(backend: std::sync::Arc<dyn nbd::ExportBackend>) -> std::io::Result<()> {
//! let server = nbd::NbdServer::new(None);
//! server.listen_unix(std::path::Path::new("/tmp/nbd.sock")).await?;
//! server
//!     .add_export(nbd::ExportConfig::new("disk0", true, backend))
//!     .expect("new name");
//! // ... later
//! let gone = server.remove_export("disk0", false).expect("exists");
//! let _ = gone.await; // every client of disk0 has left
//! server.stop().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! * [`proto`] — wire constants, request decoding, reply encoding, the errno mapping (pure).
//! * `meta` — which metadata contexts a LIST/SET query names (pure).
//! * [`backend`] — [`ExportBackend`] (implemented by the block core) and [`ExportConfig`].
//! * `registry` — the export table, client leases, removal notifications.
//! * `handshake` — option negotiation up to `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.
//! * `transmission` — one connection's request loop: reader, concurrent request tasks on the
//!   blocking pool, one writer task, bounded in-flight budget.
//! * [`server`] — [`NbdServer`]: listeners, connection limit, handshake timeout, stop.
//! * [`error`] — [`Error`] / [`ErrorKind`].

#![deny(missing_docs)]

pub mod backend;
pub mod error;
mod handshake;
mod meta;
mod pool;
pub mod proto;
mod registry;
pub mod server;
mod transmission;

pub use backend::{ExportBackend, ExportConfig};
pub use error::{Error, ErrorKind};
pub use server::{NbdServer, ServerOptions};

/// Per-connection limits on requests in flight (exposed for documentation and tests).
pub mod limits {
    /// Requests of one connection processed or awaiting their reply at once.
    pub const MAX_IN_FLIGHT_REQUESTS: usize = crate::transmission::MAX_IN_FLIGHT;
    /// Payload bytes (write data, read buffers, extent lists) held for one connection.
    pub const MAX_IN_FLIGHT_BYTES: usize = crate::transmission::MAX_IN_FLIGHT_BYTES;
}
