//! The copy engine of a backup: which clusters are still to copy, who is copying which right
//! now, and the copy-before-write hook that keeps the backup at its point in time.
//!
//! One lock ([`Copier::state`]) guards `todo` (clusters not yet copied, at the job's cluster
//! size) and `inflight` (runs someone is copying). Whoever copies a run first *claims* it:
//! removes it from `todo` and lists it in `inflight`, under the lock; the copy itself runs
//! without the lock. So the hook and the job's workers never copy a cluster twice, and a
//! guest write to a cluster whose copy is in flight waits (condvar) until that copy is done.
//! A failed copy puts its run back into `todo`: nothing is ever lost.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use hbitmap::HBitmap;

use super::kcopy::{self, WriteTurn};
use crate::driver::BlockStatus;
use crate::node::{Node, NodeRef, WriteHook};

/// Who copies a run: a worker of the job, or the copy-before-write hook while a guest write
/// waits (it does not queue for the target's [`WriteTurn`] behind a worker's turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copying {
    Worker,
    ForGuest,
}

/// A copy failure: which side failed (read = source).
#[derive(Debug)]
pub(crate) struct CopyError {
    pub is_read: bool,
    pub err: io::Error,
}

pub(crate) struct CopyState {
    /// Clusters still to copy.
    pub todo: HBitmap,
    /// Runs being copied now: (start, end).
    pub inflight: Vec<(u64, u64)>,
    /// Runs a reader of the point-in-time view is reading now (cluster-aligned): writes
    /// there wait, so what the reader found still to copy stays unchanged in the source.
    pub readers: Vec<(u64, u64)>,
    /// Threads waiting on the condvar: the end of a claim wakes nobody when this is 0 (a
    /// notify is a system call even without waiters; claims end once per copied run).
    waiters: usize,
}

/// What regions of the source read as zeros, or are to be skipped, computed once.
pub(crate) struct SourceMap {
    /// Whole clusters that read as zeros at the start.
    pub zero: HBitmap,
}

/// A run `[start, end)` of a view read and whether it is still only in the source.
pub(crate) type ViewRun = (u64, u64, bool);

/// Shared between the job body, its workers and the write hook.
pub(crate) struct Copier {
    pub source: NodeRef,
    pub target: NodeRef,
    pub cluster: u64,
    pub size: u64,
    pub compress: bool,
    pub discard_source: bool,
    /// `x-perf.use-copy-range`: offload copies with `copy_file_range` (which may share
    /// extents with the source or copy on a server) before falling back to `splice`.
    pub offload: bool,
    /// The target has no backing: unmapping zeros is safe there.
    pub may_unmap: bool,
    state: Mutex<CopyState>,
    cv: Condvar,
    /// Bytes copied (job progress).
    pub done: AtomicU64,
    /// Bytes to copy (job progress).
    pub total: AtomicU64,
    /// Set once the map is known (the hook works without it).
    pub map: Mutex<Option<std::sync::Arc<SourceMap>>>,
    /// The job ended: the hook lets writes through untouched.
    pub stopped: AtomicBool,
    /// The workers' kernel copies into the target's file write one at a time: the kernel
    /// would serialise them on the file's inode lock, spinning (see [`WriteTurn`]). The hook
    /// does not wait for it (a guest write waits for the hook); writes through a buffer
    /// (compression, filters) do not take it either: compressing stays parallel.
    turn: WriteTurn,
}

