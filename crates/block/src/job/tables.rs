//! QEMU's job lifecycle tables: the statuses, the verbs, which status may follow which and
//! which verbs each status accepts.

/// QEMU's JobStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Not yet created.
    Undefined,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Ready to complete (mirror-like jobs).
    Ready,
    /// Paused while ready.
    Standby,
    /// Finished its work, waiting for its transaction group.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Being aborted.
    Aborting,
    /// Done; waits for dismiss.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// QEMU's JobVerb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    /// cancel
    Cancel,
    /// pause
    Pause,
    /// resume
    Resume,
    /// set-speed
    SetSpeed,
    /// complete
    Complete,
    /// finalize
    Finalize,
    /// dismiss
    Dismiss,
    /// change
    Change,
}

impl JobVerb {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

/// The transition table.
pub fn allowed_transition(from: JobStatus, to: JobStatus) -> bool {
    use JobStatus::*;
    matches!(
        (from, to),
        (Undefined, Created)
            | (Created, Running | Aborting | Null)
            | (Running, Paused | Ready | Waiting | Aborting)
            | (Paused, Running)
            | (Ready, Standby | Waiting | Aborting)
            | (Standby, Ready)
            | (Waiting, Pending | Aborting)
            | (Pending, Concluded | Aborting)
            | (Aborting, Concluded | Aborting)
            | (Concluded, Null)
    )
}

/// The verb table.
pub fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    use JobStatus::*;
    use JobVerb::*;
    match verb {
        Cancel => matches!(
            status,
            Created | Running | Paused | Ready | Standby | Waiting | Pending
        ),
        Pause | Resume | SetSpeed | Change => {
            matches!(status, Created | Running | Paused | Ready | Standby)
        }
        JobVerb::Complete => matches!(status, Ready | Standby),
        Finalize => status == Pending,
        Dismiss => status == Concluded,
    }
}
