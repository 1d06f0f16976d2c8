//! What the job core does for every job about speed and I/O errors: the shared rate limiter
//! (`speed`, `block-job-set-speed`) and QEMU's error policies (`on-*-error`, `io-status`,
//! `BLOCK_JOB_ERROR`).

use std::time::{Duration, Instant};

use super::{JobCtx, JobStatus};

/// QEMU's BlockdevOnError: what a job does about an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Go on; the failed work is retried.
    Ignore,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// Stop (pause as if by the user) until resumed or cancelled.
    Stop,
    /// For jobs: as `Enospc`.
    Auto,
}

/// What the job core decided about one I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail the job with the error.
    Report,
    /// Retry the failed work later.
    Ignore,
    /// The job is now stopped; retry after it resumes (the body's next pause point waits).
    Stop,
}

/// The rate limiter every job uses: a byte budget per time slice derived from the job's
/// `speed`, so a job never runs more than one slice ahead of its limit.
#[derive(Debug)]
pub(super) struct RateState {
    /// When the work done so far is "paid for" at the current speed.
    pub(super) next: Option<Instant>,
}

/// Longest time a job runs ahead of its speed limit (the burst the limiter allows).
const RATE_SLICE: Duration = Duration::from_millis(100);

impl JobCtx {
    /// Account `bytes` of work against the speed limit and wait while the job is ahead of
    /// it. The wait is a pause point (a pause takes effect during it), returns at once on
    /// cancel, and follows speed changes (block-job-set-speed) while it lasts.
    pub async fn rate_limit(&self, bytes: u64) {
        let mut speed = self.speed();
        let mut next = {
            let mut rs = self.job.rate.lock().unwrap_or_else(|p| p.into_inner());
            if speed == 0 {
                rs.next = None;
                return;
            }
            let now = Instant::now();
            // Budget left unused for more than a slice is forfeited: no burst after idling.
            let floor = now.checked_sub(RATE_SLICE).unwrap_or(now);
            let base = rs.next.map_or(now, |n| n.max(floor));
            let n = base + Duration::from_secs_f64(bytes as f64 / speed as f64);
            rs.next = Some(n);
            n
        };
        loop {
            if self.is_cancelled() {
                return;
            }
            if self.job.lock().user_paused {
                self.pause_point().await;
                continue;
            }
            let now = Instant::now();
            let wait = next.saturating_duration_since(now);
            if wait.is_zero() {
                return;
            }
            let notified = self.job.wake.notified();
            self.job.lock().sleeping = true;
            tokio::select! {
                _ = tokio::time::sleep(wait.min(RATE_SLICE)) => {}
                _ = self.job.cancel.cancelled() => {}
                _ = notified => {}
            }
            self.job.lock().sleeping = false;
            if self.is_cancelled() {
                return;
            }
            let new_speed = self.speed();
            if new_speed != speed {
                let mut rs = self.job.rate.lock().unwrap_or_else(|p| p.into_inner());
                if new_speed == 0 {
                    rs.next = None;
                    return;
                }
                let now = Instant::now();
                let left = next.saturating_duration_since(now).as_secs_f64();
                next = now + Duration::from_secs_f64(left * speed as f64 / new_speed as f64);
                rs.next = Some(next);
                speed = new_speed;
            }
        }
    }
    /// Decide what to do about an I/O error under `policy` (QEMU's block_job_error_action):
    /// emits BLOCK_JOB_ERROR, and for a stop sets `io-status` and pauses the job as a user
    /// pause would (the body's next pause point waits for job-resume or cancel).
    pub fn error_action(
        &self,
        policy: OnError,
        is_read: bool,
        err: &std::io::Error,
    ) -> ErrorAction {
        let nospace = err.raw_os_error() == Some(libc::ENOSPC);
        let action = match policy {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto if nospace => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => ErrorAction::Report,
        };
        let name = match action {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        };
        self.report_error(if is_read { "read" } else { "write" }, name);
        if action == ErrorAction::Stop {
            let mut st = self.job.lock();
            st.user_paused = true;
            st.io_status = if nospace { "nospace" } else { "failed" };
        }
        action
    }
    /// Has the user (or a stop on error) asked the job to pause?
    pub fn pause_requested(&self) -> bool {
        self.job.lock().user_paused && !self.job.cancel.is_cancelled()
    }
    /// A point where the job may pause: waits while the user has it paused.
    pub async fn pause_point(&self) {
        loop {
            let notified = self.job.wake.notified();
            let paused = {
                let st = self.job.lock();
                st.user_paused && !self.job.cancel.is_cancelled()
            };
            if !paused {
                if self.job.lock().status == JobStatus::Paused {
                    self.job.transition(JobStatus::Running);
                }
                return;
            }
            if self.job.lock().status == JobStatus::Running {
                self.job.transition(JobStatus::Paused);
            }
            tokio::select! {
                _ = notified => {}
                _ = self.job.cancel.cancelled() => {}
            }
        }
    }
}
