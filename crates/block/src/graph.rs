//! The graph: the one owner of the node-name table.
//!
//! Nodes are created from [`NodeOptions`] (children first, inline children with generated names),
//! looked up by name, and deleted only when nothing uses them. The daemon keeps the graph behind a
//! std `Mutex` that is never held across `.await`; I/O clones [`NodeRef`]s out and runs without it.

use std::sync::Arc;

use crate::driver::NodeEventSink;
use crate::error::{Error, Result};
use crate::node::{NodeFlags, NodeRef};

mod close;
mod drain;
mod open;
mod perms;
mod reopen;
mod rewire;
mod snapshot;
mod staged;
mod switch;

pub use close::{Detached, NodeHold};
pub use drain::Drained;
pub use reopen::{ChildChange, ReadOnlyPrep};
pub use snapshot::{SnapshotSync, SnapshotUndo};
pub use switch::switch_order;

pub(crate) use perms::PendingEdge;

/// How a node refers to a child: by name, or defined inline.
#[derive(Debug, Clone)]
pub enum ChildRef {
    /// An existing node.
    Name(String),
    /// A new node created for this parent.
    Inline(Box<NodeOptions>),
}

/// Options for one node, already checked against the schema by the daemon.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Node name; generated when absent (only allowed for inline children).
    pub node_name: Option<String>,
    /// Open read-only.
    pub read_only: bool,
    /// Fall back to read-only if read-write is impossible.
    pub auto_read_only: bool,
    /// Query-only flags.
    pub flags: NodeFlags,
    /// The driver and its options.
    pub driver: DriverOptions,
}

/// Driver-specific options.
#[derive(Debug, Clone, Default)]
pub enum DriverOptions {
    /// Host file.
    File {
        /// Path.
        filename: String,
        /// Take QEMU-compatible image locks.
        locking: bool,
    },
    /// Raw format over a child.
    Raw {
        /// The child.
        file: ChildRef,
        /// Window start.
        offset: Option<u64>,
        /// Window size.
        size: Option<u64>,
    },
    /// Null disk.
    Null {
        /// Size in bytes.
        size: u64,
        /// Reads fill zeros.
        read_zeroes: bool,
    },
    /// qcow2 over a child.
    Qcow2 {
        /// The child holding the image.
        file: ChildRef,
        /// `None`: open the backing file named in the image. `Some(None)`: no backing.
        /// `Some(Some(r))`: this node.
        backing: Option<Option<ChildRef>>,
        /// Metadata cache options.
        cache: crate::drivers::qcow2_cache::Qcow2CacheOptions,
    },
    /// blkdebug fault injection over a child.
    Blkdebug {
        /// The filtered child (`image`).
        image: ChildRef,
        /// Rules and limits.
        opts: crate::drivers::blkdebug::BlkdebugOptions,
    },
    /// copy-before-write filter (image fleecing).
    CopyBeforeWrite {
        /// The disk (`file`).
        file: ChildRef,
        /// The scratch node old data is copied to.
        target: ChildRef,
        /// Only this bitmap's dirty regions are protected: (node, bitmap name).
        bitmap: Option<(String, String)>,
        /// `min-cluster-size`, `on-cbw-error`, `cbw-timeout`.
        config: CbwOptions,
    },
    /// snapshot-access: the point-in-time view of a copy-before-write node.
    SnapshotAccess {
        /// The copy-before-write node.
        file: ChildRef,
    },
    /// A driver named in the schema that blockd does not implement.
    #[default]
    Unsupported,
}

/// The plain options of a copy-before-write node.
#[derive(Debug, Clone, Copy, Default)]
pub struct CbwOptions {
    /// `min-cluster-size` in bytes (0: none).
    pub min_cluster_size: u64,
    /// `on-cbw-error: break-snapshot` (else break-guest-write).
    pub break_snapshot: bool,
    /// `cbw-timeout` in seconds (0: none).
    pub timeout_secs: u32,
}

