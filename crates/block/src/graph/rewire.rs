//! Re-wiring a graph in use: roots (exports, devices, jobs), drained sections, replacing a
//! node everywhere it is used, inserting a filter above a node and removing it, swapping a
//! child.
//!
//! Every change runs in a drained section: the roots that reach the nodes involved stop
//! taking new requests and wait for those in flight, the change is made and its permissions
//! checked (undone if refused), then the roots resume. A request therefore runs entirely on
//! the wiring it started on, and a writer's requests stay in order.
//!
//! The daemon waits for the requests in flight WITHOUT the graph lock
//! ([`Graph::drained_staged`], [`Graph::drain_begin_staged`] in `drain.rs`): a request held up
//! by a slow disk delays the re-wiring that waits for it, never the other graph commands.
//! Nothing slips in while the lock is free because of this invariant:
//!
//! **While a drained section lives, every live root that reaches one of its nodes (through the
//! wiring as it is under the lock) is stopped by it.** Its start stops the roots reaching its
//! nodes ([`Graph::drain_stop`]); the graph records the section, and every change that can make
//! another root reach them — [`Graph::attach_root`], a re-wiring, a reopen's child change, a
//! snapshot's overlay — ends with [`Graph::refresh_perms`], which stops those roots for every
//! live section before anything can send a request through them (a root attached during the
//! wait starts stopped). After its wait the section re-takes the lock and makes its change
//! only once all of its roots are idle (it waits again, without the lock, for any it caught
//! up with that still had a request in flight). Sections nest (a root's stop is a count), so
//! a change made under the lock inside a section, in its own in-lock section, finds the roots
//! idle and does not wait. Requests that reach a node other than through a root (a job's own
//! I/O, qemu-io) are not held by a section; callers that need them finished wait on the
//! node's tracker (`NodeRef::wait_idle`) without the lock.

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

    /// `node` is in the name table; else QEMU's text for a name that finds nothing. What a
    /// command looked up without holding the lock may have been deleted since (every node
    /// with users is in the table: internal ones like a backup's filter too).
    pub(crate) fn check_present(&self, node: &NodeRef) -> Result<()> {
        if self.contains(node) {
            return Ok(());
        }
        let name = node.name();
        Err(Error::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        )))
    }

    /// The live roots.
    pub fn roots(&self) -> Vec<Arc<Root>> {
        self.roots.iter().filter_map(Weak::upgrade).collect()
    }

    /// Register a root and take its permissions; refused (and not registered) on conflict.
    pub fn attach_root(&mut self, root: &Arc<Root>) -> Result<()> {
        // Only a node in the name table takes new users: one a blockdev-del took out (and
        // perhaps already closed) after the caller looked it up is gone, as if never there.
        self.check_present(&root.node())?;
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
