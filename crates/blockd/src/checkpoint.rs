//! The periodic bitmap checkpoint task (beyond QEMU, which stores persistent bitmaps only at
//! close): every period, each node's persistent bitmaps are stored into its image.
//!
//! The task is owned, not fire-and-forget: [`Checkpointer::stop`] ends it and waits for a
//! round in flight, so shutdown closes the nodes only after the last checkpoint finished. A
//! panic while checkpointing a node is caught, reported at once (error level, with the
//! node's name and the panic's message), that node is left out of later rounds, and `stop`
//! returns every such report so the daemon can exit with a failure status.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;

/// How often persistent bitmaps are checkpointed into their images. `BLOCKD_BITMAP_CHECKPOINT_SECS`
/// overrides; 0 disables checkpoints altogether (periodic and at flush), giving QEMU's behaviour.
pub fn checkpoint_interval() -> Option<Duration> {
    let secs = std::env::var("BLOCKD_BITMAP_CHECKPOINT_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(10);
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// One node's checkpoint; a failure is logged and retried next round.
fn checkpoint_node(n: &block::NodeRef) {
    if let Err(e) = n.checkpoint_bitmaps() {
        tracing::warn!(node = n.name(), error = %e, "bitmap checkpoint failed");
    }
}

/// The running checkpoint task.
pub struct Checkpointer {
    stop: CancellationToken,
    task: JoinHandle<()>,
    panics: Arc<Mutex<Vec<String>>>,
}

impl Checkpointer {
    /// Starts checkpointing the daemon's nodes, or turns checkpoints off (also those at
    /// flush) when the period is 0; then `None`.
    pub fn start(daemon: Arc<Daemon>) -> Option<Checkpointer> {
        let Some(period) = checkpoint_interval() else {
            block::node::FLUSH_CHECKPOINTS.store(false, std::sync::atomic::Ordering::Relaxed);
            return None;
        };
        Some(Checkpointer::spawn(
            period,
            move || daemon.graph().nodes().to_vec(),
            |n| n.name().to_string(),
            checkpoint_node,
        ))
    }

    /// The loop over `targets()` every `period`: `work` on each, in a blocking thread.
    fn spawn<T, S, N, W>(period: Duration, targets: S, name: N, work: W) -> Checkpointer
    where
        T: Send + 'static,
        S: Fn() -> Vec<T> + Send + Sync + 'static,
        N: Fn(&T) -> String + Send + Sync + 'static,
        W: Fn(&T) + Send + Sync + 'static,
    {
        let stop = CancellationToken::new();
        let panics = Arc::new(Mutex::new(Vec::new()));
        let round = Arc::new(Round {
            targets,
            name,
            work,
            panics: panics.clone(),
            broken: Mutex::new(HashSet::new()),
        });
        let task = tokio::spawn(run(period, stop.clone(), round));
        Checkpointer { stop, task, panics }
    }

    /// Ends the task after the round in flight (if any) and returns the panics reported
    /// while it ran (empty when all went well).
    pub async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        let mut panics = std::mem::take(&mut *lock(&self.panics));
        if let Err(e) = self.task.await {
            let msg = format!("bitmap checkpoint task failed: {e}");
            tracing::error!("{msg}");
            panics.push(msg);
        }
        panics.extend(std::mem::take(&mut *lock(&self.panics)));
        panics
    }
}

struct Round<S, N, W> {
    targets: S,
    name: N,
    work: W,
    panics: Arc<Mutex<Vec<String>>>,
    /// Targets whose checkpoint panicked: left alone from then on.
    broken: Mutex<HashSet<String>>,
}

impl<T, S, N, W> Round<S, N, W>
where
    S: Fn() -> Vec<T>,
    N: Fn(&T) -> String,
    W: Fn(&T),
{
    fn run_once(&self) {
        let targets = match catch_unwind(AssertUnwindSafe(&self.targets)) {
            Ok(t) => t,
            Err(p) => return self.report("listing the nodes", &*p),
        };
        for t in targets {
            let name = (self.name)(&t);
            if lock(&self.broken).contains(&name) {
                continue;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.work)(&t))) {
                self.report(&format!("node '{name}'"), &*p);
                lock(&self.broken).insert(name);
            }
        }
    }

    fn report(&self, what: &str, payload: &(dyn std::any::Any + Send)) {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let text =
            format!("bitmap checkpoint of {what} panicked: {msg}; no more checkpoints for it");
        tracing::error!("{text}");
        lock(&self.panics).push(text);
    }
}

async fn run<T, S, N, W>(period: Duration, stop: CancellationToken, round: Arc<Round<S, N, W>>)
where
    T: Send + 'static,
    S: Fn() -> Vec<T> + Send + Sync + 'static,
    N: Fn(&T) -> String + Send + Sync + 'static,
    W: Fn(&T) + Send + Sync + 'static,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = round.clone();
        // Awaited before the next stop check: stop() returns only after this round.
        if let Err(e) = tokio::task::spawn_blocking(move || r.run_once()).await {
            let text = format!("bitmap checkpoint round failed: {e}");
            tracing::error!("{text}");
            lock(&round.panics).push(text);
        }
    }
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    type Counts = Arc<Mutex<HashMap<&'static str, u32>>>;

    fn counting(fail_on: &'static str, counts: Counts) -> Checkpointer {
        Checkpointer::spawn(
            Duration::from_millis(5),
            || vec!["a", "boom", "c"],
            |t: &&str| t.to_string(),
            move |t: &&'static str| {
                *lock(&counts).entry(*t).or_default() += 1;
                if *t == fail_on {
                    panic!("injected failure in {t}");
                }
            },
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_is_reported_and_the_other_nodes_go_on() {
        let counts: Counts = Arc::default();
        let c = counting("boom", counts.clone());
        // A few rounds after the panic (printing its backtrace may take a while).
        for _ in 0..500 {
            if lock(&counts).get("c").copied().unwrap_or(0) >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let panics = c.stop().await;
        let counts = lock(&counts).clone();
        assert_eq!(counts.get("boom"), Some(&1), "{counts:?}");
        assert!(counts["a"] >= 3 && counts["c"] >= 3, "{counts:?}");
        assert_eq!(
            panics,
            vec![
                "bitmap checkpoint of node 'boom' panicked: injected failure in boom; \
                 no more checkpoints for it"
                    .to_string()
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_healthy_loop_reports_nothing() {
        let counts: Counts = Arc::default();
        let c = counting("none", counts.clone());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(c.stop().await.is_empty());
        assert!(lock(&counts)["a"] >= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_waits_for_the_round_in_flight_and_no_round_follows() {
        let in_round = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(Mutex::new(0u32));
        let (flag, n) = (in_round.clone(), rounds.clone());
        let c = Checkpointer::spawn(
            Duration::from_millis(5),
            || vec![()],
            |_| "n".to_string(),
            move |_| {
                flag.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                *lock(&n) += 1;
                flag.store(false, Ordering::SeqCst);
            },
        );
        while !in_round.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(c.stop().await.is_empty());
        assert!(
            !in_round.load(Ordering::SeqCst),
            "stop returned during a round"
        );
        let after = *lock(&rounds);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*lock(&rounds), after, "a round ran after stop");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_listing_the_nodes_is_reported() {
        let c = Checkpointer::spawn(
            Duration::from_millis(5),
            || -> Vec<()> { panic!("no graph") },
            |_| String::new(),
            |_| {},
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        let panics = c.stop().await;
        assert!(!panics.is_empty());
        assert!(
            panics[0].contains("listing the nodes panicked: no graph"),
            "{panics:?}"
        );
    }
}
