//! Job groups: the jobs of one transaction end together.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Job;

/// Jobs that end together (the jobs of one transaction): a member whose work is done waits
/// in `waiting` until every member's work is done; when one fails or is cancelled, every
/// other member is cancelled and all abort.
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
        let others = {
            let mut st = self.lock();
            if st.failed {
                Vec::new()
            } else {
                st.failed = true;
                st.members.iter().filter_map(|w| w.upgrade()).collect()
            }
        };
        for other in others.iter().filter(|o| !Arc::ptr_eq(o, job)) {
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
