//! Event payloads and the [`Event`] enum naming them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::block_job::BlockErrorAction;
use super::common::IoOperationType;
use super::job::{JobStatus, JobType};

/// `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatusChange {
    /// Job id.
    pub id: String,
    /// New state.
    pub status: JobStatus,
}

/// `BLOCK_JOB_COMPLETED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobCompleted {
    /// Job kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Job id.
    pub device: String,
    /// Total work in bytes.
    pub len: i64,
    /// Work done in bytes.
    pub offset: i64,
    /// Speed limit.
    pub speed: i64,
    /// Error text when the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `BLOCK_JOB_CANCELLED` (and the payload of `BLOCK_JOB_READY`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobProgress {
    /// Job kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Job id.
    pub device: String,
    /// Total work in bytes.
    pub len: i64,
    /// Work done in bytes.
    pub offset: i64,
    /// Speed limit.
    pub speed: i64,
}

/// `BLOCK_JOB_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobError {
    /// Job id.
    pub device: String,
    /// The failed operation.
    pub operation: IoOperationType,
    /// What the job did about it.
    pub action: BlockErrorAction,
}

/// `BLOCK_JOB_PENDING`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobPending {
    /// Job kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Job id.
    pub id: String,
}

/// `BLOCK_EXPORT_DELETED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockExportDeleted {
    /// Export id.
    pub id: String,
}

/// `BLOCK_IMAGE_CORRUPTED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockImageCorrupted {
    /// Device name, or the node name when there is no device.
    pub device: String,
    /// Node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// What is wrong.
    pub msg: String,
    /// Offset of the bad metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// Size of the bad metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Whether the image is now unusable (marked corrupt).
    pub fatal: bool,
}

/// An event blockd emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A job changed state.
    JobStatusChange(JobStatusChange),
    /// A block job finished (successfully or not).
    BlockJobCompleted(BlockJobCompleted),
    /// A block job was cancelled.
    BlockJobCancelled(BlockJobProgress),
    /// A block job hit an I/O error.
    BlockJobError(BlockJobError),
    /// A block job can be completed.
    BlockJobReady(BlockJobProgress),
    /// A block job waits for finalization.
    BlockJobPending(BlockJobPending),
    /// An export is gone.
    BlockExportDeleted(BlockExportDeleted),
    /// Image metadata is corrupt.
    BlockImageCorrupted(BlockImageCorrupted),
}

impl Event {
    /// Every event name this enum covers (the tests keep it equal to the schema's).
    pub const NAMES: &'static [&'static str] = &[
        "JOB_STATUS_CHANGE",
        "BLOCK_JOB_COMPLETED",
        "BLOCK_JOB_CANCELLED",
        "BLOCK_JOB_ERROR",
        "BLOCK_JOB_READY",
        "BLOCK_JOB_PENDING",
        "BLOCK_EXPORT_DELETED",
        "BLOCK_IMAGE_CORRUPTED",
    ];

    /// The event's QMP name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::JobStatusChange(_) => "JOB_STATUS_CHANGE",
            Event::BlockJobCompleted(_) => "BLOCK_JOB_COMPLETED",
            Event::BlockJobCancelled(_) => "BLOCK_JOB_CANCELLED",
            Event::BlockJobError(_) => "BLOCK_JOB_ERROR",
            Event::BlockJobReady(_) => "BLOCK_JOB_READY",
            Event::BlockJobPending(_) => "BLOCK_JOB_PENDING",
            Event::BlockExportDeleted(_) => "BLOCK_EXPORT_DELETED",
            Event::BlockImageCorrupted(_) => "BLOCK_IMAGE_CORRUPTED",
        }
    }

    /// The event's `data` member.
    pub fn data(&self) -> Map<String, Value> {
        let v = match self {
            Event::JobStatusChange(d) => serde_json::to_value(d),
            Event::BlockJobCompleted(d) => serde_json::to_value(d),
            Event::BlockJobCancelled(d) | Event::BlockJobReady(d) => serde_json::to_value(d),
            Event::BlockJobError(d) => serde_json::to_value(d),
            Event::BlockJobPending(d) => serde_json::to_value(d),
            Event::BlockExportDeleted(d) => serde_json::to_value(d),
            Event::BlockImageCorrupted(d) => serde_json::to_value(d),
        };
        // These structs have string keys and plain fields, so serialisation cannot fail.
        match v {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }
}
