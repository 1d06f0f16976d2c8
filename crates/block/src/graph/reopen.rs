//! blockdev-reopen: changing a node between read-only and read-write, and changing its
//! `file` / `backing` child to another node (or `backing` to none), as QEMU 10 allows.
//!
//! Going read-write: the permissions first (the node's edges to its children now ask for
//! write; refused with QEMU's conflict text or a lock failure, changing nothing), then the
//! driver reopens for writing. Going read-only: persistent bitmaps are stored and the image
//! flushed while write access is still held, then the driver gives it up and the locks drop.
//! The daemon does all of it without holding the graph lock over disk I/O: the nodes are
//! marked as being reopened and drained, stored and flushed ([`Graph::prepare_reopen`]), and
//! the drivers' switch is staged around the lock ([`Graph::reopen_switch`], `switch.rs`).
//! [`Graph::reopen_read_only`] does the same under the caller's lock.
//! Inline (auto-named) `file` children follow their parent, as QEMU's inherited options do.
//!
//! A child change is a re-wiring in a drained section with the permissions checked (a lock
//! that cannot be had refuses it, changing nothing). Like QEMU, blockd does not check that a
//! new `file` holds the same image: that is the caller's promise (the use is putting a filter
//! between a format and its file).

use std::sync::{Arc, Mutex, MutexGuard};

use super::close::{shutting_down, wait_changed};
use super::drain::Drained;
use super::rewire::reaches;
use super::switch::{commit_chain, prepare_chain, run_after};
use super::{ChildRef, DriverOptions, Graph, NodeOptions};
use crate::edge::ChildEdge;
use crate::error::{Error, Result};
use crate::node::NodeRef;
use crate::perm::Perm;

/// A child a reopen changes: `role` of the node becomes `to` (`None`: no backing).
#[derive(Clone)]
pub struct ChildChange {
    /// "file" or "backing".
    pub role: &'static str,
    /// The new child.
    pub to: Option<NodeRef>,
}

/// Nodes a reopen has marked, drained and (those going read-only) stored and flushed without
/// the graph lock ([`Graph::prepare_reopen`]). Until it is given back with
/// [`Graph::reopen_done`] (under the lock, after the switches) the roots that reach them stay
/// drained and they are marked as being reopened: `blockdev-del` and other reopens of them
/// wait.
#[must_use = "give it back with Graph::reopen_done"]
pub struct ReadOnlyPrep {
    pub(super) nodes: Vec<NodeRef>,
    _drained: Option<Drained>,
}

pub(super) fn lock(g: &Mutex<Graph>) -> MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

/// `node` and its inline `file` children that are not `read_only` yet: what a switch to
/// `read_only` changes.
pub(super) fn ro_chain(node: &NodeRef, read_only: bool) -> Vec<NodeRef> {
    let mut chain = vec![node.clone()];
    while let Some(c) = chain.last().and_then(|n| n.child("file")) {
        if !c.auto_named() {
            break;
        }
        chain.push(c);
    }
    chain.retain(|n| n.read_only() != read_only);
    chain
}

/// Store a node's persistent bitmaps and flush it: what must be done before it gives up
/// write access.
pub(super) fn store_and_flush(n: &NodeRef) -> Result<()> {
    n.store_bitmaps(false)?;
    n.driver()
        .flush()
        .map_err(|e| Error::io("Could not flush before reopening", &e))
}

/// The drivers of `chain` switched to read-write: the nodes say so (after
/// [`Graph::take_write`]).
pub(super) fn writable_now(chain: &[NodeRef]) {
    for n in chain {
        n.set_read_only_flag(false);
        n.set_becoming_writable(false);
        n.set_bitmaps_read_only(false);
    }
}

/// What QEMU can change on reopen but blockd cannot yet: refused rather than ignored.
fn not_yet(option: &str) -> Error {
    Error::generic(format!(
        "blockd cannot change the option '{option}' in blockdev-reopen"
    ))
}

