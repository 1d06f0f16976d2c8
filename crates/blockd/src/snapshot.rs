//! `blockdev-snapshot` and `blockdev-snapshot-sync`: find the nodes, check the names as QEMU
//! does, then prepare and commit through the core (`block::graph::snapshot`). Named devices
//! follow the overlay like every other user of the node.

use std::sync::Arc;

use block::graph::{SnapshotSync, SnapshotUndo};
use block::{Error, Graph, NodeRef, Result};
use qapi::types::{BlockdevSnapshot, BlockdevSnapshotSync, NewImageMode};

use crate::daemon::Daemon;

impl Daemon {
    fn devices_on(&self, node: &NodeRef) -> bool {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        devices.iter().any(|d| Arc::ptr_eq(&d.root.node(), node))
    }

    fn device_node(&self, name: &str) -> Option<NodeRef> {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        devices
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.root.node())
    }

    /// `blockdev-snapshot`.
    pub fn blockdev_snapshot(&self, a: &BlockdevSnapshot) -> Result<()> {
        let prepared = self.prepare_blockdev_snapshot(a)?;
        self.commit_snapshot(prepared, false)
    }

    /// `blockdev-snapshot-sync`.
    pub fn blockdev_snapshot_sync(&self, a: &BlockdevSnapshotSync) -> Result<()> {
        let prepared = self.prepare_blockdev_snapshot_sync(a)?;
        self.commit_snapshot(prepared, true)
    }

    /// `blockdev-snapshot` up to the undoable step: the overlay is in place, the base still
    /// writable (a transaction's prepare).
    pub fn prepare_blockdev_snapshot(&self, a: &BlockdevSnapshot) -> Result<SnapshotUndo> {
        let node = self.lookup_node(&a.node)?;
        self.graph().snapshot_check_base(&node)?;
        let overlay = self.lookup_node(&a.overlay)?;
        let prepared = self.graph().snapshot_prepare(&node, &overlay)?;
        Ok(prepared)
    }

    /// `blockdev-snapshot-sync` up to the undoable step (see
    /// [`Daemon::prepare_blockdev_snapshot`]).
    pub fn prepare_blockdev_snapshot_sync(&self, a: &BlockdevSnapshotSync) -> Result<SnapshotUndo> {
        let found = a
            .device
            .as_deref()
            .and_then(|d| self.device_node(d))
            .or_else(|| a.node_name.as_deref().and_then(|n| self.graph().get(n)));
        let not_found = || {
            Error::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                a.device.as_deref().unwrap_or(""),
                a.node_name.as_deref().unwrap_or("")
            ))
        };
        // Held while the overlay is created and opened without the graph lock: a
        // blockdev-del of the base waits; one that took it out already makes this a miss.
        let node = found
            .and_then(|n| Graph::hold_node(&self.graph, &n))
            .ok_or_else(not_found)?;
        self.graph().snapshot_check_base(&node)?;
        // QEMU generates a name for an overlay of a device given without one; blockd asks
        // for it in every case.
        let Some(name) = a.snapshot_node_name.clone() else {
            return Err(Error::generic("New overlay node-name missing"));
        };
        if self.device_node(&name).is_some() || self.graph().get(&name).is_some() {
            return Err(Error::generic("New overlay node-name already in use"));
        }
        let req = SnapshotSync {
            file: a.snapshot_file.clone(),
            node_name: name,
            format: a.format.clone().unwrap_or_else(|| "qcow2".to_string()),
            existing: a.mode == Some(NewImageMode::Existing),
        };
        // The flush, the file's creation and its open run without the graph lock.
        Graph::snapshot_sync_staged(&self.graph, &node, &req)
    }

    /// Make a prepared snapshot final (the base goes read-only). `created`: the overlay was
    /// made by blockdev-snapshot-sync; with no user at all (no parent, export or device)
    /// QEMU drops it at once and only the file stays. So does blockd.
    pub fn commit_snapshot(&self, prepared: SnapshotUndo, created: bool) -> Result<()> {
        let overlay = prepared.overlay().clone();
        // The base goes read-only as a reopen's switch does, with no disk I/O under the graph
        // lock: its bitmaps stored and flushed first (`Graph::prepare_read_only`, the base
        // marked and drained), then the driver's reopen (`Graph::reopen_switch`). A failure
        // only leaves the base writable, as in QEMU.
        let base = prepared.base().clone();
        match Graph::prepare_read_only(&self.graph, std::slice::from_ref(&base)) {
            Ok(ready) => {
                prepared.commit_staged(&self.graph, &ready);
                self.graph().reopen_done(ready);
            }
            Err(e) => {
                tracing::warn!(node = base.name(), error = %e, "snapshot base stays writable");
            }
        }
        if !created {
            return Ok(());
        }
        let on_device = self.devices_on(&overlay);
        let graph = self.graph();
        let unused = !on_device
            && graph.parents(&overlay).is_empty()
            && graph.root_on(&overlay).is_none()
            && overlay.first_user().is_none();
        drop(graph);
        if unused {
            // Stored, flushed and closed without the graph lock (see `Graph::del_staged`);
            // if something started using it meanwhile, that came first and it stays.
            Graph::del_staged(&self.graph, overlay.name())?;
        }
        Ok(())
    }

    /// Undo a prepared snapshot (a transaction's abort): everything as before; a created
    /// overlay file stays, as in QEMU.
    pub fn abort_snapshot(&self, prepared: SnapshotUndo) {
        // A created overlay is stored, flushed and closed after the lock is released.
        let d = prepared.undo_detached(&mut self.graph());
        Graph::close_detached(&self.graph, d);
    }
}
