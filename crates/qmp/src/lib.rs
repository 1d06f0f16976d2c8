//! qmp: the QMP wire-protocol server of blockd.
//!
//! It frames, negotiates, routes to a [`Dispatcher`] and fans out events; it knows nothing of
//! blocks and nothing of the schema. Its behaviour is that of qemu-storage-daemon 10.0.2's
//! monitor, byte for byte where it could be checked: the greeting, `\r\n`-terminated output
//! lines, QEMU's JSON dialect (single-quoted strings, concatenated messages, error recovery),
//! the same error classes and texts, the same member order in output.
//!
//! Beyond QEMU: any number of clients per monitor at once (QEMU serves one per monitor),
//! bounded input and output per connection, and a client that stops reading is dropped
//! rather than stalling anyone.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn demo(dispatcher: Arc<dyn qmp::Dispatcher>) -> std::io::Result<()> {
//! let events = qmp::EventBus::new();
//! let greeting = qmp::Greeting { major: 10, minor: 0, micro: 2, package: String::new() };
//! let server = qmp::Server::new(dispatcher, events.clone(), greeting);
//! let listener = tokio::net::UnixListener::bind("/tmp/qmp.sock")?;
//! server.add_unix_monitor(listener, Some("/tmp/qmp.sock".into()));
//! events.emit("JOB_STATUS_CHANGE", Some(serde_json::json!({"id": "j", "status": "created"})));
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! * [`json`] — QEMU's JSON dialect: byte-level lexer, message streamer with limits and error
//!   recovery, push parser, and a writer that prints like QEMU.
//! * [`protocol`] — the protocol rules as pure functions: envelope checks, negotiation,
//!   replies, events, greeting.
//! * `dispatch` — the [`Dispatcher`] trait the daemon implements.
//! * `events` — [`EventBus`]: non-blocking fan-out to negotiated connections.
//! * `outbox` — the bounded per-connection output queue and its writer task.
//! * `connection` — one task per client: read, parse, route, reply.
//! * `server` — [`Server`]: monitors, accept loops, shutdown.
//! * `error` — [`QmpError`], an error as sent on the wire.
//!
//! Logging uses `tracing`: traffic at debug level, dropped connections at warn; nothing is
//! printed unless the daemon installs a subscriber.

#![warn(missing_docs)]

mod connection;
mod dispatch;
mod error;
mod events;
pub mod json;
mod outbox;
pub mod protocol;
mod server;

pub use dispatch::{DispatchFuture, Dispatcher};
pub use error::QmpError;
pub use events::EventBus;
pub use outbox::OutboxLimits;
pub use protocol::Greeting;
pub use server::{Server, ServerConfig};
