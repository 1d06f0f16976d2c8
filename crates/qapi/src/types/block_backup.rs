//! Backup jobs: arguments of `blockdev-backup` and `drive-backup` (`block-backup.json`).

use serde::{Deserialize, Serialize};

/// `MirrorSyncMode`: what a backup copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorSyncMode {
    /// What the top layer holds.
    Top,
    /// Everything.
    Full,
    /// Only what writes are about to overwrite.
    None,
    /// The bitmap's dirty regions (bitmap-mode on-success).
    Incremental,
    /// The bitmap's dirty regions, any bitmap-mode.
    Bitmap,
}

/// `BitmapSyncMode`: the bitmap's fate at the end of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapSyncMode {
    /// Cleared (to the writes made during the job) when the job succeeds.
    OnSuccess,
    /// Never cleared.
    Never,
    /// Cleared of what was copied, success or not.
    Always,
}

/// `BlockdevOnError`: what a job does about an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevOnError {
    /// Fail the job.
    Report,
    /// Go on and retry later.
    Ignore,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// Stop (pause) the job.
    Stop,
    /// As `enospc` for jobs.
    Auto,
}

/// `NewImageMode`: how `drive-backup` gets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewImageMode {
    /// Open an existing image.
    Existing,
    /// Create the image.
    AbsolutePaths,
}

/// `BackupPerf`: copy tuning (unstable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackupPerf {
    /// Use copy offload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_copy_range: Option<bool>,
    /// Parallel copy requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<i64>,
    /// Largest copy request in bytes (0: default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chunk: Option<i64>,
    /// Smallest copy unit in bytes (0: default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cluster_size: Option<u64>,
}

/// `BackupCommon`: the members both backup commands share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields: serde cannot combine it with flatten; the schema check
// has already refused unknown members.
#[serde(rename_all = "kebab-case")]
pub struct BackupCommon {
    /// Job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Source node.
    pub device: String,
    /// What to copy.
    pub sync: MirrorSyncMode,
    /// Speed limit in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<i64>,
    /// Sync bitmap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// The bitmap's fate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Write compressed clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// Policy for source read errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_source_error: Option<BlockdevOnError>,
    /// Policy for target write errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_target_error: Option<BlockdevOnError>,
    /// Finalize without `job-finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Dismiss without `job-dismiss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Name of the copy-before-write filter node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
    /// Discard source regions once copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_source: Option<bool>,
    /// Copy tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_perf: Option<BackupPerf>,
}

/// `DriveBackup`: arguments of `drive-backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields: serde cannot combine it with flatten; the schema check
// has already refused unknown members.
#[serde(rename_all = "kebab-case")]
pub struct DriveBackup {
    /// Shared members.
    #[serde(flatten)]
    pub common: BackupCommon,
    /// Target file name.
    pub target: String,
    /// Target format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Open or create the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NewImageMode>,
}

/// `BlockdevBackup`: arguments of `blockdev-backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields: serde cannot combine it with flatten; the schema check
// has already refused unknown members.
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    /// Shared members.
    #[serde(flatten)]
    pub common: BackupCommon,
    /// Target node.
    pub target: String,
}
