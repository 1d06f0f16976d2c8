//! Jobs: the lifecycle every long-running operation shares (create, backup).
//!
//! - `tables`: statuses, verbs and QEMU's two tables; `policy`: the rate limiter and the
//!   error policies; `group`: jobs that end together (transactions); `verbs`: what a client
//!   asks of a running job (cancel, pause, resume, set-speed, complete, finalize, dismiss).
//!
//! The lifecycle is two tables, as QEMU defines them: which status may follow which
//! ([`allowed_transition`]) and which verbs each status accepts ([`verb_allowed`]). Status only
//! changes through [`Job::transition`], which also emits `JOB_STATUS_CHANGE`, or, for a job
//! leaving the list (auto-dismissed, dismissed, discarded), through
//! [`JobManager::remove_through`], which changes status, removes the job and emits the events
//! under the list's lock. The event sink must therefore not call back into the manager (the
//! daemon's sink only queues the event for the monitors).
//!
//! A job runs as one tokio task: `created → running → (body) → waiting → pending → concluded →
//! null` on success, `running → aborting → concluded → null` on failure or cancel. The body is a
//! [`JobBody`]; it reports progress, honours pause points and watches the cancellation token
//! through its [`JobCtx`] and must return once cancelled: the job waits for its body (so its
//! I/O has stopped) before `abort` and `clean`. A body that panics concludes the job with an
//! error. Every job task is tracked; shutdown cancels and awaits them all.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};

mod group;
mod policy;
mod tables;
mod verbs;

pub use group::JobGroup;
use policy::RateState;
pub use policy::{ErrorAction, OnError};
pub use tables::{allowed_transition, verb_allowed, JobStatus, JobVerb};

/// Job events the core emits; the daemon turns them into QMP events.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// JOB_STATUS_CHANGE.
    StatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// BLOCK_JOB_COMPLETED (block jobs only).
    Completed {
        /// Job type.
        job_type: &'static str,
        /// Job id.
        device: String,
        /// Total progress.
        len: u64,
        /// Current progress.
        offset: u64,
        /// Speed limit.
        speed: u64,
        /// Error text when failed.
        error: Option<String>,
    },
    /// BLOCK_JOB_CANCELLED (block jobs only).
    Cancelled {
        /// Job type.
        job_type: &'static str,
        /// Job id.
        device: String,
        /// Total progress.
        len: u64,
        /// Current progress.
        offset: u64,
        /// Speed limit.
        speed: u64,
    },
    /// BLOCK_JOB_PENDING (block jobs with auto-finalize off).
    Pending {
        /// Job type.
        job_type: &'static str,
        /// Job id.
        id: String,
    },
    /// BLOCK_JOB_ERROR.
    IoError {
        /// Job id.
        device: String,
        /// "read" or "write".
        operation: &'static str,
        /// "report", "ignore", "stop".
        action: &'static str,
    },
}

/// Where job events go.
pub type EventSink = Arc<dyn Fn(JobEvent) + Send + Sync>;

/// The mutable part of a job, under its lock.
#[derive(Debug)]
pub struct JobState {
    /// Status.
    pub status: JobStatus,
    /// Paused by the user (job-pause).
    pub user_paused: bool,
    /// Bytes done.
    pub current: u64,
    /// Bytes to do.
    pub total: u64,
    /// Speed limit, bytes/s (0 = none).
    pub speed: u64,
    /// Error message once failed or cancelled.
    pub error: Option<String>,
    /// Cancel was requested.
    pub cancelled: bool,
    /// I/O status for query-block-jobs ("ok", "failed", "nospace").
    pub io_status: &'static str,
    /// Sleeping for the speed limit (query-block-jobs shows `busy: false` then, as QEMU).
    pub sleeping: bool,
}

/// What a job does: its body, and what happens to its resources at the end.
pub trait JobBody: Send + Sync + 'static {
    /// Do the work. Err(message) fails the job.
    fn run(
        self: Arc<Self>,
        ctx: JobCtx,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>>;
    /// Success: make the result visible (called at finalize).
    fn commit(&self) {}
    /// Failure or cancel: undo (called at finalize).
    fn abort(&self) {}
    /// Either way, after commit/abort: release resources.
    fn clean(&self) {}
}

