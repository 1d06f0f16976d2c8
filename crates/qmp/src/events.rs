//! Event fan-out to every negotiated connection.
//!
//! Any part of the daemon, on any thread, calls [`EventBus::emit`]. The event is stamped,
//! serialised once and offered to the outgoing queue of every connection that has completed
//! capabilities negotiation. `emit` never waits: a connection whose queue is full (its client
//! stopped reading) is dropped with a warning instead of holding up the emitter or the other
//! clients.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use serde_json::Value;
use tracing::{debug, warn};

use crate::json;
use crate::outbox::{Outbox, PushError};
use crate::protocol;

/// One receiving connection.
#[derive(Debug)]
struct Subscriber {
    id: u64,
    outbox: Arc<Outbox>,
    peer: Arc<str>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Negotiated connections. Guarded by a std mutex held only while offering one event to
    /// every queue (each offer is a non-blocking push), never across an await.
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
}

/// The daemon-wide event bus. Cheap to clone; all clones are the same bus.
#[derive(Debug, Clone, Default)]
pub struct EventBus {
    inner: Arc<Inner>,
}

/// Keeps a connection subscribed; dropping it unsubscribes.
#[derive(Debug)]
pub(crate) struct Subscription {
    bus: Weak<Inner>,
    id: u64,
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(inner: &Inner) -> MutexGuard<'_, Vec<Subscriber>> {
        // Subscribers are only added, removed or offered a message under the lock; none of
        // that can leave the list inconsistent, so a poisoned lock is still usable.
        inner.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends event `name` (with `data`, if any) to every negotiated connection, stamped with
    /// the wall clock. Never blocks or waits; callable from any thread.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        if Self::lock(&self.inner).is_empty() {
            debug!(event = name, "QMP event with no connection to receive it");
            return;
        }
        let message = protocol::event(name, data, SystemTime::now());
        let mut text = json::to_string(&message);
        debug!(event = %text, "QMP event");
        text.push_str("\r\n");
        let bytes: Arc<[u8]> = Arc::from(text.into_bytes());
        Self::lock(&self.inner).retain(|sub| match sub.outbox.try_push(bytes.clone()) {
            Ok(()) => true,
            Err(PushError::Closed) => false,
            Err(PushError::Full) => {
                let (messages, queued) = sub.outbox.queued();
                warn!(
                    peer = %sub.peer,
                    messages,
                    bytes = queued,
                    "dropping QMP connection: it does not read its events and its queue is full"
                );
                sub.outbox.abort();
                false
            }
        });
    }

    /// Number of connections currently receiving events.
    pub fn subscriber_count(&self) -> usize {
        Self::lock(&self.inner).len()
    }

    /// Starts delivering events into `outbox` until the returned guard is dropped.
    pub(crate) fn subscribe(&self, outbox: Arc<Outbox>, peer: Arc<str>) -> Subscription {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        Self::lock(&self.inner).push(Subscriber { id, outbox, peer });
        Subscription {
            bus: Arc::downgrade(&self.inner),
            id,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            EventBus::lock(&inner).retain(|sub| sub.id != self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Next, OutboxLimits};

    fn outbox(max_messages: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(OutboxLimits {
            max_messages,
            max_bytes: 1 << 20,
        }))
    }

    fn popped(o: &Outbox) -> String {
        match o.pop() {
            Next::Message(m) => String::from_utf8_lossy(&m).into_owned(),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn emit_reaches_every_subscriber_with_crlf() {
        let bus = EventBus::new();
        let (a, b) = (outbox(10), outbox(10));
        let _sa = bus.subscribe(a.clone(), "a".into());
        let _sb = bus.subscribe(b.clone(), "b".into());
        bus.emit("X", None);
        for o in [&a, &b] {
            let line = popped(o);
            assert!(line.ends_with("\"event\": \"X\"}\r\n"), "{line}");
            assert!(line.starts_with("{\"timestamp\": {\"seconds\": "), "{line}");
        }
    }

    #[test]
    fn dropping_the_subscription_stops_delivery() {
        let bus = EventBus::new();
        let a = outbox(10);
        let sub = bus.subscribe(a.clone(), "a".into());
        drop(sub);
        bus.emit("X", None);
        assert!(matches!(a.pop(), Next::Idle));
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[test]
    fn a_full_queue_aborts_only_that_connection() {
        let bus = EventBus::new();
        let (slow, fast) = (outbox(2), outbox(100));
        let _s = bus.subscribe(slow.clone(), "slow".into());
        let _f = bus.subscribe(fast.clone(), "fast".into());
        for _ in 0..3 {
            bus.emit("X", Some(serde_json::json!({"n": 1})));
        }
        assert!(slow.dead().is_cancelled());
        assert!(!fast.dead().is_cancelled());
        assert_eq!(fast.queued().0, 3);
        assert_eq!(bus.subscriber_count(), 1);
    }
}
