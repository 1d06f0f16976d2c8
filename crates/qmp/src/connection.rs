//! One client connection: read, parse, route, reply.
//!
//! The connection task reads into a fixed buffer and feeds the streamer; each complete message
//! is handled to the end (including running its command) before the next one is looked at, so
//! replies come in request order and a connection has at most one command in flight. A
//! separate writer task drains the connection's [`Outbox`], so events keep flowing while a
//! command runs, and a client that does not read only ever stalls itself.

use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, error};

use crate::error::QmpError;
use crate::events::Subscription;
use crate::json::{self, Parsed, Streamer};
use crate::outbox::{self, Outbox};
use crate::protocol::{self, Action, Command, Session};
use crate::server::Shared;

/// Size of the read buffer.
const READ_BUFFER: usize = 16 * 1024;

/// The connection must end (shutdown, or its queue is gone).
#[derive(Debug)]
struct Stop;

struct Connection {
    shared: Arc<Shared>,
    peer: Arc<str>,
    session: Session,
    streamer: Streamer,
    outbox: Arc<Outbox>,
    /// Present once negotiated; dropped first when the connection ends, so no event is
    /// queued after the queue is closed.
    subscription: Option<Subscription>,
}

/// Serves one client until it disconnects, its queue overflows, or the server shuts down.
pub(crate) async fn serve<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: Arc<str>,
    _permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let outbox = Arc::new(Outbox::new(shared.config.output));
    let mut writer_task = tokio::spawn(outbox::write_loop(writer, outbox.clone(), peer.clone()));
    // The queue is empty, so the greeting always fits.
    let _ = outbox.try_push(shared.greeting.clone());
    let mut conn = Connection {
        streamer: Streamer::new(shared.config.input),
        shared: shared.clone(),
        peer: peer.clone(),
        session: Session::new(),
        outbox: outbox.clone(),
        subscription: None,
    };
    conn.read_loop(reader).await;
    conn.subscription = None;
    outbox.close();
    let grace = shared.config.shutdown_grace;
    tokio::select! {
        _ = &mut writer_task => {}
        _ = async {
            shared.shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            debug!(%peer, "QMP client did not read its last messages in time");
            outbox.abort();
            writer_task.abort();
        }
    }
    debug!(%peer, "QMP connection closed");
}

impl Connection {
    fn stopping(&self) -> bool {
        self.shared.shutdown.is_cancelled() || self.outbox.dead().is_cancelled()
    }

    async fn read_loop<R: AsyncRead + Unpin>(&mut self, mut reader: R) {
        let mut buf = vec![0u8; READ_BUFFER];
        let (mut start, mut end) = (0, 0);
        loop {
            while start < end {
                if self.stopping() {
                    return;
                }
                let (used, parsed) = self.streamer.feed(&buf[start..end]);
                start += used;
                if let Some(parsed) = parsed {
                    if self.handle(parsed).await.is_err() {
                        return;
                    }
                }
            }
            let read = tokio::select! {
                biased;
                _ = self.shared.shutdown.cancelled() => return,
                _ = self.outbox.dead().cancelled() => return,
                r = reader.read(&mut buf) => r,
            };
            match read {
                Ok(0) => return,
                Ok(n) => (start, end) = (0, n),
                Err(e) => {
                    debug!(peer = %self.peer, error = %e, "QMP read failed");
                    return;
                }
            }
        }
    }

    async fn handle(&mut self, parsed: Parsed) -> Result<(), Stop> {
        match &parsed {
            Parsed::Value(v) => debug!(peer = %self.peer, request = %json::to_string(v), "QMP rx"),
            Parsed::Error(e) => debug!(peer = %self.peer, error = %e, "QMP rx malformed"),
        }
        let dispatcher = &self.shared.dispatcher;
        let action = self
            .session
            .handle(parsed, &|name| dispatcher.has_command(name));
        match action {
            Action::Reply(reply) => self.send(reply).await,
            Action::Negotiated(reply) => {
                self.send(reply).await?;
                let sub = self
                    .shared
                    .events
                    .subscribe(self.outbox.clone(), self.peer.clone());
                self.subscription = Some(sub);
                Ok(())
            }
            Action::Execute(command) => self.execute(command).await,
        }
    }

    /// Runs one command under the server-wide command lock (unless the dispatcher says it
    /// runs unserialised) and sends its reply.
    async fn execute(&mut self, command: Command) -> Result<(), Stop> {
        let shared = self.shared.clone();
        let guard = if shared.dispatcher.runs_unserialised(&command.name) {
            None
        } else {
            Some(tokio::select! {
                g = shared.command_lock.lock() => g,
                _ = shared.shutdown.cancelled() => return Err(Stop),
            })
        };
        if shared.shutdown.is_cancelled() {
            return Err(Stop);
        }
        let Command { name, args, id } = command;
        let future = shared.dispatcher.dispatch(&name, args);
        // A task of its own, so that a panicking command cannot take the connection down.
        let result = match tokio::spawn(future).await {
            Ok(result) => result,
            Err(e) => {
                error!(peer = %self.peer, command = %name, error = %e, "QMP command failed abnormally");
                Err(QmpError::generic(format!(
                    "Command {name} failed unexpectedly"
                )))
            }
        };
        drop(guard);
        self.send(protocol::reply(result, id)).await
    }

    async fn send(&self, message: Value) -> Result<(), Stop> {
        let mut text = json::to_string(&message);
        debug!(peer = %self.peer, reply = %text, "QMP tx");
        text.push_str("\r\n");
        self.outbox
            .push(Arc::from(text.into_bytes()), &self.shared.shutdown)
            .await
            .map_err(|_| Stop)
    }
}
