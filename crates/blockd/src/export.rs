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

/// Extents of a dirty bitmap walked per hold of the node's bitmap lock. Writers mark the
/// bitmap under that lock, so a block-status request (up to `nbd::proto::MAX_EXTENTS`
/// extents over any length) stalls them for at most this many steps, not a whole walk.
const EXTENTS_PER_LOCK: usize = 256;

/// Appends an extent to `out`, merging it with the last one when the flags agree; false
/// (nothing appended) when that would need more than `max` extents.
fn push_extent(out: &mut Vec<(u64, u32)>, max: usize, n: u64, flags: u32) -> bool {
    match out.last_mut() {
        Some(last) if last.1 == flags => last.0 += n,
        _ => {
            if out.len() == max {
                return false;
            }
            out.push((n, flags));
        }
    }
    true
}

/// The `qemu:dirty-bitmap` extents of bitmap `name` over `offset..offset + len`, the lock
/// taken for at most [`EXTENTS_PER_LOCK`] steps at a time (`between` runs while it is not
/// held). A write landing between two slices shows in the later one, as it would in a
/// request sent a moment later.
fn bitmap_extents(
    node: &NodeRef,
    name: &str,
    offset: u64,
    len: u64,
    max: usize,
    mut between: impl FnMut(),
) -> io::Result<Vec<(u64, u32)>> {
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = offset;
    loop {
        {
            let list = node.bitmaps();
            let Some(b) = list.get(name) else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            for _ in 0..EXTENTS_PER_LOCK {
                if pos >= end {
                    return Ok(out);
                }
                let (flags, stop) = if b.bits.get(pos) {
                    (1, b.bits.next_clean(pos, end).unwrap_or(end))
                } else {
                    (0, b.bits.next_dirty(pos, end).unwrap_or(end))
                };
                let n = stop.saturating_sub(pos).clamp(1, end - pos);
                if !push_extent(&mut out, max, n, flags) {
                    return Ok(out);
                }
                pos += n;
            }
        }
        if pos >= end {
            return Ok(out);
        }
        between();
    }
}

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
            if !push_extent(&mut out, max, n, flags) {
                break;
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
                bitmap_extents(node, name, offset, len, max, std::thread::yield_now)
            }
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
    fn reads_as_zero(&self, offset: u64, len: u64) -> bool {
        self.root.begin().reads_as_zero(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::graph::{DriverOptions, NodeOptions};
    use std::sync::mpsc;
    use std::time::Duration;

    const GRAN: u64 = 512;

    /// A null node with a 512 B-granularity bitmap dirty on every even granule of the first
    /// `granules` (so as many extents as granules).
    fn striped(granules: u64) -> (block::Graph, NodeRef) {
        let mut graph = block::Graph::new();
        let opts = NodeOptions {
            node_name: Some("n".into()),
            driver: DriverOptions::Null {
                size: 64 << 20,
                read_zeroes: true,
            },
            ..NodeOptions::default()
        };
        let node = graph.add(&opts).expect("null node");
        block::bitmap_ops::add(&node, "b", Some(GRAN), false, false).expect("bitmap");
        for g in (0..granules).step_by(2) {
            node.write(g * GRAN, &[1; GRAN as usize]).expect("write");
        }
        (graph, node)
    }

    #[test]
    fn a_long_bitmap_walk_lets_writers_in_between_slices() {
        let granules = 8 * EXTENTS_PER_LOCK as u64;
        let (_graph, node) = striped(granules);
        let late = granules - 3; // odd: clean until the writer below marks it
        let mut slices = 0;
        let extents = bitmap_extents(&node, "b", 0, granules * GRAN, 1 << 17, || {
            slices += 1;
            if slices == 1 {
                // Another thread writes while the walk is under way; it must get the lock.
                let (tx, rx) = mpsc::channel();
                let writer = node.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(writer.write(late * GRAN, &[2; GRAN as usize]).is_ok());
                });
                assert_eq!(
                    rx.recv_timeout(Duration::from_secs(10)),
                    Ok(true),
                    "the writer could not mark the bitmap during the walk"
                );
            }
        })
        .expect("walk");
        assert!(slices >= 7, "{slices} slices");
        // Granules late-1, late, late+1 merged into one dirty extent by the write.
        let mut want: Vec<(u64, u32)> = Vec::new();
        for g in 0..granules {
            let dirty = g % 2 == 0 || g == late;
            assert!(push_extent(&mut want, usize::MAX, GRAN, u32::from(dirty)));
        }
        assert_eq!(extents, want);
    }

    #[test]
    fn the_extent_limit_ends_a_walk_in_any_slice() {
        let (_graph, node) = striped(4 * EXTENTS_PER_LOCK as u64);
        let max = EXTENTS_PER_LOCK + 7;
        let extents = bitmap_extents(&node, "b", 0, 32 << 20, max, || {}).expect("walk");
        assert_eq!(extents.len(), max);
        assert!(extents.iter().all(|e| e.0 == GRAN));
        assert_eq!(extents[0].1, 1);
        assert!(bitmap_extents(&node, "nosuch", 0, 512, 1, || {}).is_err());
    }
}
