//! Re-wiring a graph in use: roots (exports, devices, jobs), drained sections, replacing a
//! node everywhere it is used, inserting a filter above a node and removing it, swapping a
//! child.
//!
//! Every change runs in a drained section: the roots that reach the nodes involved stop
//! taking new requests and wait for those in flight, the change is made and its permissions
//! checked (undone if refused), then the roots resume. A request therefore runs entirely on
//! the wiring it started on, and a writer's requests stay in order.

use std::sync::{Arc, Weak};

use super::Graph;
use crate::edge::Root;
use crate::error::{Error, Result};
use crate::graph::NodeOptions;
use crate::node::NodeRef;

/// Is `target` `from` or below it?
pub(crate) fn reaches(from: &NodeRef, target: &NodeRef) -> bool {
    Arc::ptr_eq(from, target) || from.children().iter().any(|c| reaches(&c.node, target))
}

/// A drained section in force (see [`Graph::drain_begin`]); the roots resume when it is
/// dropped.
pub struct Drained {
    roots: Vec<Arc<Root>>,
}

impl Drained {
    /// Stop `roots` taking new requests and wait for those in flight (blocking; it needs no
    /// graph lock).
    pub(super) fn quiesce(roots: Vec<Arc<Root>>) -> Drained {
        for r in &roots {
            r.quiesce();
        }
        Drained { roots }
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        for r in &self.roots {
            r.resume();
        }
    }
}

/// One swap made by a re-wiring, so it can be undone.
enum Swap {
    Edge(Arc<crate::edge::ChildEdge>, NodeRef),
    Root(Arc<Root>, NodeRef),
}

impl Graph {
    /// Put a node built outside the graph (e.g. over [`crate::testing::TestDriver`]) in the
    /// name table. Its children must already be in the graph.
    pub fn add_node_ref(&mut self, node: NodeRef) -> Result<()> {
        if self.get(node.name()).is_some() {
            return Err(Error::generic(format!(
                "Duplicate nodes with node-name='{}'",
                node.name()
            )));
        }
        self.nodes.push(node);
        if let Err(e) = self.refresh_perms() {
            self.nodes.pop();
            return Err(e);
        }
        Ok(())
    }

    /// The live roots.
    pub fn roots(&self) -> Vec<Arc<Root>> {
        self.roots.iter().filter_map(Weak::upgrade).collect()
    }

