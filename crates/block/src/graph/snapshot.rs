//! External snapshots (`blockdev-snapshot`, `blockdev-snapshot-sync`) as a prepare / commit /
//! undo triple, so that a transaction can prepare several and undo them newest first.
//!
//! Prepare puts an overlay (a format node without a backing child) on top of a node in one
//! drained section: the overlay gets the node as its backing child, and every parent edge and
//! root that used the node uses the overlay instead. The permissions of the new wiring are
//! checked before the section ends; a refusal puts everything back. Commit makes the old node
//! read-only, as QEMU does once the snapshot is final. Undo takes the overlay out again (and
//! closes it if prepare opened it; a file prepare created stays, as in QEMU).

use std::sync::{Arc, Mutex, MutexGuard};

use super::rewire::reaches;
use super::{ChildRef, Detached, DriverOptions, Graph, NodeOptions};
use crate::create::{create, CreateSpec};
use crate::edge::{ChildEdge, Root};
use crate::error::{Error, Result};
use crate::node::NodeRef;
use crate::perm::Perm;

/// One re-pointed link, kept so that undo can point it back.
enum Swap {
    Edge(Arc<ChildEdge>),
    Root(Arc<Root>),
}

/// A prepared snapshot: call [`SnapshotUndo::commit`] or [`SnapshotUndo::undo`].
#[must_use = "a prepared snapshot must be committed or undone"]
pub struct SnapshotUndo {
    node: NodeRef,
    overlay: NodeRef,
    backing: Arc<ChildEdge>,
    swaps: Vec<Swap>,
    /// The overlay node prepare opened (`blockdev-snapshot-sync`): closed by undo.
    created: bool,
}

/// What `blockdev-snapshot-sync` asks for, once its node is found and its names checked.
#[derive(Debug, Clone)]
pub struct SnapshotSync {
    /// The new image's file.
    pub file: String,
    /// Node name of the overlay.
    pub node_name: String,
    /// Format of the overlay ("qcow2" by default).
    pub format: String,
    /// Open an existing file instead of creating it (`mode: existing`).
    pub existing: bool,
}

impl SnapshotUndo {
    /// The overlay now on top.
    pub fn overlay(&self) -> &NodeRef {
        &self.overlay
    }

    /// The node under the overlay, which commit makes read-only.
    pub fn base(&self) -> &NodeRef {
        &self.node
    }

    /// Make the snapshot final: the old node is reopened read-only (QEMU does the same; a
    /// failure there only leaves it writable).
    pub fn commit(self, graph: &mut Graph) {
        if let Err(e) = graph.reopen_read_only(&self.node, true) {
            tracing::warn!(node = self.node.name(), error = %e, "snapshot base stays writable");
        }
    }

    /// [`SnapshotUndo::commit`] with no disk I/O under `graph`'s lock: the base switches as a
    /// reopen's does ([`Graph::reopen_switch`]), `prep` marking it
    /// ([`Graph::prepare_read_only`]). The caller holds no graph lock.
    pub fn commit_staged(self, graph: &Mutex<Graph>, prep: &super::ReadOnlyPrep) {
        if let Err(e) = Graph::reopen_switch(graph, prep, &self.node, true) {
            tracing::warn!(node = self.node.name(), error = %e, "snapshot base stays writable");
        }
    }

    /// Put the overlay back out: everything that used the node before uses it again, the
    /// overlay has no backing child, and a node prepare opened is closed.
    pub fn undo(self, graph: &mut Graph) {
        let d = self.undo_detached(graph);
        graph.close_detached_now(d);
    }

    /// [`SnapshotUndo::undo`], leaving an overlay prepare opened detached: close it with
    /// [`Graph::close_detached`] once the graph lock is released.
    pub fn undo_detached(self, graph: &mut Graph) -> Detached {
        let involved = [self.node.clone(), self.overlay.clone()];
        graph.drained(&involved, |g| self.unwire_detached(g))
    }

