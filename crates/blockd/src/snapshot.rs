//! `blockdev-snapshot` and `blockdev-snapshot-sync`: find the nodes, check the names as QEMU
//! does, then prepare and commit through the core (`block::graph::snapshot`). Named devices
//! follow the overlay like every other user of the node.

use std::sync::Arc;

use block::graph::{SnapshotSync, SnapshotUndo};
use block::{Error, NodeRef, Result};
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

    /// Commit a prepared snapshot of `node` (devices, as roots, followed it at prepare; the
    /// base goes read-only).
    fn finish_snapshot(&self, _node: &NodeRef, prepared: SnapshotUndo) {
        prepared.commit(&mut self.graph());
    }

    /// `blockdev-snapshot`.
    pub fn blockdev_snapshot(&self, a: &BlockdevSnapshot) -> Result<()> {
        let node = self.lookup_node(&a.node)?;
        self.graph().snapshot_check_base(&node)?;
        let overlay = self.lookup_node(&a.overlay)?;
        let prepared = self.graph().snapshot_prepare(&node, &overlay)?;
        self.finish_snapshot(&node, prepared);
        Ok(())
    }

    /// `blockdev-snapshot-sync`.
    pub fn blockdev_snapshot_sync(&self, a: &BlockdevSnapshotSync) -> Result<()> {
        let found = a
            .device
            .as_deref()
            .and_then(|d| self.device_node(d))
            .or_else(|| a.node_name.as_deref().and_then(|n| self.graph().get(n)));
        let Some(node) = found else {
            return Err(Error::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                a.device.as_deref().unwrap_or(""),
                a.node_name.as_deref().unwrap_or("")
            )));
        };
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
        let prepared = self.graph().snapshot_sync_prepare(&node, &req)?;
        let overlay = prepared.overlay().clone();
        self.finish_snapshot(&node, prepared);
        // The overlay belongs to the node's users, not to the monitor: with none (no parent,
        // export or device), QEMU drops it at once and only the file stays. So does blockd.
        let on_device = self.devices_on(&overlay);
        let mut graph = self.graph();
        let unused = !on_device
            && graph.parents(&overlay).is_empty()
            && graph.root_on(&overlay).is_none()
            && overlay.first_user().is_none();
        if unused {
            graph.del(overlay.name())?;
        }
        Ok(())
    }
}
