//! Claims: what keeps a graph command that runs beside others (off the QMP command lock, see
//! `dispatch::runs_unserialised`) atomic against the other commands that change the same
//! nodes.
//!
//! A command claims, before it changes anything, the nodes it will change and the names and
//! files it will create; a second command claiming any of them waits until the first has
//! ended (replied), then looks everything up again, as if it had been sent after it. Claims
//! are taken all at once (never one after another while holding some), so two commands
//! cannot wait for each other. A claimer holds nothing else while it waits (no graph lock,
//! no node hold, no reopen mark), so a claim holder never waits for a claim waiter.
//!
//! Between two claims the graph may change: a claim is taken on what the command's arguments
//! resolve to, and when they resolve differently once claimed (a device moved onto a new
//! overlay meanwhile), the claim is given back and taken again ([`Claims::take`]).
//!
//! Queries that report nodes (`query-block`, `query-named-block-nodes`,
//! `query-block-exports`, `x-debug-block-dirty-bitmap-sha256`) run beside every command and
//! take a *read* claim on the nodes they report ([`Claims::read`]): it waits while a command
//! that changes one of them holds it, and such a command waits for the readers in progress;
//! read claims never wait for each other. A query therefore shows a node as it was before or
//! after a `transaction`, snapshot, reopen or backup that changes it in several steps, never
//! half way, as under QEMU's lock.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use block::NodeRef;

use crate::daemon::Daemon;

/// One thing a command claims.
#[derive(Clone)]
pub enum Key {
    /// A node the command changes (rewires, reopens, snapshots).
    Node(NodeRef),
    /// A node-name the command will create.
    Name(String),
    /// An image file the command will create or open as a new node.
    File(String),
    /// A job id the command will create a job with (or acts on).
    Job(String),
    /// An export id the command will add.
    Export(String),
    /// The NBD server (started, stopped, or exports added to it).
    NbdServer,
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        match (self, other) {
            (Key::Node(a), Key::Node(b)) => Arc::ptr_eq(a, b),
            (Key::Name(a), Key::Name(b))
            | (Key::File(a), Key::File(b))
            | (Key::Job(a), Key::Job(b))
            | (Key::Export(a), Key::Export(b)) => a == b,
            (Key::NbdServer, Key::NbdServer) => true,
            _ => false,
        }
    }
}

/// The claims of the commands running now.
#[derive(Default)]
pub struct Claims {
    /// (claim id, key, is it a read claim).
    held: Mutex<Vec<(u64, Key, bool)>>,
    next: Mutex<u64>,
    changed: Condvar,
}

