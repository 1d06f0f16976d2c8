//! The backup job body: compute the source map once, then a few workers claim runs still to
//! copy and copy them on the blocking pool with reused buffers; progress, speed limit, error
//! policies, pause and cancel are handled between runs. A cancel stops claiming and waits for
//! the copies in flight before the body returns (so abort runs after the I/O stopped).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::copy::{Copier, CopyError, Copying};
use super::{BackupJob, SyncMode, DEFAULT_WORKERS, MAX_WORKERS};
use crate::error::strerror;
use crate::job::{ErrorAction, JobCtx};

/// Copy request size without a speed limit, and with one (so the limit is followed closely).
const CHUNK_FAST: u64 = 8 << 20;
const CHUNK_LIMITED: u64 = 1 << 20;

/// Copied bytes, the buffer back, and the first error of a batch.
type Done = (u64, Vec<u8>, Result<(), CopyError>);
/// Runs one worker takes at once.
const MAX_RUNS: usize = 64;

/// A run `start..start + len` reached the target: with `discard-source`, discard it on the
/// source (after its claim ended: the discard passes the hook, which waits for claims in
/// flight). Returns the bytes to count as done.
fn copied(c: &Copier, discard: bool, start: u64, len: u64) -> u64 {
    if discard {
        if let Err(e) = c.source.discard(start, len) {
            tracing::debug!(error = %e, "discard-source failed");
        }
    }
    len
}

fn progress(ctx: &JobCtx, c: &Copier) {
    ctx.set_progress(
        c.done.load(Ordering::Acquire),
        c.total.load(Ordering::Acquire),
    );
}

