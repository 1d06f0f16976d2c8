//! Changing a node between read-only and read-write (blockdev-reopen's `read-only`).
//!
//! Going read-write: the permissions first (the node's edges to its children now ask for
//! write; refused with QEMU's conflict text or a lock failure, changing nothing), then the
//! driver reopens for writing. Going read-only: persistent bitmaps are stored and the image
//! flushed while write access is still held, then the driver gives it up and the locks drop.
//! Inline (auto-named) `file` children follow their parent, as QEMU's inherited options do.

use super::{ChildRef, DriverOptions, Graph, NodeOptions};
use crate::error::{Error, Result};
use crate::node::NodeRef;
use crate::perm::Perm;

/// A child option of a reopen against the current child: unchanged, or refused.
fn same_child(node: &NodeRef, role: &str, new: &ChildRef) -> Result<()> {
    let current = node.child(role);
    let same = match new {
        ChildRef::Name(n) => current.as_ref().is_some_and(|c| c.name() == n),
        ChildRef::Inline(_) => false,
    };
    if same {
        Ok(())
    } else {
        Err(not_yet(role))
    }
}

/// What QEMU can change on reopen but blockd cannot yet: refused rather than ignored.
fn not_yet(option: &str) -> Error {
    Error::generic(format!(
        "blockd cannot change the option '{option}' in blockdev-reopen"
    ))
}

impl Graph {
    /// Check a reopen's options for `node` against how it is open: every option other than
    /// `read-only` must be unchanged. QEMU's refusals keep QEMU's text ("Cannot change the
    /// option 'filename'"); changes QEMU makes but blockd cannot yet are refused as such.
    pub fn check_reopen(&self, node: &NodeRef, new: &NodeOptions) -> Result<()> {
        let f = node.flags();
        let nf = &new.flags;
        if nf.detect_zeroes != f.detect_zeroes {
            return Err(not_yet("detect-zeroes"));
        }
        if nf.discard_unmap != f.discard_unmap {
            return Err(not_yet("discard"));
        }
        if nf.cache_direct != f.cache_direct {
            return Err(not_yet("cache.direct"));
        }
        if nf.cache_no_flush != f.cache_no_flush {
            return Err(not_yet("cache.no-flush"));
        }
        let Some(old) = node.opened_with() else {
            return Ok(());
        };
        let cannot = |o: &str| Error::generic(format!("Cannot change the option '{o}'"));
        match (old, &new.driver) {
            (
                DriverOptions::File { filename, locking },
                DriverOptions::File {
                    filename: nfilename,
                    locking: nlocking,
                },
            ) => {
                if filename != nfilename {
                    return Err(cannot("filename"));
                }
                if locking != nlocking {
                    return Err(cannot("locking"));
                }
            }
            (
                DriverOptions::Raw { offset, size, .. },
                DriverOptions::Raw {
                    file,
                    offset: noffset,
                    size: nsize,
                },
            ) => {
                same_child(node, "file", file)?;
                if offset.unwrap_or(0) != noffset.unwrap_or(0) {
                    return Err(not_yet("offset"));
                }
                if size != nsize {
                    return Err(not_yet("size"));
                }
            }
            (
                DriverOptions::Null { size, read_zeroes },
                DriverOptions::Null {
                    size: s,
                    read_zeroes: z,
                },
            ) => {
                if size != s {
                    return Err(not_yet("size"));
                }
                if read_zeroes != z {
                    return Err(not_yet("read-zeroes"));
                }
            }
            (
                DriverOptions::Qcow2 { cache: old, .. },
                DriverOptions::Qcow2 {
                    file,
                    backing,
                    cache,
                },
            ) => {
                if cache != old {
                    return Err(not_yet("cache-size"));
                }
                same_child(node, "file", file)?;
                match backing {
                    // Not given: the current backing stays.
                    None => {}
                    Some(None) if node.child("backing").is_none() => {}
                    Some(None) => return Err(not_yet("backing")),
                    Some(Some(b)) => same_child(node, "backing", b)?,
                }
            }
            _ => {}
        }
        Ok(())
    }

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
