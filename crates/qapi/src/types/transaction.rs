//! Transactions: arguments of `transaction` and the snapshot action arguments
//! (`transaction.json`).

use serde::{Deserialize, Serialize};

use super::bitmaps::{BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge};
use super::block_backup::{BlockdevBackup, DriveBackup};
use super::block_snapshot::{BlockdevSnapshot, BlockdevSnapshotSync};

/// `Abort`: the action that always fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {}

/// `ActionCompletionMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionCompletionMode {
    /// Each job completes on its own.
    Individual,
    /// The transaction's jobs complete or fail together.
    Grouped,
}

/// `BlockdevSnapshotInternal`: an internal snapshot of a qcow2 node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevSnapshotInternal {
    /// Device or node name.
    pub device: String,
    /// Snapshot name.
    pub name: String,
}

/// `TransactionAction`: `{"type": KIND, "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// `abort`.
    Abort(Abort),
    /// `block-dirty-bitmap-add`.
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    /// `block-dirty-bitmap-remove`.
    BlockDirtyBitmapRemove(BlockDirtyBitmap),
    /// `block-dirty-bitmap-clear`.
    BlockDirtyBitmapClear(BlockDirtyBitmap),
    /// `block-dirty-bitmap-enable`.
    BlockDirtyBitmapEnable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-disable`.
    BlockDirtyBitmapDisable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-merge`.
    BlockDirtyBitmapMerge(BlockDirtyBitmapMerge),
    /// `blockdev-backup`.
    BlockdevBackup(BlockdevBackup),
    /// `blockdev-snapshot`.
    BlockdevSnapshot(BlockdevSnapshot),
    /// `blockdev-snapshot-internal-sync`.
    BlockdevSnapshotInternalSync(BlockdevSnapshotInternal),
    /// `blockdev-snapshot-sync`.
    BlockdevSnapshotSync(BlockdevSnapshotSync),
    /// `drive-backup`.
    DriveBackup(DriveBackup),
}

/// `TransactionProperties`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TransactionProperties {
    /// How the transaction's jobs complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_mode: Option<ActionCompletionMode>,
}

/// Arguments of `transaction`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TransactionArgs {
    /// The actions, applied in order.
    pub actions: Vec<TransactionAction>,
    /// Options of the whole transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TransactionProperties>,
}
