//! The backup job body: compute the source map once, then a few workers claim runs still to
//! copy and copy them on the blocking pool with reused buffers; progress, speed limit, error
//! policies, pause and cancel are handled between runs. A cancel stops claiming and waits for
//! the copies in flight before the body returns (so abort runs after the I/O stopped).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::copy::{Copier, CopyError};
use super::{BackupJob, SyncMode};
use crate::error::strerror;
use crate::job::{ErrorAction, JobCtx};

/// Copy request size without a speed limit, and with one (so the limit is followed closely).
const CHUNK_FAST: u64 = 8 << 20;
const CHUNK_LIMITED: u64 = 1 << 20;
/// Workers (parallel copies) at most: the machine has few cores, the disks like big requests.
const MAX_WORKERS: usize = 3;

type Done = (u64, u64, Vec<u8>, Result<(), CopyError>);

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
        // Copy-before-write only: runs until cancelled.
        while !ctx.is_cancelled() {
            ctx.pause_point().await;
            progress(&ctx, &c);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return finish(&ctx, &c).await;
    }
    let limited = ctx.speed() > 0;
    let mut chunk = if limited { CHUNK_LIMITED } else { CHUNK_FAST };
    if job.perf.max_chunk > 0 {
        chunk = chunk.min(job.perf.max_chunk as u64);
    }
    chunk = chunk.max(c.cluster) / c.cluster * c.cluster;
    let workers = if limited {
        1
    } else {
        (job.perf.max_workers.max(1) as usize).min(MAX_WORKERS)
    };
    let mut buffers: Vec<Vec<u8>> = Vec::new();
    let mut set: JoinSet<Done> = JoinSet::new();
    let mut cursor = 0u64;
    let mut failure: Option<String> = None;
    loop {
        // Fill the workers.
        while failure.is_none()
            && !ctx.is_cancelled()
            && !ctx.pause_requested()
            && set.len() < workers
        {
            let claim = c
                .claim_next(cursor, chunk)
                .or_else(|| c.claim_next(0, chunk));
            let Some((start, len)) = claim else { break };
            cursor = start + len;
            let mut buf = buffers.pop().unwrap_or_default();
            let cw = c.clone();
            let discard = c.discard_source;
            set.spawn_blocking(move || {
                if buf.len() < chunk as usize {
                    buf.resize(chunk as usize, 0);
                }
                let r = cw.copy_run(start, len, &mut buf);
                // Finish the claim first: the discard passes the hook, which waits for
                // claims in flight over its range.
                cw.finish(start, len, r.is_ok());
                if r.is_ok() && discard {
                    if let Err(e) = cw.source.discard(start, len) {
                        tracing::debug!(error = %e, "discard-source failed");
                    }
                }
                (start, len, buf, r)
            });
        }
        let Some(joined) = set.join_next().await else {
            // Nothing in flight: done, failed, cancelled, or pausing.
            if failure.is_some() || ctx.is_cancelled() {
                break;
            }
            if ctx.pause_requested() {
                ctx.pause_point().await;
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
        let (_, len, buf, r) = joined.map_err(|e| format!("backup worker failed: {e}"))?;
        buffers.push(buf);
        progress(&ctx, &c);
        match r {
            Ok(()) => {
                ctx.rate_limit(len).await;
            }
            Err(e) => {
                let policy = if e.is_read {
                    job.on_source_error
                } else {
                    job.on_target_error
                };
                match ctx.error_action(policy, e.is_read, &e.err) {
                    ErrorAction::Report => {
                        failure.get_or_insert_with(|| strerror(&e.err));
                    }
                    ErrorAction::Ignore => {
                        // Retried later (the run is back in `todo`); don't spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    ErrorAction::Stop => {}
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
