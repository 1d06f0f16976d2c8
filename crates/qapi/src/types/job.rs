//! Generic jobs: lifecycle states and `job-*` commands (`job.json`).

use serde::{Deserialize, Serialize};

/// `JobType`: what kind of job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobType {
    /// block-commit.
    Commit,
    /// block-stream.
    Stream,
    /// Mirror.
    Mirror,
    /// Backup.
    Backup,
    /// blockdev-create.
    Create,
    /// x-blockdev-amend.
    Amend,
    /// snapshot-load.
    SnapshotLoad,
    /// snapshot-save.
    SnapshotSave,
    /// snapshot-delete.
    SnapshotDelete,
}

/// `JobStatus`: a job's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Never reported.
    Undefined,
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused by request.
    Paused,
    /// Ready to be completed (mirror-like jobs).
    Ready,
    /// Ready but paused.
    Standby,
    /// Waiting for other jobs of its transaction.
    Waiting,
    /// Waiting for `job-finalize`.
    Pending,
    /// Failing or being cancelled.
    Aborting,
    /// Finished; waiting for `job-dismiss`.
    Concluded,
    /// Gone.
    Null,
}

/// Arguments of the `job-*` verbs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobIdArgs {
    /// The job's id.
    pub id: String,
}

/// `JobInfo`: one entry of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Current state.
    pub status: JobStatus,
    /// Work done so far (unit chosen by the job).
    pub current_progress: i64,
    /// Estimated total work.
    pub total_progress: i64,
    /// Error text, once the job has failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
