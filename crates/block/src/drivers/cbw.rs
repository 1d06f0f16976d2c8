//! The `copy-before-write` filter: image fleecing's frozen point in time.
//!
//! Reads and flushes pass to the `file` child (the disk). Every write, write-zeroes and discard
//! first copies the old contents of the touched, still-protected clusters from `file` to
//! `target` (the scratch image), whole clusters at a time. The filter also offers the snapshot
//! view ([`SnapshotApi`]) that a `snapshot-access` node exports: clusters already copied come
//! from the target, the others from the disk, as they were when the filter was opened.
//!
//! # State (one mutex, one condition variable)
//! * `to_copy`: protected clusters not copied and not being copied.
//! * `done`: clusters copied to the target.
//! * `access`: clusters the snapshot may read (protected and not discarded by the reader).
//! * `copying`: the in-flight copies (a small range lock): a guest write touching one waits for
//!   it, so no two writes ever copy the same cluster.
//! * `reading`: snapshot reads served from the disk; a guest write waits for those in its
//!   range after its copy, before it changes the disk (a frozen read never sees new data).
//!
//! A guest write claims the still-to-copy clusters of its range under the lock (moving them
//! from `to_copy` to `copying`), copies them without the lock, then marks them `done` (or puts
//! them back on failure). The cluster size follows QEMU's block-copy: the largest of 64 KiB,
//! the target's cluster size and `min-cluster-size`.
//!
//! # Why its own range lock, not the node's request tracking
//! The disk node tracks its requests ([`crate::tracking`]) and offers serialising requests,
//! but the filter keeps `copying` and `reading` under its own mutex, as QEMU does (block-copy's
//! in-flight task list and the filter's frozen-read list, both under the filter's lock, not
//! the node's tracked requests):
//! * Each decision is one atomic step over the bitmaps *and* the ranges: a frozen read looks
//!   up `done` and registers in `reading` under one lock; a write claims from `to_copy` and
//!   registers in `copying` under that same lock. With the node's tracker (its own mutex) a
//!   write could copy, mark `done` and start writing the disk between a reader's `done` lookup
//!   and its registration, and the reader would then hand out new data as the snapshot's.
//! * The waits are not the tracker's: a write waits for overlapping copies *before* it claims
//!   (then finds the clusters done and copies nothing), and for frozen reads only *after* its
//!   copy. A serialising request waits for overlapping writes at its start, so a frozen read
//!   tracked that way would also wait for writes that no longer matter to it.
//! * Cost: one short lock per read piece and per write, no second lock or nesting; measured
//!   with `bench/fleecing.py`, this path is a small share of the reader's time.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use hbitmap::HBitmap;

use crate::driver::{BlockStatus, Driver, ImageFacts, SnapshotApi};
use crate::error::errno;
use crate::node::NodeRef;
use crate::perm::Role;

/// Smallest copy granularity (QEMU's block-copy default cluster size).
pub const DEFAULT_CLUSTER: u64 = 64 * 1024;
/// Largest copy granularity (the bitmaps' largest granularity).
pub const MAX_CLUSTER: u64 = 1 << 31;
/// Largest piece read into memory at once while copying.
const COPY_CHUNK: u64 = 1 << 20;

/// What a failed copy sacrifices (`on-cbw-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCbwError {
    /// The guest write fails; the snapshot stays intact (QEMU's default).
    #[default]
    BreakGuestWrite,
    /// The guest write goes on; the snapshot is broken and every later read of it fails.
    BreakSnapshot,
}

/// Options of a copy-before-write node, children already resolved.
pub struct CbwConfig {
    /// `min-cluster-size` (0: none).
    pub min_cluster_size: u64,
    /// `on-cbw-error`.
    pub on_error: OnCbwError,
    /// `cbw-timeout` in seconds (0: none).
    pub timeout_secs: u32,
}

/// Multiset of byte ranges `[start, end)` (in-flight copies or frozen reads).
#[derive(Default)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn intersects(&self, start: u64, end: u64) -> bool {
        self.0.iter().any(|&(s, e)| s < end && start < e)
    }
    fn add(&mut self, start: u64, end: u64) {
        self.0.push((start, end));
    }
    fn remove(&mut self, start: u64, end: u64) {
        if let Some(i) = self.0.iter().position(|&r| r == (start, end)) {
            self.0.swap_remove(i);
        }
    }
}

