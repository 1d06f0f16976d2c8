//! Drained sections: the roots (exports, devices, jobs) that reach some nodes stop taking new
//! requests, the requests in flight finish, a change is made, the roots resume.
//!
//! A section is two steps: stopping the roots ([`Graph::drain_stop`]: a counter in each root,
//! never blocks, done under the graph lock) and waiting for their requests in flight, which
//! may take as long as a slow disk. The staged forms ([`Graph::drain_begin_staged`],
//! [`Graph::drained_staged`]) wait WITHOUT the graph lock, so other graph commands answer
//! meanwhile; see the invariant in [`super::rewire`] for why nothing slips in.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::rewire::reaches;
use super::Graph;
use crate::edge::Root;
use crate::node::NodeRef;

/// A section as the graph records it while it lives (see [`Graph::drain_stop`]).
pub(super) struct Section {
    nodes: Vec<NodeRef>,
    state: Mutex<SectionState>,
}

#[derive(Default)]
struct SectionState {
    /// The roots this section stopped (each once): resumed when it ends.
    roots: Vec<Arc<Root>>,
    /// The section has ended: it stops nothing more.
    ended: bool,
}

impl Section {
    fn state(&self) -> MutexGuard<'_, SectionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop `root` for this section, unless it already did or has ended.
    fn take(&self, root: &Arc<Root>) {
        let mut s = self.state();
        if s.ended || s.roots.iter().any(|r| Arc::ptr_eq(r, root)) {
            return;
        }
        root.stop();
        s.roots.push(root.clone());
    }

    fn roots(&self) -> Vec<Arc<Root>> {
        self.state().roots.clone()
    }
}

/// A drained section in force; its roots resume when it is dropped (no graph lock needed).
#[must_use = "the section ends when this is dropped"]
pub struct Drained {
    section: Arc<Section>,
}

impl Drained {
    /// The nodes it drains.
    pub fn nodes(&self) -> &[NodeRef] {
        &self.section.nodes
    }

    /// Wait for the requests in flight on its roots (blocking; call it without the lock).
    fn wait(&self) {
        for r in self.section.roots() {
            r.wait_idle();
        }
    }

    fn idle(&self) -> bool {
        self.section.roots().iter().all(|r| r.in_flight() == 0)
    }

    /// Wait for the requests in flight without `graph`'s lock, then take the lock; returned
    /// only once, under it, every root reaching the section's nodes is stopped by it and idle
    /// (a root that came to reach them while the lock was free is stopped and waited for too).
    pub fn wait_unlocked<'a>(&self, graph: &'a Mutex<Graph>) -> MutexGuard<'a, Graph> {
        loop {
            self.wait();
            let g = lock(graph);
            g.catch_up(&self.section);
            if self.idle() {
                return g;
            }
        }
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        let roots = {
            let mut s = self.section.state();
            s.ended = true;
            std::mem::take(&mut s.roots)
        };
        for r in roots {
            r.resume();
        }
    }
}

fn lock(g: &Mutex<Graph>) -> MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

impl Graph {
    /// Start a drained section over `nodes` without waiting: every root that reaches one of
    /// them stops taking new requests, and so does every root that comes to reach one while
    /// the section lives (attached or re-wired; see [`super::rewire`]). Requests already in
    /// flight go on: wait for them with [`Drained::wait_unlocked`] (or use
    /// [`Graph::drain_begin`] when holding the lock over the wait is acceptable).
    pub fn drain_stop(&mut self, nodes: &[NodeRef]) -> Drained {
        self.sections.retain(|s| s.strong_count() > 0);
        let section = Arc::new(Section {
            nodes: nodes.to_vec(),
            state: Mutex::new(SectionState::default()),
        });
        for r in self.roots_reaching(nodes) {
            section.take(&r);
        }
        self.sections.push(Arc::downgrade(&section));
        Drained { section }
    }

    /// Stop, for the live sections, the roots that now reach their nodes. Every change of
    /// the wiring ends with [`Graph::refresh_perms`], which calls this.
    pub(super) fn sections_catch_up(&self) {
        for s in self.sections.iter().filter_map(Weak::upgrade) {
            self.catch_up(&s);
        }
    }

    fn catch_up(&self, s: &Section) {
        if s.state().ended {
            return;
        }
        for r in self.roots_reaching(&s.nodes) {
            s.take(&r);
        }
    }

    /// Begin a drained section over `nodes` and wait, under the caller's lock, for the
    /// requests in flight. The section lasts until the returned guard is dropped, and
    /// sections nest: a drained section (a re-wiring) started while an outer one holds the
    /// same roots finds them idle and does not wait. Blocking; the daemon uses
    /// [`Graph::drain_begin_staged`].
    pub fn drain_begin(&mut self, nodes: &[NodeRef]) -> Drained {
        let d = self.drain_stop(nodes);
        d.wait();
        d
    }

    /// [`Graph::drain_begin`] without holding `graph`'s lock over the wait: lock, stop, unlock,
    /// wait, lock again to catch up with roots attached or re-wired meanwhile, unlock. Do not
    /// call it with the lock held.
    pub fn drain_begin_staged(graph: &Mutex<Graph>, nodes: &[NodeRef]) -> Drained {
        let d = lock(graph).drain_stop(nodes);
        drop(d.wait_unlocked(graph));
        d
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
    /// flight); see [`Graph::drain_begin`]. Blocking, under the caller's lock.
    pub fn drained<T>(&mut self, nodes: &[NodeRef], f: impl FnOnce(&mut Graph) -> T) -> T {
        let section = self.drain_begin(nodes);
        let out = f(self);
        drop(section);
        out
    }

    /// Run `f` under `graph`'s lock in a drained section over `nodes` whose wait for the
    /// requests in flight ran without the lock: lock, stop new requests, unlock, wait, lock,
    /// `f`, unlock, resume. `f` must check again what it relies on (the nodes may have left
    /// the graph, shutdown may have begun while the lock was free); the drained sections it
    /// opens itself over the same nodes find the roots idle. Do not call it with the lock
    /// held.
    pub fn drained_staged<T>(
        graph: &Mutex<Graph>,
        nodes: &[NodeRef],
        f: impl FnOnce(&mut Graph) -> T,
    ) -> T {
        let section = lock(graph).drain_stop(nodes);
        let mut g = section.wait_unlocked(graph);
        let out = f(&mut g);
        drop(g);
        drop(section);
        out
    }
}
