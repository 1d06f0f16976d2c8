//! The `qcow2` format driver: adapts the `qcow2` crate to the graph.
//!
//! The image lives in the `file` child node, reached through [`NodeStorage`] so that the host
//! writes the format makes go through that node (and mark its bitmaps). The backing node, if any,
//! serves reads of unallocated clusters.

use std::io;
use std::sync::{Arc, RwLock};

use qcow2::{BlockStatus as QStatus, Qcow2, Storage};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::driver::{
    BitmapStore, BitmapToStore, BlockStatus, Driver, FormatSpecific, ImageFacts, NodeEvent,
    NodeEventSink, StoredBitmap,
};
use crate::edge::ChildEdge;
use crate::node::NodeRef;

/// A node seen as qcow2 storage.
pub struct NodeStorage(pub NodeRef);

impl Storage for NodeStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.0.size();
        if offset >= size {
            buf.fill(0);
            return Ok(());
        }
        let n = ((size - offset).min(buf.len() as u64)) as usize;
        self.0.read(offset, &mut buf[..n])?;
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write(offset, buf)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.size())
    }
    fn truncate(&self, size: u64) -> io::Result<()> {
        self.0.truncate(size)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
}

/// A child edge seen as qcow2 storage: each call goes to the node the edge points at now.
pub struct EdgeStorage(pub Arc<ChildEdge>);

impl Storage for EdgeStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        NodeStorage(self.0.node()).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.node().write(offset, buf)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.node().size())
    }
    fn truncate(&self, size: u64) -> io::Result<()> {
        self.0.node().truncate(size)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.node().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.node().discard(offset, len)
    }
}

/// An open qcow2 image.
///
/// The image is first opened read-only whatever the node's mode, so opening writes nothing;
/// [`Driver::activate`] reopens it for writing once the whole tree holds its image locks.
/// Reopening (read-only <-> read-write) swaps the open image the same way.
pub struct Qcow2Driver {
    image: RwLock<Arc<Qcow2>>,
    file: Arc<ChildEdge>,
    backing: RwLock<Option<Arc<ChildEdge>>>,
    corruption: CorruptionReport,
}

/// Open the image in `file`.
fn open_image(file: &Arc<ChildEdge>, read_only: bool) -> qcow2::Result<Qcow2> {
    let storage: Arc<dyn Storage> = Arc::new(EdgeStorage(file.clone()));
    Qcow2::open(storage, qcow2::OpenOptions { read_only })
}

/// The I/O path speaks errno (NBD maps it to its own codes); the message goes to the log.
fn to_io(e: qcow2::Error) -> io::Error {
    tracing::warn!(error = %e, "qcow2 request failed");
    io::Error::from_raw_os_error(e.errno())
}

/// Reports the first corruption found while running, as QEMU does with BLOCK_IMAGE_CORRUPTED.
struct CorruptionReport {
    node_name: String,
    sink: Option<NodeEventSink>,
    reported: AtomicBool,
}

impl Qcow2Driver {
    /// Open the image stored in `file`, for reading only: nothing is written until
    /// [`Driver::activate`] (with `read_only` false) after the tree's locks are held.
    pub fn open(
        file: NodeRef,
        read_only: bool,
        name: &str,
        events: Option<NodeEventSink>,
    ) -> Result<Qcow2Driver, String> {
        Qcow2Driver::open_edge(ChildEdge::new("file", file), read_only, name, events)
    }

    /// [`Qcow2Driver::open`] over a re-wirable edge.
    pub fn open_edge(
        file: Arc<ChildEdge>,
        _read_only: bool,
        name: &str,
        events: Option<NodeEventSink>,
    ) -> Result<Qcow2Driver, String> {
        let image = open_image(&file, true).map_err(|e| e.to_string())?;
        let corruption = CorruptionReport {
            node_name: name.to_string(),
            sink: events,
            reported: AtomicBool::new(image.is_corrupt()),
        };
        Ok(Qcow2Driver {
            image: RwLock::new(Arc::new(image)),
            file,
            backing: RwLock::new(None),
            corruption,
        })
    }

    /// The open image (a clone of the handle: a reopen may swap it meanwhile).
    fn img(&self) -> Arc<Qcow2> {
        self.image.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Open the image again in `read_only` mode and use that from now on. Going read-only
    /// first writes back everything of the writable one.
    fn switch_mode(&self, read_only: bool) -> Result<(), qcow2::Error> {
        let old = self.img();
        if old.is_read_only() == read_only {
            return Ok(());
        }
        if read_only {
            // Everything the writable one cached must be in the file the reader opens.
            old.flush()?;
        }
        let image = open_image(&self.file, read_only)?;
        if let Some(b) = self
            .backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            image.set_backing(Some(Arc::new(EdgeStorage(b))));
        }
        if !read_only {
            // As QEMU: bitmaps are flagged in use as soon as the image is writable.
            image.claim_bitmaps()?;
        }
        *self.image.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(image);
        if read_only {
            // Requests that still hold the writable one fail from here on (reopen drains first).
            old.close()?;
        }
        Ok(())
    }

