//! A node served over NBD: the core's side of `nbd::ExportBackend`.
//!
//! Contexts: `base:allocation` (through the backing chain), `qemu:allocation-depth` (when asked
//! for), and `qemu:dirty-bitmap:NAME` for each exported bitmap (read from the live bitmap).

use std::io;

use block::driver::BlockStatus;
use std::sync::Arc;

use block::edge::Root;
use block::NodeRef;

/// One metadata context of an export.
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:allocation-depth`.
    Depth,
    /// `qemu:dirty-bitmap:<alias>` backed by bitmap `name` of `node`.
    Bitmap {
        /// The node holding the bitmap.
        node: NodeRef,
        /// Bitmap name on that node.
        name: String,
        /// Name on the wire.
        alias: String,
    },
}

/// A node as an NBD export.
pub struct NodeExport {
    root: Arc<Root>,
    contexts: Vec<Context>,
}

const HOLE: u32 = 1;
const ZERO: u32 = 2;

impl NodeExport {
    /// Serve `node` with these contexts.
    pub fn new(root: Arc<Root>, contexts: Vec<Context>) -> NodeExport {
        NodeExport { root, contexts }
    }

    fn extents<F>(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        mut next: F,
    ) -> io::Result<Vec<(u64, u32)>>
    where
        F: FnMut(u64, u64) -> io::Result<(u32, u64)>,
    {
        let mut out: Vec<(u64, u32)> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (flags, n) = next(pos, end - pos)?;
            let n = n.clamp(1, end - pos);
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => {
                    if out.len() == max {
                        break;
                    }
                    out.push((n, flags));
                }
            }
            pos += n;
        }
        Ok(out)
    }
}

impl nbd::ExportBackend for NodeExport {
    fn size(&self) -> u64 {
        self.root.node().size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.root.begin().read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let node = self.root.begin();
        node.write(offset, data)?;
        if fua {
            node.flush()?;
        }
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        let node = self.root.begin();
        // NBD: a fast-only zero that would be slow fails at once with ENOTSUP, changing nothing.
        if fast_only && !node.zero_is_fast(offset, len) {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        node.write_zeroes(offset, len, may_unmap)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.root.begin().discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.root.begin().flush()
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.contexts
            .iter()
            .map(|c| match c {
                Context::Allocation => "base:allocation".to_string(),
                Context::Depth => "qemu:allocation-depth".to_string(),
                Context::Bitmap { alias, .. } => format!("qemu:dirty-bitmap:{alias}"),
            })
            .collect()
    }
    fn block_status(
        &self,
        ctx: usize,
        offset: u64,
        len: u64,
        max: usize,
    ) -> io::Result<Vec<(u64, u32)>> {
        match self.contexts.get(ctx) {
            Some(Context::Allocation) => self.extents(offset, len, max, |o, l| {
                let (s, _, n) = self.root.begin().status_above(o, l)?;
                Ok((
                    if s == BlockStatus::Data {
                        0
                    } else {
                        HOLE | ZERO
                    },
                    n,
                ))
            }),
            Some(Context::Depth) => self.extents(offset, len, max, |o, l| {
                let (_, depth, n) = self.root.begin().status_above(o, l)?;
                Ok((depth, n))
            }),
            Some(Context::Bitmap { node, name, .. }) => {
                let list = node.bitmaps();
                let Some(b) = list.get(name) else {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                };
                let end = offset + len;
                self.extents(offset, len, max, |o, _| {
                    if b.bits.get(o) {
                        let stop = b.bits.next_clean(o, end).unwrap_or(end);
                        Ok((1, stop - o))
                    } else {
                        let stop = b.bits.next_dirty(o, end).unwrap_or(end);
                        Ok((0, stop - o))
                    }
                })
            }
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
    fn reads_as_zero(&self, offset: u64, len: u64) -> bool {
        self.root.begin().reads_as_zero(offset, len)
    }
}