/// One job.
pub struct Job {
    /// Job id.
    pub id: String,
    /// QAPI JobType ("create", "backup", ...).
    pub job_type: &'static str,
    /// Block jobs emit BLOCK_JOB_* events and show in query-block-jobs.
    pub is_block_job: bool,
    /// Finalize automatically.
    pub auto_finalize: bool,
    /// Dismiss automatically.
    pub auto_dismiss: bool,
    state: Mutex<JobState>,
    cancel: CancellationToken,
    wake: Notify,
    finalize_requested: AtomicBool,
    events: EventSink,
    body: Arc<dyn JobBody>,
    rate: Mutex<RateState>,
    drain_at_start: bool,
    group: Mutex<Option<Arc<JobGroup>>>,
}

/// What a job body uses to cooperate with its job.
#[derive(Clone)]
pub struct JobCtx {
    job: Arc<Job>,
}

impl JobCtx {
    /// Cancelled?
    pub fn is_cancelled(&self) -> bool {
        self.job.cancel.is_cancelled()
    }
    /// The cancellation token (to race I/O against).
    pub fn cancel_token(&self) -> CancellationToken {
        self.job.cancel.clone()
    }
    /// Set the total amount of work.
    pub fn set_total(&self, total: u64) {
        self.job.lock().total = total;
    }
    /// Add to the total.
    pub fn add_total(&self, n: u64) {
        self.job.lock().total += n;
    }
    /// Add done work.
    pub fn progress(&self, n: u64) {
        self.job.lock().current += n;
    }
    /// Current speed limit.
    pub fn speed(&self) -> u64 {
        self.job.lock().speed
    }
    /// Set progress outright (work done, total work).
    pub fn set_progress(&self, current: u64, total: u64) {
        let mut st = self.job.lock();
        st.current = current;
        st.total = total;
    }
    /// The job id.
    pub fn id(&self) -> &str {
        &self.job.id
    }
    /// Report an I/O error event.
    pub fn report_error(&self, operation: &'static str, action: &'static str) {
        if self.job.is_block_job {
            (self.job.events)(JobEvent::IoError {
                device: self.job.id.clone(),
                operation,
                action,
            });
        }
    }
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot of the state for the queries.
    pub fn snapshot(&self) -> JobInfo {
        let st = self.lock();
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: st.status,
            current: st.current,
            total: st.total,
            speed: st.speed,
            error: st.error.clone(),
            user_paused: st.user_paused,
            io_status: st.io_status,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            is_block_job: self.is_block_job,
            busy: st.status == JobStatus::Running && !st.sleeping,
        }
    }

    /// Change status (if the table allows) and emit JOB_STATUS_CHANGE.
    pub fn transition(&self, to: JobStatus) {
        if self.set_status(to) {
            self.emit_status(to);
        }
    }

    /// Change status if the table allows, without the event; whether it changed.
    fn set_status(&self, to: JobStatus) -> bool {
        let mut st = self.lock();
        if st.status == to && to != JobStatus::Aborting {
            return false;
        }
        if !allowed_transition(st.status, to) {
            tracing::error!(job = %self.id, from = st.status.as_str(), to = to.as_str(), "illegal job transition");
            return false;
        }
        st.status = to;
        true
    }

    fn emit_status(&self, to: JobStatus) {
        (self.events)(JobEvent::StatusChange {
            id: self.id.clone(),
            status: to,
        });
    }

    fn check_verb(&self, verb: JobVerb) -> Result<JobStatus> {
        let status = self.lock().status;
        if !verb_allowed(verb, status) {
            return Err(Error::generic(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                self.id,
                status.as_str(),
                verb.as_str()
            )));
        }
        Ok(status)
    }
}

