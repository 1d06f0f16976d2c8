//! A staged `blockdev-add`: the graph lock is held to check and reserve, and again to insert,
//! but never over the disk I/O of the open (files, locks, image headers, bitmaps, fsync).
//!
//! 1. Under the lock: every node-name of the tree must be free (neither a node nor reserved by
//!    another staged open) and every node the tree names must exist. The names are reserved
//!    and the named nodes pinned (`blockdev-del` refuses them). A name whose node is being
//!    closed (a `blockdev-del` in progress) is waited for. When a name is taken or a named
//!    child is missing, the open cannot succeed: it runs all the same (step 2, without the
//!    lock, the existing nodes it names pinned and the taken names marked taken in its
//!    scratch graph), so that it fails with exactly the error, at exactly the point, of the
//!    plain open. No root name fails at once, opening nothing.
//! 2. Without the lock: the tree opens in a scratch graph, children first, locks before bytes
//!    ([`Graph::add`]'s rules). An edge onto an existing node takes its permissions in the
//!    daemon's graph (briefly locked), so a concurrent change sees and respects it.
//! 3. Under the lock: the new nodes join the graph and the reservations go; on failure the
//!    scratch graph has already closed what it opened and the pending edges are dropped.
//!    A node the open pinned that became an orphan meanwhile (a backing opened from an image
//!    header, replaced by a `blockdev-reopen` while pinned) is then taken out and closed
//!    without the lock.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::close::{shutting_down, wait_names};
use super::{close_node, ChildRef, Detached, DriverOptions, Graph, NodeOptions, PendingEdge};
use crate::error::{Error, Result};
use crate::node::NodeRef;

/// Staged opens in progress, in the daemon's graph.
#[derive(Default)]
pub(super) struct Reservations {
    items: Vec<Reservation>,
    /// Auto-named nodes left without users that were not closed because an open pinned
    /// them: closed when that open ends (see [`Graph::close_deferred`]).
    deferred: Vec<NodeRef>,
}

struct Reservation {
    id: u64,
    names: Vec<String>,
    pins: Vec<NodeRef>,
}

impl Reservations {
    /// A staged open will create a node of this name.
    pub(super) fn reserved(&self, name: &str) -> bool {
        self.items.iter().any(|r| r.names.iter().any(|n| n == name))
    }

    /// Close `node` once no open pins it any more.
    pub(super) fn defer(&mut self, node: &NodeRef) {
        if !self.deferred.iter().any(|d| Arc::ptr_eq(d, node)) {
            self.deferred.push(node.clone());
        }
    }

    /// A staged open names this node as a child (or a bitmap's holder).
    pub(super) fn pinned(&self, node: &NodeRef) -> bool {
        self.items
            .iter()
            .any(|r| r.pins.iter().any(|p| Arc::ptr_eq(p, node)))
    }
}

/// What a scratch graph knows of the open it runs.
pub(super) struct Scratch {
    id: u64,
    /// The existing nodes the tree names (pinned in the daemon's graph).
    external: Vec<NodeRef>,
    /// The daemon's graph.
    outer: Arc<Mutex<Graph>>,
    /// An open that must fail (a name taken, a named node missing), run for its error.
    fallback: bool,
    /// The tree's names that are taken in the daemon's graph (or twice in the tree).
    taken: Vec<String>,
}

impl Scratch {
    pub(super) fn external(&self, name: &str) -> Option<NodeRef> {
        self.external.iter().find(|n| n.name() == name).cloned()
    }

    pub(super) fn is_taken(&self, name: &str) -> bool {
        self.taken.iter().any(|n| n == name)
    }

    pub(super) fn is_external(&self, node: &NodeRef) -> bool {
        self.external.iter().any(|n| Arc::ptr_eq(n, node))
    }