    fn io_err(&self, e: qcow2::Error) -> io::Error {
        if e.kind() == qcow2::ErrorKind::Corrupt
            && !self.corruption.reported.swap(true, Ordering::AcqRel)
        {
            if let Some(sink) = &self.corruption.sink {
                let node = self.corruption.node_name.clone();
                sink(NodeEvent::ImageCorrupted {
                    node,
                    msg: e.to_string(),
                    fatal: true,
                });
            }
        }
        to_io(e)
    }

    /// Attach (or detach) the backing node.
    pub fn set_backing(&self, backing: Option<NodeRef>) {
        self.set_backing_edge(backing.map(|b| ChildEdge::new("backing", b)));
    }

    /// Attach (or detach) the backing edge.
    pub fn set_backing_edge(&self, backing: Option<Arc<ChildEdge>>) {
        *self.backing.write().unwrap_or_else(|p| p.into_inner()) = backing.clone();
        self.img()
            .set_backing(backing.map(|b| Arc::new(EdgeStorage(b)) as Arc<dyn Storage>));
    }

    /// Backing file named in the image.
    pub fn backing_filename(&self) -> Option<String> {
        self.img().backing_file()
    }

    /// Backing format named in the image.
    pub fn backing_format(&self) -> Option<String> {
        self.img().backing_format()
    }

    /// The image's own file name (for resolving relative backing names).
    pub fn facts_filename(&self) -> String {
        self.file.node().facts().filename
    }
}

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn size(&self) -> u64 {
        self.img().virtual_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.img().read_at(buf, offset).map_err(|e| self.io_err(e))
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.img()
            .write_at(data, offset)
            .map_err(|e| self.io_err(e))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.img()
            .write_zeroes(offset, len, may_unmap)
            .map_err(|e| self.io_err(e))
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.img().discard(offset, len).map_err(|e| self.io_err(e))
    }
    fn flush(&self) -> io::Result<()> {
        self.img().flush().map_err(|e| self.io_err(e))
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        let (status, n) = self.img().block_status(offset, len).map_err(to_io)?;
        let status = match status {
            QStatus::Data => BlockStatus::Data,
            QStatus::Zero => BlockStatus::Zero,
            QStatus::Unallocated => BlockStatus::Unallocated,
        };
        Ok((status, n))
    }
    fn facts(&self) -> ImageFacts {
        let file = self.file.node().facts();
        let image = self.img();
        let bitmaps = image
            .bitmaps()
            .into_iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.in_use {
                    flags.push("in-use");
                }
                if b.auto {
                    flags.push("auto");
                }
                (b.name, b.granularity, flags)
            })
            .collect();
        ImageFacts {
            filename: file.filename,
            actual_size: file.actual_size,
            cluster_size: Some(self.img().cluster_size()),
            backing_filename: self.img().backing_file(),
            backing_format: self.img().backing_format(),
            format_specific: Some(FormatSpecific::Qcow2 {
                compat: if self.img().version() >= 3 {
                    "1.1"
                } else {
                    "0.10"
                }
                .to_string(),
                lazy_refcounts: false,
                refcount_bits: 16,
                corrupt: self.img().is_corrupt(),
                bitmaps,
            }),
            dirty_flag: false,
        }
    }
    fn close(&self) -> io::Result<()> {
        self.img().close().map_err(to_io)
    }
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        Some(self)
    }
    fn activate(&self, read_only: bool) -> crate::Result<()> {
        self.switch_mode(read_only)
            .map_err(|e| crate::Error::generic(e.to_string()))
    }
    fn set_read_only(&self, read_only: bool) -> io::Result<()> {
        self.switch_mode(read_only).map_err(to_io)
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn attach_backing(&self, edge: Option<Arc<ChildEdge>>) {
        self.set_backing_edge(edge);
    }
}

impl BitmapStore for Qcow2Driver {
    fn load(&self) -> io::Result<Vec<StoredBitmap>> {
        // Keep qcow2's account of what is wrong; the errno alone says only "I/O error".
        let loaded = self
            .img()
            .load_bitmaps()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(loaded
            .into_iter()
            .map(|b| StoredBitmap {
                name: b.name,
                granularity: b.granularity,
                recording: b.auto,
                inconsistent: b.inconsistent,
                data: b.data,
            })
            .collect())
    }
    fn can_store(&self, name: &str, granularity: u64) -> Result<(), String> {
        self.img()
            .can_store_bitmap(name, granularity)
            .map_err(|e| e.to_string())
    }
    fn store(&self, bitmaps: &[BitmapToStore], in_use: bool) -> io::Result<()> {
        let list: Vec<qcow2::StoreBitmap> = bitmaps
            .iter()
            .map(|b| qcow2::StoreBitmap {
                name: b.name.clone(),
                granularity: b.granularity,
                auto: b.recording,
                inconsistent_keep_in_use: b.inconsistent,
                data: b.data.clone(),
            })
            .collect();
        self.img().store_bitmaps(&list, in_use).map_err(to_io)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.img().remove_bitmap(name).map_err(to_io)
    }
}