struct State {
    to_copy: HBitmap,
    done: HBitmap,
    access: HBitmap,
    copying: Ranges,
    reading: Ranges,
    /// The errno that broke the snapshot (break-snapshot after a failed copy).
    broken: Option<i32>,
    /// Copies still running after their caller gave up on them (cbw-timeout).
    background: usize,
    /// Threads waiting on `changed` (only then does a change need to wake anyone).
    waiters: usize,
}

struct Shared {
    source: NodeRef,
    target: NodeRef,
    cluster: u64,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    state: Mutex<State>,
    changed: Condvar,
}

/// The copy-before-write driver.
pub struct CbwDriver {
    shared: Arc<Shared>,
}

/// QEMU's "Cannot create block-copy-state: ..." prefix.
fn bcs_error(msg: impl std::fmt::Display) -> String {
    format!("Cannot create block-copy-state: {msg}")
}

impl CbwDriver {
    /// Open the filter over `source` copying into `target`. `bitmap`, when given, limits the
    /// protected (and readable) regions to its dirty bits, as of now. Errors use QEMU's texts.
    pub fn open(
        source: NodeRef,
        target: NodeRef,
        bitmap: Option<(&str, &HBitmap)>,
        cfg: &CbwConfig,
    ) -> Result<CbwDriver, String> {
        if cfg.min_cluster_size > i64::MAX as u64 {
            return Err(format!(
                "min-cluster-size too large: {} > {}",
                cfg.min_cluster_size,
                i64::MAX
            ));
        }
        if cfg.min_cluster_size != 0 && !cfg.min_cluster_size.is_power_of_two() {
            return Err(bcs_error("min-cluster-size needs to be a power of 2"));
        }
        let target_cluster = match target.facts().cluster_size {
            Some(c) => c,
            None => {
                if target.child("backing").is_none() {
                    tracing::warn!(
                        target = target.name(),
                        "the target doesn't provide its block size and has no backing file; \
                         copying in clusters of {} bytes",
                        DEFAULT_CLUSTER.max(cfg.min_cluster_size)
                    );
                }
                0
            }
        };
        let cluster = DEFAULT_CLUSTER
            .max(target_cluster)
            .max(cfg.min_cluster_size);
        if cluster > MAX_CLUSTER || !cluster.is_power_of_two() {
            return Err(bcs_error(format!(
                "cluster size {cluster} is not supported"
            )));
        }
        let size = source.size();
        let new_map = || HBitmap::new(size, cluster).map_err(|e| bcs_error(e.to_string()));
        let mut to_copy = new_map()?;
        match bitmap {
            Some((name, bits)) => to_copy.merge(bits).map_err(|e| {
                bcs_error(format!(
                    "Failed to merge bitmap '{name}' to internal copy-bitmap: {e}"
                ))
            })?,
            None => to_copy.set_all(),
        }
        // QEMU does not check this and aborts on the first copy past the target's end.
        if target.size() != size {
            return Err(bcs_error(format!(
                "target size ({}) differs from source size ({size})",
                target.size()
            )));
        }
        let access = to_copy.clone();
        let state = State {
            to_copy,
            done: new_map()?,
            access,
            copying: Ranges::default(),
            reading: Ranges::default(),
            broken: None,
            background: 0,
            waiters: 0,
        };
        let timeout = (cfg.timeout_secs > 0).then(|| Duration::from_secs(cfg.timeout_secs.into()));
        Ok(CbwDriver {
            shared: Arc::new(Shared {
                source,
                target,
                cluster,
                on_error: cfg.on_error,
                timeout,
                state: Mutex::new(state),
                changed: Condvar::new(),
            }),
        })
    }

