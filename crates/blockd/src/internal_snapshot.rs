//! `blockdev-snapshot-internal-sync` and `blockdev-snapshot-delete-internal-sync`: internal
//! (qcow2) snapshots of a node, checked in QEMU's order with QSD's texts; the transaction
//! action creates at prepare and deletes the snapshot again at abort.

use block::error::strerror;
use block::graph::NodeHold;
use block::internal_snapshot::{self, InternalSnapshot, SnapshotClock};
use block::{Error, Graph, NodeRef, Result};
use qapi::types::{BlockdevSnapshotDeleteInternal, BlockdevSnapshotInternal, SnapshotInfo};

use crate::daemon::Daemon;

/// A snapshot taken by a transaction's prepare, to delete again at abort.
pub struct TakenSnapshot {
    node: NodeRef,
    id: String,
    name: String,
    /// The node named, held until the snapshot is final or deleted again: a `blockdev-del`
    /// of it (which runs beside other commands) waits.
    _hold: NodeHold,
}

impl TakenSnapshot {
    /// Delete the snapshot again (a transaction's abort).
    pub fn undo(self) {
        let Some(store) = self.node.driver().internal_snapshots() else {
            return;
        };
        if let Err(e) = store.delete(Some(&self.id), Some(&self.name)) {
            tracing::warn!(error = %e, snapshot = %self.name, "deleting an aborted internal snapshot failed");
        }
    }
}

/// QMP's `SnapshotInfo` of a snapshot.
pub fn snapshot_info(s: &InternalSnapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        vm_state_size: s.vm_state_size as i64,
        date_sec: s.date_sec as i64,
        date_nsec: s.date_nsec as i64,
        vm_clock_sec: (s.vm_clock_nsec / 1_000_000_000) as i64,
        vm_clock_nsec: (s.vm_clock_nsec % 1_000_000_000) as i64,
        icount: s.icount.map(|i| i as i64),
    }
}

/// `image.snapshots` of a node: None when it has none (QSD leaves the key out).
pub fn image_snapshots(node: &NodeRef) -> Option<Vec<SnapshotInfo>> {
    let list = internal_snapshot::list(node);
    (!list.is_empty()).then(|| list.iter().map(snapshot_info).collect())
}

impl Daemon {
    /// The node named `device`, which must be a root (no parent node, no job using it),
    /// held while the command writes to it (a `blockdev-del` of it waits; one that took it
    /// out after the lookup makes this a miss).
    fn snapshot_root(&self, device: &str) -> Result<NodeHold> {
        let found = self.lookup_node(device)?;
        let Some(node) = Graph::hold_node(&self.graph, &found) else {
            self.lookup_node(device)?;
            return Err(Error::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            )));
        };
        let has_parent = !self.graph().parents(&node).is_empty();
        let in_job = node.users().iter().any(|u| u.who.starts_with("block job"));
        if has_parent || in_job {
            return Err(Error::generic("Need a root block node"));
        }
        Ok(node)
    }

    /// `blockdev-snapshot-internal-sync` up to a snapshot that [`TakenSnapshot::undo`] can
    /// delete again.
    pub fn take_internal_snapshot(&self, a: &BlockdevSnapshotInternal) -> Result<TakenSnapshot> {
        let device = &a.device;
        let node = self.snapshot_root(device)?;
        if node.read_only() {
            return Err(Error::generic(format!("Device '{device}' is read only")));
        }
        let Some(target) = internal_snapshot::target(&node) else {
            return Err(Error::generic(format!(
                "Block format '{}' used by device '{device}' does not support internal snapshots",
                node.driver_name()
            )));
        };
        if a.name.is_empty() {
            return Err(Error::generic("Name is empty"));
        }
        let Some(store) = target.driver().internal_snapshots() else {
            return Err(Error::generic("internal snapshots vanished"));
        };
        let failed = |e: std::io::Error| {
            Error::generic(format!(
                "Failed to create snapshot '{}' on device '{device}': {}",
                a.name,
                strerror(&e)
            ))
        };
        if store
            .list()
            .map_err(failed)?
            .iter()
            .any(|s| s.name == a.name)
        {
            return Err(Error::generic(format!(
                "Snapshot with name '{}' already exists on device '{device}'",
                a.name
            )));
        }
        let taken = store
            .create(&a.name, SnapshotClock::now())
            .map_err(failed)?;
        Ok(TakenSnapshot {
            node: target,
            id: taken.id,
            name: taken.name,
            _hold: node,
        })
    }

    /// `blockdev-snapshot-delete-internal-sync`.
    pub fn delete_internal_snapshot(
        &self,
        a: &BlockdevSnapshotDeleteInternal,
    ) -> Result<SnapshotInfo> {
        let device = &a.device;
        let node = self.snapshot_root(device)?;
        let (id, name) = (a.id.as_deref(), a.name.as_deref());
        if id.is_none() && name.is_none() {
            return Err(Error::generic("Name or id must be provided"));
        }
        let store = internal_snapshot::target(&node);
        let Some(store) = store.as_ref().and_then(|t| t.driver().internal_snapshots()) else {
            return Err(Error::generic(
                "Failed to get a snapshot list: Operation not supported",
            ));
        };
        let list = store.list().map_err(|e| {
            Error::generic(format!("Failed to get a snapshot list: {}", strerror(&e)))
        })?;
        let found = list
            .iter()
            .find(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n));
        let Some(found) = found else {
            return Err(Error::generic(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                id.unwrap_or("null"),
                name.unwrap_or("null")
            )));
        };
        let removed = |e: std::io::Error| {
            Error::generic(format!(
                "Failed to remove snapshot from snapshot list: {}",
                strerror(&e)
            ))
        };
        if node.read_only() {
            return Err(removed(std::io::Error::from_raw_os_error(libc::EPERM)));
        }
        let info = snapshot_info(found);
        match store
            .delete(Some(&found.id), Some(&found.name))
            .map_err(removed)?
        {
            Some(_) => Ok(info),
            None => Err(Error::generic(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                id.unwrap_or("null"),
                name.unwrap_or("null")
            ))),
        }
    }
}
