//! Job groups: the jobs of one transaction end together.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::{Job, JobManager, JobStatus};

/// Jobs that end together (the jobs of one transaction): a member whose work is done waits
/// in `waiting` until every member's work is done; when one fails or is cancelled, every
/// other member is cancelled and all abort. The aborted group ends as QEMU ends an aborted
/// job transaction: the failing member goes to `aborting` at once; once every member's work
/// has stopped the others go to `aborting` and then all end, newest first.
#[derive(Default)]
pub struct JobGroup {
    state: Mutex<GroupState>,
    changed: Notify,
}

#[derive(Default)]
struct GroupState {
    members: Vec<std::sync::Weak<Job>>,
    done: usize,
    failed: bool,
    /// The member whose failure or cancel aborted the group.
    culprit: Option<std::sync::Weak<Job>>,
    /// Members of the failed group whose work has stopped.
    settled: usize,
    /// Aborted by cancelling a member waiting in `pending`: QEMU then ends every member in
    /// turn (aborting, cancelled, concluded), newest first, none singled out.
    from_pending: bool,
}

impl JobGroup {
    /// An empty group.
    pub fn new() -> Arc<JobGroup> {
        Arc::new(JobGroup::default())
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Put a job (not yet started) into the group.
    pub fn add(self: &Arc<Self>, job: &Arc<Job>) {
        self.lock().members.push(Arc::downgrade(job));
        *job.group.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.clone());
    }

    /// A member's body ended (`ok` or not). A failure cancels every other member.
    pub(super) fn body_done(&self, job: &Arc<Job>, ok: bool) {
        self.lock().done += 1;
        if !ok {
            self.fail(job);
        }
        self.changed.notify_waiters();
    }

    /// The members still alive.
    pub(super) fn members(&self) -> Vec<Arc<Job>> {
        self.lock()
            .members
            .iter()
            .filter_map(|w| w.upgrade())
            .collect()
    }

    /// One member failed or was cancelled: cancel every other member.
    fn fail(&self, job: &Arc<Job>) {
        self.abort(job, false);
    }

    /// A member waiting in `pending` was cancelled: the whole group aborts (QEMU's
    /// `job-cancel` of a pending job aborts its transaction).
    pub(super) fn cancel_pending(&self, job: &Arc<Job>) {
        self.abort(job, true);
    }

    fn abort(&self, job: &Arc<Job>, from_pending: bool) {
        // From `pending`, a member with auto-finalize on may have ended already: it has nothing
        // left to abort and will not settle, so it leaves the group.
        let ended: Vec<*const Job> = if from_pending {
            self.members()
                .iter()
                .filter(|m| matches!(m.lock().status, JobStatus::Concluded | JobStatus::Null))
                .map(Arc::as_ptr)
                .collect()
        } else {
            Vec::new()
        };
        let others = {
            let mut st = self.lock();
            if st.failed {
                Vec::new()
            } else {
                st.failed = true;
                st.from_pending = from_pending;
                if from_pending {
                    st.members
                        .retain(|w| w.strong_count() > 0 && !ended.contains(&w.as_ptr()));
                } else {
                    st.culprit = Some(Arc::downgrade(job));
                }
                st.members.iter().filter_map(|w| w.upgrade()).collect()
            }
        };
        for other in others.iter().rev().filter(|o| !Arc::ptr_eq(o, job)) {
            {
                let mut st = other.lock();
                st.cancelled = true;
                st.user_paused = false;
            }
            other.cancel.cancel();
            other.wake.notify_waiters();
        }
        self.changed.notify_waiters();
    }

    /// Whether `job` is the member that aborted the group.
    pub(super) fn is_culprit(&self, job: &Arc<Job>) -> bool {
        let st = self.lock();
        st.culprit
            .as_ref()
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(job)))
    }

    /// A member of the failed group stopped its work. For the last one, every member, newest
    /// first (QEMU's job transaction lists the newest job first): the caller ends them all.
    /// Also whether the group was aborted from `pending` (see [`cancel_pending`]).
    pub(super) fn settle(&self) -> Option<(Vec<Arc<Job>>, bool)> {
        let mut st = self.lock();
        st.settled += 1;
        if st.settled != st.members.len() {
            return None;
        }
        let members = st
            .members
            .iter()
            .rev()
            .filter_map(|w| w.upgrade())
            .collect();
        Some((members, st.from_pending))
    }

    /// Wait until every member's body ended or one failed; true when all succeeded. A cancel
    /// of the waiting member fails the whole group.
    pub(super) async fn wait_all(&self, job: &Arc<Job>) -> bool {
        loop {
            let notified = self.changed.notified();
            {
                let st = self.lock();
                if st.failed {
                    return false;
                }
                if st.done >= st.members.len() {
                    return true;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = job.cancel.cancelled() => {
                    self.fail(job);
                    return false;
                }
            }
        }
    }
}

impl JobManager {
    /// A member of a failed group stopped its work: the member that failed goes to
    /// `aborting` now; the last member to stop moves the others there and then ends every
    /// member, newest first (QEMU's order for an aborted job transaction).
    pub(super) fn abort_in_group(&self, job: &Arc<Job>, group: &JobGroup, error: String) {
        if group.is_culprit(job) {
            job.transition(JobStatus::Aborting);
        }
        job.lock().error = Some(error);
        let Some((members, from_pending)) = group.settle() else {
            return;
        };
        if !from_pending {
            for m in &members {
                if !group.is_culprit(m) {
                    m.transition(JobStatus::Aborting);
                }
            }
        }
        for m in &members {
            if from_pending {
                m.transition(JobStatus::Aborting);
            }
            m.body.abort();
            m.body.clean();
            let error = m.lock().error.clone();
            self.emit_end(m, error);
            self.conclude(m);
        }
    }
}
