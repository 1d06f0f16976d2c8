//! The bounded queue of messages waiting to be written to one connection.
//!
//! Three kinds of producers share it: the greeting, command replies (from the connection's own
//! task, which may wait for space: a client that does not read simply stops getting its
//! commands executed) and events (from any thread, which must never wait: when the queue is
//! full the connection is aborted instead). One consumer, the connection's writer task, takes
//! messages one at a time, so at most one message is outside the queue's accounting.
//!
//! ```text
//!   EventBus::emit ──try_push──┐
//!   replies ────push (waits)───┼──> Outbox ──pop──> writer task ──> socket
//!   greeting ──try_push────────┘      │
//!                                     └─ abort(): overflow or write error → connection ends
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How much may wait in one connection's outgoing queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most queued messages.
    pub max_messages: usize,
    /// Most queued bytes (a single larger message is still accepted into an empty queue).
    pub max_bytes: usize,
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue is at its limits.
    Full,
    /// The connection is closing or gone.
    Closed,
}

/// Queue contents. Guarded by `Outbox::state`, a std mutex held only for queue operations,
/// never across an await (producers include plain threads emitting events).
#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Arc<[u8]>>,
    bytes: usize,
    /// No more messages are accepted; the writer finishes once the queue is empty.
    closed: bool,
}

/// What the writer should do next.
#[derive(Debug)]
pub enum Next {
    /// Write this message.
    Message(Arc<[u8]>),
    /// Nothing queued; flush and wait.
    Idle,
    /// Closed and drained, or aborted: shut the socket down.
    Finished,
}

/// One connection's outgoing queue.
#[derive(Debug)]
pub struct Outbox {
    limits: OutboxLimits,
    state: Mutex<State>,
    /// Wakes the writer when a message arrives or the queue closes.
    writer_wake: Notify,
    /// Wakes a reply producer waiting for space.
    space: Notify,
    /// Cancelled when the connection must end now (overflow, write error, shutdown timeout).
    dead: CancellationToken,
}

