//! Transactions: a list of actions that take effect all together or not at all.
//!
//! Each action is first *prepared*, in list order: it checks everything and does the part of
//! its work that can still be undone (a bitmap is added, a clear keeps the old bits, a job is
//! created but not started). An action sees the effects of the actions prepared before it
//! (add a bitmap, then merge into it, in one transaction).
//!
//! If every action prepared, each is *committed*, newest first (jobs start, a removed bitmap is
//! released). If one fails, every action prepared so far, the failing one included, is
//! *aborted*, newest first, so the state is exactly as before; the failing action's error is
//! the transaction's. Either way each action is then *cleaned*, newest first.
//!
//! The abort of a partly prepared action must be safe: an action records what it did as it goes
//! and undoes only that.
//!
//! [`bitmaps`] holds the dirty-bitmap actions; job and snapshot actions live beside the code
//! they drive.

pub mod bitmaps;

use crate::error::{Error, Result};

/// One action of a transaction.
pub trait Action: Send {
    /// The action's type as QMP names it ("block-dirty-bitmap-add"), for error texts.
    fn kind(&self) -> &'static str;
    /// Check and do the undoable part of the work.
    fn prepare(&mut self) -> Result<()>;
    /// Make the prepared work final (every action prepared).
    fn commit(&mut self) {}
    /// Undo whatever `prepare` did, even if it failed half-way.
    fn abort(&mut self) {}
    /// Release what the action holds (after commit or abort).
    fn clean(&mut self) {}
    /// Whether the action can join a group of jobs that complete together
    /// (`completion-mode: grouped`); only job-creating actions can.
    fn supports_grouped(&self) -> bool {
        false
    }
}

/// How the jobs a transaction creates complete (QAPI `ActionCompletionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompletionMode {
    /// Each job finishes on its own.
    #[default]
    Individual,
    /// The jobs succeed or fail together.
    Grouped,
}

/// The error of the `abort` action, which exists to make a transaction fail.
pub struct AbortAction;

impl Action for AbortAction {
    fn kind(&self) -> &'static str {
        "abort"
    }
    fn prepare(&mut self) -> Result<()> {
        Err(Error::generic("Transaction aborted using Abort action"))
    }
}

/// QEMU's refusal of a grouped transaction with an action that creates no job; checked for
/// the whole list before anything is prepared.
fn check_grouped(actions: &[Box<dyn Action>], mode: CompletionMode) -> Result<()> {
    if mode != CompletionMode::Grouped {
        return Ok(());
    }
    match actions.iter().find(|a| !a.supports_grouped()) {
        Some(a) => Err(Error::generic(format!(
            "Action '{}' does not support transaction property completion-mode = grouped",
            a.kind()
        ))),
        None => Ok(()),
    }
}

/// Run `actions` as one transaction: all take effect, or none does and the first error is
/// returned.
pub fn run(actions: &mut [Box<dyn Action>], mode: CompletionMode) -> Result<()> {
    check_grouped(actions, mode)?;
    let mut registered = 0;
    let mut failure = None;
    for action in actions.iter_mut() {
        registered += 1;
        if let Err(e) = action.prepare() {
            failure = Some(e);
            break;
        }
    }
    let done = &mut actions[..registered];
    match failure {
        Some(e) => {
            done.iter_mut().rev().for_each(|a| a.abort());
            done.iter_mut().rev().for_each(|a| a.clean());
            Err(e)
        }
        None => {
            done.iter_mut().rev().for_each(|a| a.commit());
            done.iter_mut().rev().for_each(|a| a.clean());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records every call, in order, into a shared log.
    struct Probe {
        id: usize,
        fail: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Probe {
        fn note(&self, what: &str) {
            self.log.lock().unwrap().push(format!("{what}{}", self.id));
        }
    }

    impl Action for Probe {
        fn kind(&self) -> &'static str {
            "probe"
        }
        fn prepare(&mut self) -> Result<()> {
            self.note("prepare");
            if self.fail {
                Err(Error::generic(format!("probe {} failed", self.id)))
            } else {
                Ok(())
            }
        }
        fn commit(&mut self) {
            self.note("commit");
        }
        fn abort(&mut self) {
            self.note("abort");
        }
        fn clean(&mut self) {
            self.note("clean");
        }
    }

    type Log = Arc<Mutex<Vec<String>>>;

    fn probes(fail_at: Option<usize>, n: usize) -> (Vec<Box<dyn Action>>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let actions = (0..n)
            .map(|id| {
                Box::new(Probe {
                    id,
                    fail: Some(id) == fail_at,
                    log: log.clone(),
                }) as Box<dyn Action>
            })
            .collect();
        (actions, log)
    }

    #[test]
    fn success_commits_and_cleans_newest_first() {
        let (mut actions, log) = probes(None, 3);
        run(&mut actions, CompletionMode::Individual).unwrap();
        let log = log.lock().unwrap().join(" ");
        assert_eq!(
            log,
            "prepare0 prepare1 prepare2 commit2 commit1 commit0 clean2 clean1 clean0"
        );
    }

    #[test]
    fn failure_aborts_every_registered_action_including_the_failing_one() {
        let (mut actions, log) = probes(Some(1), 3);
        let err = run(&mut actions, CompletionMode::Individual).unwrap_err();
        assert_eq!(err.message(), "probe 1 failed");
        let log = log.lock().unwrap().join(" ");
        assert_eq!(log, "prepare0 prepare1 abort1 abort0 clean1 clean0");
    }

    #[test]
    fn abort_action_fails_with_qemus_text() {
        let mut actions: Vec<Box<dyn Action>> = vec![Box::new(AbortAction)];
        let err = run(&mut actions, CompletionMode::Individual).unwrap_err();
        assert_eq!(err.message(), "Transaction aborted using Abort action");
    }

    #[test]
    fn grouped_refuses_actions_that_create_no_job_before_preparing_them() {
        let (mut actions, log) = probes(None, 2);
        let err = run(&mut actions, CompletionMode::Grouped).unwrap_err();
        assert_eq!(
            err.message(),
            "Action 'probe' does not support transaction property completion-mode = grouped"
        );
        assert!(log.lock().unwrap().is_empty(), "nothing is prepared");
    }

    #[test]
    fn empty_transaction_succeeds() {
        run(&mut [], CompletionMode::Individual).unwrap();
    }
}
