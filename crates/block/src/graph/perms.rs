//! Permissions over the whole graph: every edge's needs, conflicts, and the locks that follow.
//!
//! Edges are the children of named nodes, the edges of nodes still being opened
//! ([`PendingEdge`]), and users (exports, jobs). A node's needs are computed from its parents'
//! (recursively, parents first); every node's parents are checked pairwise; then each node's
//! driver is told its union (host files relock). A failure at any node puts back what was
//! applied before, so a refused change leaves every lock as it was.

use std::collections::HashMap;
use std::sync::Arc;

use super::Graph;
use crate::error::{Error, Result};
use crate::node::NodeRef;
use crate::perm::{check_parents, child_needs, Needs, ParentEdge, Perm, Role};

/// An edge of a node that is being opened (its `Node` does not exist yet): it already holds
/// its permissions, so the child's locks are taken before the parent's driver reads it.
#[derive(Clone)]
pub(crate) struct PendingEdge {
    /// Name of the parent being opened.
    pub parent: String,
    /// The parent will be read-write.
    pub writable: bool,
    /// Child name at the parent ("file", "backing").
    pub name: &'static str,
    /// How needs pass down.
    pub role: Role,
    /// The child.
    pub child: NodeRef,
    /// Attachment order.
    pub seq: u64,
    /// The staged open it belongs to (0: an open run under the graph lock).
    pub owner: u64,
}

/// One edge into a node: its source (a node, or none for users and pending parents) and how it
/// derives its needs.
struct InEdge {
    edge: ParentEdge,
    /// Parent node and role: needs follow the parent's. None: fixed needs in `edge`.
    from: Option<(NodeRef, Role)>,
}

/// Edges into each node, keyed by the node's address.
type EdgeMap = HashMap<usize, Vec<InEdge>>;

fn key(n: &NodeRef) -> usize {
    Arc::as_ptr(n) as usize
}

impl Graph {
    /// Every edge into every node, keyed by the child.
    fn in_edges(&self) -> HashMap<usize, Vec<InEdge>> {
        let mut map: HashMap<usize, Vec<InEdge>> = HashMap::new();
        // Nodes being closed keep their edges' permissions until they are closed.
        for n in self.nodes.iter().chain(self.closing_nodes()) {
            for c in n.children() {
                map.entry(key(&c.node)).or_default().push(InEdge {
                    edge: ParentEdge {
                        who: format!("node '{}'", n.name()),
                        role: c.role.to_string(),
                        perm: Perm::NONE,
                        shared: Perm::ALL,
                        seq: n.seq(),
                    },
                    from: Some((n.clone(), n.driver().child_role(c.role))),
                });
            }
            for u in n.users() {
                map.entry(key(n)).or_default().push(InEdge {
                    edge: ParentEdge {
                        who: u.desc,
                        role: u.role,
                        perm: u.perm,
                        shared: u.shared,
                        seq: u.seq,
                    },
                    from: None,
                });
            }
            if n.legacy_writers() > 0 {
                map.entry(key(n)).or_default().push(InEdge {
                    edge: ParentEdge {
                        who: "an unnamed block device".to_string(),
                        role: "root".to_string(),
                        perm: Perm::CONSISTENT_READ | Perm::WRITE,
                        shared: Perm::ALL & !Perm::RESIZE,
                        seq: 0,
                    },
                    from: None,
                });
            }
        }
        for r in self.roots() {
            let (perm, shared) = r.perms();
            map.entry(key(&r.node())).or_default().push(InEdge {
                edge: ParentEdge {
                    who: r.desc.clone(),
                    role: "root".to_string(),
                    perm,
                    shared,
                    seq: r.seq(),
                },
                from: None,
            });
        }
        for p in &self.pending {
            // The node being opened has no parents yet.
            let needs = child_needs(p.role, p.writable, false, Needs::default());
            map.entry(key(&p.child)).or_default().push(InEdge {
                edge: ParentEdge {
                    who: format!("node '{}'", p.parent),
                    role: p.name.to_string(),
                    perm: needs.perm,
                    shared: needs.shared,
                    seq: p.seq,
                },
                from: None,
            });
        }
        map
    }

