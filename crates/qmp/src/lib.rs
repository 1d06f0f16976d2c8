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
//! # Where we differ from qemu-storage-daemon 10.0.2, on purpose
//!
//! * Several clients may use one monitor at once (QSD greets the second only after the first
//!   disconnects). Each connection negotiates on its own and gets every event.
//! * Input limits are smaller and configurable ([`ServerConfig::input`]: 1 MiB of tokens,
//!   64 Ki tokens, depth 1024; QSD: 64 MiB, 2 Mi, 1024). After a limit error we skip the rest
//!   of that message; QSD re-reads the rest as new messages and sends one error per leftover
//!   token (e.g. 1025 `[` then 1025 `]` gives 1026 errors there, one here). A lexical error
//!   while skipping ends the skip silently, so an unterminated huge string ends at a newline.
//! * A float literal beyond the f64 range becomes ±1.7976931348623157e+308; QSD stores
//!   infinity and prints `inf`, which is not JSON.
//! * A client that does not read its events is disconnected once its queue is full
//!   ([`ServerConfig::output`]); QSD buffers without bound.
//! * `exec-oob` errors are sent in request order; QSD sends them at once, possibly ahead of the
//!   reply to a command still running. (No command supports OOB, in QSD either.)
//! * A command that panics gets a `GenericError` reply; the daemon lives on.
//! * A client that half-closes its socket still receives the replies to what it sent.
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