/// A read-only view of a job.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// Id.
    pub id: String,
    /// Type.
    pub job_type: &'static str,
    /// Status.
    pub status: JobStatus,
    /// Done.
    pub current: u64,
    /// Total.
    pub total: u64,
    /// Speed limit.
    pub speed: u64,
    /// Error.
    pub error: Option<String>,
    /// Paused by user.
    pub user_paused: bool,
    /// I/O status.
    pub io_status: &'static str,
    /// auto-finalize.
    pub auto_finalize: bool,
    /// auto-dismiss.
    pub auto_dismiss: bool,
    /// Block job.
    pub is_block_job: bool,
    /// Doing work now (not paused, not sleeping for the speed limit).
    pub busy: bool,
}

/// Options for a new job.
pub struct JobSpec {
    /// Id.
    pub id: String,
    /// QAPI job type.
    pub job_type: &'static str,
    /// Emits BLOCK_JOB_* events.
    pub is_block_job: bool,
    /// auto-finalize.
    pub auto_finalize: bool,
    /// auto-dismiss.
    pub auto_dismiss: bool,
    /// Initial speed.
    pub speed: u64,
    /// Show the pause blip of a drained start (`running → paused → running`), as QEMU's
    /// backup jobs do.
    pub drain_at_start: bool,
}

/// The table of jobs.
pub struct JobManager {
    jobs: Mutex<Vec<Arc<Job>>>,
    events: EventSink,
    /// Every job task ever started and not yet reaped: shutdown cancels and awaits them.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// QEMU's rule for ids: a letter first, then letters, digits, '-', '.', '_'.
pub fn valid_id(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || "-._".contains(x))
}

impl JobManager {
    /// An empty table sending events to `events`.
    pub fn new(events: EventSink) -> Arc<JobManager> {
        Arc::new(JobManager {
            jobs: Mutex::new(Vec::new()),
            events,
            tasks: Mutex::new(Vec::new()),
        })
    }

