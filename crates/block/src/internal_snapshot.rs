//! Internal snapshots a format keeps inside its image (qcow2), as the QMP commands
//! `blockdev-snapshot-internal-sync` / `blockdev-snapshot-delete-internal-sync` and the
//! `image.snapshots` of the queries see them.
//!
//! A node whose driver has no snapshots of its own reaches those of its only child, as QEMU
//! falls back to the primary child when no other child holds data (a raw node over a qcow2
//! node); see [`target`].

use std::io;

use crate::NodeRef;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalSnapshot {
    /// Unique id (decimal numbers for QEMU's and ours).
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Bytes of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, if recorded.
    pub icount: Option<u64>,
}

/// When a snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotClock {
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
}

impl SnapshotClock {
    /// Now, as QSD records it: wall clock in microseconds; with no guest, its clock is the
    /// same instant in nanoseconds.
    pub fn now() -> SnapshotClock {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let us = d.as_micros() as u64;
        let date_sec = (us / 1_000_000) as u32;
        let date_nsec = ((us % 1_000_000) * 1000) as u32;
        SnapshotClock {
            date_sec,
            date_nsec,
            vm_clock_nsec: date_sec as u64 * 1_000_000_000 + date_nsec as u64,
        }
    }
}

/// Snapshot storage of a format driver.
pub trait InternalSnapshots: Send + Sync {
    /// The snapshots in the image, in table order.
    fn list(&self) -> io::Result<Vec<InternalSnapshot>>;
    /// Take a disk-only snapshot of the current state (data I/O is held off meanwhile).
    fn create(&self, name: &str, when: SnapshotClock) -> io::Result<InternalSnapshot>;
    /// Delete the snapshot matching `id` and/or `name`; None when none matches.
    fn delete(&self, id: Option<&str>, name: Option<&str>) -> io::Result<Option<InternalSnapshot>>;
}

/// The node whose driver keeps the internal snapshots of `node`: itself, or down the chain
/// of only children.
pub fn target(node: &NodeRef) -> Option<NodeRef> {
    let mut cur = node.clone();
    for _ in 0..64 {
        if cur.driver().internal_snapshots().is_some() {
            return Some(cur);
        }
        let children = cur.children();
        if children.len() != 1 {
            return None;
        }
        cur = cur.primary_child()?;
    }
    None
}

/// The internal snapshots of `node` (through [`target`]); empty when it has none.
pub fn list(node: &NodeRef) -> Vec<InternalSnapshot> {
    target(node)
        .and_then(|t| t.driver().internal_snapshots().and_then(|s| s.list().ok()))
        .unwrap_or_default()
}