pub(super) async fn run(job: Arc<BackupJob>, ctx: JobCtx) -> Result<(), String> {
    let c = job.copier.clone();
    progress(&ctx, &c);
    let top = job.sync == SyncMode::Top;
    let cm = c.clone();
    tokio::task::spawn_blocking(move || cm.compute_map(top))
        .await
        .map_err(|e| format!("backup task failed: {e}"))?
        .map_err(|e| strerror(&e))?;
    progress(&ctx, &c);
    if job.sync == SyncMode::None {
        // Copy-before-write only: runs until cancelled, and a cancel ends it at once (fleecing
        // tears down with job-cancel and waits for the job before deleting its scratch node).
        let cancel = ctx.cancel_token();
        while !ctx.is_cancelled() {
            ctx.pause_point().await;
            progress(&ctx, &c);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        return finish(&ctx, &c).await;
    }
    let limited = ctx.speed() > 0;
    let mut chunk: u64 = if limited { CHUNK_LIMITED } else { CHUNK_FAST };
    if job.perf.max_chunk > 0 {
        chunk = chunk.min(job.perf.max_chunk as u64);
    }
    chunk = chunk.max(c.cluster) / c.cluster * c.cluster;
    let workers = if limited {
        1
    } else {
        match job.perf.max_workers {
            Some(w) => usize::try_from(w.max(1)).unwrap_or(1).min(MAX_WORKERS),
            None => DEFAULT_WORKERS,
        }
    };
    let mut buffers: Vec<Vec<u8>> = Vec::new();
    let mut set: JoinSet<Done> = JoinSet::new();
    // Without a speed limit a worker keeps claiming until nothing is left (no hand-off through
    // this task per batch, which costs a wake-up each on a busy machine); with one it returns
    // after each batch for the rate limiter.
    let shared = Arc::new(Shared {
        cursor: AtomicU64::new(0),
        chunk: AtomicU64::new(chunk),
        halt: AtomicBool::new(false),
    });
    let mut failure: Option<String> = None;
    // After a stop, errors of copies still in flight are not reported again (their runs are
    // back in `todo` and are retried after the resume), as QEMU reports one error per stop.
    let mut stopping = false;
    loop {
        // Fill the workers.
        while failure.is_none()
            && !stopping
            && !ctx.is_cancelled()
            && !ctx.pause_requested()
            && set.len() < workers
        {
            let runs = shared.claim(&c);
            if runs.is_empty() {
                break;
            }
            let mut buf = buffers.pop().unwrap_or_default();
            let cw = c.clone();
            let sh = shared.clone();
            let wctx = ctx.clone();
            let discard = c.discard_source;
            set.spawn_blocking(move || {
                let mut result = Ok(());
                let mut done = 0;
                let mut runs = runs;
                loop {
                    if result.is_ok() {
                        if let Some(r) = cw.copy_batch(&runs, &mut buf) {
                            // One lock round for the batch's claims; discards after it (they
                            // pass the hook, which waits for claims in flight).
                            cw.finish_many(&runs, r.is_ok());
                            if r.is_ok() {
                                for &(start, len) in &runs {
                                    done += copied(&cw, discard, start, len);
                                }
                            }
                            result = r;
                            runs = Vec::new();
                        }
                    }
                    for (start, len) in runs {
                        if result.is_err() {
                            cw.finish(start, len, false);
                            continue;
                        }
                        // Grown to what the claims need (an incremental's single clusters
                        // never touch a whole chunk's pages), then reused.
                        if buf.len() < len as usize {
                            buf.resize(len as usize, 0);
                        }
                        let r = cw.copy_run(start, len, &mut buf, Copying::Worker);
                        // Finish the claim first: the discard passes the hook, which waits for
                        // claims in flight over its range.
                        cw.finish(start, len, r.is_ok());
                        if r.is_ok() {
                            done += copied(&cw, discard, start, len);
                        }
                        result = r;
                    }
                    if limited
                        || result.is_err()
                        || sh.halt.load(Ordering::Acquire)
                        || wctx.is_cancelled()
                        || wctx.pause_requested()
                    {
                        break;
                    }
                    runs = sh.claim(&cw);
                    if runs.is_empty() {
                        break;
                    }
                }
                (done, buf, result)
            });
        }
        let joined = tokio::select! {
            j = set.join_next() => j,
            // Long-running workers: keep the job's progress current meanwhile.
            _ = tokio::time::sleep(Duration::from_millis(100)), if !set.is_empty() => {
                progress(&ctx, &c);
                continue;
            }
        };
        let Some(joined) = joined else {
            // Nothing in flight: done, failed, cancelled, or pausing.
            if failure.is_some() || ctx.is_cancelled() {
                break;
            }
            if ctx.pause_requested() {
                ctx.pause_point().await;
                stopping = false;
                shared.halt.store(false, Ordering::Release);
                continue;
            }
            let (todo, inflight) = c.work_left();
            if !todo && !inflight {
                break;
            }
            if !todo {
                // The hook is copying the last runs: wait for it.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            continue;
        };
        let (len, buf, r) = joined.map_err(|e| format!("backup worker failed: {e}"))?;
        buffers.push(buf);
        progress(&ctx, &c);
        if len > 0 {
            ctx.rate_limit(len).await;
        }
        match r {
            Ok(()) => {}
            Err(_) if failure.is_some() || stopping => {}
            Err(e) => {
                let policy = if e.is_read {
                    job.on_source_error
                } else {
                    job.on_target_error
                };
                match ctx.error_action(policy, e.is_read, &e.err) {
                    ErrorAction::Report => {
                        failure.get_or_insert_with(|| strerror(&e.err));
                        shared.halt.store(true, Ordering::Release);
                    }
                    ErrorAction::Ignore => {
                        // As QEMU: the run is dirty again and copying moves on past it; it is
                        // retried on the next pass over the disk (one error event per failed
                        // attempt; a region that always fails is retried until the job is
                        // cancelled). From here on claims are QEMU's 1 MiB, so one bad
                        // sector holds back only its own megabyte.
                        let small = CHUNK_LIMITED.max(c.cluster);
                        shared.chunk.fetch_min(small, Ordering::AcqRel);
                        tokio::task::yield_now().await;
                    }
                    ErrorAction::Stop => {
                        stopping = true;
                        shared.halt.store(true, Ordering::Release);
                    }
                }
            }
        }
    }
    if let Some(f) = failure {
        wait_idle(&c).await;
        progress(&ctx, &c);
        return Err(f);
    }
    finish(&ctx, &c).await
}

/// What the workers share: where to claim next, the claim size, and a stop sign.
struct Shared {
    cursor: AtomicU64,
    chunk: AtomicU64,
    /// Stop claiming (a failure or a stop on error).
    halt: AtomicBool,
}

impl Shared {
    /// Claim the next batch at or after the cursor, wrapping to the start (runs put back by a
    /// failed copy are retried on the next pass).
    fn claim(&self, c: &Copier) -> Vec<(u64, u64)> {
        let chunk = self.chunk.load(Ordering::Acquire);
        let mut runs = c.claim_batch(self.cursor.load(Ordering::Acquire), chunk, MAX_RUNS);
        if runs.is_empty() {
            runs = c.claim_batch(0, chunk, MAX_RUNS);
        }
        if let Some(&(last, len)) = runs.last() {
            self.cursor.store(last + len, Ordering::Release);
        }
        runs
    }
}

async fn wait_idle(c: &Arc<Copier>) {
    let cw = c.clone();
    let _ = tokio::task::spawn_blocking(move || cw.wait_idle()).await;
}

async fn finish(ctx: &JobCtx, c: &Arc<Copier>) -> Result<(), String> {
    wait_idle(c).await;
    progress(ctx, c);
    if !ctx.is_cancelled() {
        let t = c.target.clone();
        tokio::task::spawn_blocking(move || t.flush())
            .await
            .map_err(|e| format!("backup task failed: {e}"))?
            .map_err(|e| strerror(&e))?;
    }
    Ok(())
}
