//! The `qcow2` format driver: adapts the `qcow2` crate to the graph.
//!
//! The image lives in the `file` child node, reached through [`NodeStorage`] so that the host
//! writes the format makes go through that node (and mark its bitmaps). The backing node, if any,
//! serves reads of unallocated clusters.

use std::io;
use std::sync::Arc;

use qcow2::{BlockStatus as QStatus, Qcow2, Storage};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::driver::{
    BitmapStore, BitmapToStore, BlockStatus, Driver, FormatSpecific, ImageFacts, NodeEvent,
    NodeEventSink, StoredBitmap,
};
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

/// An open qcow2 image.
pub struct Qcow2Driver {
    image: Qcow2,
    file: NodeRef,
    corruption: CorruptionReport,
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
    /// Open the image stored in `file`.
    pub fn open(
        file: NodeRef,
        read_only: bool,
        name: &str,
        events: Option<NodeEventSink>,
    ) -> Result<Qcow2Driver, String> {
        let storage: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let opts = qcow2::OpenOptions { read_only };
        let image = Qcow2::open(storage, opts).map_err(|e| e.to_string())?;
        let corruption = CorruptionReport {
            node_name: name.to_string(),
            sink: events,
            reported: AtomicBool::new(image.is_corrupt()),
        };
        Ok(Qcow2Driver {
            image,
            file,
            corruption,
        })
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
        self.image
            .set_backing(backing.map(|b| Arc::new(NodeStorage(b)) as Arc<dyn Storage>));
    }

    /// Backing file named in the image.
    pub fn backing_filename(&self) -> Option<String> {
        self.image.backing_file()
    }

    /// Backing format named in the image.
    pub fn backing_format(&self) -> Option<String> {
        self.image.backing_format()
    }

    /// The image's own file name (for resolving relative backing names).
    pub fn facts_filename(&self) -> String {
        self.file.facts().filename
    }
}

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn size(&self) -> u64 {
        self.image.virtual_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read_at(buf, offset).map_err(|e| self.io_err(e))
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.image
            .write_at(data, offset)
            .map_err(|e| self.io_err(e))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.image
            .write_zeroes(offset, len, may_unmap)
            .map_err(|e| self.io_err(e))
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len).map_err(|e| self.io_err(e))
    }
    fn flush(&self) -> io::Result<()> {
        self.image.flush().map_err(|e| self.io_err(e))
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        let (status, n) = self.image.block_status(offset, len).map_err(to_io)?;
        let status = match status {
            QStatus::Data => BlockStatus::Data,
            QStatus::Zero => BlockStatus::Zero,
            QStatus::Unallocated => BlockStatus::Unallocated,
        };
        Ok((status, n))
    }
    fn facts(&self) -> ImageFacts {
        let file = self.file.facts();
        let bitmaps = self
            .image
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
            cluster_size: Some(self.image.cluster_size()),
            backing_filename: self.image.backing_file(),
            backing_format: self.image.backing_format(),
            format_specific: Some(FormatSpecific::Qcow2 {
                compat: if self.image.version() >= 3 {
                    "1.1"
                } else {
                    "0.10"
                }
                .to_string(),
                lazy_refcounts: false,
                refcount_bits: 16,
                corrupt: self.image.is_corrupt(),
                bitmaps,
            }),
            dirty_flag: false,
        }
    }
    fn close(&self) -> io::Result<()> {
        self.image.close().map_err(to_io)
    }
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        Some(self)
    }
}

impl BitmapStore for Qcow2Driver {
    fn load(&self) -> io::Result<Vec<StoredBitmap>> {
        let loaded = self.image.load_bitmaps().map_err(to_io)?;
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
        self.image
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
        self.image.store_bitmaps(&list, in_use).map_err(to_io)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        // A persistent bitmap added since the last store is not in the file yet: nothing to
        // delete there (QEMU's remove succeeds too).
        if !self.image.bitmaps().iter().any(|b| b.name == name) {
            return Ok(());
        }
        self.image.remove_bitmap(name).map_err(to_io)
    }
}