    /// [`SnapshotUndo::undo`] with the drained section's wait for requests in flight and
    /// the close of an overlay prepare opened both without `graph`'s lock. Do not call it
    /// with the lock held.
    pub fn undo_staged(self, graph: &Mutex<Graph>) {
        let involved = [self.node.clone(), self.overlay.clone()];
        let d = Graph::drained_staged(graph, &involved, |g| self.unwire_detached(g));
        Graph::close_detached(graph, d);
    }

    fn unwire_detached(self, g: &mut Graph) -> Detached {
        unwire(g, &self);
        if !self.created {
            return Detached::none();
        }
        g.detach_unused(&self.overlay)
            .unwrap_or_else(Detached::none)
    }
}

/// Point every swapped link back at the node and detach the backing child. A link that no
/// longer points at the overlay was changed since by a command of its own (a reopen of the
/// parent, run beside the snapshot's transaction): that change stays.
fn unwire(g: &Graph, s: &SnapshotUndo) {
    for sw in s.swaps.iter().rev() {
        match sw {
            Swap::Edge(e) if Arc::ptr_eq(&e.node(), &s.overlay) => {
                e.set(s.node.clone());
            }
            Swap::Root(r) if Arc::ptr_eq(&r.node(), &s.overlay) => {
                r.set_node(s.node.clone());
            }
            Swap::Edge(_) | Swap::Root(_) => {}
        }
    }
    s.overlay.driver().attach_backing(None);
    s.overlay.remove_edge(&s.backing);
    if let Err(e) = g.refresh_perms() {
        tracing::warn!(error = %e, "restoring permissions after taking an overlay out");
    }
}

impl Graph {
    /// The first check of a snapshot of `node` (before its overlay is looked up or created):
    /// QEMU's op blocker on a node that is already some overlay's backing child.
    ///
    /// blockd refuses too while the node has registered users (a backup job's source or
    /// target: the job's I/O uses the node directly and could not follow it onto the
    /// overlay). Exports and devices are backends and follow.
    pub fn snapshot_check_base(&self, node: &NodeRef) -> Result<()> {
        if let Some((p, _)) = self
            .parents(node)
            .into_iter()
            .find(|(_, r)| *r == "backing")
        {
            return Err(Error::generic(format!(
                "Node '{}' is busy: node is used as backing hd of '{}'",
                node.name(),
                p.name()
            )));
        }
        if let Some(u) = node.users().first() {
            return Err(Error::generic(format!(
                "Node '{}' is in use by {}, which cannot move to an overlay",
                node.name(),
                u.who
            )));
        }
        Ok(())
    }

    /// What the users of `n` need from it now.
    fn perm_on(&self, n: &NodeRef) -> Result<Perm> {
        Ok(self
            .compute_needs()?
            .into_iter()
            .find(|(m, _)| Arc::ptr_eq(m, n))
            .map(|(_, needs)| needs.perm)
            .unwrap_or(Perm::NONE))
    }

    /// Put `overlay` on top of `node` (see the module text). Nothing changes on error.
    pub fn snapshot_prepare(&mut self, node: &NodeRef, overlay: &NodeRef) -> Result<SnapshotUndo> {
        self.snapshot_check_base(node)?;
        self.flush_base(node)?;
        self.attach_overlay(node, overlay, false)
    }

    fn flush_base(&self, node: &NodeRef) -> Result<()> {
        flush_base(node)
    }

