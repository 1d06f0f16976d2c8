//! The job lifecycle: statuses, events, verbs and their refusals, and blockdev-create.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::create::{CreateJob, CreateSpec};
use block::job::{Job, JobBody, JobCtx, JobEvent, JobManager, JobSpec, JobStatus};
use block::ErrorKind;

use crate::common::{wait_status, Refused};

mod verbs;

type BoxFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Every event the manager emitted, in order.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<JobEvent>>>);

impl Events {
    fn all(&self) -> Vec<JobEvent> {
        self.0.lock().unwrap().clone()
    }

    /// The JOB_STATUS_CHANGE statuses, in order.
    fn statuses(&self) -> Vec<&'static str> {
        self.all()
            .iter()
            .filter_map(|e| match e {
                JobEvent::StatusChange { status, .. } => Some(status.as_str()),
                _ => None,
            })
            .collect()
    }

    /// A compact trace: statuses by name, block events as "COMPLETED", "CANCELLED", "PENDING".
    fn trace(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|e| match e {
                JobEvent::StatusChange { status, .. } => status.as_str().to_string(),
                JobEvent::Completed { .. } => "COMPLETED".to_string(),
                JobEvent::Cancelled { .. } => "CANCELLED".to_string(),
                JobEvent::Pending { .. } => "PENDING".to_string(),
                JobEvent::IoError { .. } => "ERROR".to_string(),
            })
            .collect()
    }

    fn block_events(&self) -> Vec<JobEvent> {
        self.all()
            .into_iter()
            .filter(|e| !matches!(e, JobEvent::StatusChange { .. }))
            .collect()
    }
}

fn manager() -> (Arc<JobManager>, Events) {
    let events = Events::default();
    let sink = events.clone();
    let manager = JobManager::new(Arc::new(move |e| sink.0.lock().unwrap().push(e)));
    (manager, events)
}

fn spec(id: &str, block: bool, auto_finalize: bool, auto_dismiss: bool) -> JobSpec {
    JobSpec {
        id: id.to_string(),
        job_type: if block { "backup" } else { "create" },
        is_block_job: block,
        auto_finalize,
        auto_dismiss,
        speed: 0,
        drain_at_start: false,
    }
}

/// What a test body does when run.
#[derive(Clone, Copy)]
enum Script {
    /// Report 10 of 10 done and succeed.
    Succeed,
    /// Fail with "boom".
    Fail,
    /// Loop on pause points until cancelled.
    Forever,
}

/// A body following a script and recording which hooks the manager called.
struct Body {
    script: Script,
    calls: Mutex<Vec<&'static str>>,
}