impl Copier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: NodeRef,
        target: NodeRef,
        cluster: u64,
        todo: HBitmap,
        compress: bool,
        discard_source: bool,
        offload: bool,
    ) -> Copier {
        let size = source.size();
        let total = clipped_count(&todo, size);
        let may_unmap = target.child("backing").is_none();
        Copier {
            source,
            target,
            cluster,
            size,
            compress,
            discard_source,
            offload,
            may_unmap,
            state: Mutex::new(CopyState {
                todo,
                inflight: Vec::new(),
                readers: Vec::new(),
                waiters: 0,
            }),
            cv: Condvar::new(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            map: Mutex::new(None),
            stopped: AtomicBool::new(false),
            turn: WriteTurn::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, CopyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for the end of a claim or a read hold, counted in `waiters` (both under the lock,
    /// so no wake-up is lost).
    fn wait<'a>(&'a self, mut st: MutexGuard<'a, CopyState>) -> MutexGuard<'a, CopyState> {
        st.waiters += 1;
        let mut st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        st.waiters -= 1;
        st
    }

    /// Wake the waiters, if any (call with the lock released).
    fn wake(&self, waiters: usize) {
        if waiters > 0 {
            self.cv.notify_all();
        }
    }

    fn align(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset / self.cluster * self.cluster;
        let end = offset
            .saturating_add(len)
            .div_ceil(self.cluster)
            .saturating_mul(self.cluster)
            .min(self.size);
        (start, end)
    }

    /// Claim up to `max` bytes in at most `max_runs` runs still to copy, at or after `from`
    /// (scattered dirty clusters go to one worker together).
    pub fn claim_batch(&self, from: u64, max: u64, max_runs: usize) -> Vec<(u64, u64)> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let mut total = 0;
        let mut at = from;
        while out.len() < max_runs && total < max {
            let Some((start, len)) = st.todo.next_dirty_area(at, self.size, max - total) else {
                break;
            };
            st.todo.reset(start, len);
            st.inflight.push((start, start + len));
            out.push((start, len));
            total += len;
            at = start + len;
        }
        out
    }

    /// Whether anything is left to copy or being copied.
    pub fn work_left(&self) -> (bool, bool) {
        let st = self.lock();
        (!st.todo.is_empty(), !st.inflight.is_empty())
    }

    /// Claim every cluster of `[start, end)` still to copy, waiting for copies in flight that
    /// overlap it (the hook: the write may proceed once this returns and the claims are copied).
    fn claim_range(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut st = self.lock();
        loop {
            let overlaps = |&(s, e): &(u64, u64)| s < end && start < e;
            let busy = st.inflight.iter().any(overlaps) || st.readers.iter().any(overlaps);
            if !busy {
                break;
            }
            st = self.wait(st);
        }
        let runs: Vec<(u64, u64)> = st.todo.dirty_ranges(start, end).collect();
        for &(s, l) in &runs {
            st.todo.reset(s, l);
            st.inflight.push((s, s + l));
        }
        runs
    }

    /// End a claim: on failure the run goes back to `todo`.
    pub fn finish(&self, start: u64, len: u64, ok: bool) {
        self.finish_many(&[(start, len)], ok);
    }

    /// End the claims of `runs` (one lock round for a worker's batch): on failure the runs
    /// go back to `todo`.
    pub fn finish_many(&self, runs: &[(u64, u64)], ok: bool) {
        let mut st = self.lock();
        for &(start, len) in runs {
            if let Some(i) = st.inflight.iter().position(|&r| r == (start, start + len)) {
                st.inflight.swap_remove(i);
            }
            if ok {
                self.done.fetch_add(len, Ordering::AcqRel);
            } else {
                st.todo.set(start, len);
            }
        }
        let waiters = st.waiters;
        drop(st);
        self.wake(waiters);
    }

    /// Copy one claimed run from source to target with `buf` (at least `len` bytes).
    pub fn copy_run(
        &self,
        start: u64,
        len: u64,
        buf: &mut [u8],
        who: Copying,
    ) -> Result<(), CopyError> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let end = start + len;
        let mut off = start;
        while off < end {
            // Split the run into pieces that are all-zero at the start or all data.
            let (zero, piece_end) = match &map {
                Some(m) if m.zero.get(off) => (true, m.zero.next_clean(off, end).unwrap_or(end)),
                Some(m) => (false, m.zero.next_dirty(off, end).unwrap_or(end)),
                None => (false, end),
            };
            let n = piece_end - off;
            if zero {
                self.target
                    .write_zeroes(off, n, self.may_unmap)
                    .map_err(|err| CopyError {
                        is_read: false,
                        err,
                    })?;
            } else {
                self.copy_data(off, n, buf, who)?;
            }
            off = piece_end;
        }
        Ok(())
    }

    /// Copy several claimed runs (an incremental's scattered dirty clusters) as one target
    /// request: the target gives one host range for all of them (qcow2: one contiguous
    /// allocation and one L2 pass) and the source pieces are spliced into it through the
    /// worker's pipe, which goes out to the target a pipe-full at a time. `None`: not for this
    /// batch (compression, fewer than two runs, zero clusters in the source map, or a target
    /// that cannot; nothing was done); copy the runs with [`Copier::copy_run`]. `buf` (grown
    /// to the largest run) serves source clusters that are not plain file data.
    pub fn copy_batch(
        &self,
        runs: &[(u64, u64)],
        buf: &mut Vec<u8>,
    ) -> Option<Result<(), CopyError>> {
        if self.compress || runs.len() < 2 {
            return None;
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(m) = &map {
            if runs
                .iter()
                .any(|&(s, l)| m.zero.next_dirty(s, s + l).is_some())
            {
                return None;
            }
        }
        let side: Cell<Option<bool>> = Cell::new(None);
        let (source, turn) = (&self.source, &self.turn);
        // Where the next target piece starts: run index and offset inside it.
        let (mut ri, mut rpos) = (0usize, 0u64);
        let r = self
            .target
            .write_batch_host(runs, &mut |tf: &File, th: u64, tn: u64| {
                let tgt = kcopy::Target {
                    file: tf,
                    turn: Some(turn),
                };
                let mut funnel = kcopy::Funnel::new(tgt, th);
                let mut left = tn;
                while left > 0 {
                    let Some(&(rs, rl)) = runs.get(ri) else {
                        side.set(Some(false));
                        return Err(io::Error::other("batched copy: target range too long"));
                    };
                    let k = (rl - rpos).min(left);
                    let g = rs + rpos;
                    let got = source.read_host(g, k, &mut |sf: &File, sh: u64, sn: u64| {
                        funnel.push(sf, sh, sn).map_err(|e| {
                            side.set(Some(e.is_read));
                            e.err
                        })
                    });
                    match got {
                        Ok(true) => {}
                        Ok(false) => {
                            // Backing or compressed clusters of the source: through memory.
                            let n = usize::try_from(k).map_err(io::Error::other)?;
                            if buf.len() < n {
                                buf.resize(n, 0);
                            }
                            let b = &mut buf[..n];
                            source.read(g, b).inspect_err(|_| side.set(Some(true)))?;
                            funnel.push_bytes(b).map_err(|e| {
                                side.set(Some(e.is_read));
                                e.err
                            })?;
                        }
                        Err(e) => {
                            if side.get().is_none() {
                                side.set(Some(true));
                            }
                            return Err(e);
                        }
                    }
                    left -= k;
                    rpos += k;
                    if rpos == rl {
                        ri += 1;
                        rpos = 0;
                    }
                }
                funnel.finish().map_err(|e| {
                    side.set(Some(e.is_read));
                    e.err
                })
            });
        match r {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(err) => Some(Err(CopyError {
                is_read: side.get().unwrap_or(false),
                err,
            })),
        }
    }

    fn copy_data(&self, off: u64, n: u64, buf: &mut [u8], who: Copying) -> Result<(), CopyError> {
        let mut done = 0u64;
        while done < n {
            let step = (n - done).min(buf.len() as u64);
            let at = off + done;
            if !self.compress && self.copy_host(at, step, &mut buf[..step as usize], who)? {
                done += step;
                continue;
            }
            let b = &mut buf[..step as usize];
            self.source
                .read(at, b)
                .map_err(|err| CopyError { is_read: true, err })?;
            let w = if self.compress {
                self.write_compressed(at, b)
            } else if is_zero(b) {
                self.target.write_zeroes(at, step, self.may_unmap)
            } else {
                self.target.write(at, b)
            };
            w.map_err(|err| CopyError {
                is_read: false,
                err,
            })?;
            done += step;
        }
        Ok(())
    }

    /// Copy `[off, off+n)` without our memory where both nodes map it to plain files (the
    /// kernel moves the bytes: one page copy instead of two); `buf` (at least `n` bytes) serves
    /// source pieces that are not plain data. `Ok(false)`: nothing done, the target takes no
    /// kernel copies (filters, detect-zeroes, unaligned ends); copy through memory.
    fn copy_host(&self, off: u64, n: u64, buf: &mut [u8], who: Copying) -> Result<bool, CopyError> {
        // Which side failed, for the error policies.
        let side: Cell<Option<bool>> = Cell::new(None);
        let mut guest = off;
        let (source, offload) = (&self.source, self.offload);
        let turn = (who == Copying::Worker).then_some(&self.turn);
        let r = self
            .target
            .write_host(off, n, &mut |tf: &File, th: u64, tn: u64| {
                let g = guest;
                guest += tn;
                // The source pieces of this target range go through the thread's pipes and
                // into the target a few pipe-fulls per turn.
                let tgt = kcopy::Target { file: tf, turn };
                let mut funnel = kcopy::Funnel::new(tgt, th);
                let failed = |e: kcopy::KernelCopyError| {
                    side.set(Some(e.is_read));
                    e.err
                };
                let got = source.read_host(g, tn, &mut |sf: &File, sh: u64, sn: u64| {
                    funnel.copy(sf, sh, sn, offload).map_err(failed)
                });
                match got {
                    Ok(true) => funnel.finish().map_err(failed),
                    Ok(false) => {
                        // Zero, backing or compressed clusters of the source: through memory.
                        let mut at = 0;
                        while at < tn {
                            let k = (tn - at).min(buf.len() as u64);
                            let b = &mut buf[..k as usize];
                            source
                                .read(g + at, b)
                                .inspect_err(|_| side.set(Some(true)))?;
                            tgt.write_all_at(b, th + at)
                                .inspect_err(|_| side.set(Some(false)))?;
                            at += k;
                        }
                        Ok(())
                    }
                    Err(e) => {
                        if side.get().is_none() {
                            side.set(Some(true));
                        }
                        Err(e)
                    }
                }
            });
        r.map_err(|err| CopyError {
            is_read: side.get().unwrap_or(false),
            err,
        })
    }

    fn write_compressed(&self, at: u64, b: &[u8]) -> io::Result<()> {
        // Whole clusters of the target (the last one may end at the disk end); all-zero
        // clusters become zero writes, as QEMU's block-copy does.
        for (i, chunk) in b.chunks(self.cluster as usize).enumerate() {
            let off = at + (i as u64) * self.cluster;
            if is_zero(chunk) {
                self.target
                    .write_zeroes(off, chunk.len() as u64, self.may_unmap)?;
            } else {
                self.target.write_compressed(off, chunk)?;
            }
        }
        Ok(())
    }

    /// Wait until no copy is in flight (the job's end).
    pub fn wait_idle(&self) {
        let mut st = self.lock();
        while !st.inflight.is_empty() {
            st = self.wait(st);
        }
    }

    /// Compute the source map (once, at the job's start) and, for `top`, drop the clusters
    /// the top layer does not hold from `todo`. Returns the bytes dropped.
    pub fn compute_map(&self, top_only: bool) -> io::Result<u64> {
        let mut zero =
            HBitmap::new(self.size, self.cluster).map_err(|e| io::Error::other(e.to_string()))?;
        let mut skip: Vec<(u64, u64)> = Vec::new();
        // Only what is still to copy needs a status (an incremental's few dirty runs); the
        // runs are cluster-aligned (todo has the job's cluster granularity).
        let ranges: Vec<(u64, u64)> = {
            let st = self.lock();
            if clipped_count(&st.todo, self.size) >= self.size {
                vec![(0, self.size)]
            } else {
                st.todo.dirty_ranges(0, self.size).collect()
            }
        };
        for (start, len) in ranges {
            let end = start + len;
            let mut off = start;
            while off < end {
                let want = (end - off).min(1 << 30);
                let (is_zero, is_skip, n) = if top_only {
                    let (st, n) = self.source.block_status(off, want)?;
                    (st == BlockStatus::Zero, st == BlockStatus::Unallocated, n)
                } else {
                    let (st, depth, n) = self.source.status_above(off, want)?;
                    let z =
                        st == BlockStatus::Zero || (st == BlockStatus::Unallocated && depth == 0);
                    (z, false, n)
                };
                let n = n.max(1).min(want);
                if is_zero || is_skip {
                    let first = off.div_ceil(self.cluster) * self.cluster;
                    let last = if off + n >= self.size {
                        self.size
                    } else {
                        (off + n) / self.cluster * self.cluster
                    };
                    if last > first {
                        if is_zero {
                            zero.set(first, last - first);
                        } else {
                            skip.push((first, last - first));
                        }
                    }
                }
                off += n;
            }
        }
        *self.map.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::sync::Arc::new(SourceMap { zero }));
        let mut dropped = 0;
        if !skip.is_empty() {
            let mut st = self.lock();
            for (s, l) in skip {
                // Only what is still to copy (a write may have claimed it already).
                let runs: Vec<_> = st.todo.dirty_ranges(s, s + l).collect();
                for (rs, rl) in runs {
                    st.todo.reset(rs, rl);
                    dropped += rl;
                }
            }
            self.total.fetch_sub(dropped, Ordering::AcqRel);
        }
        Ok(dropped)
    }

    /// Hold writes off `[offset, offset+len)` (once no copy of it is in flight) and split it
    /// into runs: `true` = still only in the source, `false` = copied to the target. Give the
    /// hold back with [`Copier::end_view_read`].
    pub fn begin_view_read(&self, offset: u64, len: u64) -> ((u64, u64), Vec<ViewRun>) {
        let (start, end) = self.align(offset, len);
        let mut st = self.lock();
        while st.inflight.iter().any(|&(s, e)| s < end && start < e) {
            st = self.wait(st);
        }
        st.readers.push((start, end));
        let mut runs = Vec::new();
        let mut at = start;
        for (s, l) in st.todo.dirty_ranges(start, end) {
            let (s, e) = (s.max(start), (s + l).min(end));
            if s > at {
                runs.push((at, s, false));
            }
            runs.push((s, e, true));
            at = e;
        }
        if at < end {
            runs.push((at, end, false));
        }
        // Clip to the request.
        let req_end = offset + len;
        let runs = runs
            .into_iter()
            .filter_map(|(s, e, src)| {
                let (s, e) = (s.max(offset), e.min(req_end));
                (s < e).then_some((s, e, src))
            })
            .collect();
        ((start, end), runs)
    }

    /// End a hold taken by [`Copier::begin_view_read`].
    pub fn end_view_read(&self, hold: (u64, u64)) {
        let mut st = self.lock();
        if let Some(i) = st.readers.iter().position(|&r| r == hold) {
            st.readers.swap_remove(i);
        }
        let waiters = st.waiters;
        drop(st);
        self.wake(waiters);
    }

    /// The clusters not copied (for bitmap-mode `always` on failure).
    pub fn not_copied(&self) -> HBitmap {
        self.lock().todo.clone()
    }
}

/// Dirty bytes of a bitmap clipped to the disk size.
pub(crate) fn clipped_count(b: &HBitmap, size: u64) -> u64 {
    let mut count = b.count();
    let g = b.granularity();
    if !size.is_multiple_of(g) && b.get(size - 1) {
        count -= g - size % g;
    }
    count
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    body && words.remainder().iter().all(|&x| x == 0)
}

/// The copy-before-write hook on the source node.
pub(crate) struct CbwHook {
    pub copier: std::sync::Arc<Copier>,
    /// One reusable buffer per hook call site is not possible (writers run on any thread):
    /// hooks allocate a cluster-run buffer, bounded by the write's size rounded to clusters.
    pub max_buf: usize,
}

impl WriteHook for CbwHook {
    fn before_write(&self, _node: &Node, offset: u64, len: u64) -> io::Result<()> {
        let c = &self.copier;
        if c.stopped.load(Ordering::Acquire) || offset >= c.size {
            return Ok(());
        }
        let (start, end) = c.align(offset, len);
        let runs = c.claim_range(start, end);
        if runs.is_empty() {
            return Ok(());
        }
        let biggest = runs.iter().map(|r| r.1).max().unwrap_or(0);
        let mut buf = vec![0u8; (biggest as usize).min(self.max_buf)];
        let mut result = Ok(());
        for (s, l) in runs {
            if result.is_err() {
                c.finish(s, l, false);
                continue;
            }
            match c.copy_run(s, l, &mut buf, Copying::ForGuest) {
                Ok(()) => c.finish(s, l, true),
                Err(e) => {
                    c.finish(s, l, false);
                    result = Err(e.err);
                }
            }
        }
        result
    }
}
