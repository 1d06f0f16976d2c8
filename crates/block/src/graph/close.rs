//! Closing nodes without holding the graph lock over disk I/O.
//!
//! A close is two-phase. Under the lock (in a drained section) the nodes leave the name
//! table and become [`Detached`]: they are listed as closing, so their names stay taken (a
//! concurrent `blockdev-add` of the same name waits until the close is done) and their edges
//! keep their permissions (a format closing over a named file still holds that file's write
//! lock while it writes its last metadata). Without the lock, their bitmaps are stored and
//! their drivers flushed and closed; then, briefly locked again, they stop being listed and
//! the permissions of what they used drop.
//!
//! `blockdev-del` ([`Graph::del_staged`]) stores and flushes first, with the node still in the
//! graph and marked as being deleted, and only then detaches it (re-checking that it is still
//! unused): a failed store or flush leaves the node exactly where it was, and once detached
//! nothing can fail the delete any more (a close error is logged, as QEMU does).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{close_node, Graph};
use crate::error::{Error, Result};
use crate::node::NodeRef;

/// A wait for a close, delete or reopen in progress wakes when one ends (the graph's
/// condvar); this bounds it anyway, so that a missed signal costs latency, not a hang.
const WAKE_AT_LEAST: Duration = Duration::from_millis(200);

/// Nodes taken out of the graph that still have to be closed (see the module documentation).
/// Close them with [`Detached::close`] off the lock, then [`Graph::closed`] under it; or
/// with [`Graph::close_detached`], which does both.
#[must_use = "detached nodes stay listed as closing until closed"]
pub struct Detached {
    nodes: Vec<NodeRef>,
}

impl Detached {
    /// Nothing to close.
    pub fn none() -> Detached {
        Detached { nodes: Vec::new() }
    }

    pub(super) fn of(nodes: Vec<NodeRef>) -> Detached {
        Detached { nodes }
    }

    /// Give up the nodes (to put them in another [`Detached`]).
    pub(super) fn take(mut self) -> Vec<NodeRef> {
        std::mem::take(&mut self.nodes)
    }

    /// The nodes, parents first.
    pub fn nodes(&self) -> &[NodeRef] {
        &self.nodes
    }

    /// Store their bitmaps and close their drivers, parents first. Disk I/O: call it without
    /// the graph lock. Errors are logged: the nodes are gone from the graph either way.
    pub fn close(&self) {
        for n in &self.nodes {
            if let Err(e) = close_node(n) {
                tracing::warn!(node = n.name(), error = %e, "closing a node failed");
            }
        }
    }
}

fn lock(g: &Mutex<Graph>) -> MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