    /// [`Graph::snapshot_prepare`] without holding `graph`'s lock over the base's flush
    /// nor over the drained section's wait for requests in flight; the checks run again
    /// under the lock before the overlay is wired in. The caller holds `node` and `overlay`
    /// looked up earlier; one deleted meanwhile is refused with QEMU's text for an unknown
    /// node. Do not call it with the lock held.
    pub fn snapshot_prepare_staged(
        graph: &Mutex<Graph>,
        node: &NodeRef,
        overlay: &NodeRef,
    ) -> Result<SnapshotUndo> {
        lock(graph).snapshot_check_base(node)?;
        flush_base(node)?;
        let involved = [node.clone(), overlay.clone()];
        Graph::drained_staged(graph, &involved, |g| {
            if let Some(gone) = involved.iter().find(|n| !g.contains(n)) {
                let name = gone.name();
                return Err(Error::generic(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                )));
            }
            g.snapshot_check_base(node)?;
            g.attach_overlay(node, overlay, false)
        })
    }

    fn attach_overlay(
        &mut self,
        node: &NodeRef,
        overlay: &NodeRef,
        created: bool,
    ) -> Result<SnapshotUndo> {
        if self.perm_on(overlay)?.contains(Perm::CONSISTENT_READ) {
            return Err(Error::generic("The overlay is already in use"));
        }
        if overlay.child("backing").is_some() {
            return Err(Error::generic("The overlay already has a backing image"));
        }
        if !overlay.driver().supports_backing() {
            return Err(Error::generic(
                "The overlay does not support backing images",
            ));
        }
        if reaches(node, overlay) {
            return Err(Error::generic(format!(
                "Making '{}' a backing child of '{}' would create a cycle",
                node.name(),
                overlay.name()
            )));
        }
        if overlay.read_only() && self.perm_on(node)?.contains(Perm::WRITE) {
            return Err(Error::generic("Block node is read-only"));
        }
        let involved = [node.clone(), overlay.clone()];
        self.drained(&involved, |g| {
            let backing = ChildEdge::new("backing", node.clone());
            let mut swaps = Vec::new();
            for p in &g.nodes {
                if reaches(overlay, p) {
                    continue;
                }
                for e in p.edges() {
                    if Arc::ptr_eq(&e.node(), node) {
                        e.set(overlay.clone());
                        swaps.push(Swap::Edge(e));
                    }
                }
            }
            for r in g.roots() {
                if r.follows() && Arc::ptr_eq(&r.node(), node) {
                    r.set_node(overlay.clone());
                    swaps.push(Swap::Root(r));
                }
            }
            overlay.push_edge(backing.clone());
            overlay.driver().attach_backing(Some(backing.clone()));
            let prepared = SnapshotUndo {
                node: node.clone(),
                overlay: overlay.clone(),
                backing,
                swaps,
                created,
            };
            match g.refresh_perms() {
                Ok(()) => Ok(prepared),
                Err(e) => {
                    unwire(g, &prepared);
                    Err(e)
                }
            }
        })
    }

    /// `blockdev-snapshot-sync`: create (unless `existing`) and open the overlay image, then
    /// [`Graph::snapshot_prepare`], all under the caller's lock. On error the opened overlay
    /// is closed again; a file already created stays (as in QEMU). The daemon uses
    /// [`Graph::snapshot_sync_staged`].
    pub fn snapshot_sync_prepare(
        &mut self,
        node: &NodeRef,
        req: &SnapshotSync,
    ) -> Result<SnapshotUndo> {
        self.snapshot_check_base(node)?;
        self.flush_base(node)?;
        if !req.existing {
            create_overlay_file(node, req)?;
        }
        let overlay = self.add(&overlay_options(node, req)?)?;
        self.attach_overlay(node, &overlay, true).inspect_err(|_| {
            if let Err(e) = self.del(overlay.name()) {
                tracing::warn!(node = overlay.name(), error = %e, "closing a refused overlay");
            }
        })
    }

    /// [`Graph::snapshot_sync_prepare`] without holding `graph`'s lock over the disk I/O:
    /// the base's flush, the overlay file's creation and its open run unlocked (the open as
    /// a staged `blockdev-add`: its node-name reserved meanwhile); the overlay is wired in
    /// under the lock, and a refused overlay is closed after it. The caller holds `node`
    /// ([`Graph::hold_node`]) so that a `blockdev-del` of it waits. Do not call it with
    /// `graph`'s lock held.
    pub fn snapshot_sync_staged(
        graph: &Arc<Mutex<Graph>>,
        node: &NodeRef,
        req: &SnapshotSync,
    ) -> Result<SnapshotUndo> {
        lock(graph).snapshot_check_base(node)?;
        // Held by the caller: no delete can close it under the flush.
        flush_base(node)?;
        if !req.existing {
            create_overlay_file(node, req)?;
        }
        let overlay = Graph::add_staged(graph, &overlay_options(node, req)?)?;
        // Wired in under the lock, in a drained section whose wait ran without it.
        let involved = [node.clone(), overlay.clone()];
        let (prepared, refused) = Graph::drained_staged(graph, &involved, |g| {
            // Something may have changed while the lock was not held: check the base again,
            // and that the overlay was not deleted meanwhile.
            let prepared = if g.contains(&overlay) {
                g.snapshot_check_base(node)
                    .and_then(|()| g.attach_overlay(node, &overlay, true))
            } else {
                let name = overlay.name();
                Err(Error::generic(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                )))
            };
            let refused = match &prepared {
                Ok(_) => Detached::none(),
                Err(_) => g.detach_unused(&overlay).unwrap_or_else(Detached::none),
            };
            (prepared, refused)
        });
        Graph::close_detached(graph, refused);
        prepared
    }
}