/// Named nodes, newest last.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeRef>,
    /// Generated-name counter, shared with the scratch graphs of staged opens.
    counter: Arc<std::sync::atomic::AtomicU64>,
    /// Where nodes report events (image corruption); `None` in tests that don't care.
    events: Option<NodeEventSink>,
    /// Edges of nodes being opened (see [`PendingEdge`]).
    pending: Vec<PendingEdge>,
    /// Exports, devices and jobs holding the graph (see [`crate::edge::Root`]).
    roots: Vec<std::sync::Weak<crate::edge::Root>>,
    /// Staged opens in progress (see [`Graph::add_staged`]): their names and pinned nodes.
    staged: staged::Reservations,
    /// In a staged open's scratch graph: the open's id, the existing nodes its tree names and
    /// the graph it will join. Empty in the daemon's graph.
    scratch: Option<staged::Scratch>,
    /// Nodes out of the name table whose close is in progress (see [`Detached`]): their
    /// names stay taken and their edges keep their permissions until they are closed.
    closing: Vec<NodeRef>,
    /// Nodes a `blockdev-del` is storing and flushing before it detaches them.
    deleting: Vec<NodeRef>,
    /// Nodes a read-only `blockdev-reopen` is storing and flushing (drained) before it
    /// switches them under the lock (see [`reopen::ReadOnlyPrep`]), each with its
    /// [`crate::node::Node::changes`] reading after the flush.
    reopening: Vec<(NodeRef, u64)>,
    /// Nodes a command looked up and is acting on (see [`close::NodeHold`]): a delete of
    /// one waits until the command is done.
    held: Vec<NodeRef>,
    /// Signalled (with the graph's mutex) when a close, delete, reopen or staged open ends:
    /// what waits for one of those waits on it.
    changed: Arc<std::sync::Condvar>,
    /// Shutdown has begun: adds and deletes are refused.
    shut: bool,
    /// Drained sections in force (see [`Drained`]): roots that come to reach their nodes
    /// are stopped too.
    sections: Vec<std::sync::Weak<drain::Section>>,
}

