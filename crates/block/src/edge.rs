//! Edges whose target can be swapped while the graph is in use.
//!
//! - [`ChildEdge`]: a parent node's child ("file", "backing"). Drivers read the target per
//!   request, so re-wiring (`Graph::replace_node`, `Graph::set_child`) takes effect for the
//!   next request.
//! - [`Root`]: what an export, a device or a job holds instead of a node (QEMU's BlockBackend).
//!   Requests enter through [`Root::begin`], which pins the node the root points at for the
//!   request's whole life (an in-flight request finishes on the wiring it started on) and is
//!   held back while the root is quiesced (drained sections).

use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::node::{next_seq, NodeRef};
use crate::perm::Perm;

/// A parent's child link with a swappable target.
pub struct ChildEdge {
    role: &'static str,
    node: RwLock<NodeRef>,
}

impl ChildEdge {
    /// A new edge.
    pub fn new(role: &'static str, node: NodeRef) -> Arc<ChildEdge> {
        Arc::new(ChildEdge {
            role,
            node: RwLock::new(node),
        })
    }

    /// Role name ("file", "backing").
    pub fn role(&self) -> &'static str {
        self.role
    }

    /// The current target.
    pub fn node(&self) -> NodeRef {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Point at `node`; returns the old target.
    pub(crate) fn set(&self, node: NodeRef) -> NodeRef {
        std::mem::replace(
            &mut *self.node.write().unwrap_or_else(|p| p.into_inner()),
            node,
        )
    }
}

#[derive(Default)]
struct Gate {
    /// Nested quiesce sections in force.
    quiesced: usize,
    /// Requests between `begin` and the drop of their [`InFlight`].
    in_flight: usize,
}

/// What kind of user a [`Root`] is (QEMU's BlockBackend versus a job's own child edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// An export, a device, a job's main node: follows re-wiring (`Graph::replace_node`
    /// moves it) and makes the node "in use" for `blockdev-del`.
    Backend,
    /// A job's hold on a node it works on (a backup's target): stays at its node when the
    /// graph is re-wired, as QEMU's job children do, and only takes permissions and drains.
    Job,
}

/// A user's handle on the graph (export, device, job): a swappable node plus permissions.
pub struct Root {
    /// Identity in "in use by" messages and removal: "export 'e'".
    pub who: String,
    /// In permission conflicts: "an unnamed block device".
    pub desc: String,
    kind: RootKind,
    perms: Mutex<(Perm, Perm)>,
    seq: u64,
    node: RwLock<NodeRef>,
    gate: Mutex<Gate>,
    changed: Condvar,
}

/// One request through a [`Root`]: the node it started on, and a place in the root's count.
pub struct InFlight {
    root: Arc<Root>,
    node: NodeRef,
}

impl std::ops::Deref for InFlight {
    type Target = NodeRef;
    fn deref(&self) -> &NodeRef {
        &self.node
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut g = self.root.lock_gate();
        g.in_flight -= 1;
        self.root.changed.notify_all();
    }
}

impl Root {
    /// A root over `node` needing `perm` and sharing `shared`. Register it with
    /// `Graph::attach_root`, which checks the permissions.
    pub fn new(who: String, desc: String, node: NodeRef, perm: Perm, shared: Perm) -> Arc<Root> {
        Root::with_kind(RootKind::Backend, who, desc, node, perm, shared)
    }

    /// A root of the given kind (see [`RootKind`]).
    pub fn with_kind(
        kind: RootKind,
        who: String,
        desc: String,
        node: NodeRef,
        perm: Perm,
        shared: Perm,
    ) -> Arc<Root> {
        Arc::new(Root {
            who,
            desc,
            kind,
            perms: Mutex::new((perm, shared)),
            seq: next_seq(),
            node: RwLock::new(node),
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
        })
    }

    fn lock_gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node it points at now (for queries; I/O goes through [`Root::begin`]).
    pub fn node(&self) -> NodeRef {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Backend or job edge.
    pub fn kind(&self) -> RootKind {
        self.kind
    }

    /// Does it follow re-wiring (a backend)?
    pub fn follows(&self) -> bool {
        self.kind == RootKind::Backend
    }

    /// (perm, shared).
    pub fn perms(&self) -> (Perm, Perm) {
        *self.perms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change what it needs and shares; call `Graph::refresh_perms` after (and put the old
    /// values back if that fails).
    pub fn set_perms(&self, perm: Perm, shared: Perm) {
        *self.perms.lock().unwrap_or_else(|p| p.into_inner()) = (perm, shared);
    }

    /// Attachment order.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Start a request: waits while the root is quiesced, then pins the current node.
    /// Blocking: call from a thread that may block (the I/O paths run on blocking threads).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        let mut g = self.lock_gate();
        while g.quiesced > 0 {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.in_flight += 1;
        drop(g);
        InFlight {
            root: self.clone(),
            node: self.node(),
        }
    }

    /// Stop new requests and wait for the ones in flight ([`Root::stop`], then
    /// [`Root::wait_idle`]).
    pub fn quiesce(&self) {
        self.stop();
        self.wait_idle();
    }

    /// Stop new requests (they wait in [`Root::begin`]) until [`Root::resume`]; does not
    /// wait for those in flight, so it may be called under the graph lock.
    pub fn stop(&self) {
        self.lock_gate().quiesced += 1;
    }

    /// Wait until no request is in flight (blocking: without the graph lock, after
    /// [`Root::stop`], as a request in flight may take as long as its disk).
    pub fn wait_idle(&self) {
        let mut g = self.lock_gate();
        while g.in_flight > 0 {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// End one [`Root::stop`] (or [`Root::quiesce`]).
    pub fn resume(&self) {
        let mut g = self.lock_gate();
        g.quiesced = g.quiesced.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock_gate().in_flight
    }

    /// Point at `node`; returns the old one.
    pub(crate) fn set_node(&self, node: NodeRef) -> NodeRef {
        std::mem::replace(
            &mut *self.node.write().unwrap_or_else(|p| p.into_inner()),
            node,
        )
    }
}