    /// What every node's edges need now, checked for conflicts (QEMU's message for the first).
    /// Write permission on a read-only node (one not going read-write) is refused with QEMU's
    /// text, as its permission check does: a writer over it could only fail.
    pub fn compute_needs(&self) -> Result<Vec<(NodeRef, Needs)>> {
        let (out, edges) = self.resolve_all();
        for (n, needs) in &out {
            if needs.perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) && !n.asks_write() {
                return Err(Error::generic("Block node is read-only"));
            }
        }
        for n in &self.nodes {
            if let Some(list) = edges.get(&key(n)) {
                let mut parents: Vec<ParentEdge> = list.iter().map(|e| e.edge.clone()).collect();
                parents.sort_by_key(|e| std::cmp::Reverse(e.seq));
                check_parents(n.name(), &parents).map_err(Error::generic)?;
            }
        }
        Ok(out)
    }

    /// The edges into `node` with their current needs, newest first.
    pub fn edges_into(&self, node: &NodeRef) -> Vec<ParentEdge> {
        let (_, edges) = self.resolve_all();
        let mut list: Vec<ParentEdge> = edges
            .get(&key(node))
            .map(|l| l.iter().map(|e| e.edge.clone()).collect())
            .unwrap_or_default();
        list.sort_by_key(|e| std::cmp::Reverse(e.seq));
        list
    }

    /// Every node's needs (unchecked) and every edge with its needs filled in.
    fn resolve_all(&self) -> (Vec<(NodeRef, Needs)>, EdgeMap) {
        let mut edges = self.in_edges();
        let mut memo: HashMap<usize, Needs> = HashMap::new();
        // Parents before children: resolve each node's needs from its parents' (a DAG).
        fn resolve(
            n: &NodeRef,
            edges: &mut HashMap<usize, Vec<InEdge>>,
            memo: &mut HashMap<usize, Needs>,
        ) -> Needs {
            if let Some(n) = memo.get(&key(n)) {
                return *n;
            }
            let mut list = edges.remove(&key(n)).unwrap_or_default();
            let mut needs = Needs::default();
            for e in &mut list {
                if let Some((parent, role)) = &e.from {
                    let pn = resolve(parent, edges, memo);
                    let used = edges.get(&key(parent)).is_some_and(|l| !l.is_empty());
                    let cn = child_needs(*role, parent.asks_write(), used, pn);
                    e.edge.perm = cn.perm;
                    e.edge.shared = cn.shared;
                }
                needs.add(e.edge.perm, e.edge.shared);
            }
            edges.insert(key(n), list);
            memo.insert(key(n), needs);
            needs
        }
        let mut out = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let needs = resolve(n, &mut edges, &mut memo);
            out.push((n.clone(), needs));
        }
        (out, edges)
    }

    /// Make every node hold exactly what its edges need (image locks follow), or change
    /// nothing and say why.
    pub fn refresh_perms(&self) -> Result<()> {
        // The wiring may have changed: live drained sections stop the roots that now reach
        // their nodes (see `rewire`'s invariant), whatever the permissions say.
        self.sections_catch_up();
        let wanted = self.compute_needs()?;
        let mut done: Vec<(NodeRef, Needs)> = Vec::new();
        for (node, needs) in wanted {
            let old = node.applied_needs();
            if old == needs {
                continue;
            }
            if let Err(e) = node.apply_needs(needs) {
                for (n, before) in done.into_iter().rev() {
                    if let Err(e) = n.apply_needs(before) {
                        tracing::warn!(node = n.name(), error = %e, "restoring image locks failed");
                    }
                }
                return Err(Error::generic(e));
            }
            done.push((node, old));
        }
        Ok(())
    }

    /// Add an edge of the node being opened as `parent` and take its permissions now.
    pub(crate) fn attach_pending(
        &mut self,
        parent: &str,
        writable: bool,
        name: &'static str,
        role: Role,
        child: &NodeRef,
    ) -> Result<()> {
        let edge = PendingEdge {
            parent: parent.to_string(),
            writable,
            name,
            role,
            child: child.clone(),
            seq: crate::node::next_seq(),
            owner: self.owner(),
        };
        // An existing node a staged open names: its permissions live in the daemon's graph.
        if let Some(s) = &self.scratch {
            if s.is_external(child) {
                return s.attach_outer(edge);
            }
        }
        self.pending.push(edge);
        self.refresh_perms()
    }
}