    /// The copy granularity in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.shared.cluster
    }

    /// Bytes still protected and not yet copied, bytes copied, bytes readable in the view.
    pub fn counts(&self) -> (u64, u64, u64) {
        let st = self.shared.lock();
        (st.to_copy.count(), st.done.count(), st.access.count())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, mut guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        guard.waiters += 1;
        let mut guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        guard.waiters -= 1;
        guard
    }

    /// Under the lock: wake the waiters, if any (a wake-up is a system call even for nobody,
    /// and every frozen read ends with one).
    fn notify(&self, st: &State) {
        if st.waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// `[offset, offset+len)` widened to whole clusters, clipped to the disk.
    fn cluster_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.cluster;
        let end = offset.saturating_add(len).saturating_add(self.cluster - 1);
        let end = end - end % self.cluster;
        (start, end.min(self.source.size()))
    }

    /// Copy-before-write for a guest request on `[offset, offset+len)`. Ok means the request
    /// may change the disk now.
    fn before_write(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = self.cluster_span(offset, len);
        if start >= end {
            return Ok(());
        }
        let claimed = {
            let mut st = self.lock();
            loop {
                if st.broken.is_some() {
                    return Ok(());
                }
                if !st.copying.intersects(start, end) {
                    break;
                }
                st = self.wait(st);
            }
            let runs: Vec<(u64, u64)> = st.to_copy.dirty_ranges(start, end).collect();
            for &(s, n) in &runs {
                st.to_copy.reset(s, n);
                st.copying.add(s, s + n);
            }
            runs
        };
        if !claimed.is_empty() {
            if let Err(e) = self.copy_claimed(claimed) {
                match self.on_error {
                    OnCbwError::BreakGuestWrite => return Err(e),
                    OnCbwError::BreakSnapshot => {
                        let mut st = self.lock();
                        st.broken
                            .get_or_insert(e.raw_os_error().unwrap_or(libc::EIO));
                        tracing::warn!(node = self.source.name(), error = %e,
                            "copy-before-write failed; snapshot broken");
                        self.notify(&st);
                    }
                }
            }
        }
        let mut st = self.lock();
        if st.broken.is_none() {
            // As QEMU: the whole range needs no copy any more (copied now or before, or not
            // protected), which the queries count as done.
            st.done.set(start, end - start);
        }
        while st.reading.intersects(start, end) {
            st = self.wait(st);
        }
        Ok(())
    }

    /// Copy the claimed runs, within the timeout if one is set. The state is updated by
    /// whoever finishes the copy, even when the caller stopped waiting for it.
    fn copy_claimed(self: &Arc<Self>, runs: Vec<(u64, u64)>) -> io::Result<()> {
        let Some(timeout) = self.timeout else {
            return self.copy_and_settle(&runs);
        };
        let (tx, rx) = std::sync::mpsc::channel();
        self.lock().background += 1;
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("cbw-copy".into())
            .spawn(move || {
                let result = me.copy_and_settle(&runs);
                let _ = tx.send(result);
                let mut st = me.lock();
                st.background -= 1;
                me.notify(&st);
            });
        if let Err(e) = spawned {
            self.lock().background -= 1;
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(_) => Err(errno(libc::ETIMEDOUT)),
        }
    }

    fn copy_and_settle(&self, runs: &[(u64, u64)]) -> io::Result<()> {
        let result = runs.iter().try_for_each(|&(s, n)| self.copy_range(s, n));
        let mut st = self.lock();
        for &(s, n) in runs {
            if result.is_ok() {
                st.done.set(s, n);
            } else {
                st.to_copy.set(s, n);
            }
            st.copying.remove(s, s + n);
        }
        self.notify(&st);
        result
    }

    /// Copy `[offset, offset+len)` from the disk to the target; areas that read as zeros
    /// become write-zeroes (never unmapped: a target backed by the disk must not fall through).
    fn copy_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut pos = offset;
        let mut buf = Vec::new();
        while pos < end {
            let want = (end - pos).min(COPY_CHUNK);
            let (status, _, n) = self.source.status_above(pos, want)?;
            let n = n.clamp(1, want);
            if status == BlockStatus::Data {
                // n <= COPY_CHUNK (1 MiB), so this fits in usize.
                buf.resize(n as usize, 0);
                self.source.read(pos, &mut buf)?;
                self.target.write(pos, &buf)?;
            } else {
                self.target.write_zeroes(pos, n, false)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Under the lock: fail with EACCES unless all of `[offset, end)` is readable in the view.
    fn check_readable(st: &State, offset: u64, end: u64) -> io::Result<()> {
        if st.broken.is_some() || st.access.next_clean(offset, end).is_some() {
            return Err(errno(libc::EACCES));
        }
        Ok(())
    }
}

impl SnapshotApi for CbwDriver {
    fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let sh = &self.shared;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (from_target, stop) = {
                let mut st = sh.lock();
                Shared::check_readable(&st, pos, end)?;
                if st.done.get(pos) {
                    (true, st.done.next_clean(pos, end).unwrap_or(end))
                } else {
                    let stop = st.done.next_dirty(pos, end).unwrap_or(end);
                    st.reading.add(pos, stop);
                    (false, stop)
                }
            };
            // pos - offset and stop - offset lie within buf.
            let piece = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            let result = if from_target {
                sh.target.read(pos, piece)
            } else {
                let r = sh.source.read(pos, piece);
                let mut st = sh.lock();
                st.reading.remove(pos, stop);
                sh.notify(&st);
                // Broken meanwhile (break-snapshot no longer waits for readers): the bytes
                // may be new ones, so they are not handed out as the snapshot's.
                if st.broken.is_some() {
                    return Err(errno(libc::EACCES));
                }
                r
            };
            result?;
            pos = stop;
        }
        Ok(())
    }

    fn snapshot_block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        let sh = &self.shared;
        let end = offset + len;
        let (from_target, stop) = {
            let st = sh.lock();
            Shared::check_readable(&st, offset, end)?;
            if st.done.get(offset) {
                (true, st.done.next_clean(offset, end).unwrap_or(end))
            } else {
                (false, st.done.next_dirty(offset, end).unwrap_or(end))
            }
        };
        if from_target {
            // The target holds every copied byte: it is never "unallocated" for the view.
            let (s, n) = sh.target.block_status(offset, stop - offset)?;
            let s = if s == BlockStatus::Unallocated {
                BlockStatus::Zero
            } else {
                s
            };
            Ok((s, n))
        } else {
            // As QEMU asks the disk itself: unallocated with nothing below reads as zeros,
            // which the view reports as allocated zeros (allocation depth 1).
            let (s, _, n) = sh.source.status_above(offset, stop - offset)?;
            let s = if s == BlockStatus::Unallocated {
                BlockStatus::Zero
            } else {
                s
            };
            Ok((s, n))
        }
    }

    fn snapshot_discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let sh = &self.shared;
        let c = sh.cluster;
        let start = offset.div_ceil(c) * c;
        let end = offset.saturating_add(len) / c * c;
        if start >= end {
            return Ok(());
        }
        {
            let mut st = sh.lock();
            while st.copying.intersects(start, end) {
                st = sh.wait(st);
            }
            st.access.reset(start, end - start);
            st.to_copy.reset(start, end - start);
        }
        sh.target.discard(start, end - start)
    }

    fn snapshot_status_is_cheap(&self) -> bool {
        let sh = &self.shared;
        sh.source.driver().status_is_cheap() && sh.target.driver().status_is_cheap()
    }
}