impl Body {
    fn new(script: Script) -> Arc<Body> {
        Arc::new(Body {
            script,
            calls: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

impl JobBody for Body {
    fn run(self: Arc<Self>, ctx: JobCtx) -> BoxFuture {
        Box::pin(async move {
            self.calls.lock().unwrap().push("run");
            match self.script {
                Script::Succeed => {
                    ctx.set_total(10);
                    ctx.progress(10);
                    Ok(())
                }
                Script::Fail => Err("boom".to_string()),
                // Bodies watch the cancellation token and return: the job ends only
                // once its body has stopped.
                Script::Forever => {
                    while !ctx.is_cancelled() {
                        ctx.pause_point().await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(())
                }
            }
        })
    }
    fn commit(&self) {
        self.calls.lock().unwrap().push("commit");
    }
    fn abort(&self) {
        self.calls.lock().unwrap().push("abort");
    }
    fn clean(&self) {
        self.calls.lock().unwrap().push("clean");
    }
}

/// Wait until the manager no longer lists `id`.
async fn wait_gone(manager: &JobManager, id: &str) {
    for _ in 0..1000 {
        if manager.list().iter().all(|j| j.id != id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {id} never went away");
}

/// Start a block job with a body that runs until cancelled; return it once the body runs.
async fn running_forever(manager: &Arc<JobManager>, auto_dismiss: bool) -> (Arc<Job>, Arc<Body>) {
    let body = Body::new(Script::Forever);
    let job = manager
        .create(spec("j", true, true, auto_dismiss), body.clone())
        .unwrap();
    manager.start(&job);
    for _ in 0..1000 {
        if body.calls().contains(&"run") {
            return (job, body);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("job body never ran");
}

/// Create job "j" (auto-finalize) with a `script` body, start it, and wait until it has
/// gone (with `auto_dismiss`) or concluded.
async fn run_to_end(
    block: bool,
    auto_dismiss: bool,
    script: Script,
) -> (Arc<JobManager>, Events, Arc<Job>, Arc<Body>) {
    let (manager, events) = manager();
    let body = Body::new(script);
    let job = start_to_end(&manager, block, auto_dismiss, body.clone()).await;
    (manager, events, job, body)
}

/// Create job "j" (auto-finalize) in `manager` with `body`, start it, and wait until it has
/// gone (with `auto_dismiss`) or concluded.
async fn start_to_end(
    manager: &Arc<JobManager>,
    block: bool,
    auto_dismiss: bool,
    body: Arc<Body>,
) -> Arc<Job> {
    let job = manager
        .create(spec("j", block, true, auto_dismiss), body)
        .unwrap();
    manager.start(&job);
    if auto_dismiss {
        wait_gone(manager, "j").await;
    } else {
        wait_status(&job, JobStatus::Concluded).await;
    }
    job
}

/// Start block job "j" without auto-finalize; return it once it is pending.
async fn pending_job(manager: &Arc<JobManager>) -> (Arc<Job>, Arc<Body>) {
    let body = Body::new(Script::Succeed);
    let job = manager
        .create(spec("j", true, false, false), body.clone())
        .unwrap();
    manager.start(&job);
    wait_status(&job, JobStatus::Pending).await;
    (job, body)
}

/// Cancel a running block job and wait until it concludes.
async fn cancelled_running_job() -> (Events, Arc<Job>, Arc<Body>) {
    let (manager, events) = manager();
    let (job, body) = running_forever(&manager, false).await;
    manager.cancel(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;
    (events, job, body)
}

/// The refusal of `verb` on a running job, checking QEMU's verb-table wording.
async fn refused_while_running(
    verb: &str,
    call: fn(&JobManager, &Arc<Job>) -> block::Result<()>,
) -> block::Error {
    let (manager, _events) = manager();
    let (job, _body) = running_forever(&manager, false).await;

    let err = call(&manager, &job).unwrap_err();

    assert_eq!(
        err.message(),
        format!("Job 'j' in state 'running' cannot accept command verb '{verb}'")
    );
    err
}

#[tokio::test(start_paused = true)]
async fn successful_job_walks_all_statuses_to_null_with_auto_dismiss() {
    let (_manager, events, _job, _body) = run_to_end(false, true, Script::Succeed).await;

    assert_eq!(
        events.statuses(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn successful_non_block_job_emits_no_block_job_events() {
    let (_manager, events, _job, _body) = run_to_end(false, true, Script::Succeed).await;

    assert!(events.block_events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn successful_block_job_emits_completed_between_pending_and_concluded() {
    let (_manager, events, _job, _body) = run_to_end(true, true, Script::Succeed).await;

    assert_eq!(
        events.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "COMPLETED",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn completed_event_carries_progress_and_no_error() {
    let (_manager, events, _job, _body) = run_to_end(true, true, Script::Succeed).await;

    let completed = events
        .block_events()
        .into_iter()
        .find_map(|e| match e {
            JobEvent::Completed {
                job_type,
                device,
                len,
                offset,
                error,
                ..
            } => Some((job_type, device, len, offset, error)),
            _ => None,
        })
        .unwrap();
    assert_eq!(completed, ("backup", "j".to_string(), 10, 10, None));
}

#[tokio::test(start_paused = true)]
async fn successful_job_commits_then_cleans() {
    let (_manager, _events, _job, body) = run_to_end(false, true, Script::Succeed).await;

    assert_eq!(body.calls(), ["run", "commit", "clean"]);
}

#[tokio::test(start_paused = true)]
async fn successful_job_without_auto_dismiss_stays_concluded_until_dismissed() {
    let (manager, events, job, _body) = run_to_end(false, false, Script::Succeed).await;

    manager.dismiss(&job).unwrap();

    assert!(manager.list().is_empty());
    assert_eq!(events.statuses().last(), Some(&"null"));
}

#[tokio::test(start_paused = true)]
async fn failing_job_goes_running_aborting_concluded_with_error() {
    let (_manager, events, job, _body) = run_to_end(false, false, Script::Fail).await;

    assert_eq!(
        events.statuses(),
        ["created", "running", "aborting", "concluded"]
    );
    assert_eq!(job.snapshot().error.as_deref(), Some("boom"));
}

#[tokio::test(start_paused = true)]
async fn failing_job_aborts_then_cleans() {
    let (_manager, _events, _job, body) = run_to_end(false, false, Script::Fail).await;

    assert_eq!(body.calls(), ["run", "abort", "clean"]);
}

#[tokio::test(start_paused = true)]
async fn failing_block_job_emits_completed_with_error() {
    let (_manager, events, _job, _body) = run_to_end(true, false, Script::Fail).await;

    assert_eq!(
        events.trace(),
        ["created", "running", "aborting", "COMPLETED", "concluded"]
    );
    let error = events.block_events().into_iter().find_map(|e| match e {
        JobEvent::Completed { error, .. } => error,
        _ => None,
    });
    assert_eq!(error.as_deref(), Some("boom"));
}

#[tokio::test(start_paused = true)]
async fn cancelled_running_block_job_aborts_with_cancelled_event() {
    let (events, job, _body) = cancelled_running_job().await;

    assert_eq!(
        events.trace(),
        ["created", "running", "aborting", "CANCELLED", "concluded"]
    );
    assert_eq!(job.snapshot().error.as_deref(), Some("Operation canceled"));
}

#[tokio::test(start_paused = true)]
async fn cancelled_running_job_aborts_and_never_commits() {
    let (_events, _job, body) = cancelled_running_job().await;

    assert_eq!(body.calls(), ["run", "abort", "clean"]);
}

#[test]
fn started_job_is_running_before_its_task_runs() {
    let (manager, events) = manager();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let job = manager
        .create(spec("j", true, true, false), Body::new(Script::Succeed))
        .unwrap();

    runtime.block_on(async { manager.start(&job) });

    assert_eq!(job.snapshot().status, JobStatus::Running);
    assert_eq!(events.statuses(), ["created", "running"]);
}

#[tokio::test(start_paused = true)]
async fn job_cancelled_right_after_start_runs_the_abort_path_once() {
    // QEMU's job_start makes the job `running` at once; a cancel arriving before the task
    // first runs must cancel the started job, not discard it as never started.
    let (manager, events) = manager();
    let body = Body::new(Script::Succeed);
    let job = manager
        .create(spec("j", true, true, false), body.clone())
        .unwrap();

    manager.start(&job);
    manager.cancel(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;

    assert_eq!(
        events.trace(),
        ["created", "running", "aborting", "CANCELLED", "concluded"]
    );
    assert!(!body.calls().contains(&"commit"));
    assert_eq!(body.calls().iter().filter(|c| **c == "clean").count(), 1);
}

#[tokio::test(start_paused = true)]
async fn job_without_auto_finalize_waits_in_pending() {
    let (manager, events) = manager();
    let (job, body) = pending_job(&manager).await;
    tokio::time::sleep(Duration::from_secs(60)).await;

    assert_eq!(job.snapshot().status, JobStatus::Pending);
    assert_eq!(
        events.trace(),
        ["created", "running", "waiting", "pending", "PENDING"]
    );
    assert_eq!(body.calls(), ["run"]);
}

#[tokio::test(start_paused = true)]
async fn finalize_of_pending_job_commits_and_concludes() {
    let (manager, events) = manager();
    let (job, body) = pending_job(&manager).await;

    manager.finalize(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;

    assert_eq!(
        events.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "PENDING",
            "COMPLETED",
            "concluded"
        ]
    );
    assert_eq!(body.calls(), ["run", "commit", "clean"]);
}

#[tokio::test(start_paused = true)]
async fn cancel_of_pending_job_aborts_with_cancelled_event() {
    let (manager, events) = manager();
    let (job, body) = pending_job(&manager).await;

    manager.cancel(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;

    assert_eq!(
        events.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "PENDING",
            "aborting",
            "CANCELLED",
            "concluded"
        ]
    );
    assert_eq!(body.calls(), ["run", "abort", "clean"]);
}

#[tokio::test(start_paused = true)]
async fn non_block_job_without_auto_finalize_emits_no_pending_event() {
    let (manager, events) = manager();
    let job = manager
        .create(spec("j", false, false, false), Body::new(Script::Succeed))
        .unwrap();

    manager.start(&job);
    wait_status(&job, JobStatus::Pending).await;

    assert!(events.block_events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn cancel_all_ends_every_running_job() {
    let (manager, _events) = manager();
    let (job, _body) = running_forever(&manager, false).await;

    manager.cancel_all().await;

    assert_eq!(job.snapshot().status, JobStatus::Concluded);
}

#[tokio::test]
async fn create_job_makes_file_of_given_size() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("new.img");
    let (manager, events) = manager();
    let body = CreateJob::new(CreateSpec::File {
        filename: file.to_str().unwrap().to_string(),
        size: 3 << 20,
    });
    let job = manager
        .create(spec("create0", false, true, false), body)
        .unwrap();

    manager.start(&job);
    wait_status(&job, JobStatus::Concluded).await;

    assert_eq!(std::fs::metadata(&file).unwrap().len(), 3 << 20);
    assert_eq!(job.snapshot().error, None);
    assert_eq!(
        events.statuses(),
        ["created", "running", "waiting", "pending", "concluded"]
    );
}

#[tokio::test]
async fn create_job_in_missing_directory_fails_with_strerror_text() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("no-such-dir").join("new.img");
    let file = file.to_str().unwrap().to_string();
    let (manager, _events) = manager();
    let body = CreateJob::new(CreateSpec::File {
        filename: file.clone(),
        size: 1 << 20,
    });
    let job = manager
        .create(spec("create0", false, true, false), body)
        .unwrap();

    manager.start(&job);
    wait_status(&job, JobStatus::Concluded).await;

    assert_eq!(
        job.snapshot().error,
        Some(format!(
            "Could not create '{file}': No such file or directory"
        ))
    );
}

/// How job "j" ends in [`shown_at_each_status`].
#[derive(Clone, Copy, Debug)]
enum End {
    /// Succeeds, auto-dismissed.
    Succeed,
    /// Fails, auto-dismissed.
    Fail,
    /// Cancelled while running, auto-dismissed.
    Cancel,
    /// Created and discarded unstarted (an aborted transaction).
    Unstarted,
    /// Succeeds without auto-dismiss, then job-dismiss.
    Dismiss,
}

/// What a `query-jobs` would find of job "j" at the moment each of its JOB_STATUS_CHANGE
/// events is sent: its status, "absent", or "locked" (the list is locked by the change
/// itself, so a query waits until the job is gone). The sink looks without blocking.
async fn shown_at_each_status(end: End) -> Vec<(&'static str, &'static str)> {
    type Seen = Arc<Mutex<Vec<(&'static str, &'static str)>>>;
    let seen: Seen = Arc::default();
    let me: Arc<std::sync::OnceLock<std::sync::Weak<JobManager>>> = Arc::default();
    let (sink_seen, sink_me) = (seen.clone(), me.clone());
    let manager = JobManager::new(Arc::new(move |e| {
        if let (JobEvent::StatusChange { status, .. }, Some(m)) =
            (e, sink_me.get().and_then(|w| w.upgrade()))
        {
            let shown = match m.try_list() {
                None => "locked",
                Some(l) => l
                    .into_iter()
                    .find(|j| j.id == "j")
                    .map_or("absent", |j| j.status.as_str()),
            };
            sink_seen.lock().unwrap().push((status.as_str(), shown));
        }
    }));
    me.set(Arc::downgrade(&manager)).ok();
    match end {
        End::Succeed | End::Fail => {
            let script = if matches!(end, End::Fail) {
                Script::Fail
            } else {
                Script::Succeed
            };
            start_to_end(&manager, true, true, Body::new(script)).await;
        }
        End::Cancel => {
            let (job, _body) = running_forever(&manager, true).await;
            manager.cancel(&job).unwrap();
            wait_gone(&manager, "j").await;
        }
        End::Unstarted => {
            let job = manager
                .create(spec("j", true, true, false), Body::new(Script::Succeed))
                .unwrap();
            manager.discard_unstarted(&job);
        }
        End::Dismiss => {
            let job = start_to_end(&manager, true, false, Body::new(Script::Succeed)).await;
            manager.dismiss(&job).unwrap();
        }
    }
    let out = seen.lock().unwrap().clone();
    out
}

#[tokio::test(start_paused = true)]
async fn an_auto_dismissed_job_is_never_listed_concluded_nor_a_dismissed_one_null() {
    // As in QEMU: concluded and null of an auto-dismissed (or discarded) job, and null of
    // job-dismiss, happen with leaving the list and their events under its lock, so a query
    // finds the job either before them or gone after them.
    for end in [
        End::Succeed,
        End::Fail,
        End::Cancel,
        End::Unstarted,
        End::Dismiss,
    ] {
        let seen = shown_at_each_status(end).await;
        let tail: Vec<_> = seen.iter().rev().take(2).rev().cloned().collect();
        let concluded = if matches!(end, End::Dismiss) {
            "concluded"
        } else {
            "locked"
        };
        assert_eq!(
            tail,
            vec![("concluded", concluded), ("null", "locked")],
            "{end:?}: {seen:?}"
        );
    }
}
