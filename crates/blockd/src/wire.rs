//! Core facts rendered as the schema's reply and event types (`qapi::types`), so every reply
//! and event blockd sends has the shape the schema declares, written down once.

use serde::de::DeserializeOwned;
use serde_json::Value;

use block::job::{JobEvent, JobInfo};
use qapi::types::{self as t, Event};

/// A QAPI enum value from its wire name (the core names its states the QAPI way).
fn qapi_enum<T: DeserializeOwned>(name: &str) -> Result<T, block::Error> {
    serde_json::from_value(Value::String(name.to_string())).map_err(|_| {
        block::Error::generic(format!("internal error: '{name}' is not a schema value"))
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, block::Error> {
    serde_json::to_value(v).map_err(|e| block::Error::generic(format!("internal error: {e}")))
}

/// `query-jobs` entry.
pub fn job_info(j: &JobInfo) -> Result<Value, block::Error> {
    to_value(&t::JobInfo {
        id: j.id.clone(),
        job_type: qapi_enum(j.job_type)?,
        status: qapi_enum(j.status.as_str())?,
        current_progress: j.current as i64,
        total_progress: j.total as i64,
        error: j.error.clone(),
    })
}

/// `query-block-jobs` entry.
pub fn block_job_info(j: &JobInfo) -> Result<Value, block::Error> {
    to_value(&t::BlockJobInfo {
        job_type: qapi_enum(j.job_type)?,
        device: j.id.clone(),
        len: j.total as i64,
        offset: j.current as i64,
        busy: j.busy,
        paused: j.user_paused,
        speed: j.speed as i64,
        io_status: qapi_enum(j.io_status)?,
        ready: false,
        status: qapi_enum(j.status.as_str())?,
        auto_finalize: j.auto_finalize,
        auto_dismiss: j.auto_dismiss,
        error: j.error.clone(),
        actively_synced: None,
    })
}

/// `query-block-exports` entry.
pub fn export_info(id: &str, node_name: &str, shutting_down: bool) -> Result<Value, block::Error> {
    to_value(&t::BlockExportInfo {
        id: id.to_string(),
        export_type: t::BlockExportType::Nbd,
        node_name: node_name.to_string(),
        shutting_down,
    })
}

/// Send a schema event to every monitor.
pub fn emit(events: &qmp::EventBus, event: Event) {
    events.emit(event.name(), Some(Value::Object(event.data())));
}

/// A core job event as the schema's event.
pub fn job_event(ev: JobEvent) -> Result<Event, block::Error> {
    Ok(match ev {
        JobEvent::StatusChange { id, status } => Event::JobStatusChange(t::JobStatusChange {
            id,
            status: qapi_enum(status.as_str())?,
        }),
        JobEvent::Completed {
            job_type,
            device,
            len,
            offset,
            speed,
            error,
        } => Event::BlockJobCompleted(t::BlockJobCompleted {
            job_type: qapi_enum(job_type)?,
            device,
            len: len as i64,
            offset: offset as i64,
            speed: speed as i64,
            error,
        }),
        JobEvent::Cancelled {
            job_type,
            device,
            len,
            offset,
            speed,
        } => Event::BlockJobCancelled(t::BlockJobProgress {
            job_type: qapi_enum(job_type)?,
            device,
            len: len as i64,
            offset: offset as i64,
            speed: speed as i64,
        }),
        JobEvent::Pending { job_type, id } => Event::BlockJobPending(t::BlockJobPending {
            job_type: qapi_enum(job_type)?,
            id,
        }),
        JobEvent::IoError {
            device,
            operation,
            action,
        } => Event::BlockJobError(t::BlockJobError {
            device,
            operation: qapi_enum(operation)?,
            action: qapi_enum(action)?,
        }),
    })
}
