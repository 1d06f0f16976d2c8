//! External snapshots: `blockdev-snapshot`, `blockdev-snapshot-sync`.

use serde::{Deserialize, Serialize};

pub use super::block_backup::NewImageMode;

/// Arguments of `blockdev-snapshot-sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevSnapshotSync {
    /// Device to snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Node to snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The overlay's file.
    pub snapshot_file: String,
    /// The overlay's node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_node_name: Option<String>,
    /// The overlay's format (default qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Create or open the file (default absolute-paths: create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NewImageMode>,
}

/// Arguments of `blockdev-snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevSnapshot {
    /// The node to snapshot.
    pub node: String,
    /// The overlay node to put on top of it.
    pub overlay: String,
}

/// Arguments of `blockdev-snapshot-delete-internal-sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevSnapshotDeleteInternal {
    /// Device or node name.
    pub device: String,
    /// Snapshot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Snapshot name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}
