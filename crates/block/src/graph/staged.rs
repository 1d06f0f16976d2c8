//! A staged `blockdev-add`: the graph lock is held to check and reserve, and again to insert,
//! but never over the disk I/O of the open (files, locks, image headers, bitmaps, fsync).
//!
//! 1. Under the lock: every node-name of the tree must be free (neither a node nor reserved by
//!    another staged open) and every node the tree names must exist. The names are reserved
//!    and the named nodes pinned (`blockdev-del` refuses them). Anything else — a taken name,
//!    an unknown child, no root name — runs the whole open under the lock, so its error is
//!    exactly the one the plain open gives.
//! 2. Without the lock: the tree opens in a scratch graph, children first, locks before bytes
//!    ([`Graph::add`]'s rules). An edge onto an existing node takes its permissions in the
//!    daemon's graph (briefly locked), so a concurrent change sees and respects it.
//! 3. Under the lock: the new nodes join the graph and the reservations go; on failure the
//!    scratch graph has already closed what it opened and the pending edges are dropped.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{close_node, ChildRef, DriverOptions, Graph, NodeOptions, PendingEdge};
use crate::error::Result;
use crate::node::NodeRef;

/// Staged opens in progress, in the daemon's graph.
#[derive(Default)]
pub(super) struct Reservations {
    items: Vec<Reservation>,
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
}

impl Scratch {
    pub(super) fn external(&self, name: &str) -> Option<NodeRef> {
        self.external.iter().find(|n| n.name() == name).cloned()
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
        let mut scratch = {
            let mut g = lock(graph);
            match g.reserve(opts, graph) {
                Some(s) => s,
                None => return g.add(opts),
            }
        };
        let id = scratch.owner();
        let opened = scratch.add_tree(opts);
        let new = std::mem::take(&mut scratch.nodes);
        let mut g = lock(graph);
        g.pending.retain(|p| p.owner != id);
        g.staged.items.retain(|r| r.id != id);
        let node = match opened {
            Ok(node) => node,
            Err(e) => {
                // The edges onto existing nodes are gone: give their locks back.
                if let Err(e) = g.refresh_perms() {
                    tracing::warn!(error = %e, "restoring permissions after a failed open");
                }
                return Err(e);
            }
        };
        let before = g.nodes.len();
        g.nodes.extend(new.iter().cloned());
        if let Err(e) = g.refresh_perms() {
            // Cannot happen while the pending edges held the same permissions; undo anyway.
            g.nodes.truncate(before);
            if let Err(e) = g.refresh_perms() {
                tracing::warn!(error = %e, "restoring permissions after a failed insert");
            }
            drop(g);
            for n in new.iter().rev() {
                if let Err(e) = close_node(n) {
                    tracing::warn!(node = n.name(), error = %e, "closing after a failed insert");
                }
            }
            return Err(e);
        }
        Ok(node)
    }

    /// Reserve the tree's names and pin the nodes it names; `None` when the open must run
    /// under the lock instead (a name taken, a child missing, no root name).
    fn reserve(&mut self, opts: &NodeOptions, outer: &Arc<Mutex<Graph>>) -> Option<Graph> {
        opts.node_name.as_ref()?;
        let (mut names, mut refs) = (Vec::new(), Vec::new());
        collect(opts, &mut names, &mut refs);
        let mut seen = HashSet::new();
        for n in &names {
            if self.name_taken(n) || !seen.insert(n.as_str()) {
                return None;
            }
        }
        let mut pins: Vec<NodeRef> = Vec::new();
        for r in &refs {
            let node = self.get(r)?;
            if !pins.iter().any(|p| Arc::ptr_eq(p, &node)) {
                pins.push(node);
            }
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.staged.items.push(Reservation {
            id,
            names,
            pins: pins.clone(),
        });
        Some(Graph {
            events: self.events.clone(),
            counter: self.counter.clone(),
            scratch: Some(Scratch {
                id,
                external: pins,
                outer: outer.clone(),
            }),
            ..Graph::default()
        })
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
