//! Requests in flight on one node, and serialising between overlapping ones.
//!
//! Every read and write of a node is tracked for its duration. A job that must not race
//! writes over a region (a backup's copy of it) takes a *serialising* request: it waits for
//! overlapping writes in flight, and new overlapping writes wait for it. Reads never wait.
//! Copy-before-write hooks run before the write is tracked, so the copy they make always
//! finishes before the write that triggered it lands.

use std::sync::{Condvar, Mutex};

#[derive(Clone, Copy)]
struct Req {
    id: u64,
    offset: u64,
    end: u64,
    write: bool,
    serialising: bool,
}

impl Req {
    fn overlaps(&self, offset: u64, end: u64) -> bool {
        self.offset < end && offset < self.end
    }
}

#[derive(Default)]
struct State {
    next: u64,
    reqs: Vec<Req>,
    /// Threads waiting on `changed` (a request's end wakes nobody when this is 0: a notify
    /// is a system call even without waiters, and every request of a node ends here).
    waiters: usize,
}

/// The requests in flight on a node.
#[derive(Default)]
pub struct Tracker {
    state: Mutex<State>,
    changed: Condvar,
}

/// One tracked request; leaves the tracker when dropped.
pub struct Tracked<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let mut s = self.tracker.lock();
        s.reqs.retain(|r| r.id != self.id);
        if s.waiters > 0 {
            self.tracker.changed.notify_all();
        }
    }
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Track `[offset, offset+len)`. A write waits for overlapping serialising requests; a
    /// serialising request waits for overlapping writes and serialising requests.
    pub fn begin(&self, offset: u64, len: u64, write: bool, serialising: bool) -> Tracked<'_> {
        let end = offset.saturating_add(len);
        let mut s = self.lock();
        loop {
            let blocked = s.reqs.iter().any(|r| {
                r.overlaps(offset, end)
                    && ((write && r.serialising) || (serialising && (r.write || r.serialising)))
            });
            if !blocked {
                break;
            }
            s = self.wait(s);
        }
        s.next += 1;
        let id = s.next;
        s.reqs.push(Req {
            id,
            offset,
            end,
            write,
            serialising,
        });
        Tracked { tracker: self, id }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().reqs.len()
    }

    /// Wait until nothing is in flight (callers stop new requests first: a drained section).
    pub fn wait_idle(&self) {
        let mut s = self.lock();
        while !s.reqs.is_empty() {
            s = self.wait(s);
        }
    }

    /// Wait for a change, counted in `waiters` (both under the lock, so no wake-up is lost).
    fn wait<'a>(
        &'a self,
        mut s: std::sync::MutexGuard<'a, State>,
    ) -> std::sync::MutexGuard<'a, State> {
        s.waiters += 1;
        let mut s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        s.waiters -= 1;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    /// Ends wake only counted waiters: with writes and serialising requests over the same
    /// few clusters from several threads, every waiter is woken (a lost wake-up hangs one
    /// thread, and the test fails on its deadline), and nothing overlapping runs together.
    #[test]
    fn contended_requests_all_finish() {
        let t = Arc::new(Tracker::default());
        let (tx, rx) = mpsc::channel();
        let threads = 4;
        for i in 0..threads {
            let (t, tx) = (t.clone(), tx.clone());
            std::thread::spawn(move || {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ i;
                for n in 0..3000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let offset = (x % 4) * 4096;
                    let serialising = (n + i) % 3 == 0;
                    let r = t.begin(offset, 8192, !serialising, serialising);
                    if serialising {
                        // No write overlaps a serialising request while it is in flight.
                        let s = t.lock();
                        let bad = s
                            .reqs
                            .iter()
                            .any(|q| q.id != r.id && q.write && q.overlaps(offset, offset + 8192));
                        assert!(!bad, "a write ran beside a serialising request");
                    }
                    if n % 64 == 0 {
                        std::thread::yield_now();
                    }
                    drop(r);
                }
                let _ = tx.send(());
            });
        }
        drop(tx);
        for _ in 0..threads {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("a request waited forever (lost wake-up) or a thread failed");
        }
        t.wait_idle();
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.lock().waiters, 0);
    }
}