/// Release the lock until a close, delete, reopen or staged open ends (see
/// [`Graph::notify_changed`]), then take it again. Callers re-check what they wait for.
pub(super) fn wait_changed(g: MutexGuard<'_, Graph>) -> MutexGuard<'_, Graph> {
    let cv = g.changed.clone();
    match cv.wait_timeout(g, WAKE_AT_LEAST) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

impl Graph {
    /// Wake whatever waits for a close, delete, reopen or staged open to end.
    pub(super) fn notify_changed(&self) {
        self.changed.notify_all();
    }

    /// A node of this name is being closed.
    pub(super) fn closing_name(&self, name: &str) -> bool {
        self.closing.iter().any(|n| n.name() == name)
    }

    /// `node` is being closed (detached) or deleted (storing and flushing before detaching).
    pub fn is_closing(&self, node: &NodeRef) -> bool {
        self.closing
            .iter()
            .chain(self.deleting.iter())
            .any(|n| Arc::ptr_eq(n, node))
    }

    /// A node being closed has an edge onto `node`: it may still write to it.
    fn used_by_close(&self, node: &NodeRef) -> bool {
        self.closing
            .iter()
            .any(|c| c.children().iter().any(|e| Arc::ptr_eq(&e.node, node)))
    }

    /// Nodes being closed, whose edges still count for permissions.
    pub(super) fn closing_nodes(&self) -> &[NodeRef] {
        &self.closing
    }

    /// Take `node` and then every inline (auto-named) child left without users out of the
    /// name table; they stay listed as closing until [`Graph::closed`].
    pub(super) fn detach_tree(&mut self, node: &NodeRef) -> Detached {
        let mut out = Vec::new();
        self.detach_into(node, &mut out);
        self.closing.extend(out.iter().cloned());
        Detached { nodes: out }
    }

    fn detach_into(&mut self, node: &NodeRef, out: &mut Vec<NodeRef>) {
        self.nodes.retain(|n| !Arc::ptr_eq(n, node));
        out.push(node.clone());
        for c in node.children() {
            if c.node.auto_named()
                && self.nodes.iter().any(|n| Arc::ptr_eq(n, &c.node))
                && self.parents(&c.node).is_empty()
                && c.node.first_user().is_none()
                && !out.iter().any(|o| Arc::ptr_eq(o, &c.node))
            {
                if self.staged.pinned(&c.node) {
                    // An open in progress names it: closed when that open ends.
                    self.staged.defer(&c.node);
                } else {
                    self.detach_into(&c.node, out);
                }
            }
        }
    }

    /// Detached nodes are closed: they stop being listed and the permissions they held on
    /// their children go.
    pub fn closed(&mut self, d: Detached) {
        if d.nodes.is_empty() {
            return;
        }
        self.closing
            .retain(|c| !d.nodes.iter().any(|n| Arc::ptr_eq(n, c)));
        if let Err(e) = self.refresh_perms() {
            tracing::warn!(error = %e, "lowering permissions after a close");
        }
        self.notify_changed();
    }

    /// Close detached nodes under the lock the caller holds (for callers that have only the
    /// graph, not its lock: tests, the image tool).
    pub fn close_detached_now(&mut self, d: Detached) {
        d.close();
        self.closed(d);
    }

    /// Close detached nodes without holding `graph`'s lock over the I/O.
    pub fn close_detached(graph: &Mutex<Graph>, d: Detached) {
        if d.nodes.is_empty() {
            return;
        }
        d.close();
        lock(graph).closed(d);
    }

    /// blockdev-del's checks, in QEMU's order: the node to delete, or why not.
    fn check_del(&self, name: &str) -> Result<NodeRef> {
        let Some(node) = self.get(name) else {
            return Err(Error::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if node.auto_named() {
            return Err(Error::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        // QEMU's order: users with a BlockBackend (exports, devices) first, then op blockers
        // (jobs: users named "block job: ..."; a backing child is blocked by its overlay),
        // then any other parent.
        // A backup's source is refused as a parent would be (its filter is one), with the
        // text blockd's own pre-check gives: the same whether the delete came before the
        // backup's start or (waiting on its hold, see `Graph::hold_node`) during it.
        let source = crate::backup::SOURCE_USER;
        let users: Vec<String> = node.users().into_iter().map(|u| u.who).collect();
        // A blockdev-add in progress names it as a child.
        if self.staged.pinned(&node)
            || self.root_on(&node).is_some()
            || users
                .iter()
                .any(|u| !u.starts_with("block job") && u != source)
        {
            return Err(Error::generic(format!("Node {name} is in use")));
        }
        if let Some(job) = users.iter().find(|u| u.starts_with("block job")) {
            return Err(Error::generic(format!(
                "Node '{name}' is busy: block device is in use by {job}"
            )));
        }
        if users.iter().any(|u| u == source) {
            return Err(Error::generic(format!("Block device {name} is in use")));
        }
        let parents = self.parents(&node);
        if let Some((overlay, _)) = parents.iter().find(|(_, role)| *role == "backing") {
            return Err(Error::generic(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                overlay.name()
            )));
        }
        if !parents.is_empty() {
            return Err(Error::generic(format!("Block device {name} is in use")));
        }
        Ok(node)
    }

    /// Take out a node a command opened and no longer wants (a refused or undone snapshot
    /// overlay), as `blockdev-del` would, to be closed without the lock. `None` (and a warning)
    /// when something started using it meanwhile: then it stays.
    pub(super) fn detach_unused(&mut self, node: &NodeRef) -> Option<Detached> {
        match self.check_del(node.name()) {
            Ok(n) if Arc::ptr_eq(&n, node) => Some(self.detach_checked(node)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(node = node.name(), error = %e, "an unused node stays");
                None
            }
        }
    }

    /// Detach a node that passed [`Graph::check_del`], in a drained section: roots that
    /// reach it stop (none can, by the checks, but the section is the rule for graph
    /// changes). It therefore never waits under the lock: no root reaches a node without a
    /// parent, a backend on it or a job using it, which the checks refuse.
    fn detach_checked(&mut self, node: &NodeRef) -> Detached {
        self.drained(std::slice::from_ref(node), |g| g.detach_tree(node))
    }

    /// Delete a root node (blockdev-del) under the caller's lock, refusing while anything
    /// uses it; the close's I/O runs under that lock too. The daemon uses
    /// [`Graph::del_staged`].
    pub fn del(&mut self, name: &str) -> Result<()> {
        let node = self.check_del(name)?;
        // Requests that reach it some other way (a job's direct I/O, qemu-io) finish first.
        node.wait_idle();
        prepare_close(&node, name)?;
        let d = self.detach_checked(&node);
        self.close_detached_now(d);
        Ok(())
    }

    /// [`Graph::del`] without holding `graph`'s lock over the store, flush and close (see the
    /// module documentation for the order). Other graph commands run meanwhile; one that
    /// starts using the node before it is detached makes the delete fail as if it had come
    /// first. Returns once the node is closed (its file closed and its locks released).
    pub fn del_staged(graph: &Mutex<Graph>, name: &str) -> Result<()> {
        let node = loop {
            let mut g = lock(graph);
            if g.shut {
                return Err(shutting_down());
            }
            // Another delete or a read-only reopen of this node, or a close that still
            // writes to it: wait for it.
            let busy = g.get(name).is_some_and(|n| {
                g.deleting.iter().any(|d| Arc::ptr_eq(d, &n))
                    || g.is_reopening(&n)
                    || g.held.iter().any(|h| Arc::ptr_eq(h, &n))
                    || g.used_by_close(&n)
            });
            if !busy {
                let node = g.check_del(name)?;
                g.deleting.push(node.clone());
                break node;
            }
            drop(wait_changed(g));
        };
        // Requests that reach the node some other way (a job's direct I/O, qemu-io) finish,
        // then what can fail at close (storing persistent bitmaps, flushing) is done with the
        // node still in place: a failed blockdev-del changes nothing. (QSD deletes the node
        // anyway and loses the bitmaps, "Lost persistent bitmaps during inactivation".)
        node.wait_idle();
        let prepared = prepare_close(&node, name);
        let d = {
            let mut g = lock(graph);
            g.deleting.retain(|d| !Arc::ptr_eq(d, &node));
            g.notify_changed();
            prepared?;
            // Something may have started using it meanwhile (an export, a parent, a job):
            // then that came first and the delete is refused, with the texts it would get.
            match g.check_del(name) {
                Ok(n) if Arc::ptr_eq(&n, &node) => {}
                Ok(_) => return Err(Error::generic(format!("Node {name} is in use"))),
                Err(e) => return Err(e),
            }
            g.detach_checked(&node)
        };
        Graph::close_detached(graph, d);
        Ok(())
    }

    /// Shutdown: from now on adds and deletes are refused. Once no open or close is in
    /// progress, every node leaves the graph (newest first, so parents before children) to
    /// be closed by the caller; `None` while one still is (call again).
    pub fn begin_shutdown(&mut self) -> Option<Detached> {
        self.shut = true;
        if self.opening()
            || !self.closing.is_empty()
            || !self.deleting.is_empty()
            || !self.reopening.is_empty()
            || !self.held.is_empty()
        {
            return None;
        }
        let mut nodes = std::mem::take(&mut self.nodes);
        nodes.reverse();
        self.closing.extend(nodes.iter().cloned());
        Some(Detached { nodes })
    }

    /// Shutdown, blocking: [`Graph::begin_shutdown`] until it gives the nodes, waiting
    /// meanwhile (without the lock) on the graph's condvar, which the end of every open,
    /// close, delete, reopen and hold signals. Call it off the reactor, without the lock.
    pub fn shutdown_wait(graph: &Mutex<Graph>) -> Detached {
        let mut g = lock(graph);
        loop {
            if let Some(d) = g.begin_shutdown() {
                return d;
            }
            g = wait_changed(g);
        }
    }

    /// The graph is shutting down (see [`Graph::begin_shutdown`]).
    pub fn is_shut(&self) -> bool {
        self.shut
    }
}

/// A node a command looked up and acts on without the graph lock (bitmap commands): while
/// it lives a `blockdev-del` of the node waits, so the command acts on a node still in the
/// graph, never on one being closed. Derefs to the node; dropping it lets the delete go on.
pub struct NodeHold {
    graph: Arc<Mutex<Graph>>,
    node: NodeRef,
}

impl std::ops::Deref for NodeHold {
    type Target = NodeRef;
    fn deref(&self) -> &NodeRef {
        &self.node
    }
}

impl Drop for NodeHold {
    fn drop(&mut self) {
        let mut g = lock(&self.graph);
        if let Some(i) = g.held.iter().position(|h| Arc::ptr_eq(h, &self.node)) {
            g.held.swap_remove(i);
        }
        g.notify_changed();
    }
}

impl Graph {
    /// Hold `node`, looked up earlier, for a command (see [`NodeHold`]). A delete of it in
    /// progress is waited for; `None` when the node is no longer in the graph (deleted or
    /// being closed meanwhile): the command answers as if it had never existed.
    /// Do not call it, nor drop the hold, with `graph`'s lock held.
    pub fn hold_node(graph: &Arc<Mutex<Graph>>, node: &NodeRef) -> Option<NodeHold> {
        let mut g = lock(graph);
        while g.deleting.iter().any(|d| Arc::ptr_eq(d, node)) {
            g = wait_changed(g);
        }
        if !g.contains(node) {
            return None;
        }
        g.held.push(node.clone());
        Some(NodeHold {
            graph: graph.clone(),
            node: node.clone(),
        })
    }
}

/// What can fail at close, done before a node is detached: store its persistent bitmaps and
/// flush it.
fn prepare_close(node: &NodeRef, name: &str) -> Result<()> {
    node.store_bitmaps(false)?;
    node.flush()
        .map_err(|e| Error::io(format!("Flushing node '{name}'"), &e))
}

/// The error of an add or delete that starts after shutdown began.
pub(super) fn shutting_down() -> Error {
    Error::generic("blockd is shutting down")
}

/// Wait (without the lock) for the closes of these names to end; returns the lock once none
/// of `names` is closing.
pub(super) fn wait_names<'a>(graph: &'a Mutex<Graph>, names: &[String]) -> MutexGuard<'a, Graph> {
    let mut g = lock(graph);
    while names.iter().any(|n| g.closing_name(n)) {
        g = wait_changed(g);
    }
    g
}
