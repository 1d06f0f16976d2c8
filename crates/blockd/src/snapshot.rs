//! `blockdev-snapshot` and `blockdev-snapshot-sync`: find the nodes, check the names as QEMU
//! does, then prepare and commit through the core (`block::graph::snapshot`). Named devices
//! follow the overlay like every other user of the node.

use std::sync::Arc;

use block::graph::{NodeHold, SnapshotSync, SnapshotUndo};
use block::{Error, Graph, NodeRef, Result};
use qapi::types::{BlockdevSnapshot, BlockdevSnapshotSync, NewImageMode};

use crate::claims::Key;
use crate::daemon::Daemon;

/// A prepared snapshot ([`SnapshotUndo`]) and the hold on its base, kept until the snapshot
/// is committed or undone: a `blockdev-del` of the base (which runs beside other commands)
/// waits for the whole command or transaction, never sees it half done.
#[must_use = "a prepared snapshot must be committed or aborted"]
pub struct PreparedSnapshot {
    undo: SnapshotUndo,
    hold: NodeHold,
}

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

    /// `blockdev-snapshot`. Runs beside other commands: its base and overlay are claimed
    /// first (see [`crate::claims`]), so another snapshot, reopen or transaction on them
    /// runs wholly before or after it.
    pub fn blockdev_snapshot(&self, a: &BlockdevSnapshot) -> Result<()> {
        let _claim = self.claims.take(|| Ok(self.snapshot_keys(a)))?;
        let prepared = self.prepare_blockdev_snapshot(a)?;
        self.commit_snapshot(prepared, false)
    }

    /// `blockdev-snapshot-sync`, beside other commands as [`Daemon::blockdev_snapshot`]:
    /// the base, the overlay's node-name and its file are claimed first. Of two snapshots of
    /// one base sent at once, the second starts once the first is done and finds the base
    /// busy (the overlay's backing child), as in QEMU, before it creates any file.
    pub fn blockdev_snapshot_sync(&self, a: &BlockdevSnapshotSync) -> Result<()> {
        let _claim = self.claims.take(|| Ok(self.snapshot_sync_keys(a)))?;
        let prepared = self.prepare_blockdev_snapshot_sync(a)?;
        self.commit_snapshot(prepared, true)
    }

    /// What a `blockdev-snapshot` claims: its node and overlay, as they resolve now.
    pub fn snapshot_keys(&self, a: &BlockdevSnapshot) -> Vec<Key> {
        [&a.node, &a.overlay]
            .into_iter()
            .filter_map(|n| self.lookup_node(n).ok())
            .map(Key::Node)
            .collect()
    }

    /// What a `blockdev-snapshot-sync` claims: its base as it resolves now, the overlay's
    /// node-name and file.
    pub fn snapshot_sync_keys(&self, a: &BlockdevSnapshotSync) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .snapshot_sync_base(a)
            .into_iter()
            .map(Key::Node)
            .collect();
        keys.extend(a.snapshot_node_name.clone().map(Key::Name));
        keys.push(Key::File(a.snapshot_file.clone()));
        keys
    }

    fn snapshot_sync_base(&self, a: &BlockdevSnapshotSync) -> Option<NodeRef> {
        a.device
            .as_deref()
            .and_then(|d| self.device_node(d))
            .or_else(|| a.node_name.as_deref().and_then(|n| self.graph().get(n)))
    }

    /// `blockdev-snapshot` up to the undoable step: the overlay is in place, the base still
    /// writable (a transaction's prepare).
    pub fn prepare_blockdev_snapshot(&self, a: &BlockdevSnapshot) -> Result<PreparedSnapshot> {
        // Both held while the base is flushed and the section waits without the graph lock
        // (the base until commit or undo): a blockdev-del of either waits; one that took it
        // out already makes this a miss.
        let held = |name: &str| {
            let n = self.lookup_node(name)?;
            match Graph::hold_node(&self.graph, &n) {
                Some(h) => Ok(h),
                None => {
                    self.lookup_node(name)?;
                    Err(Error::generic(format!(
                        "Cannot find device='{name}' nor node-name='{name}'"
                    )))
                }
            }
        };
        let node = held(&a.node)?;
        self.graph().snapshot_check_base(&node)?;
        let overlay = held(&a.overlay)?;
        // The base's flush and the drained section's wait run without the graph lock.
        let undo = Graph::snapshot_prepare_staged(&self.graph, &node, &overlay)?;
        Ok(PreparedSnapshot { undo, hold: node })
    }

    /// `blockdev-snapshot-sync` up to the undoable step (see
    /// [`Daemon::prepare_blockdev_snapshot`]).
    pub fn prepare_blockdev_snapshot_sync(
        &self,
        a: &BlockdevSnapshotSync,
    ) -> Result<PreparedSnapshot> {
        let found = self.snapshot_sync_base(a);
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
        let undo = Graph::snapshot_sync_staged(&self.graph, &node, &req)?;
        Ok(PreparedSnapshot { undo, hold: node })
    }

    /// Make a prepared snapshot final (the base goes read-only). `created`: the overlay was
    /// made by blockdev-snapshot-sync; with no user at all (no parent, export or device)
    /// QEMU drops it at once and only the file stays. So does blockd.
    pub fn commit_snapshot(&self, prepared: PreparedSnapshot, created: bool) -> Result<()> {
        // The hold on the base goes once everything is done (and without the graph lock).
        let PreparedSnapshot {
            undo: prepared,
            hold: _hold,
        } = prepared;
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
    pub fn abort_snapshot(&self, prepared: PreparedSnapshot) {
        let PreparedSnapshot { undo, hold: _hold } = prepared;
        // Drained without the graph lock over the wait; a created overlay is stored,
        // flushed and closed after the lock is released.
        undo.undo_staged(&self.graph);
    }
}
