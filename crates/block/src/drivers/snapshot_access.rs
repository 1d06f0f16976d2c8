//! The `snapshot-access` driver: the point-in-time view of a copy-before-write node.
//!
//! It talks to its `file` child only through the child's [`SnapshotApi`]: reads and block
//! status of the frozen view, and discard of regions the reader is done with. Writes are
//! refused (ENOTSUP), flush does nothing. Over a node without the snapshot API the node opens
//! (as in QEMU) but reads and block status fail with ENOTSUP.

use std::io;

use crate::driver::{BlockStatus, Driver, ImageFacts, SnapshotApi};
use crate::error::errno;
use crate::node::NodeRef;

/// A snapshot-access node over `child` (normally a copy-before-write node).
pub struct SnapshotAccessDriver {
    child: NodeRef,
}

impl SnapshotAccessDriver {
    /// The view of `child`.
    pub fn new(child: NodeRef) -> SnapshotAccessDriver {
        SnapshotAccessDriver { child }
    }

    fn api(&self) -> io::Result<&dyn SnapshotApi> {
        self.child
            .driver()
            .snapshot_api()
            .ok_or_else(|| errno(libc::ENOTSUP))
    }
}

impl Driver for SnapshotAccessDriver {
    fn name(&self) -> &'static str {
        "snapshot-access"
    }
    fn size(&self) -> u64 {
        self.child.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.api()?.snapshot_read(offset, buf)
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(errno(libc::ENOTSUP))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        Err(errno(libc::ENOTSUP))
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.api()?.snapshot_discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.api()?.snapshot_block_status(offset, len)
    }
    fn status_is_cheap(&self) -> bool {
        self.api().is_ok_and(|a| a.snapshot_status_is_cheap())
    }
    fn facts(&self) -> ImageFacts {
        let child = self.child.facts();
        ImageFacts {
            filename: child.filename,
            actual_size: child.actual_size,
            ..ImageFacts::default()
        }
    }
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
    fn child_role(&self, _child: &str) -> crate::perm::Role {
        // QEMU's snapshot-access takes nothing of its child for itself and shares everything:
        // only the view's readers' needs pass on (a "file" is no format storage here, which
        // would unshare write on the disk under the guest's writer).
        crate::perm::Role::Filtered
    }
}