/// Claims held by one command; given back when dropped.
#[must_use = "the claim is given back when dropped"]
pub struct Claim {
    claims: Arc<Claims>,
    id: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = lock(&self.claims.held);
        held.retain(|(id, ..)| *id != self.id);
        drop(held);
        self.claims.changed.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Claims {
    /// Claim what `resolve` names, waiting while another command holds any of it. `resolve`
    /// runs before and after the claim is taken; when the two answers differ, the claim is
    /// given back and the whole is tried again. Blocking: call it off the reactor.
    pub fn take<E>(
        self: &Arc<Self>,
        resolve: impl Fn() -> Result<Vec<Key>, E>,
    ) -> Result<Claim, E> {
        self.take_as(resolve, false)
    }

    /// A query's read claim on what `resolve` names: as [`Claims::take`], but it waits only
    /// for (and holds off only) claims that change those keys, never other read claims.
    pub fn read<E>(
        self: &Arc<Self>,
        resolve: impl Fn() -> Result<Vec<Key>, E>,
    ) -> Result<Claim, E> {
        self.take_as(resolve, true)
    }

    fn take_as<E>(
        self: &Arc<Self>,
        resolve: impl Fn() -> Result<Vec<Key>, E>,
        read: bool,
    ) -> Result<Claim, E> {
        loop {
            let keys = resolve()?;
            let claim = self.claim_as(keys.clone(), read);
            if resolve()? == keys {
                return Ok(claim);
            }
        }
    }

    /// Claim `keys` all at once, waiting while any of them is held by another command.
    #[cfg(test)]
    fn claim(self: &Arc<Self>, keys: Vec<Key>) -> Claim {
        self.claim_as(keys, false)
    }

    /// Claim `keys` all at once, waiting while another command holds any of them in a way
    /// that conflicts (two read claims do not).
    fn claim_as(self: &Arc<Self>, keys: Vec<Key>, read: bool) -> Claim {
        let id = {
            let mut next = lock(&self.next);
            *next += 1;
            *next
        };
        let mut held = lock(&self.held);
        let conflicts = |held: &Vec<(u64, Key, bool)>| {
            keys.iter()
                .any(|k| held.iter().any(|(_, h, r)| h == k && !(read && *r)))
        };
        while conflicts(&held) {
            held = self.changed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.extend(keys.into_iter().map(|k| (id, k, read)));
        Claim {
            claims: self.clone(),
            id,
        }
    }
}

/// The nodes `roots` reach through their children (each once), for a query's read claim.
fn reached(roots: Vec<NodeRef>) -> Vec<Key> {
    let mut seen: Vec<NodeRef> = Vec::new();
    let mut todo = roots;
    while let Some(n) = todo.pop() {
        if seen.iter().any(|s| Arc::ptr_eq(s, &n)) {
            continue;
        }
        todo.extend(n.children().into_iter().map(|c| c.node));
        seen.push(n);
    }
    seen.into_iter().map(Key::Node).collect()
}

/// What `query-block` reads: the devices' nodes and everything below them.
pub fn device_keys(d: &Daemon) -> Vec<Key> {
    let roots = lock(&d.devices).iter().map(|v| v.root.node()).collect();
    reached(roots)
}

/// What `query-named-block-nodes` reads: every node.
pub fn all_node_keys(d: &Daemon) -> Vec<Key> {
    d.graph().nodes().iter().cloned().map(Key::Node).collect()
}

/// What `query-block-exports` reads: the exports' nodes.
pub fn export_keys(d: &Daemon) -> Vec<Key> {
    d.exports()
        .iter()
        .map(|e| Key::Node(e.root.node()))
        .collect()
}

/// What a backup creates: its job id (QSD: none given is the empty id) and its filter's
/// node-name if given.
pub fn backup_keys(c: &qapi::types::BackupCommon) -> Vec<Key> {
    let job = Key::Job(c.job_id.clone().unwrap_or_default());
    let filter = c.filter_node_name.clone().map(Key::Name);
    std::iter::once(job).chain(filter).collect()
}

/// Claim `keys` for a command that runs on the reactor (the wait runs off it).
pub async fn claim_off_reactor(d: &Arc<Daemon>, keys: Vec<Key>) -> Result<Claim, block::Error> {
    let d = d.clone();
    tokio::task::spawn_blocking(move || d.claims.take(|| Ok(keys.clone())))
        .await
        .map_err(|e| block::Error::generic(format!("claiming failed: {e}")))?
}

/// Claim the node `name` resolves to and `keys`, for a command that runs on the reactor.
pub async fn claim_off_reactor_on(
    d: &Arc<Daemon>,
    name: &str,
    keys: Vec<Key>,
) -> Result<Claim, block::Error> {
    let d = d.clone();
    let name = name.to_string();
    let take = move || {
        d.claims.take(|| {
            let mut all = d
                .lookup_node(&name)
                .ok()
                .map(Key::Node)
                .into_iter()
                .collect::<Vec<_>>();
            all.extend(keys.iter().cloned());
            Ok(all)
        })
    };
    tokio::task::spawn_blocking(take)
        .await
        .map_err(|e| block::Error::generic(format!("claiming failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::{Claims, Key};
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_second_claim_of_the_same_name_waits_for_the_first() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim(vec![Key::Name("a".into()), Key::File("f".into())]);
        let (tx, rx) = mpsc::channel();
        let c = claims.clone();
        let t = std::thread::spawn(move || {
            let _second = c.claim(vec![Key::File("f".into())]);
            tx.send(()).ok();
        });
        // Other keys are free meanwhile.
        drop(claims.claim(vec![Key::Name("b".into())]));
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(first);
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        t.join().ok();
    }

    #[test]
    fn reads_share_and_wait_for_a_change() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim_as(vec![Key::Name("a".into())], true);
        // A second read of the same key does not wait.
        drop(claims.claim_as(vec![Key::Name("a".into())], true));
        let (tx, rx) = mpsc::channel();
        let c = claims.clone();
        let t = std::thread::spawn(move || {
            let _change = c.claim(vec![Key::Name("a".into())]);
            tx.send(()).ok();
        });
        // A change waits for the read in progress.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(first);
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        t.join().ok();
        // And a read waits for a change in progress.
        let change = claims.claim(vec![Key::Job("j".into())]);
        let (tx, rx) = mpsc::channel();
        let c = claims.clone();
        let t = std::thread::spawn(move || {
            let _read = c.claim_as(vec![Key::Job("j".into())], true);
            tx.send(()).ok();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(change);
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        t.join().ok();
    }

    #[test]
    fn a_claim_whose_answer_changed_is_taken_again() {
        let claims = Arc::new(Claims::default());
        let calls = std::cell::Cell::new(0);
        let claim = claims.take(|| -> Result<_, ()> {
            calls.set(calls.get() + 1);
            Ok(vec![Key::Name(format!("n{}", calls.get().min(2)))])
        });
        assert!(claim.is_ok());
        // n1 then n2 (differ: again), n2 then n2 (same: done).
        assert_eq!(calls.get(), 4);
    }
}
