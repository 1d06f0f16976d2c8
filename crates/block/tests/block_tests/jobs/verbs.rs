//! Job verbs on jobs in each status: the verb table's refusals, pause / resume / set-speed,
//! unknown and malformed ids, and jobs created but never started.

use super::*;

#[tokio::test(start_paused = true)]
async fn finalize_of_running_job_is_refused_by_verb_table() {
    let err = refused_while_running("finalize", JobManager::finalize).await;

    assert_eq!(err.kind(), ErrorKind::Generic);
}

#[tokio::test(start_paused = true)]
async fn dismiss_of_running_job_is_refused_by_verb_table() {
    refused_while_running("dismiss", JobManager::dismiss).await;
}

#[tokio::test(start_paused = true)]
async fn complete_of_running_job_is_refused_by_verb_table() {
    refused_while_running("complete", JobManager::complete).await;
}

#[tokio::test(start_paused = true)]
async fn dismiss_of_pending_job_is_refused_by_verb_table() {
    let (manager, _events) = manager();
    let (job, _body) = pending_job(&manager).await;

    let err = manager.dismiss(&job).unwrap_err();

    assert_eq!(
        err.message(),
        "Job 'j' in state 'pending' cannot accept command verb 'dismiss'"
    );
}

#[tokio::test(start_paused = true)]
async fn verbs_on_concluded_job_other_than_dismiss_are_refused() {
    let (manager, _events) = manager();
    let job = manager
        .create(spec("j", true, true, false), Body::new(Script::Succeed))
        .unwrap();
    manager.start(&job);
    wait_status(&job, JobStatus::Concluded).await;

    let cancel = manager.cancel(&job).unwrap_err();
    let pause = manager.pause(&job).unwrap_err();
    let speed = manager.set_speed(&job, 1).unwrap_err();
    let finalize = manager.finalize(&job).unwrap_err();

    for (err, verb) in [
        (cancel, "cancel"),
        (pause, "pause"),
        (speed, "set-speed"),
        (finalize, "finalize"),
    ] {
        assert_eq!(
            err.message(),
            format!("Job 'j' in state 'concluded' cannot accept command verb '{verb}'")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn paused_job_reaches_paused_status_and_resumes_running() {
    let (manager, events) = manager();
    let (job, _body) = running_forever(&manager, true).await;

    manager.pause(&job).unwrap();
    wait_status(&job, JobStatus::Paused).await;
    manager.resume(&job).unwrap();
    wait_status(&job, JobStatus::Running).await;

    assert_eq!(
        events.statuses(),
        ["created", "running", "paused", "running"]
    );
    assert!(!job.snapshot().user_paused);
}

#[tokio::test(start_paused = true)]
async fn pausing_paused_job_is_refused() {
    let (manager, _events) = manager();
    let (job, _body) = running_forever(&manager, true).await;
    manager.pause(&job).unwrap();

    let err = manager.pause(&job).unwrap_err();

    assert_eq!(err.message(), "Job is already paused");
}

#[tokio::test(start_paused = true)]
async fn resuming_job_that_was_not_paused_is_refused() {
    let (manager, _events) = manager();
    let (job, _body) = running_forever(&manager, true).await;

    let err = manager.resume(&job).unwrap_err();

    assert_eq!(err.message(), "Can't resume a job that was not paused");
}

#[tokio::test(start_paused = true)]
async fn cancelled_paused_job_resumes_then_aborts_and_concludes() {
    // QEMU: cancel clears the user pause; the job leaves its pause point (paused → running)
    // and then aborts. Paused → aborting is not in the transition table.
    let (manager, events) = manager();
    let (job, _body) = running_forever(&manager, false).await;
    manager.pause(&job).unwrap();
    wait_status(&job, JobStatus::Paused).await;

    manager.cancel(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;

    assert_eq!(
        events.trace(),
        [
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "CANCELLED",
            "concluded"
        ]
    );
    assert!(!job.snapshot().user_paused);
}

#[tokio::test(start_paused = true)]
async fn set_speed_on_running_job_is_visible_to_body_and_queries() {
    let (manager, _events) = manager();
    let (job, _body) = running_forever(&manager, true).await;

    manager.set_speed(&job, 1 << 20).unwrap();

    assert_eq!(job.snapshot().speed, 1 << 20);
}

#[test]
fn unknown_job_for_job_verb_is_generic_job_not_found() {
    let (manager, _events) = manager();

    let err = manager.find("x", false).refused();

    assert_eq!(err.kind(), ErrorKind::Generic);
    assert_eq!(err.message(), "Job not found");
}

#[test]
fn unknown_job_for_block_verb_is_device_not_active() {
    let (manager, _events) = manager();

    let err = manager.find("x", true).refused();

    assert_eq!(err.kind(), ErrorKind::DeviceNotActive);
    assert_eq!(err.message(), "Block job 'x' not found");
}

#[test]
fn non_block_job_is_not_found_by_block_verbs() {
    let (manager, _events) = manager();
    manager
        .create(spec("c", false, true, true), Body::new(Script::Succeed))
        .unwrap();

    let block = manager.find("c", true).refused();
    let generic = manager.find("c", false);

    assert_eq!(block.kind(), ErrorKind::DeviceNotActive);
    assert_eq!(block.message(), "Block job 'c' not found");
    assert!(generic.is_ok());
}

#[test]
fn malformed_job_id_is_refused() {
    let (manager, _events) = manager();

    let err = manager
        .create(spec("1x", true, true, true), Body::new(Script::Succeed))
        .refused();

    assert_eq!(err.message(), "Invalid job ID '1x'");
    assert!(manager.list().is_empty());
}

#[test]
fn duplicate_job_id_is_refused() {
    let (manager, _events) = manager();
    manager
        .create(spec("j", true, true, true), Body::new(Script::Succeed))
        .unwrap();

    let err = manager
        .create(spec("j", true, true, true), Body::new(Script::Succeed))
        .refused();

    assert_eq!(err.message(), "Job ID 'j' already in use");
    assert_eq!(manager.list().len(), 1);
}

#[test]
fn created_job_is_listed_in_created_status() {
    let (manager, events) = manager();

    manager
        .create(spec("j", true, true, true), Body::new(Script::Succeed))
        .unwrap();

    assert_eq!(manager.list()[0].status, JobStatus::Created);
    assert_eq!(events.statuses(), ["created"]);
}

#[test]
fn discard_unstarted_goes_created_aborting_concluded_null_without_block_events() {
    let (manager, events) = manager();
    let body = Body::new(Script::Succeed);
    let job = manager
        .create(spec("j", true, true, false), body.clone())
        .unwrap();

    manager.discard_unstarted(&job);

    assert_eq!(
        events.statuses(),
        ["created", "aborting", "concluded", "null"]
    );
    assert!(events.block_events().is_empty());
    assert!(manager.list().is_empty());
    assert_eq!(body.calls(), ["abort", "clean"]);
}

#[test]
fn cancel_of_created_job_discards_it() {
    let (manager, events) = manager();
    let job = manager
        .create(spec("j", true, true, false), Body::new(Script::Succeed))
        .unwrap();

    manager.cancel(&job).unwrap();

    assert_eq!(
        events.statuses(),
        ["created", "aborting", "concluded", "null"]
    );
    assert!(manager.list().is_empty());
}
