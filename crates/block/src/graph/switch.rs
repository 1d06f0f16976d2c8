//! blockdev-reopen's switch between read-only and read-write with no disk I/O under the
//! graph lock ([`Graph::reopen_switch`]). The nodes are marked as being reopened and their
//! roots drained by [`Graph::prepare_reopen`] first (a `blockdev-del` or another reopen of
//! them waits); then each switch is three steps:
//!
//! - under the lock, what is decided: going read-write, the nodes ask their children for
//!   write and the write locks are taken (permissions before bytes), while they still refuse
//!   writers of their own; going read-only, the refusal while something writes through them;
//! - without it, the drivers' I/O ([`crate::driver::Driver::prepare_switch`]): going
//!   read-only, the bitmaps stored and the image flushed (unless the prepare did and nothing
//!   wrote since), then the image opened again read-only; going read-write, opened again for
//!   writing and its bitmaps flagged in use;
//! - under the lock again, the swap ([`crate::driver::Driver::commit_switch`], in memory
//!   only), the flags and, going read-only, the locks given up; what the swap replaced is
//!   closed after the lock.
//!
//! A failure before the swap undoes the drivers' part ([`crate::driver::Driver::abort_switch`])
//! and the permissions: the node is as it was. Only when something wrote to a node going
//! read-only after its flush (a direct write, which the drain does not stop) is the switch
//! done the old way, under the lock, so that nothing written is lost.

use std::sync::{Arc, Mutex};

use super::reopen::{lock, ro_chain, store_and_flush, writable_now, ReadOnlyPrep};
use super::rewire::reaches;
use super::Graph;
use crate::driver::{AfterSwitch, StagedSwitch};
use crate::error::Result;
use crate::node::NodeRef;

/// A driver's prepared switch: staged (swapped in at the commit), or swapped in already
/// (holding the state it replaced, for an abort to put back).
pub(super) enum Step {
    Staged(StagedSwitch),
    Swapped(StagedSwitch),
}

/// Drivers' switches prepared for a chain, in the order they were prepared.
pub(super) type Staged = Vec<(NodeRef, Option<Step>)>;

