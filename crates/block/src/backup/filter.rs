//! The copy-before-write filter as a node: it shows in the graph under `filter-node-name` (or
//! a generated name) while a backup runs, as QEMU's does, with the source as its `file` child
//! and the target as its `target` child. I/O through it goes to the source, whose write hook
//! does the copy-before-write (the hook, not this node, keeps the point in time: writers that
//! use the source directly are covered too).

use std::io;

use crate::driver::{BlockStatus, Driver, ImageFacts};
use crate::node::NodeRef;
use crate::perm::Role;

/// The filter's driver: everything forwarded to the source.
pub struct CbwFilter {
    source: NodeRef,
}

impl CbwFilter {
    /// A filter over `source`.
    pub fn new(source: NodeRef) -> CbwFilter {
        CbwFilter { source }
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
