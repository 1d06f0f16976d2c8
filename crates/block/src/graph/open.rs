//! Opening a tree of nodes: children first, each child's permissions (image locks) taken
//! before its parent's driver reads it, and nothing written anywhere until every lock of the
//! tree is held and [`Graph::activate_new`] runs.

use std::sync::Arc;

use super::{
    check_node_name, probe_format, resolve_backing_path, ChildRef, DriverOptions, Graph,
    NodeOptions, MAX_BACKING_DEPTH,
};
use crate::bitmap::DirtyBitmap;
use crate::driver::Driver;
use crate::drivers::cbw::{CbwConfig, CbwDriver, OnCbwError};
use crate::drivers::snapshot_access::SnapshotAccessDriver;
use crate::drivers::{file::FileDriver, null::NullDriver, qcow2::Qcow2Driver, raw::RawDriver};
use crate::edge::ChildEdge;
use crate::error::{strerror, Error, Result};
use crate::node::{Node, NodeRef};
use crate::perm::Role;

/// A driver just opened, its child edges, and whether it ended up read-only.
type Opened = (Box<dyn Driver>, Vec<Arc<ChildEdge>>, bool);

impl Graph {
    /// Open a node and (first) its children. Takes each child edge's permissions before the
    /// driver reads the child; writes nothing (see [`Graph::activate_new`]).
    /// `inline`: created with a parent (an inline child, a backing file named in the image),
    /// so owned by its parents, not the monitor, even when given a node-name (as in QEMU).
    pub(super) fn add_node(
        &mut self,
        opts: &NodeOptions,
        depth: usize,
        inline: bool,
    ) -> Result<NodeRef> {
        let name = match &opts.node_name {
            Some(n) => {
                check_node_name(n)?;
                if self.name_taken(n) {
                    return Err(Error::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                n.clone()
            }
            None => self.generate_name(),
        };
        if opts.flags.detect_zeroes == "unmap" && !opts.flags.discard_unmap {
            return Err(Error::generic(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        let auto_named = inline || opts.node_name.is_none();
        let (driver, children, read_only) = self.open_driver(opts, depth, &name)?;
        let node = Arc::new(Node::with_edges(
            name,
            auto_named,
            driver,
            children,
            read_only,
            opts.flags.clone(),
        ));
        node.set_opened_with(opts.driver.clone());
        // Its edges are real now.
        self.pending.retain(|p| p.parent != node.name());
        self.nodes.push(node.clone());
        load_persistent_bitmaps(&node)?;
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
                o.flags.cache_no_flush |= parent.flags.cache_no_flush;
                o.flags.cache_direct |= parent.flags.cache_direct;
                self.add_node(&o, depth, true)
            }
        }
    }

    fn open_driver(&mut self, opts: &NodeOptions, depth: usize, name: &str) -> Result<Opened> {
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
                let role = if offset.unwrap_or(0) == 0 && size.is_none() {
                    Role::Filtered
                } else {
                    Role::Data
                };
                self.attach_pending(name, !ro, "file", role, &child)?;
                let edge = ChildEdge::new("file", child);
                let driver = RawDriver::on_edge(edge.clone(), offset.unwrap_or(0), *size)
                    .map_err(Error::generic)?;
                Ok((Box::new(driver), vec![edge], ro))
            }
            DriverOptions::Qcow2 {
                file,
                backing,
                cache,
            } => {
                let child = self.child(file, opts, depth)?;
                // The file's locks before the format reads a byte of it (a read-only file
                // under a read-write format is refused there, with QEMU's text).
                self.attach_pending(name, !ro, "file", Role::Storage, &child)?;
                let edge = ChildEdge::new("file", child);
                let driver =
                    Qcow2Driver::open_edge(edge.clone(), ro, name, self.events.clone(), cache)
                        .map_err(Error::generic)?;
                let mut children = vec![edge];
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
                    self.attach_pending(name, !ro, "backing", Role::Backing, &b)?;
                    let edge = ChildEdge::new("backing", b);
                    driver.set_backing_edge(Some(edge.clone()));
                    children.push(edge);
                }
                Ok((Box::new(driver), children, ro))
            }
            DriverOptions::Blkdebug { image, opts: bd } => {
                let child = self.child(image, opts, depth)?;
                let ro = ro || child.read_only();
                self.attach_pending(name, !ro, "image", Role::Filtered, &child)?;
                let driver =
                    crate::drivers::blkdebug::BlkdebugDriver::new(child.clone(), bd.clone())
                        .map_err(Error::generic)?;
                Ok((Box::new(driver), vec![ChildEdge::new("image", child)], ro))
            }
            DriverOptions::CopyBeforeWrite {
                file,
                target,
                bitmap,
                config,
            } => {
                let source = self.child(file, opts, depth)?;
                let target = self.child(target, opts, depth)?;
                self.attach_pending(name, !ro, "file", Role::CbwSource, &source)?;
                self.attach_pending(name, !ro, "target", Role::CbwTarget, &target)?;
                let driver = self.open_cbw(source.clone(), target.clone(), bitmap, config)?;
                let children = vec![
                    ChildEdge::new("file", source),
                    ChildEdge::new("target", target),
                ];
                Ok((Box::new(driver), children, ro))
            }
            DriverOptions::SnapshotAccess { file } => {
                let child = self.child(file, opts, depth)?;
                self.attach_pending(name, false, "file", Role::Unused, &child)?;
                let driver = SnapshotAccessDriver::new(child.clone());
                Ok((Box::new(driver), vec![ChildEdge::new("file", child)], ro))
            }
            DriverOptions::Unsupported => Err(Error::generic("Driver is not supported by blockd")),
        }
    }

