//! Changing a node between read-only and read-write (blockdev-reopen's `read-only`).
//!
//! Going read-write: the permissions first (the node's edges to its children now ask for
//! write; refused with QEMU's conflict text or a lock failure, changing nothing), then the
//! driver reopens for writing. Going read-only: persistent bitmaps are stored and the image
//! flushed while write access is still held, then the driver gives it up and the locks drop.
//! Inline (auto-named) `file` children follow their parent, as QEMU's inherited options do.

use super::Graph;
use crate::error::{Error, Result};
use crate::node::NodeRef;
use crate::perm::Perm;

impl Graph {
    /// Switch `node` (and its inline file child) to `read_only`, all or nothing.
    pub fn reopen_read_only(&mut self, node: &NodeRef, read_only: bool) -> Result<()> {
        let mut chain = vec![node.clone()];
        while let Some(c) = chain.last().and_then(|n| n.child("file")) {
            if !c.auto_named() {
                break;
            }
            chain.push(c);
        }
        chain.retain(|n| n.read_only() != read_only);
        if chain.is_empty() {
            return Ok(());
        }
        self.drained(&chain, |g| {
            if read_only {
                g.make_read_only(&chain)
            } else {
                g.make_writable(&chain)
            }
        })
    }

    fn make_writable(&mut self, chain: &[NodeRef]) -> Result<()> {
        let undo = |g: &Graph| {
            for n in chain {
                n.set_read_only_flag(true);
            }
            if let Err(e) = g.refresh_perms() {
                tracing::warn!(error = %e, "restoring permissions after a refused reopen");
            }
        };
        for n in chain {
            n.set_read_only_flag(false);
        }
        if let Err(e) = self.refresh_perms() {
            undo(self);
            return Err(e);
        }
        // Children first: a format reopens for writing over a writable file.
        for (i, n) in chain.iter().enumerate().rev() {
            if let Err(e) = n.driver().activate(false) {
                for done in &chain[i + 1..] {
                    let _ = done.driver().set_read_only(true);
                }
                undo(self);
                return Err(e.context("Could not reopen"));
            }
        }
        for n in chain {
            n.set_bitmaps_read_only(false);
        }
        Ok(())
    }

    fn make_read_only(&mut self, chain: &[NodeRef]) -> Result<()> {
        let top = &chain[0];
        let needs_write = self
            .edges_into(top)
            .iter()
            .any(|e| e.perm.contains(Perm::WRITE))
            || top.legacy_writers() > 0;
        if needs_write {
            return Err(Error::generic(format!(
                "Read-only block node '{}' cannot support read-write users",
                top.name()
            )));
        }
        // Parents first: the format writes its bitmaps back while it can still write.
        for n in chain {
            n.store_bitmaps(false)?;
            n.driver()
                .flush()
                .map_err(|e| Error::io("Could not flush before reopening", &e))?;
            n.driver()
                .set_read_only(true)
                .map_err(|e| Error::io("Could not reopen", &e))?;
            n.set_read_only_flag(true);
            n.set_bitmaps_read_only(true);
        }
        self.refresh_perms()
    }
}
