//! The dirty-bitmap actions of a transaction: add, remove, clear, enable, disable, merge.
//!
//! Each does its work at prepare, as the plain command would, keeping what it needs to undo it:
//!
//! | action | prepare | abort | commit |
//! |---|---|---|---|
//! | add | add the bitmap | drop it (and any stored copy) | - |
//! | remove | check, mark busy, delete the stored copy | unmark, store it again | drop it |
//! | clear | clear, keep the old bits | put the old bits back | - |
//! | enable / disable | flip recording | flip it back | - |
//! | merge | merge, keep the target's old bits | put the old bits back | - |
//!
//! A bitmap being removed is busy until the end, so a later action of the same transaction
//! cannot use it. Nodes are looked up at prepare, so an action sees what earlier ones did.
//! As the plain commands do, an action holds its node ([`NodeHold`]) from its prepare to its
//! commit or abort: a concurrent `blockdev-del` of it waits, and one that took the node out
//! before the action found it makes the action fail with the command's not-found text.

use std::sync::Arc;

use hbitmap::HBitmap;

use super::Action;
use crate::bitmap_ops;
use crate::error::Result;
use crate::graph::NodeHold;
use crate::node::NodeRef;

/// How actions find nodes by the name a client gave (the daemon knows devices and nodes).
pub trait NodeLookup: Send + Sync {
    /// The node for `block-dirty-bitmap-add` (a device or node name), held.
    fn node(&self, name: &str) -> Result<NodeHold>;
    /// The node for the other bitmap commands ("Node 'x' not found"), held.
    fn bitmap_node(&self, name: &str) -> Result<NodeHold>;
}

/// Shared lookup handle.
pub type Lookup = Arc<dyn NodeLookup>;

/// `block-dirty-bitmap-add`.
pub struct Add {
    lookup: Lookup,
    node: String,
    name: String,
    granularity: Option<u64>,
    persistent: bool,
    disabled: bool,
    added: Option<NodeHold>,
}

impl Add {
    /// An add action with the command's arguments.
    pub fn new(
        lookup: Lookup,
        node: String,
        name: String,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Add {
        Add {
            lookup,
            node,
            name,
            granularity,
            persistent,
            disabled,
            added: None,
        }
    }
}

impl Action for Add {
    fn kind(&self) -> &'static str {
        "block-dirty-bitmap-add"
    }
    fn prepare(&mut self) -> Result<()> {
        let node = self.lookup.node(&self.node)?;
        bitmap_ops::add(
            &node,
            &self.name,
            self.granularity,
            self.persistent,
            self.disabled,
        )?;
        self.added = Some(node);
        Ok(())
    }
    fn commit(&mut self) {
        self.added = None;
    }
    fn abort(&mut self) {
        if let Some(node) = self.added.take() {
            bitmap_ops::discard(&node, &self.name);
            if self.persistent {
                // A checkpoint may have stored it meanwhile; a failure here leaves a copy
                // that the next store of the node's set replaces.
                let _ = bitmap_ops::remove_stored(&node, &self.name);
            }
        }
    }
}

/// What the action on one existing bitmap does: the command it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `block-dirty-bitmap-remove`.
    Remove,
    /// `block-dirty-bitmap-clear`.
    Clear,
    /// `block-dirty-bitmap-enable`.
    Enable,
    /// `block-dirty-bitmap-disable`.
    Disable,
}

/// What to put back on abort.
enum Undo {
    Bits(HBitmap),
    Recording(bool),
    Unbusy,
}

/// Remove, clear, enable or disable one bitmap.
pub struct OnBitmap {
    lookup: Lookup,
    op: Op,
    node: String,
    name: String,
    prepared: Option<(NodeHold, Undo)>,
}

impl OnBitmap {
    /// An action of kind `op` on bitmap `name` of `node`.
    pub fn new(lookup: Lookup, op: Op, node: String, name: String) -> OnBitmap {
        OnBitmap {
            lookup,
            op,
            node,
            name,
            prepared: None,
        }
    }
}

impl Action for OnBitmap {
    fn kind(&self) -> &'static str {
        match self.op {
            Op::Remove => "block-dirty-bitmap-remove",
            Op::Clear => "block-dirty-bitmap-clear",
            Op::Enable => "block-dirty-bitmap-enable",
            Op::Disable => "block-dirty-bitmap-disable",
        }
    }
    fn prepare(&mut self) -> Result<()> {
        let node = self.lookup.bitmap_node(&self.node)?;
        let undo = match self.op {
            Op::Remove => {
                bitmap_ops::remove_prepare(&node, &self.name)?;
                Undo::Unbusy
            }
            Op::Clear => Undo::Bits(bitmap_ops::clear(&node, &self.name)?),
            Op::Enable | Op::Disable => Undo::Recording(bitmap_ops::set_recording(
                &node,
                &self.name,
                self.op == Op::Enable,
            )?),
        };
        self.prepared = Some((node, undo));
        Ok(())
    }
    fn abort(&mut self) {
        let Some((node, undo)) = self.prepared.take() else {
            return;
        };
        match undo {
            Undo::Bits(bits) => bitmap_ops::restore(&node, &self.name, bits),
            Undo::Recording(was) => {
                let _ = bitmap_ops::set_recording(&node, &self.name, was);
            }
            Undo::Unbusy => bitmap_ops::remove_abort(&node, &self.name),
        }
    }
    fn commit(&mut self) {
        if let Some((node, Undo::Unbusy)) = self.prepared.take() {
            bitmap_ops::discard(&node, &self.name);
        }
    }
}

/// `block-dirty-bitmap-merge`.
pub struct Merge {
    lookup: Lookup,
    node: String,
    target: String,
    /// Sources: (node, or `None` for the target's node; bitmap name).
    sources: Vec<(Option<String>, String)>,
    prepared: Option<(NodeHold, HBitmap)>,
}

impl Merge {
    /// Merge `sources` into bitmap `target` of `node`.
    pub fn new(
        lookup: Lookup,
        node: String,
        target: String,
        sources: Vec<(Option<String>, String)>,
    ) -> Merge {
        Merge {
            lookup,
            node,
            target,
            sources,
            prepared: None,
        }
    }
}

impl Action for Merge {
    fn kind(&self) -> &'static str {
        "block-dirty-bitmap-merge"
    }
    fn prepare(&mut self) -> Result<()> {
        let node = self.lookup.bitmap_node(&self.node)?;
        // The source nodes are held while the merge reads them.
        let mut held = Vec::with_capacity(self.sources.len());
        let mut sources: Vec<(NodeRef, String)> = Vec::with_capacity(self.sources.len());
        for (src, name) in &self.sources {
            let src = match src {
                Some(s) => {
                    let h = self.lookup.bitmap_node(s)?;
                    let n = NodeRef::clone(&h);
                    held.push(h);
                    n
                }
                None => NodeRef::clone(&node),
            };
            sources.push((src, name.clone()));
        }
        let old = bitmap_ops::merge(&node, &self.target, &sources)?;
        drop(held);
        self.prepared = Some((node, old));
        Ok(())
    }
    fn commit(&mut self) {
        self.prepared = None;
    }
    fn abort(&mut self) {
        if let Some((node, old)) = self.prepared.take() {
            bitmap_ops::restore(&node, &self.target, old);
        }
    }
}