    /// Take an edge's permissions on an existing node, in the daemon's graph.
    pub(super) fn attach_outer(&self, edge: PendingEdge) -> Result<()> {
        let mut g = lock(&self.outer);
        let seq = edge.seq;
        g.pending.push(edge);
        let r = g.refresh_perms();
        if r.is_err() {
            g.pending.retain(|p| p.seq != seq);
        }
        r
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn lock(g: &Mutex<Graph>) -> MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

impl Graph {
    /// A staged open is in progress: its nodes are not in the graph yet, and will be.
    /// Shutdown waits for this to be false before it closes the graph.
    pub fn opening(&self) -> bool {
        !self.staged.items.is_empty()
    }

    /// The staged open this graph runs (0: none, the daemon's graph).
    pub(super) fn owner(&self) -> u64 {
        self.scratch.as_ref().map_or(0, |s| s.id)
    }

    /// [`Graph::add`] without holding `graph`'s lock over the open's disk I/O (see the module
    /// documentation). Other graph commands run meanwhile; a node the tree names cannot be
    /// deleted, and its names cannot be taken, until the open is done.
    pub fn add_staged(graph: &Arc<Mutex<Graph>>, opts: &NodeOptions) -> Result<NodeRef> {
        let (mut names, mut refs) = (Vec::new(), Vec::new());
        collect(opts, &mut names, &mut refs);
        let mut scratch = {
            // A name whose close is in progress is free once the close is done: wait.
            let mut g = wait_names(graph, &names);
            if g.shut {
                return Err(shutting_down());
            }
            if opts.node_name.is_none() {
                // Refused before anything opens.
                return g.add(opts);
            }
            g.reserve(names, &refs, graph)
        };
        let id = scratch.owner();
        let fallback = scratch.scratch.as_ref().is_some_and(|s| s.fallback);
        let opened = scratch.add_tree(opts);
        let new = std::mem::take(&mut scratch.nodes);
        let mut g = lock(graph);
        g.pending.retain(|p| p.owner != id);
        g.staged.items.retain(|r| r.id != id);
        g.notify_changed();
        let orphans = g.close_deferred();
        let result = g.insert_opened(opened, new, fallback);
        drop(g);
        Graph::close_detached(graph, orphans);
        result
    }

    /// The end of a staged open, under the lock: its nodes join the graph. (A failed open
    /// has closed what it opened already, in its scratch graph.)
    fn insert_opened(
        &mut self,
        opened: Result<NodeRef>,
        new: Vec<NodeRef>,
        fallback: bool,
    ) -> Result<NodeRef> {
        let node = match opened {
            Ok(node) => node,
            Err(e) => {
                // The edges onto existing nodes are gone: give their locks back.
                if let Err(e) = self.refresh_perms() {
                    tracing::warn!(error = %e, "restoring permissions after a failed open");
                }
                return Err(e);
            }
        };
        // An open run for its error cannot succeed (a name of it is taken); should it, its
        // names were not reserved: refuse as the plain open would.
        let dup = new.iter().find(|n| fallback && self.name_taken(n.name()));
        let refused = match dup {
            Some(n) => Err(Error::generic(format!(
                "Duplicate nodes with node-name='{}'",
                n.name()
            ))),
            None => {
                let before = self.nodes.len();
                self.nodes.extend(new.iter().cloned());
                // Cannot fail while the pending edges held the same permissions; undo anyway.
                let r = self.refresh_perms();
                if r.is_err() {
                    self.nodes.truncate(before);
                }
                r
            }
        };
        let Err(e) = refused else {
            return Ok(node);
        };
        if let Err(e) = self.refresh_perms() {
            tracing::warn!(error = %e, "restoring permissions after a failed insert");
        }
        for n in new.iter().rev() {
            if let Err(e) = close_node(n) {
                tracing::warn!(node = n.name(), error = %e, "closing after a failed insert");
            }
        }
        Err(e)
    }

    /// Take out the deferred orphans no open pins any more (see [`Reservations::defer`]).
    fn close_deferred(&mut self) -> Detached {
        let deferred = std::mem::take(&mut self.staged.deferred);
        let mut out = Vec::new();
        for n in deferred {
            if self.staged.pinned(&n) {
                self.staged.deferred.push(n);
            } else if self.is_orphan(&n) {
                out.extend(self.detach_tree(&n).take());
            }
        }
        if !out.is_empty() {
            if let Err(e) = self.refresh_perms() {
                tracing::warn!(error = %e, "lowering permissions after closing orphans");
            }
        }
        Detached::of(out)
    }

    /// Reserve the tree's names and pin the nodes it names, for an open in a scratch graph.
    /// When a name is taken or a named node is missing, nothing is reserved and the scratch
    /// graph knows the taken names: the open runs only to fail as the plain open would.
    fn reserve(&mut self, names: Vec<String>, refs: &[String], outer: &Arc<Mutex<Graph>>) -> Graph {
        let mut seen = HashSet::new();
        let mut taken = Vec::new();
        for n in &names {
            if self.name_taken(n) || !seen.insert(n.as_str()) {
                taken.push(n.clone());
            }
        }
        let mut pins: Vec<NodeRef> = Vec::new();
        let mut missing = false;
        for r in refs {
            match self.get(r) {
                Some(node) if !pins.iter().any(|p| Arc::ptr_eq(p, &node)) => pins.push(node),
                Some(_) => {}
                None => missing = true,
            }
        }
        let fallback = missing || !taken.is_empty();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.staged.items.push(Reservation {
            id,
            names: if fallback { Vec::new() } else { names },
            pins: pins.clone(),
        });
        Graph {
            events: self.events.clone(),
            counter: self.counter.clone(),
            scratch: Some(Scratch {
                id,
                external: pins,
                outer: outer.clone(),
                fallback,
                taken,
            }),
            ..Graph::default()
        }
    }
}

/// The node-names a tree defines and the existing nodes it names.
fn collect(opts: &NodeOptions, names: &mut Vec<String>, refs: &mut Vec<String>) {
    fn child(r: &ChildRef, names: &mut Vec<String>, refs: &mut Vec<String>) {
        match r {
            ChildRef::Name(n) => refs.push(n.clone()),
            ChildRef::Inline(o) => collect(o, names, refs),
        }
    }
    if let Some(n) = &opts.node_name {
        names.push(n.clone());
    }
    match &opts.driver {
        DriverOptions::File { .. } | DriverOptions::Null { .. } | DriverOptions::Unsupported => {}
        DriverOptions::Raw { file, .. } | DriverOptions::SnapshotAccess { file } => {
            child(file, names, refs)
        }
        DriverOptions::Blkdebug { image, .. } => child(image, names, refs),
        DriverOptions::Qcow2 { file, backing, .. } => {
            child(file, names, refs);
            if let Some(Some(b)) = backing {
                child(b, names, refs);
            }
        }
        DriverOptions::CopyBeforeWrite {
            file,
            target,
            bitmap,
            ..
        } => {
            child(file, names, refs);
            child(target, names, refs);
            if let Some((n, _)) = bitmap {
                refs.push(n.clone());
            }
        }
    }
}