impl Driver for CbwDriver {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }
    fn size(&self) -> u64 {
        self.shared.source.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.shared.source.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.shared.before_write(offset, data.len() as u64)?;
        self.shared.source.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.shared.before_write(offset, len)?;
        self.shared.source.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.shared.before_write(offset, len)?;
        self.shared.source.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.shared.source.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        let (s, _, n) = self.shared.source.status_above(offset, len)?;
        Ok((s, n))
    }
    fn status_is_cheap(&self) -> bool {
        self.shared.source.driver().status_is_cheap()
    }
    fn facts(&self) -> ImageFacts {
        // A filter: QEMU reports the source's file, size on disk and cluster size.
        let source = self.shared.source.facts();
        ImageFacts {
            filename: source.filename,
            actual_size: source.actual_size,
            cluster_size: source.cluster_size,
            ..ImageFacts::default()
        }
    }
    fn close(&self) -> io::Result<()> {
        // Copies abandoned by a timeout still write to the target: wait for them.
        let sh = &self.shared;
        let mut st = sh.lock();
        while st.background > 0 {
            st = sh.wait(st);
        }
        drop(st);
        sh.source.flush()
    }
    fn snapshot_api(&self) -> Option<&dyn SnapshotApi> {
        Some(self)
    }
    fn child_role(&self, child: &str) -> Role {
        // The source becomes exclusive to the filter's writers once the filter is used.
        match child {
            "target" => Role::CbwTarget,
            _ => Role::CbwSource,
        }
    }
    fn internal_bitmaps(&self) -> Vec<(u64, u64)> {
        // QEMU lists the access, done and copy bitmaps (newest first).
        let (to_copy, done, access) = self.counts();
        let g = self.shared.cluster;
        vec![(g, access), (g, done), (g, to_copy)]
    }
}

#[cfg(test)]
#[path = "cbw_tests.rs"]
mod tests;