impl Outbox {
    /// An empty queue.
    pub fn new(limits: OutboxLimits) -> Self {
        Outbox {
            limits,
            state: Mutex::new(State::default()),
            writer_wake: Notify::new(),
            space: Notify::new(),
            dead: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // operation is a single push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message if there is room; never waits.
    pub fn try_push(&self, msg: Arc<[u8]>) -> Result<(), PushError> {
        {
            let mut st = self.lock();
            if st.closed || self.dead.is_cancelled() {
                return Err(PushError::Closed);
            }
            let too_many = st.queue.len() >= self.limits.max_messages;
            let too_big =
                st.bytes > 0 && st.bytes.saturating_add(msg.len()) > self.limits.max_bytes;
            if too_many || too_big {
                return Err(PushError::Full);
            }
            st.bytes += msg.len();
            st.queue.push_back(msg);
        }
        self.writer_wake.notify_one();
        Ok(())
    }

    /// Queues a message beyond the limits (one reply during shutdown must not be lost).
    fn force_push(&self, msg: Arc<[u8]>) -> Result<(), PushError> {
        {
            let mut st = self.lock();
            if st.closed || self.dead.is_cancelled() {
                return Err(PushError::Closed);
            }
            st.bytes += msg.len();
            st.queue.push_back(msg);
        }
        self.writer_wake.notify_one();
        Ok(())
    }

    /// Queues a message, waiting for room. When `stop` is cancelled while waiting, the
    /// message is queued beyond the limits so that it is still delivered.
    pub async fn push(&self, msg: Arc<[u8]>, stop: &CancellationToken) -> Result<(), PushError> {
        loop {
            match self.try_push(msg.clone()) {
                Err(PushError::Full) => {}
                other => return other,
            }
            tokio::select! {
                _ = self.space.notified() => {}
                _ = self.dead.cancelled() => return Err(PushError::Closed),
                _ = stop.cancelled() => return self.force_push(msg),
            }
        }
    }

    /// Takes the next message for the writer.
    pub fn pop(&self) -> Next {
        let next = {
            let mut st = self.lock();
            if self.dead.is_cancelled() {
                Next::Finished
            } else if let Some(msg) = st.queue.pop_front() {
                st.bytes -= msg.len();
                Next::Message(msg)
            } else if st.closed {
                Next::Finished
            } else {
                Next::Idle
            }
        };
        if matches!(next, Next::Message(_)) {
            self.space.notify_one();
        }
        next
    }

    /// Waits until there may be something for the writer.
    pub async fn wait(&self) {
        tokio::select! {
            _ = self.writer_wake.notified() => {}
            _ = self.dead.cancelled() => {}
        }
    }

    /// No more messages; the writer finishes after writing what is queued.
    pub fn close(&self) {
        self.lock().closed = true;
        self.writer_wake.notify_one();
    }

    /// Ends the connection now, dropping whatever is queued.
    pub fn abort(&self) {
        {
            let mut st = self.lock();
            st.closed = true;
            st.queue.clear();
            st.bytes = 0;
        }
        self.dead.cancel();
        self.writer_wake.notify_one();
        self.space.notify_one();
    }

    /// Cancelled once the connection has been aborted.
    pub fn dead(&self) -> &CancellationToken {
        &self.dead
    }

    /// Messages and bytes queued now.
    pub fn queued(&self) -> (usize, usize) {
        let st = self.lock();
        (st.queue.len(), st.bytes)
    }
}

/// The writer task: drains `outbox` into `sink` until the outbox finishes or a write fails.
/// Flushes whenever the queue runs empty; shuts the sink down at the end.
pub async fn write_loop<W>(sink: W, outbox: Arc<Outbox>, peer: Arc<str>)
where
    W: AsyncWrite + Unpin,
{
    let mut sink = BufWriter::with_capacity(16 * 1024, sink);
    loop {
        let step = match outbox.pop() {
            Next::Message(msg) => {
                tokio::select! {
                    r = sink.write_all(&msg) => r,
                    _ = outbox.dead().cancelled() => return,
                }
            }
            Next::Idle => {
                let flushed = tokio::select! {
                    r = sink.flush() => r,
                    _ = outbox.dead().cancelled() => return,
                };
                if flushed.is_ok() {
                    outbox.wait().await;
                }
                flushed
            }
            Next::Finished => {
                if !outbox.dead().is_cancelled() {
                    let _ = sink.flush().await;
                    let _ = sink.shutdown().await;
                }
                return;
            }
        };
        if let Err(e) = step {
            debug!(%peer, error = %e, "QMP write failed; closing connection");
            outbox.abort();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    fn small() -> Outbox {
        Outbox::new(OutboxLimits {
            max_messages: 2,
            max_bytes: 10,
        })
    }

    #[test]
    fn try_push_refuses_beyond_the_message_limit() {
        let o = small();
        assert_eq!(o.try_push(msg("a")), Ok(()));
        assert_eq!(o.try_push(msg("b")), Ok(()));
        assert_eq!(o.try_push(msg("c")), Err(PushError::Full));
    }

    #[test]
    fn try_push_refuses_beyond_the_byte_limit_but_takes_one_big_message() {
        let o = small();
        assert_eq!(o.try_push(msg("0123456789ABC")), Ok(()));
        assert_eq!(o.try_push(msg("x")), Err(PushError::Full));
    }

    #[test]
    fn pop_frees_room_and_close_finishes_after_draining() {
        let o = small();
        o.try_push(msg("a")).unwrap();
        o.close();
        assert_eq!(o.try_push(msg("b")), Err(PushError::Closed));
        assert!(matches!(o.pop(), Next::Message(m) if &*m == b"a"));
        assert!(matches!(o.pop(), Next::Finished));
    }

    #[test]
    fn abort_drops_queued_messages() {
        let o = small();
        o.try_push(msg("a")).unwrap();
        o.abort();
        assert!(matches!(o.pop(), Next::Finished));
        assert_eq!(o.queued(), (0, 0));
        assert!(o.dead().is_cancelled());
    }

    #[tokio::test]
    async fn push_waits_for_room_then_succeeds() {
        let o = Arc::new(small());
        o.try_push(msg("a")).unwrap();
        o.try_push(msg("b")).unwrap();
        let stop = CancellationToken::new();
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push(msg("c"), &stop).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(matches!(o.pop(), Next::Message(_)));
        assert_eq!(waiter.await.ok(), Some(Ok(())));
        assert_eq!(o.queued().0, 2);
    }

    #[tokio::test]
    async fn push_queues_beyond_limits_when_stopping() {
        let o = small();
        o.try_push(msg("a")).unwrap();
        o.try_push(msg("b")).unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(o.push(msg("c"), &stop).await, Ok(()));
        assert_eq!(o.queued().0, 3);
    }
}