/// Prepare the switch of each node in `order`; a failure gives back what was prepared.
/// Going read-write, every node but `top` (the inline `file` children, already writable to
/// their parent alone) is swapped in as soon as it is prepared: the parent's prepare that
/// follows writes through the child's new descriptor (its header, its bitmaps' in-use flags).
pub(super) fn prepare_chain<'a>(
    order: impl Iterator<Item = &'a NodeRef>,
    read_only: bool,
    top: &NodeRef,
) -> Result<Staged> {
    let mut done: Staged = Vec::new();
    for n in order {
        match n.driver().prepare_switch(read_only) {
            Ok(s) => {
                let step = s.map(|s| {
                    if read_only || Arc::ptr_eq(n, top) {
                        return Step::Staged(s);
                    }
                    match n.driver().swap_switch(s) {
                        Ok(old) => Step::Swapped(old),
                        Err(s) => Step::Staged(s),
                    }
                });
                done.push((n.clone(), step));
            }
            Err(e) => {
                abort_chain(done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Give up prepared switches, newest first (those swapped in already are swapped back).
pub(super) fn abort_chain(staged: Staged) {
    for (n, s) in staged.into_iter().rev() {
        match s {
            Some(Step::Staged(s)) => n.driver().abort_switch(s),
            Some(Step::Swapped(old)) => match n.driver().swap_switch(old) {
                Ok(new) => n.driver().abort_switch(new),
                Err(_) => tracing::warn!(node = n.name(), "a reopen could not put a node back"),
            },
            None => {}
        }
    }
}

/// Make prepared switches current (in memory only); returns what to release after the lock.
pub(super) fn commit_chain(staged: Staged) -> Vec<AfterSwitch> {
    staged
        .into_iter()
        .filter_map(|(n, s)| match s? {
            Step::Staged(s) => n.driver().commit_switch(s),
            Step::Swapped(old) => Some(Box::new(move || drop(old)) as AfterSwitch),
        })
        .collect()
}

/// Release what committed switches replaced.
pub(super) fn run_after(after: Vec<AfterSwitch>) {
    for f in after {
        f();
    }
}

fn marked(prep: &ReadOnlyPrep, chain: &[NodeRef]) -> bool {
    chain
        .iter()
        .all(|n| prep.nodes.iter().any(|p| Arc::ptr_eq(p, n)))
}

impl Graph {
    /// Switch `node` (and its inline `file` children) to `read_only`, all or nothing, with
    /// the disk I/O outside `graph`'s lock (see the module documentation). The caller holds
    /// no graph lock and `prep` ([`Graph::prepare_reopen`]) marks the nodes the switch
    /// changes; nodes it does not mark are switched under the lock
    /// ([`Graph::reopen_read_only`]). Errors and texts are those of
    /// [`Graph::reopen_read_only`].
    pub fn reopen_switch(
        graph: &Mutex<Graph>,
        prep: &ReadOnlyPrep,
        node: &NodeRef,
        read_only: bool,
    ) -> Result<()> {
        if read_only {
            switch_to_read_only(graph, prep, node)
        } else {
            switch_to_writable(graph, prep, node)
        }
    }
}

/// The order in which a reopen's list of switches `(node, read_only)` is made, as indices
/// into it: QEMU reopens the whole list at once, blockd node by node, so those going
/// read-only go first, parents before the nodes below them (a parent stops asking for write
/// before its child refuses writers), then those going read-write, children first (a
/// format's switch writes through a child that is writable already). Otherwise list order.
pub fn switch_order(switches: &[(NodeRef, bool)]) -> Vec<usize> {
    let mut order = Vec::with_capacity(switches.len());
    for read_only in [true, false] {
        let mut left: Vec<usize> = (0..switches.len())
            .filter(|&i| switches[i].1 == read_only)
            .collect();
        while !left.is_empty() {
            // The first one that no other left must precede: read-only, none of the others
            // is above it; read-write, none is below it.
            let must_wait = |i: usize| {
                left.iter().any(|&j| {
                    let (a, b) = (&switches[i].0, &switches[j].0);
                    !Arc::ptr_eq(a, b)
                        && if read_only {
                            reaches(b, a)
                        } else {
                            reaches(a, b)
                        }
                })
            };
            // A cycle cannot be (the graph is acyclic); list order should one appear.
            let pos = (0..left.len()).find(|&k| !must_wait(left[k])).unwrap_or(0);
            order.push(left.remove(pos));
        }
    }
    order
}

fn switch_to_writable(graph: &Mutex<Graph>, prep: &ReadOnlyPrep, node: &NodeRef) -> Result<()> {
    let chain = {
        let mut g = lock(graph);
        let chain = ro_chain(node, false);
        if chain.is_empty() {
            return Ok(());
        }
        if !marked(prep, &chain) {
            return g.reopen_read_only(node, false);
        }
        // The write locks first: nothing is written before they are held.
        g.take_write(&chain)?;
        chain
    };
    // Children first: a format reopens for writing over a writable file.
    let staged = match prepare_chain(chain.iter().rev(), false, &chain[0]) {
        Ok(s) => s,
        Err(e) => {
            lock(graph).undo_take_write(&chain);
            return Err(e);
        }
    };
    let after = {
        let _g = lock(graph);
        let after = commit_chain(staged);
        writable_now(&chain);
        after
    };
    run_after(after);
    Ok(())
}

fn switch_to_read_only(graph: &Mutex<Graph>, prep: &ReadOnlyPrep, node: &NodeRef) -> Result<()> {
    let chain = {
        let mut g = lock(graph);
        let chain = ro_chain(node, true);
        if chain.is_empty() {
            return Ok(());
        }
        if !marked(prep, &chain) {
            return g.reopen_read_only(node, true);
        }
        g.refuse_writers(&chain[0])?;
        chain
    };
    // Parents first: the format stores its bitmaps and flushes while it can still write.
    for n in &chain {
        let fresh = lock(graph).prepared_unchanged(n);
        if !fresh {
            n.wait_idle();
            let before = n.changes();
            store_and_flush(n)?;
            lock(graph).set_prepared(n, before);
        }
    }
    let staged = prepare_chain(chain.iter(), true, &chain[0])?;
    let g = lock(graph);
    // Something may have started writing through it meanwhile: refused as if it had come
    // first.
    if let Err(e) = g.refuse_writers(&chain[0]) {
        drop(g);
        abort_chain(staged);
        return Err(e);
    }
    if !chain.iter().all(|n| g.prepared_unchanged(n)) {
        // Written since the flush: stored and flushed again, and switched, under the lock.
        drop(g);
        abort_chain(staged);
        return lock(graph).reopen_read_only(node, true);
    }
    let after = commit_chain(staged);
    for n in &chain {
        n.set_read_only_flag(true);
        n.set_bitmaps_read_only(true);
    }
    let r = g.refresh_perms();
    drop(g);
    run_after(after);
    r
}