/// Create the overlay image with `node`'s image as its backing file, through the same code as
/// `blockdev-create`. Disk I/O: called without the graph lock by the daemon.
fn create_overlay_file(node: &NodeRef, req: &SnapshotSync) -> Result<()> {
    match req.format.as_str() {
        "qcow2" => {}
        "raw" => {
            return Err(Error::generic(
                "Backing file not supported for file format 'raw'",
            ))
        }
        other => return Err(Error::generic(format!("Unknown file format '{other}'"))),
    }
    create(&CreateSpec::File {
        filename: req.file.clone(),
        size: 0,
    })
    .map_err(Error::generic)?;
    let host = crate::drivers::file::FileDriver::open(&req.file, false).map_err(|e| {
        Error::generic(format!(
            "Could not open '{}': {}",
            req.file,
            crate::error::strerror(&e)
        ))
    })?;
    let host: NodeRef = Arc::new(crate::node::Node::new(
        "snapshot-create".to_string(),
        true,
        Box::new(host),
        Vec::new(),
        false,
        Default::default(),
    ));
    let opts = qcow2::CreateOptions {
        size: node.size().div_ceil(512) * 512,
        backing_file: Some(node.facts().filename),
        backing_fmt: Some(node.driver_name().to_string()),
        ..qcow2::CreateOptions::default()
    };
    let created = create(&CreateSpec::Qcow2 {
        file: Ok(host.clone()),
        opts,
    });
    let closed = host.close();
    created.map_err(Error::generic)?;
    closed.map_err(|e| Error::io(format!("Closing '{}'", req.file), &e))
}

/// Flush a writable snapshot base before its overlay goes on top.
fn flush_base(node: &NodeRef) -> Result<()> {
    if node.read_only() {
        return Ok(());
    }
    node.flush()
        .map_err(|e| Error::io("An IO error has occurred", &e))
}

/// The overlay's options: the format over its file, without a backing child, read-only when
/// the base is.
fn overlay_options(node: &NodeRef, req: &SnapshotSync) -> Result<NodeOptions> {
    let file = Box::new(NodeOptions {
        driver: DriverOptions::File {
            filename: req.file.clone(),
            locking: true,
        },
        ..NodeOptions::default()
    });
    let driver = match req.format.as_str() {
        "qcow2" => DriverOptions::Qcow2 {
            file: ChildRef::Inline(file),
            backing: Some(None),
            cache: Default::default(),
        },
        "raw" => DriverOptions::Raw {
            file: ChildRef::Inline(file),
            offset: None,
            size: None,
        },
        other => {
            return Err(Error::generic(format!("Unknown driver '{other}'")));
        }
    };
    Ok(NodeOptions {
        node_name: Some(req.node_name.clone()),
        read_only: node.read_only(),
        driver,
        ..NodeOptions::default()
    })
}

fn lock(g: &Mutex<Graph>) -> MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}