impl Graph {
    /// A reopen's `file` or `backing` option against the current child: unchanged (`None`),
    /// a change to make, or QEMU's refusal.
    fn child_option(
        &self,
        node: &NodeRef,
        role: &'static str,
        new: Option<&ChildRef>,
    ) -> Result<Option<ChildChange>> {
        let current = node.child(role);
        let Some(new) = new else {
            return Ok((current.is_some()).then_some(ChildChange { role, to: None }));
        };
        let to = match new {
            ChildRef::Name(n) => self.get(n).ok_or_else(|| {
                Error::generic(format!("Cannot find device='' nor node-name='{n}'"))
            })?,
            ChildRef::Inline(_) => {
                return Err(Error::generic(format!(
                    "Cannot change the option '{role}.driver'"
                )))
            }
        };
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &to)) {
            return Ok(None);
        }
        if reaches(&to, node) {
            return Err(Error::generic(format!(
                "Making '{}' a {role} child of '{}' would create a cycle",
                to.name(),
                node.name()
            )));
        }
        Ok(Some(ChildChange { role, to: Some(to) }))
    }

    /// Check a reopen's options for `node` against how it is open: every option other than
    /// `read-only`, `file` and `backing` must be unchanged. Returns the child changes to make.
    /// QEMU's refusals keep QEMU's text ("Cannot change the option 'filename'"); changes QEMU
    /// makes but blockd cannot yet are refused as such.
    pub fn check_reopen(&self, node: &NodeRef, new: &NodeOptions) -> Result<Vec<ChildChange>> {
        let mut changes = Vec::new();
        let f = node.flags();
        let nf = &new.flags;
        if nf.detect_zeroes != f.detect_zeroes {
            return Err(not_yet("detect-zeroes"));
        }
        if nf.discard_unmap != f.discard_unmap {
            return Err(not_yet("discard"));
        }
        if nf.cache_direct != f.cache_direct {
            return Err(not_yet("cache.direct"));
        }
        if nf.cache_no_flush != f.cache_no_flush {
            return Err(not_yet("cache.no-flush"));
        }
        let Some(old) = node.opened_with() else {
            return Ok(changes);
        };
        let cannot = |o: &str| Error::generic(format!("Cannot change the option '{o}'"));
        match (old, &new.driver) {
            (
                DriverOptions::File { filename, locking },
                DriverOptions::File {
                    filename: nfilename,
                    locking: nlocking,
                },
            ) => {
                if filename != nfilename {
                    return Err(cannot("filename"));
                }
                if locking != nlocking {
                    return Err(cannot("locking"));
                }
            }
            (
                DriverOptions::Raw { offset, size, .. },
                DriverOptions::Raw {
                    file,
                    offset: noffset,
                    size: nsize,
                },
            ) => {
                changes.extend(self.child_option(node, "file", Some(file))?);
                if offset.unwrap_or(0) != noffset.unwrap_or(0) {
                    return Err(not_yet("offset"));
                }
                if size != nsize {
                    return Err(not_yet("size"));
                }
            }
            (
                DriverOptions::Null { size, read_zeroes },
                DriverOptions::Null {
                    size: s,
                    read_zeroes: z,
                },
            ) => {
                if size != s {
                    return Err(not_yet("size"));
                }
                if read_zeroes != z {
                    return Err(not_yet("read-zeroes"));
                }
            }
            (
                DriverOptions::Qcow2 { cache: old, .. },
                DriverOptions::Qcow2 {
                    file,
                    backing,
                    cache,
                },
            ) => {
                if cache != old {
                    return Err(not_yet("cache-size"));
                }
                // QEMU looks at `backing` first, then `file`.
                match backing {
                    // Absent means "no backing" to blockdev-reopen, which QEMU refuses for a
                    // node that has one (or names one in its image).
                    None => {
                        // Under the graph lock: no stat of the file (`facts`) here.
                        let named = node.driver().named_backing().is_some();
                        if node.child("backing").is_some() || named {
                            return Err(Error::generic(format!(
                                "backing is missing for '{}'",
                                node.name()
                            )));
                        }
                    }
                    Some(b) => changes.extend(self.child_option(node, "backing", b.as_ref())?),
                }
                changes.extend(self.child_option(node, "file", Some(file))?);
            }
            _ => {}
        }
        Ok(changes)
    }

    /// Make one child change of a reopen (drained, permissions checked, undone if refused);
    /// returns the change that undoes it.
    pub fn reopen_child(&mut self, node: &NodeRef, change: &ChildChange) -> Result<ChildChange> {
        let role = change.role;
        let undo = ChildChange {
            role,
            to: node.child(role),
        };
        let edge = node.edges().into_iter().find(|e| e.role() == role);
        match (&change.to, edge) {
            (Some(to), Some(_)) => self.set_child(node, role, to)?,
            (Some(to), None) => {
                let involved = [node.clone(), to.clone()];
                self.drained(&involved, |g| {
                    let edge = ChildEdge::new(role, to.clone());
                    node.push_edge(edge.clone());
                    node.driver().attach_backing(Some(edge.clone()));
                    if let Err(e) = g.refresh_perms() {
                        node.driver().attach_backing(None);
                        node.remove_edge(&edge);
                        if let Err(e) = g.refresh_perms() {
                            tracing::warn!(error = %e, "restoring permissions after a refused reopen");
                        }
                        return Err(e);
                    }
                    Ok(())
                })?
            }
            (None, Some(edge)) => {
                let involved = [node.clone(), edge.node()];
                self.drained(&involved, |g| {
                    node.driver().attach_backing(None);
                    node.remove_edge(&edge);
                    g.refresh_perms()
                })?
            }
            (None, None) => {}
        }
        Ok(undo)
    }

    /// After a reopen succeeded: take out the auto-named children it left without any user
    /// (a backing file opened from the image's header that was replaced), as QEMU drops them.
    /// The caller closes them without the graph lock (see [`super::Detached`]).
    pub fn close_orphans(&mut self, old: &[NodeRef]) -> super::Detached {
        let mut out = Vec::new();
        for n in old {
            if self.is_orphan(n) {
                out.extend(self.detach_tree(n).take());
            } else if self.staged.pinned(n) {
                // An open in progress names it: closed when that open ends, if still unused.
                self.staged.defer(n);
            }
        }
        let _ = self.refresh_perms();
        super::Detached::of(out)
    }

    /// An auto-named node in the graph that nothing uses any more.
    pub(super) fn is_orphan(&self, n: &NodeRef) -> bool {
        n.auto_named()
            && self.nodes.iter().any(|x| Arc::ptr_eq(x, n))
            && self.parents(n).is_empty()
            && !self.staged.pinned(n)
            && n.first_user().is_none()
            && !self.roots().iter().any(|r| Arc::ptr_eq(&r.node(), n))
    }

    /// A read-only reopen is storing and flushing `node` (see [`ReadOnlyPrep`]).
    pub(super) fn is_reopening(&self, node: &NodeRef) -> bool {
        self.reopening.iter().any(|(n, _)| Arc::ptr_eq(n, node))
    }

    /// Prepared by [`Graph::prepare_read_only`] and neither written nor its bitmaps changed
    /// since: nothing left to store or flush.
    pub(super) fn prepared_unchanged(&self, node: &NodeRef) -> bool {
        self.reopening
            .iter()
            .any(|(n, seen)| Arc::ptr_eq(n, node) && *seen == node.changes())
    }

    /// A node marked by [`Graph::prepare_reopen`] was stored and flushed when its change
    /// count was `seen`.
    pub(super) fn set_prepared(&mut self, node: &NodeRef, seen: u64) {
        if let Some(r) = self
            .reopening
            .iter_mut()
            .find(|(r, _)| Arc::ptr_eq(r, node))
        {
            r.1 = seen;
        }
    }

    /// The disk I/O of switching `nodes` to read-only, without holding `graph`'s lock: mark
    /// them (and their inline `file` children) as being reopened, drain the roots that reach
    /// them, then store their persistent bitmaps and flush them. The switch itself is
    /// [`Graph::reopen_read_only`] under the lock, which then finds nothing to store or
    /// flush (unless something wrote meanwhile, which the drain keeps to direct I/O);
    /// give the result back with [`Graph::reopen_done`]. A failure changes nothing (what was
    /// stored and flushed is the image's current state) and gives everything back.
    /// Waits while a delete or another read-only reopen of one of them is in progress; a node
    /// no longer in the graph gives QEMU's text for an unknown node.
    pub fn prepare_read_only(graph: &Mutex<Graph>, nodes: &[NodeRef]) -> Result<ReadOnlyPrep> {
        let switches: Vec<(NodeRef, bool)> = nodes.iter().map(|n| (n.clone(), true)).collect();
        Graph::prepare_reopen(graph, &switches, false)
    }

    /// [`Graph::prepare_read_only`] for a reopen's whole list: `(node, read_only)`. Nodes
    /// going read-only are stored and flushed as there; the nodes a switch to read-write
    /// changes are marked and drained as well (their switch is [`Graph::reopen_switch`]),
    /// and with `mark_all` so is every node of the list (a reopen that changes its children
    /// only, and releases the graph lock between its entries).
    pub fn prepare_reopen(
        graph: &Mutex<Graph>,
        switches: &[(NodeRef, bool)],
        mark_all: bool,
    ) -> Result<ReadOnlyPrep> {
        let nodes: Vec<NodeRef> = switches.iter().map(|(n, _)| n.clone()).collect();
        let mut chain: Vec<NodeRef> = Vec::new();
        let mut to_flush: Vec<NodeRef> = Vec::new();
        for (node, ro) in switches {
            let mut these = ro_chain(node, *ro);
            if *ro {
                to_flush.extend(these.iter().cloned());
            }
            if mark_all && !these.iter().any(|c| Arc::ptr_eq(c, node)) {
                these.push(node.clone());
            }
            for n in these {
                if !chain.iter().any(|c| Arc::ptr_eq(c, &n)) {
                    chain.push(n);
                }
            }
        }
        if chain.is_empty() {
            return Ok(ReadOnlyPrep {
                nodes: chain,
                _drained: None,
            });
        }
        let section = {
            let mut g = lock(graph);
            loop {
                if g.shut {
                    return Err(shutting_down());
                }
                if let Some(gone) = nodes
                    .iter()
                    .find(|n| !g.nodes.iter().any(|x| Arc::ptr_eq(x, n)))
                {
                    return Err(Error::generic(format!(
                        "Failed to find node with node-name='{}'",
                        gone.name()
                    )));
                }
                let busy = chain
                    .iter()
                    .any(|n| g.is_reopening(n) || g.deleting.iter().any(|d| Arc::ptr_eq(d, n)));
                if !busy {
                    break;
                }
                g = wait_changed(g);
            }
            // Marked with a count no node has yet: "changed" until the flush is done.
            g.reopening
                .extend(chain.iter().map(|n| (n.clone(), u64::MAX)));
            g.drain_stop(&chain)
        };
        // Requests in flight through the roots finish without the lock.
        drop(section.wait_unlocked(graph));
        let prep = ReadOnlyPrep {
            nodes: chain,
            _drained: Some(section),
        };
        let mut seen = Vec::new();
        for n in &prep.nodes {
            // Requests that reach it other than through a root (a job's, qemu-io) end first.
            n.wait_idle();
            if !to_flush.iter().any(|f| Arc::ptr_eq(f, n)) {
                continue;
            }
            let before = n.changes();
            if let Err(e) = store_and_flush(n) {
                lock(graph).reopen_done(prep);
                return Err(e);
            }
            seen.push((n.clone(), before));
        }
        let mut g = lock(graph);
        for (n, c) in seen {
            if let Some(r) = g.reopening.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &n)) {
                r.1 = c;
            }
        }
        Ok(prep)
    }

    /// A read-only reopen prepared by [`Graph::prepare_read_only`] is over (switched or
    /// refused): the nodes stop being marked and the drained roots resume.
    pub fn reopen_done(&mut self, prep: ReadOnlyPrep) {
        self.reopening
            .retain(|(n, _)| !prep.nodes.iter().any(|p| Arc::ptr_eq(p, n)));
        self.notify_changed();
        drop(prep);
    }

    /// Switch `node` to read-only with the store and flush outside `graph`'s lock
    /// ([`Graph::prepare_read_only`], [`Graph::reopen_read_only`], [`Graph::reopen_done`]).
    pub fn reopen_read_only_staged(graph: &Mutex<Graph>, node: &NodeRef) -> Result<()> {
        Graph::reopen_staged(graph, node, true)
    }

    /// Switch `node` to `read_only` with no disk I/O under `graph`'s lock:
    /// [`Graph::prepare_reopen`], [`Graph::reopen_switch`], [`Graph::reopen_done`].
    pub fn reopen_staged(graph: &Mutex<Graph>, node: &NodeRef, read_only: bool) -> Result<()> {
        let prep = Graph::prepare_reopen(graph, &[(node.clone(), read_only)], false)?;
        let r = Graph::reopen_switch(graph, &prep, node, read_only);
        lock(graph).reopen_done(prep);
        r
    }

    /// Switch `node` (and its inline file child) to `read_only`, all or nothing. Going
    /// read-only stores bitmaps and flushes under the caller's lock unless
    /// [`Graph::prepare_read_only`] did so and nothing changed since.
    pub fn reopen_read_only(&mut self, node: &NodeRef, read_only: bool) -> Result<()> {
        let chain = ro_chain(node, read_only);
        if chain.is_empty() {
            return Ok(());
        }
        self.drained(&chain, |g| {
            if read_only {
                g.make_read_only(&chain)
            } else {
                g.make_writable(&chain)
            }
        })
    }

    fn make_writable(&mut self, chain: &[NodeRef]) -> Result<()> {
        self.take_write(chain)?;
        // Children first: a format reopens for writing over a writable file.
        let staged = match prepare_chain(chain.iter().rev(), false, &chain[0]) {
            Ok(s) => s,
            Err(e) => {
                self.undo_take_write(chain);
                return Err(e);
            }
        };
        run_after(commit_chain(staged));
        writable_now(chain);
        Ok(())
    }

    /// The permission part of a switch to read-write: the nodes ask their children for write
    /// and the write locks are taken; refused (QEMU's conflict text or a lock failure) with
    /// everything as before. The top node stays read-only to its users (refusing writers)
    /// until [`writable_now`]; its inline `file` children, written by it alone, are writable
    /// at once (the format's switch writes through them).
    pub(super) fn take_write(&mut self, chain: &[NodeRef]) -> Result<()> {
        for (i, n) in chain.iter().enumerate() {
            if i == 0 {
                n.set_becoming_writable(true);
            } else {
                n.set_read_only_flag(false);
            }
        }
        if let Err(e) = self.refresh_perms() {
            self.undo_take_write(chain);
            return Err(e);
        }
        Ok(())
    }

    /// Undo [`Graph::take_write`].
    pub(super) fn undo_take_write(&self, chain: &[NodeRef]) {
        for n in chain {
            n.set_becoming_writable(false);
            n.set_read_only_flag(true);
        }
        if let Err(e) = self.refresh_perms() {
            tracing::warn!(error = %e, "restoring permissions after a refused reopen");
        }
    }

    /// A switch of `top` to read-only is refused while something writes through it, even
    /// unchanged data (QEMU refuses both with this text).
    pub(super) fn refuse_writers(&self, top: &NodeRef) -> Result<()> {
        let needs_write = self
            .edges_into(top)
            .iter()
            .any(|e| e.perm.contains(Perm::WRITE) || e.perm.contains(Perm::WRITE_UNCHANGED))
            || top.legacy_writers() > 0;
        if needs_write {
            return Err(Error::generic(format!(
                "Read-only block node '{}' cannot support read-write users",
                top.name()
            )));
        }
        Ok(())
    }

    fn make_read_only(&mut self, chain: &[NodeRef]) -> Result<()> {
        self.refuse_writers(&chain[0])?;
        // Parents first: the format writes its bitmaps back while it can still write.
        for n in chain {
            if !self.prepared_unchanged(n) {
                store_and_flush(n)?;
            }
            let staged = prepare_chain(std::iter::once(n), true, n)?;
            run_after(commit_chain(staged));
            n.set_read_only_flag(true);
            n.set_bitmaps_read_only(true);
        }
        self.refresh_perms()
    }
}
