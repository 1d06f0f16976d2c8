//! Block jobs: `block-job-*` commands and `query-block-jobs` (`block-job.json`).

use serde::{Deserialize, Serialize};

use super::block_core::BlockDeviceIoStatus;
use super::job::{JobStatus, JobType};

/// Arguments of `block-job-set-speed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockJobSetSpeedArgs {
    /// Job id.
    pub device: String,
    /// Bytes per second, 0 for unlimited (negative values are refused at run time).
    pub speed: i64,
}

/// Arguments of `block-job-cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockJobCancelArgs {
    /// Job id.
    pub device: String,
    /// Cancel even a paused job (and a ready mirror without completing it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

/// Arguments of `block-job-pause`, `-resume` and `-complete` (the job named `device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockJobDeviceArgs {
    /// Job id.
    pub device: String,
}

/// Arguments of `block-job-dismiss` and `-finalize` (the job named `id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockJobIdArgs {
    /// Job id.
    pub id: String,
}

/// `BlockErrorAction`: what a job did about an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockErrorAction {
    /// Went on.
    Ignore,
    /// Failed.
    Report,
    /// Paused.
    Stop,
}

/// `BlockJobInfo`: one entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// Job kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Job id.
    pub device: String,
    /// Total work in bytes.
    pub len: i64,
    /// Work done in bytes.
    pub offset: i64,
    /// Whether the job is doing I/O right now.
    pub busy: bool,
    /// Whether it is paused.
    pub paused: bool,
    /// Speed limit in bytes per second (0 = none).
    pub speed: i64,
    /// I/O status.
    pub io_status: BlockDeviceIoStatus,
    /// Whether it can be completed.
    pub ready: bool,
    /// Lifecycle state.
    pub status: JobStatus,
    /// Whether it finalizes without `job-finalize`.
    pub auto_finalize: bool,
    /// Whether it disappears without `job-dismiss`.
    pub auto_dismiss: bool,
    /// Error text once failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Mirror jobs only (set it exactly when `job_type` is `Mirror`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actively_synced: Option<bool>,
}