    /// Open the backing file an image names, the way QEMU does: relative to the image's
    /// directory, read-only, format from the image (else probed), bounded depth.
    fn open_cbw(
        &self,
        source: NodeRef,
        target: NodeRef,
        bitmap: &Option<(String, String)>,
        o: &super::CbwOptions,
    ) -> Result<CbwDriver> {
        let config = CbwConfig {
            min_cluster_size: o.min_cluster_size,
            on_error: if o.break_snapshot {
                OnCbwError::BreakSnapshot
            } else {
                OnCbwError::BreakGuestWrite
            },
            timeout_secs: o.timeout_secs,
        };
        let Some((bnode, bname)) = bitmap else {
            return CbwDriver::open(source, target, None, &config).map_err(Error::generic);
        };
        let holder = self
            .get(bnode)
            .ok_or_else(|| Error::generic(format!("Node '{bnode}' not found")))?;
        let list = holder.bitmaps();
        let bits = &list.find(bname)?.bits;
        CbwDriver::open(source, target, Some((bname, bits)), &config).map_err(Error::generic)
    }

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
                cache: Default::default(),
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
        self.add_node(&opts, depth + 1, true)
            .map(Some)
            .map_err(|e| e.context("Could not open backing file"))
    }

    /// Let the nodes from `first` on (a tree just opened, children first) start writing: a
    /// writable format reopens for writing and claims its bitmaps. Returns how many were
    /// activated before an error.
    pub(super) fn activate_new(&self, first: usize) -> std::result::Result<(), (usize, Error)> {
        for (i, node) in self.nodes[first..].iter().enumerate() {
            node.driver()
                .activate(node.read_only())
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// Load the bitmaps stored in a node's image (reading only: the image is not yet writable).
fn load_persistent_bitmaps(node: &NodeRef) -> Result<()> {
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
    // Bitmaps created together and fed the same writes are stored with the same bits.
    list.share_identical();
    node.refresh_recording(&list);
    Ok(())
}

fn open_error(filename: &str, e: &std::io::Error) -> Error {
    Error::io(format!("Could not open '{filename}'"), e)
}
