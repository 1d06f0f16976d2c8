//! The graph: the one owner of the node-name table.
//!
//! Nodes are created from [`NodeOptions`] (children first, inline children with generated names),
//! looked up by name, and deleted only when nothing uses them. The daemon keeps the graph behind a
//! std `Mutex` that is never held across `.await`; I/O clones [`NodeRef`]s out and runs without it.

use std::sync::Arc;

use crate::bitmap::DirtyBitmap;
use crate::driver::{Driver, LockMode, NodeEventSink};
use crate::drivers::{file::FileDriver, null::NullDriver, qcow2::Qcow2Driver, raw::RawDriver};
use crate::error::{strerror, Error, Result};
use crate::node::{Child, Node, NodeFlags, NodeRef};

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
    },
    /// A driver named in the schema that blockd does not implement.
    #[default]
    Unsupported,
}

/// Named nodes, newest last.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeRef>,
    counter: u64,
    /// Where nodes report events (image corruption); `None` in tests that don't care.
    events: Option<NodeEventSink>,
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

    /// Find a node by name.
    pub fn get(&self, name: &str) -> Option<NodeRef> {
        self.nodes.iter().find(|n| n.name() == name).cloned()
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
        let rnd = (std::process::id() as u64)
            .wrapping_mul(2654435761)
            .wrapping_add(self.counter * 7919)
            % 100;
        let name = format!("#block{}{:02}", self.counter, rnd);
        self.counter += 1;
        name
    }

    /// Create a root node (named) and whatever inline children it defines.
    pub fn add(&mut self, opts: &NodeOptions) -> Result<NodeRef> {
        if opts.node_name.is_none() {
            return Err(Error::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let before = self.nodes.len();
        let result = self
            .add_node(opts, 0)
            .and_then(|n| self.refresh_locks().map(|_| n));
        if result.is_err() {
            // Undo inline children created on the way.
            for node in self.nodes.drain(before..).rev() {
                let _ = node.close();
            }
            let _ = self.refresh_locks();
        }
        result
    }

    /// Open a root node with a generated name (drive-backup's target); nothing is left behind
    /// when it fails. Remove it with [`Graph::remove_unnamed`].
    pub fn add_unnamed(&mut self, opts: &NodeOptions) -> Result<NodeRef> {
        let before = self.nodes.len();
        let result = self.add_node(opts, 0);
        if result.is_err() {
            for node in self.nodes.drain(before..).rev() {
                let _ = node.close();
            }
        }
        let locks = self.refresh_locks();
        result.and_then(|n| locks.map(|_| n))
    }

    /// Remove a node opened with [`Graph::add_unnamed`] and its inline children, if nothing
    /// uses it any more.
    pub fn remove_unnamed(&mut self, node: &NodeRef) -> Result<()> {
        if !self.nodes.iter().any(|n| Arc::ptr_eq(n, node)) {
            return Ok(());
        }
        if !self.parents(node).is_empty() || node.first_user().is_some() {
            return Err(Error::generic(format!("Node {} is in use", node.name())));
        }
        let r = self.remove_tree(node);
        let _ = self.refresh_locks();
        r
    }

    fn add_node(&mut self, opts: &NodeOptions, depth: usize) -> Result<NodeRef> {
        let name = match &opts.node_name {
            Some(n) => {
                check_node_name(n)?;
                if self.get(n).is_some() {
                    return Err(Error::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                n.clone()
            }
            None => self.generate_name(),
        };
        let auto_named = opts.node_name.is_none();
        let (driver, children, read_only) = self.open_driver(opts, depth, &name)?;
        let node = Arc::new(Node::new(
            name,
            auto_named,
            driver,
            children,
            read_only,
            opts.flags.clone(),
        ));
        self.load_persistent_bitmaps(&node)?;
        self.nodes.push(node.clone());
        Ok(node)
    }

    fn child(&mut self, r: &ChildRef, parent: &NodeOptions, depth: usize) -> Result<NodeRef> {
        let parent_ro = parent.read_only;
        match r {
            ChildRef::Name(n) => self.get(n).ok_or_else(|| {
                Error::generic(format!("Cannot find device='{n}' nor node-name='{n}'"))
            }),
            ChildRef::Inline(o) => {
                // Inline children inherit read-only and discard from their parent, as in QEMU.
                let mut o = (**o).clone();
                o.read_only |= parent_ro;
                o.flags.discard_unmap |= parent.flags.discard_unmap;
                self.add_node(&o, depth)
            }
        }
    }

    fn open_driver(
        &mut self,
        opts: &NodeOptions,
        depth: usize,
        name: &str,
    ) -> Result<(Box<dyn Driver>, Vec<Child>, bool)> {
        let ro = opts.read_only;
        match &opts.driver {
            DriverOptions::File { filename, locking } => {
                let open = |ro| FileDriver::open(filename, ro);
                let (driver, ro) = match open(ro) {
                    Ok(d) => (d, ro),
                    Err(e)
                        if !ro && opts.auto_read_only && e.raw_os_error() == Some(libc::EACCES) =>
                    {
                        (open(true).map_err(|e| open_error(filename, &e))?, true)
                    }
                    Err(e) => return Err(open_error(filename, &e)),
                };
                if *locking {
                    driver.enable_locking();
                }
                Ok((Box::new(driver), Vec::new(), ro))
            }
            DriverOptions::Null { size, read_zeroes } => Ok((
                Box::new(NullDriver::new(*size, *read_zeroes)),
                Vec::new(),
                ro,
            )),
            DriverOptions::Raw { file, offset, size } => {
                let child = self.child(file, opts, depth)?;
                let ro = ro || child.read_only();
                let driver = RawDriver::new(child.clone(), offset.unwrap_or(0), *size)
                    .map_err(Error::generic)?;
                Ok((
                    Box::new(driver),
                    vec![Child {
                        role: "file",
                        node: child,
                    }],
                    ro,
                ))
            }
            DriverOptions::Qcow2 { file, backing } => {
                let child = self.child(file, opts, depth)?;
                if !ro && child.read_only() {
                    return Err(Error::generic("Could not open image: Permission denied")
                        .context(child.name().to_string()));
                }
                let driver = Qcow2Driver::open(child.clone(), ro, name, self.events.clone())
                    .map_err(Error::generic)?;
                let mut children = vec![Child {
                    role: "file",
                    node: child,
                }];
                let backing_node = match backing {
                    Some(None) => None,
                    Some(Some(r)) => {
                        let ro_parent = NodeOptions {
                            read_only: true,
                            ..opts.clone()
                        };
                        Some(self.child(r, &ro_parent, depth)?)
                    }
                    None => self.open_backing_from_image(&driver, depth)?,
                };
                if let Some(b) = backing_node {
                    driver.set_backing(Some(b.clone()));
                    children.push(Child {
                        role: "backing",
                        node: b,
                    });
                }
                Ok((Box::new(driver), children, ro))
            }
            DriverOptions::Unsupported => Err(Error::generic("Driver is not supported by blockd")),
        }
    }

    /// Open the backing file an image names, the way QEMU does: relative to the image's
    /// directory, read-only, format from the image (else probed), bounded depth.
    fn open_backing_from_image(
        &mut self,
        driver: &Qcow2Driver,
        depth: usize,
    ) -> Result<Option<NodeRef>> {
        let Some(name) = driver.backing_filename() else {
            return Ok(None);
        };
        if depth + 1 > MAX_BACKING_DEPTH {
            return Err(Error::generic(format!(
                "Backing chain too deep (more than {MAX_BACKING_DEPTH} images) at '{name}'"
            )));
        }
        let path = resolve_backing_path(&driver.facts_filename(), &name);
        let format = match driver.backing_format() {
            Some(f) => f,
            None => probe_format(&path).map_err(|e| {
                Error::generic(format!(
                    "Could not open backing file: Could not open '{path}': {}",
                    strerror(&e)
                ))
            })?,
        };
        let file = Box::new(NodeOptions {
            read_only: true,
            driver: DriverOptions::File {
                filename: path.clone(),
                locking: true,
            },
            ..NodeOptions::default()
        });
        let driver = match format.as_str() {
            "qcow2" => DriverOptions::Qcow2 {
                file: ChildRef::Inline(file),
                backing: None,
            },
            "raw" => DriverOptions::Raw {
                file: ChildRef::Inline(file),
                offset: None,
                size: None,
            },
            other => {
                return Err(Error::generic(format!(
                    "Could not open backing file: Unknown driver '{other}'"
                )))
            }
        };
        let opts = NodeOptions {
            read_only: true,
            driver,
            ..NodeOptions::default()
        };
        self.add_node(&opts, depth + 1)
            .map(Some)
            .map_err(|e| e.context("Could not open backing file"))
    }

    fn load_persistent_bitmaps(&self, node: &NodeRef) -> Result<()> {
        let Some(store) = node.driver().bitmap_store() else {
            return Ok(());
        };
        let loaded = store
            .load()
            .map_err(|e| Error::io("Could not load bitmaps", &e))?;
        let mut list = node.bitmaps();
        for b in loaded {
            let mut bits = hbitmap::HBitmap::new(node.size(), b.granularity)
                .map_err(|e| Error::generic(format!("Bitmap '{}': {e}", b.name)))?;
            if !b.inconsistent {
                bits.deserialize_part(0, &b.data);
            }
            list.items.push(DirtyBitmap {
                name: Some(b.name),
                bits,
                recording: b.recording && !b.inconsistent,
                persistent: true,
                busy: false,
                inconsistent: b.inconsistent,
                readonly: node.read_only(),
                frozen: false,
            });
        }
        node.refresh_recording(&list);
        Ok(())
    }

    /// Delete a root node (blockdev-del), refusing while anything uses it.
    pub fn del(&mut self, name: &str) -> Result<()> {
        let Some(node) = self.get(name) else {
            return Err(Error::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if node.auto_named() {
            return Err(Error::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !self.parents(&node).is_empty() {
            return Err(Error::generic(format!("Block device {name} is in use")));
        }
        if let Some(user) = node.first_user() {
            return Err(Error::generic(format!("Node {name} is in use by {user}")));
        }
        let result = self.remove_tree(&node);
        let _ = self.refresh_locks();
        result
    }

    /// Make every node hold the image locks its users need now: a writer above (a read-write
    /// parent, a writing export) needs write, any parent or user needs read, else nothing.
    pub fn refresh_locks(&self) -> Result<()> {
        for node in &self.nodes {
            let parents = self.parents(node);
            let mode = if node.writers() > 0 || parents.iter().any(|(p, _)| !p.read_only()) {
                LockMode::Write
            } else if !parents.is_empty() || node.first_user().is_some() {
                LockMode::Read
            } else {
                LockMode::Unused
            };
            node.driver().set_lock(mode).map_err(Error::generic)?;
        }
        Ok(())
    }

    /// Remove `node` and then every inline (auto-named) child left without parents.
    fn remove_tree(&mut self, node: &NodeRef) -> Result<()> {
        self.nodes.retain(|n| !Arc::ptr_eq(n, node));
        let result = close_node(node);
        for c in node.children() {
            if c.node.auto_named()
                && self.parents(&c.node).is_empty()
                && c.node.first_user().is_none()
            {
                let _ = self.remove_tree(&c.node);
            }
        }
        result
    }

    /// Close every node, parents before children (shutdown).
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

fn open_error(filename: &str, e: &std::io::Error) -> Error {
    Error::generic(format!("Could not open '{filename}': {}", strerror(e)))
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
