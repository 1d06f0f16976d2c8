//! The `raw` format driver: the child's bytes, optionally a window `[offset, offset+size)` of them.

use std::io;

use crate::driver::{BlockStatus, Driver, HostFn, ImageFacts};
use std::sync::Arc;

use crate::edge::ChildEdge;
use crate::node::NodeRef;
use crate::perm::Role;

/// A raw view of a child node.
pub struct RawDriver {
    child: Arc<ChildEdge>,
    offset: u64,
    /// Fixed size when `size` was given; otherwise follows the child.
    size: Option<u64>,
}

impl RawDriver {
    /// A raw node over `child`. Checks that the window lies inside the child (QEMU's messages).
    pub fn new(child: NodeRef, offset: u64, size: Option<u64>) -> Result<RawDriver, String> {
        RawDriver::on_edge(ChildEdge::new("file", child), offset, size)
    }

    /// A raw node over whatever `edge` points at (re-wirable).
    pub fn on_edge(
        child: Arc<ChildEdge>,
        offset: u64,
        size: Option<u64>,
    ) -> Result<RawDriver, String> {
        let child_size = child.node().size();
        if offset > child_size {
            return Err("The sum of offset (".to_string()
                + &offset.to_string()
                + ") and size (0) has to be smaller or equal to the  actual size of the containing file ("
                + &child_size.to_string()
                + ")");
        }
        if let Some(s) = size {
            if s % 512 != 0 {
                return Err("Specified size is not multiple of 512".to_string());
            }
            if offset.checked_add(s).is_none_or(|end| end > child_size) {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({child_size})"
                ));
            }
        }
        Ok(RawDriver {
            child,
            offset,
            size,
        })
    }
}

impl Driver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.child.node().size().saturating_sub(self.offset))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let child = self.child.node();
        child.debug_event("read_aio");
        child.read(self.offset + offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let child = self.child.node();
        child.debug_event("write_aio");
        child.write(self.offset + offset, data)
    }
    fn host_io(&self) -> bool {
        self.child.node().host_io()
    }
    fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        let child = self.child.node();
        if !child.host_io() {
            return Ok(false);
        }
        child.debug_event("read_aio");
        child.read_host(self.offset + offset, len, f)
    }
    fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        let child = self.child.node();
        if !child.host_io() {
            return Ok(false);
        }
        child.debug_event("write_aio");
        child.write_host(self.offset + offset, len, f)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.child
            .node()
            .write_zeroes(self.offset + offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.child.node().discard(self.offset + offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.child.node().flush()
    }
    fn child_role(&self, _child: &str) -> Role {
        // The whole child is a filter's child; a window is data the format relies on.
        if self.offset == 0 && self.size.is_none() {
            Role::Filtered
        } else {
            Role::Data
        }
    }
    fn zero_is_fast(&self, offset: u64, len: u64) -> bool {
        self.child
            .node()
            .driver()
            .zero_is_fast(self.offset + offset, len)
    }
    fn status_is_cheap(&self) -> bool {
        self.child.node().driver().status_is_cheap()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.child.node().block_status(self.offset + offset, len)
    }
    fn facts(&self) -> ImageFacts {
        let child = self.child.node().facts();
        ImageFacts {
            filename: child.filename,
            actual_size: child.actual_size,
            ..ImageFacts::default()
        }
    }
}