    fn jobs(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All jobs, oldest first.
    pub fn list(&self) -> Vec<JobInfo> {
        self.jobs().iter().map(|j| j.snapshot()).collect()
    }

    /// [`list`](Self::list) unless the list is locked right now (then `None`): for tests that
    /// look at the list from inside the event sink.
    #[doc(hidden)]
    pub fn try_list(&self) -> Option<Vec<JobInfo>> {
        let jobs = match self.jobs.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(jobs.iter().map(|j| j.snapshot()).collect())
    }

    /// Find a job for `job-*` verbs (GenericError "Job not found") or `block-job-*` verbs
    /// (DeviceNotActive "Block job 'X' not found").
    pub fn find(&self, id: &str, block_verb: bool) -> Result<Arc<Job>> {
        let job = self.jobs().iter().find(|j| j.id == id).cloned();
        match job {
            Some(j) if !block_verb || j.is_block_job => Ok(j),
            _ if block_verb => Err(Error::new(
                ErrorKind::DeviceNotActive,
                format!("Block job '{id}' not found"),
            )),
            _ => Err(Error::generic("Job not found")),
        }
    }

    /// Create a job in `created` (not started). Checks the id.
    pub fn create(self: &Arc<Self>, spec: JobSpec, body: Arc<dyn JobBody>) -> Result<Arc<Job>> {
        if !valid_id(&spec.id) {
            return Err(Error::generic(format!("Invalid job ID '{}'", spec.id)));
        }
        let mut jobs = self.jobs();
        if jobs.iter().any(|j| j.id == spec.id) {
            return Err(Error::generic(format!(
                "Job ID '{}' already in use",
                spec.id
            )));
        }
        let job = Arc::new(Job {
            id: spec.id,
            job_type: spec.job_type,
            is_block_job: spec.is_block_job,
            auto_finalize: spec.auto_finalize,
            auto_dismiss: spec.auto_dismiss,
            state: Mutex::new(JobState {
                status: JobStatus::Undefined,
                user_paused: false,
                current: 0,
                total: 0,
                speed: spec.speed,
                error: None,
                cancelled: false,
                io_status: "ok",
                sleeping: false,
            }),
            cancel: CancellationToken::new(),
            wake: Notify::new(),
            finalize_requested: AtomicBool::new(false),
            events: self.events.clone(),
            body,
            rate: Mutex::new(RateState { next: None }),
            drain_at_start: spec.drain_at_start,
            group: Mutex::new(None),
        });
        jobs.push(job.clone());
        drop(jobs);
        job.transition(JobStatus::Created);
        Ok(job)
    }

    /// Start a created job's task. The job is `running` when this returns (as in QEMU), so a
    /// cancel that arrives before the task first runs cancels it instead of discarding it.
    pub fn start(self: &Arc<Self>, job: &Arc<Job>) {
        self.start_held(job);
        self.resume_held(job);
    }

    /// Start a created job inside a drained section that ends later (a transaction's): the
    /// job is `running` (then `paused`, for a job that shows a drained start) when this
    /// returns, and runs from [`JobManager::resume_held`] on, as QEMU's jobs started by one
    /// transaction all resume when its drained section ends.
    pub fn start_held(&self, job: &Arc<Job>) {
        job.transition(JobStatus::Running);
        if job.drain_at_start {
            job.transition(JobStatus::Paused);
        }
    }

    /// Run a job started by [`JobManager::start_held`].
    pub fn resume_held(self: &Arc<Self>, job: &Arc<Job>) {
        if job.drain_at_start {
            job.transition(JobStatus::Running);
        }
        let manager = self.clone();
        let job = job.clone();
        let handle = tokio::spawn(async move { manager.run(job).await });
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// A job whose creation failed after QEMU would have created it (a bad speed):
    /// `JOB_STATUS_CHANGE` created then null, as QEMU emits them; nothing is kept.
    pub fn announce_failed_creation(&self, id: &str) {
        for status in [JobStatus::Created, JobStatus::Null] {
            (self.events)(JobEvent::StatusChange {
                id: id.to_string(),
                status,
            });
        }
    }

    /// Drop a created-but-never-started job (aborted transaction): created → aborting →
    /// concluded → null, with no BLOCK_JOB_* event.
    pub fn discard_unstarted(&self, job: &Arc<Job>) {
        job.transition(JobStatus::Aborting);
        off_worker(|| {
            job.body.abort();
            job.body.clean();
        });
        self.remove_through(job, &[JobStatus::Concluded, JobStatus::Null]);
    }

    async fn run(self: Arc<Self>, job: Arc<Job>) {
        let ctx = JobCtx { job: job.clone() };
        // The body runs as its own task so that a panic in it is caught here and concludes
        // the job with an error. A cancel does not drop the body: the body watches the token
        // and returns once its I/O has stopped, and only then do abort and clean run.
        let body = tokio::spawn(job.body.clone().run(ctx.clone()));
        let result = match body.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                let msg = panic_message(e.into_panic());
                tracing::error!(job = %job.id, panic = %msg, "job body panicked");
                Err(format!("job panicked: {msg}"))
            }
            Err(e) => Err(format!("job task failed: {e}")),
        };
        // A body dropped at a pause point leaves it (paused → running) before ending: paused
        // cannot go to aborting directly.
        if job.lock().status == JobStatus::Paused {
            job.transition(JobStatus::Running);
        }
        let result = if job.cancel.is_cancelled() && result.is_ok() {
            Err("Operation canceled".to_string())
        } else {
            result
        };
        let group = job.group.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match result {
            Ok(()) => {
                if let Some(g) = &group {
                    g.body_done(&job, true);
                }
                job.transition(JobStatus::Waiting);
                if let Some(g) = &group {
                    if !g.wait_all(&job).await || job.cancel.is_cancelled() {
                        self.abort_in_group(&job, g, "Operation canceled".to_string());
                        return;
                    }
                }
                job.transition(JobStatus::Pending);
                // As in QEMU, no member of a group finalizes on its own while any member
                // waits for a manual job-finalize (which finalizes the whole group).
                let manual = !job.auto_finalize
                    || group
                        .as_ref()
                        .is_some_and(|g| g.members().iter().any(|m| !m.auto_finalize));
                if manual {
                    if job.is_block_job && !job.auto_finalize {
                        (self.events)(JobEvent::Pending {
                            job_type: job.job_type,
                            id: job.id.clone(),
                        });
                    }
                    loop {
                        let notified = job.wake.notified();
                        if job.finalize_requested.load(Ordering::Acquire)
                            || job.cancel.is_cancelled()
                        {
                            break;
                        }
                        tokio::select! {
                            _ = notified => {}
                            _ = job.cancel.cancelled() => {}
                        }
                    }
                }
                if job.cancel.is_cancelled() {
                    match &group {
                        // A cancelled pending member aborts its whole group, as in QEMU.
                        Some(g) => {
                            g.cancel_pending(&job);
                            self.abort_in_group(&job, g, "Operation canceled".to_string());
                        }
                        None => self.finish_failed(&job, "Operation canceled".to_string()),
                    }
                } else {
                    off_worker(|| {
                        job.body.commit();
                        job.body.clean();
                    });
                    self.emit_end(&job, None);
                    self.conclude(&job);
                }
            }
            Err(e) => match &group {
                Some(g) => {
                    g.body_done(&job, false);
                    self.abort_in_group(&job, g, e);
                }
                None => self.finish_failed(&job, e),
            },
        }
    }

