//! The copy-before-write filter as a node: it shows in the graph under `filter-node-name` (or
//! a generated name) while a backup runs, as QEMU's does, with the source as its `file` child
//! and the target as its `target` child. I/O through it goes to the source, whose write hook
//! does the copy-before-write (the hook, not this node, keeps the point in time: writers that
//! use the source directly are covered too).
//!
//! For a `sync: none` job it also offers the point-in-time view to `snapshot-access` (image
//! fleecing through a backup job, as with QEMU's filter): clusters the hook has not copied
//! yet are read from the source, copied ones from the target.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::copy::Copier;
use crate::driver::{BlockStatus, Driver, ImageFacts, SnapshotApi};
use crate::error::errno;
use crate::node::NodeRef;
use crate::perm::Role;

/// The point in time a running `sync: none` backup keeps (see [`super::prepare_with_view`]).
pub struct SnapshotView {
    copier: Arc<Copier>,
}

impl SnapshotView {
    pub(crate) fn new(copier: Arc<Copier>) -> SnapshotView {
        SnapshotView { copier }
    }

    /// Run `f` on each run of the range with writes there held off; EACCES once the job
    /// ended (the target no longer follows the source).
    fn with_runs<T>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&Copier, &[(u64, u64, bool)]) -> io::Result<T>,
    ) -> io::Result<T> {
        let c = &*self.copier;
        if c.stopped.load(Ordering::Acquire) {
            return Err(errno(libc::EACCES));
        }
        let (hold, runs) = c.begin_view_read(offset, len);
        // Checked again under the hold: a job that ended before it may have let writes by.
        let r = if c.stopped.load(Ordering::Acquire) {
            Err(errno(libc::EACCES))
        } else {
            f(c, &runs)
        };
        c.end_view_read(hold);
        r
    }
}

impl SnapshotApi for SnapshotView {
    fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with_runs(offset, buf.len() as u64, |c, runs| {
            for &(s, e, in_source) in runs {
                let at = (s - offset) as usize..(e - offset) as usize;
                let node = if in_source { &c.source } else { &c.target };
                node.read(s, &mut buf[at])?;
            }
            Ok(())
        })
    }

    fn snapshot_block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.with_runs(offset, len, |c, runs| {
            let Some(&(s, e, in_source)) = runs.first() else {
                return Ok((BlockStatus::Data, len));
            };
            if !in_source {
                // Copied: what the target holds is data as far as the view says.
                return Ok((BlockStatus::Data, e - s));
            }
            let (st, depth, n) = c.source.status_above(s, e - s)?;
            let st = match st {
                BlockStatus::Unallocated if depth == 0 => BlockStatus::Zero,
                BlockStatus::Unallocated => BlockStatus::Data,
                other => other,
            };
            Ok((st, n.clamp(1, e - s)))
        })
    }

    fn snapshot_discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        // The hook keeps protecting the range; nothing is lost by ignoring the hint.
        Ok(())
    }

    fn snapshot_status_is_cheap(&self) -> bool {
        self.copier.source.driver().status_is_cheap()
    }
}

/// The filter's driver: everything forwarded to the source.
pub struct CbwFilter {
    source: NodeRef,
    view: Option<SnapshotView>,
}

impl CbwFilter {
    /// A filter over `source`.
    pub fn new(source: NodeRef) -> CbwFilter {
        CbwFilter { source, view: None }
    }

    /// A filter over `source` that offers `view` to `snapshot-access`.
    pub fn with_view(source: NodeRef, view: Option<SnapshotView>) -> CbwFilter {
        CbwFilter { source, view }
    }
}

impl Driver for CbwFilter {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }
    fn size(&self) -> u64 {
        self.source.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.source.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.source.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.source.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.source.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.source.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.source.block_status(offset, len)
    }
    fn facts(&self) -> ImageFacts {
        let mut f = self.source.facts();
        f.format_specific = None;
        f.backing_filename = None;
        f.backing_format = None;
        f
    }
    fn close(&self) -> io::Result<()> {
        // The source is not ours to close.
        Ok(())
    }
    fn status_is_cheap(&self) -> bool {
        self.source.driver().status_is_cheap()
    }
    fn snapshot_api(&self) -> Option<&dyn SnapshotApi> {
        self.view.as_ref().map(|v| v as &dyn SnapshotApi)
    }
    fn child_role(&self, child: &str) -> Role {
        // QEMU's filter unshares write on the source because it moves the source's writers
        // above itself. Here the writers stay on the source and the job's write hook copies for
        // every one of them, so the source edge only passes the filter's own needs through.
        match child {
            "target" => Role::CbwTarget,
            _ => Role::Filtered,
        }
    }
}