    /// Register a root and take its permissions; refused (and not registered) on conflict.
    pub fn attach_root(&mut self, root: &Arc<Root>) -> Result<()> {
        // A node a blockdev-del is closing is gone for new users (a command that looked it
        // up before the delete detached it).
        let node = root.node();
        if self.is_closing(&node) && !self.nodes.iter().any(|n| Arc::ptr_eq(n, &node)) {
            let name = node.name();
            return Err(Error::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            )));
        }
        self.roots.retain(|r| r.strong_count() > 0);
        self.roots.push(Arc::downgrade(root));
        if let Err(e) = self.refresh_perms() {
            self.detach_root(root);
            return Err(e);
        }
        Ok(())
    }

    /// Unregister a root (its permissions go).
    pub fn detach_root(&mut self, root: &Arc<Root>) {
        self.roots
            .retain(|r| r.strong_count() > 0 && !std::ptr::eq(r.as_ptr(), Arc::as_ptr(root)));
        if let Err(e) = self.refresh_perms() {
            tracing::warn!(error = %e, "lowering permissions after a root went away");
        }
    }

    /// The first backend (export, device, job's main node) pointing at `node`: what makes
    /// QEMU say "Node X is in use". A job's hold on its target is not one.
    pub fn root_on(&self, node: &NodeRef) -> Option<Arc<Root>> {
        self.roots()
            .into_iter()
            .find(|r| r.follows() && Arc::ptr_eq(&r.node(), node))
    }

    /// Begin a drained section over `nodes`: every root that reaches one of them stops taking
    /// new requests, and this waits for those in flight. The section lasts until the returned
    /// guard is dropped, and sections nest: a drained section (a re-wiring) started while an
    /// outer one holds the same roots finds them idle and does not wait. Blocking.
    pub fn drain_begin(&self, nodes: &[NodeRef]) -> Drained {
        Drained::quiesce(self.roots_reaching(nodes))
    }

    /// The live roots that reach one of `nodes`.
    pub(super) fn roots_reaching(&self, nodes: &[NodeRef]) -> Vec<Arc<Root>> {
        self.roots()
            .into_iter()
            .filter(|r| {
                let top = r.node();
                nodes.iter().any(|n| reaches(&top, n))
            })
            .collect()
    }

    /// Run `f` with every root that reaches one of `nodes` quiesced (no new requests, none in
    /// flight); see [`Graph::drain_begin`]. Blocking.
    pub fn drained<T>(&mut self, nodes: &[NodeRef], f: impl FnOnce(&mut Graph) -> T) -> T {
        let section = self.drain_begin(nodes);
        let out = f(self);
        drop(section);
        out
    }

    /// Make everything that uses `from` (parent nodes' edges, roots) use `to` instead,
    /// except edges from `to` itself or from below it (which would make a loop).
    pub fn replace_node(&mut self, from: &NodeRef, to: &NodeRef) -> Result<()> {
        if Arc::ptr_eq(from, to) {
            return Ok(());
        }
        let involved = [from.clone(), to.clone()];
        self.drained(&involved, |g| {
            let mut swaps = Vec::new();
            for p in &g.nodes {
                if reaches(to, p) {
                    continue;
                }
                for e in p.edges() {
                    if Arc::ptr_eq(&e.node(), from) {
                        swaps.push(Swap::Edge(e.clone(), e.set(to.clone())));
                    }
                }
            }
            for r in g.roots() {
                if r.follows() && Arc::ptr_eq(&r.node(), from) {
                    swaps.push(Swap::Root(r.clone(), r.set_node(to.clone())));
                }
            }
            g.commit_or_undo(swaps)
        })
    }

    fn commit_or_undo(&self, swaps: Vec<Swap>) -> Result<()> {
        let checked = self.refresh_perms();
        if checked.is_err() {
            for s in swaps.into_iter().rev() {
                match s {
                    Swap::Edge(e, old) => {
                        e.set(old);
                    }
                    Swap::Root(r, old) => {
                        r.set_node(old);
                    }
                }
            }
            if let Err(e) = self.refresh_perms() {
                tracing::warn!(error = %e, "restoring permissions after a refused re-wiring");
            }
        }
        checked
    }

    /// Open a filter node from `opts` (its child must name `below`) and put it above `below`:
    /// every parent and root of `below` now uses the filter. All or nothing.
    pub fn insert_above(&mut self, below: &NodeRef, opts: &NodeOptions) -> Result<NodeRef> {
        let filter = self.add(opts)?;
        if !filter
            .children()
            .iter()
            .any(|c| Arc::ptr_eq(&c.node, below))
        {
            let _ = self.del(filter.name());
            return Err(Error::generic(format!(
                "'{}' is not a parent of '{}'",
                filter.name(),
                below.name()
            )));
        }
        if let Err(e) = self.replace_node(below, &filter) {
            let _ = self.del(filter.name());
            return Err(e);
        }
        Ok(filter)
    }

    /// Take a filter out: everything that used it uses its (only) child again, and the filter
    /// node is closed.
    pub fn remove_filter(&mut self, filter: &NodeRef) -> Result<()> {
        let children = filter.children();
        let [only] = children.as_slice() else {
            return Err(Error::generic(format!(
                "'{}' is not a filter with one child",
                filter.name()
            )));
        };
        let below = only.node.clone();
        self.replace_node(filter, &below)?;
        self.del(filter.name())
    }

    /// Point `parent`'s child edge `role` at `child`. All or nothing.
    pub fn set_child(&mut self, parent: &NodeRef, role: &str, child: &NodeRef) -> Result<()> {
        let Some(edge) = parent.edges().iter().find(|e| e.role() == role).cloned() else {
            return Err(Error::generic(format!(
                "Node '{}' has no child '{role}'",
                parent.name()
            )));
        };
        if reaches(child, parent) {
            return Err(Error::generic(format!(
                "Making '{}' a child of '{}' would create a cycle",
                child.name(),
                parent.name()
            )));
        }
        let involved = [parent.clone(), edge.node(), child.clone()];
        self.drained(&involved, |g| {
            let old = edge.set(child.clone());
            g.commit_or_undo(vec![Swap::Edge(edge, old)])
        })
    }
}