    fn finish_failed(&self, job: &Arc<Job>, error: String) {
        job.transition(JobStatus::Aborting);
        job.lock().error = Some(error.clone());
        off_worker(|| {
            job.body.abort();
            job.body.clean();
        });
        self.emit_end(job, Some(error));
        self.conclude(job);
    }

    fn emit_end(&self, job: &Arc<Job>, error: Option<String>) {
        if !job.is_block_job {
            return;
        }
        let st = job.snapshot();
        let cancelled = job.cancel.is_cancelled();
        let event = if cancelled {
            JobEvent::Cancelled {
                job_type: job.job_type,
                device: job.id.clone(),
                len: st.total,
                offset: st.current,
                speed: st.speed,
            }
        } else {
            JobEvent::Completed {
                job_type: job.job_type,
                device: job.id.clone(),
                len: st.total,
                offset: st.current,
                speed: st.speed,
                error,
            }
        };
        (self.events)(event);
    }

    fn conclude(&self, job: &Arc<Job>) {
        if job.auto_dismiss {
            self.remove_through(job, &[JobStatus::Concluded, JobStatus::Null]);
        } else {
            job.transition(JobStatus::Concluded);
        }
    }

    /// Take `job` through the statuses `to` and out of the list in one step under the list's
    /// lock, as in QEMU, where `query-jobs` never shows an auto-dismissed job concluded nor a
    /// dismissed one null. The JOB_STATUS_CHANGE events are sent under the lock too, so a
    /// `query-jobs` that finds the job gone answers after them (as QEMU's main loop orders
    /// them) and a new job of the same id cannot announce itself first.
    pub(crate) fn remove_through(&self, job: &Arc<Job>, to: &[JobStatus]) {
        let mut jobs = self.jobs();
        let changed: Vec<JobStatus> = to.iter().copied().filter(|&s| job.set_status(s)).collect();
        jobs.retain(|j| !Arc::ptr_eq(j, job));
        for s in changed {
            job.emit_status(s);
        }
        drop(jobs);
    }

    /// Cancel every job and wait for every job task to end (shutdown); a task that
    /// panicked is reported. Jobs waiting in `pending` are cancelled too.
    pub async fn cancel_all(&self) {
        let jobs: Vec<_> = self.jobs().clone();
        for j in &jobs {
            if j.lock().status == JobStatus::Created {
                self.discard_unstarted(j);
            } else if !matches!(j.lock().status, JobStatus::Concluded | JobStatus::Null) {
                let _ = self.cancel(j);
            }
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "job task ended abnormally");
            }
        }
    }

    /// Number of job tasks still running (tests, shutdown diagnostics).
    pub fn running_tasks(&self) -> usize {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.len()
    }
}

/// Run a job's commit/abort/clean, which may block (a backup takes its filter out in a
/// drained section, waiting for requests in flight): on a multi-thread runtime's worker the
/// worker hands its other tasks (QMP, NBD) to the others first.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
