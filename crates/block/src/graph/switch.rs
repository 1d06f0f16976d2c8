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
use super::Graph;
use crate::driver::{AfterSwitch, StagedSwitch};
use crate::error::Result;
use crate::node::NodeRef;

/// Drivers' switches prepared for a chain, in the order they were prepared.
pub(super) type Staged = Vec<(NodeRef, Option<StagedSwitch>)>;

/// Prepare the switch of each node in `order`; a failure gives back what was prepared.
pub(super) fn prepare_chain<'a>(
    order: impl Iterator<Item = &'a NodeRef>,
    read_only: bool,
) -> Result<Staged> {
    let mut done: Staged = Vec::new();
    for n in order {
        match n.driver().prepare_switch(read_only) {
            Ok(s) => done.push((n.clone(), s)),
            Err(e) => {
                abort_chain(done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Give up prepared switches, newest first.
pub(super) fn abort_chain(staged: Staged) {
    for (n, s) in staged.into_iter().rev() {
        if let Some(s) = s {
            n.driver().abort_switch(s);
        }
    }
}

/// Make prepared switches current (in memory only); returns what to release after the lock.
pub(super) fn commit_chain(staged: Staged) -> Vec<AfterSwitch> {
    staged
        .into_iter()
        .filter_map(|(n, s)| s.and_then(|s| n.driver().commit_switch(s)))
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
    let staged = match prepare_chain(chain.iter().rev(), false) {
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
    let staged = prepare_chain(chain.iter(), true)?;
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