/// Longest backing chain opened from names inside images.
pub const MAX_BACKING_DEPTH: usize = 32;

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Send node events (image corruption) to `sink`.
    pub fn set_event_sink(&mut self, sink: NodeEventSink) {
        self.events = Some(sink);
    }

    /// All nodes, oldest first.
    pub fn nodes(&self) -> &[NodeRef] {
        &self.nodes
    }

    /// `node` is in the name table (not deleted, not being closed).
    pub fn contains(&self, node: &NodeRef) -> bool {
        self.nodes.iter().any(|n| Arc::ptr_eq(n, node))
    }

    /// Find a node by name.
    pub fn get(&self, name: &str) -> Option<NodeRef> {
        let found = self.nodes.iter().find(|n| n.name() == name);
        match (found, &self.scratch) {
            (Some(n), _) => Some(n.clone()),
            (None, Some(s)) => s.external(name),
            (None, None) => None,
        }
    }

    /// A node of this name exists or a staged open has reserved it.
    fn name_taken(&self, name: &str) -> bool {
        self.get(name).is_some()
            || self.staged.reserved(name)
            || self.closing_name(name)
            || self.scratch.as_ref().is_some_and(|s| s.is_taken(name))
    }

    /// Find a node for commands that name a device or node: QEMU's
    /// "Cannot find device='X' nor node-name='X'".
    pub fn lookup(&self, name: &str) -> Result<NodeRef> {
        self.get(name).ok_or_else(|| {
            Error::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    /// Parents of a node: (parent, role).
    pub fn parents(&self, node: &NodeRef) -> Vec<(NodeRef, &'static str)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            for c in n.children() {
                if Arc::ptr_eq(&c.node, node) {
                    out.push((n.clone(), c.role));
                }
            }
        }
        out
    }

    fn generate_name(&mut self) -> String {
        let counter = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rnd = (std::process::id() as u64)
            .wrapping_mul(2654435761)
            .wrapping_add(counter.wrapping_mul(7919))
            % 100;
        format!("#block{counter}{rnd:02}")
    }

    /// Create a root node (named) and whatever inline children it defines.
    ///
    /// Permissions before bytes: each child's image locks are taken before its parent's driver
    /// reads it, and no driver writes anything (qcow2 in-use flags, header updates) until every
    /// lock of the new tree is held. A failure at any step closes what was opened and puts
    /// every lock back, leaving every file as it was.
    pub fn add(&mut self, opts: &NodeOptions) -> Result<NodeRef> {
        if opts.node_name.is_none() {
            return Err(Error::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        self.add_tree(opts)
    }

    /// Open a root node with a generated name (drive-backup's target), with the same
    /// all-or-nothing open as [`Graph::add`]. Remove it with [`Graph::remove_unnamed`].
    pub fn add_unnamed(&mut self, opts: &NodeOptions) -> Result<NodeRef> {
        self.add_tree(opts)
    }

    /// Take a node opened with [`Graph::add_unnamed`] and its inline children out of the
    /// graph, if nothing uses it any more; the caller closes them (see [`Detached`]).
    pub fn remove_unnamed(&mut self, node: &NodeRef) -> Result<Detached> {
        if !self.nodes.iter().any(|n| Arc::ptr_eq(n, node)) {
            return Ok(Detached::none());
        }
        if !self.parents(node).is_empty()
            || self.staged.pinned(node)
            || node.first_user().is_some()
            || self.root_on(node).is_some()
        {
            return Err(Error::generic(format!("Node {} is in use", node.name())));
        }
        Ok(self.detach_tree(node))
    }

    /// Put a node built elsewhere (a backup's copy-before-write filter) into the name table,
    /// named `name` or a generated name. Take it out with [`Graph::remove_internal`].
    pub fn insert_internal(
        &mut self,
        name: Option<&str>,
        driver: Box<dyn crate::driver::Driver>,
        children: Vec<crate::node::Child>,
    ) -> Result<NodeRef> {
        // Its children were looked up without the lock: one deleted since is not found.
        for c in &children {
            self.check_present(&c.node)?;
        }
        let (name, auto) = match name {
            Some(n) => {
                check_node_name(n)?;
                if self.name_taken(n) {
                    return Err(Error::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                (n.to_string(), false)
            }
            None => (self.generate_name(), true),
        };
        let node = Arc::new(crate::node::Node::new(
            name,
            auto,
            driver,
            children,
            false,
            NodeFlags::default(),
        ));
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Take a node put in with [`Graph::insert_internal`] out of the table (its children
    /// stay); the caller closes it (see [`Detached`]).
    pub fn remove_internal(&mut self, node: &NodeRef) -> Detached {
        if !self.nodes.iter().any(|n| Arc::ptr_eq(n, node)) {
            return Detached::none();
        }
        self.nodes.retain(|n| !Arc::ptr_eq(n, node));
        self.closing.push(node.clone());
        Detached::of(vec![node.clone()])
    }

    fn add_tree(&mut self, opts: &NodeOptions) -> Result<NodeRef> {
        let before = self.nodes.len();
        let owner = self.owner();
        let opened = self.add_node(opts, 0, false).and_then(|n| {
            self.pending.retain(|p| p.owner != owner);
            self.refresh_perms().map(|_| n)
        });
        let (activated, e) = match opened {
            Ok(node) => match self.activate_new(before) {
                Ok(()) => return Ok(node),
                Err(failed) => failed,
            },
            Err(e) => (0, e),
        };
        self.pending.retain(|p| p.owner != owner);
        let new: Vec<NodeRef> = self.nodes.drain(before..).collect();
        if let Err(e) = self.refresh_perms() {
            tracing::warn!(error = %e, "restoring permissions after a failed open");
        }
        // Parents first. Activated nodes may have claimed bitmaps: store them back.
        for (i, node) in new.iter().enumerate().rev() {
            let closed = if i < activated {
                close_node(node)
            } else {
                node.close().map_err(|e| Error::io("Closing", &e))
            };
            if let Err(e) = closed {
                tracing::warn!(node = node.name(), error = %e, "closing after a failed open");
            }
        }
        Err(e)
    }

    /// Make every node hold the image locks its users need now (see [`Graph::refresh_perms`]).
    pub fn refresh_locks(&self) -> Result<()> {
        self.refresh_perms()
    }

    /// Close every node, parents before children, under the caller's lock (tests, the image
    /// tool; the daemon uses [`Graph::begin_shutdown`] and closes without the lock).
    pub fn close_all(&mut self) {
        while let Some(node) = self.nodes.pop() {
            if let Err(e) = close_node(&node) {
                tracing::warn!(node = node.name(), error = %e, "close failed");
            }
        }
    }
}

/// Store persistent bitmaps and close the driver.
pub fn close_node(node: &NodeRef) -> Result<()> {
    let stored = node.store_bitmaps(false);
    let closed = node
        .close()
        .map_err(|e| Error::io(format!("Closing node '{}'", node.name()), &e));
    stored.and(closed)
}

/// QEMU's node-name rules: a letter first, then letters, digits, '-', '.', '_'; under 32 bytes.
pub fn check_node_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return Err(Error::generic(format!("Invalid node-name: '{name}'")));
    }
    if name.len() >= 32 {
        return Err(Error::generic("Node name too long"));
    }
    Ok(())
}

/// A backing file name relative to the image's directory, as QEMU resolves it.
pub fn resolve_backing_path(image: &str, backing: &str) -> String {
    if backing.starts_with('/') || backing.contains("://") {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(i) => format!("{}{}", &image[..=i], backing),
        None => backing.to_string(),
    }
}

/// Guess a file's format from its first bytes (qcow2 magic, else raw).
pub fn probe_format(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
    .to_string())
}
