//! The verbs a client sends a job: cancel, pause, resume, set-speed, complete, finalize,
//! dismiss. Each checks QEMU's verb table for the job's status first; the job's task acts on
//! what they set (flags, the cancellation token) at its next pause point.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Job, JobManager, JobStatus, JobVerb};
use crate::error::{Error, Result};

impl JobManager {
    /// job-cancel / block-job-cancel.
    pub fn cancel(&self, job: &Arc<Job>) -> Result<()> {
        let status = job.check_verb(JobVerb::Cancel)?;
        if status == JobStatus::Created {
            self.discard_unstarted(job);
            return Ok(());
        }
        {
            let mut st = job.lock();
            st.cancelled = true;
            // As QEMU: cancelling drops the user's pause.
            st.user_paused = false;
        }
        job.cancel.cancel();
        job.wake.notify_waiters();
        Ok(())
    }

    /// job-pause.
    pub fn pause(&self, job: &Arc<Job>) -> Result<()> {
        job.check_verb(JobVerb::Pause)?;
        let mut st = job.lock();
        if st.user_paused {
            return Err(Error::generic("Job is already paused"));
        }
        st.user_paused = true;
        Ok(())
    }

    /// job-resume (also clears an error's io-status, as QEMU does).
    pub fn resume(&self, job: &Arc<Job>) -> Result<()> {
        if !job.lock().user_paused {
            return Err(Error::generic("Can't resume a job that was not paused"));
        }
        job.check_verb(JobVerb::Resume)?;
        {
            let mut st = job.lock();
            st.user_paused = false;
            st.io_status = "ok";
        }
        job.wake.notify_waiters();
        Ok(())
    }

    /// block-job-set-speed.
    pub fn set_speed(&self, job: &Arc<Job>, speed: u64) -> Result<()> {
        job.check_verb(JobVerb::SetSpeed)?;
        job.lock().speed = speed;
        job.wake.notify_waiters();
        Ok(())
    }

    /// job-complete (no job type blockd has can be completed).
    pub fn complete(&self, job: &Arc<Job>) -> Result<()> {
        job.check_verb(JobVerb::Complete)?;
        Err(Error::generic(format!(
            "The active block job '{}' cannot be completed",
            job.id
        )))
    }

    /// job-finalize: the task waiting in `pending` commits and concludes.
    /// A member of a group (one `grouped` transaction) finalizes the whole group, as in QEMU.
    pub fn finalize(&self, job: &Arc<Job>) -> Result<()> {
        job.check_verb(JobVerb::Finalize)?;
        let group = job.group.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let members = match group {
            Some(g) => g.members(),
            None => vec![job.clone()],
        };
        for m in members {
            m.finalize_requested.store(true, Ordering::Release);
            m.wake.notify_waiters();
        }
        Ok(())
    }

    /// job-dismiss.
    pub fn dismiss(&self, job: &Arc<Job>) -> Result<()> {
        job.check_verb(JobVerb::Dismiss)?;
        self.remove_through(job, &[JobStatus::Null]);
        Ok(())
    }
}
