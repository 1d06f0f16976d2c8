//! The driver trait: what every node's format or protocol implementation provides.
//!
//! Drivers do blocking, positioned I/O and are called from any thread (the async edges of the
//! daemon hop onto tokio's blocking pool). A driver that sits on other nodes (raw, qcow2) reaches
//! them only through [`crate::NodeRef`], so the writes it issues mark the bitmaps of those nodes.

use std::io;

use crate::perm::{Perm, Role};

/// Allocation status of a run of bytes, as a format knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// Data stored in this layer.
    Data,
    /// Stored in this layer as zeros (reads return zeros without touching data).
    Zero,
    /// Not stored in this layer: reads fall through to the backing node, or read as zeros.
    Unallocated,
}

/// A driver's switch between read-only and read-write prepared by
/// [`Driver::prepare_switch`]: the driver's own state, opaque to the graph.
pub struct StagedSwitch(pub Box<dyn std::any::Any + Send>);

/// What a committed switch leaves to release without the graph lock (closing the replaced
/// image, stopping its helpers). Errors there are logged: the switch is made.
pub type AfterSwitch = Box<dyn FnOnce() + Send>;

/// Something a node reports on its own (the daemon turns it into a QMP event).
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// BLOCK_IMAGE_CORRUPTED: the image's metadata is corrupt; it was marked corrupt and is
    /// now refused for writing (`fatal`).
    ImageCorrupted {
        /// Node name.
        node: String,
        /// What was found.
        msg: String,
        /// Further writes are refused.
        fatal: bool,
    },
}

/// Where node events go.
pub type NodeEventSink = std::sync::Arc<dyn Fn(NodeEvent) + Send + Sync>;

/// What a node's users need from its storage, for image locking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody uses it: hold no locks.
    Unused,
    /// Readers only: take "consistent read", refuse others "write".
    Read,
    /// A writer: take read, write and resize, share only reads.
    Write,
}

/// Facts about an open image for the queries (`image` in `query-named-block-nodes`).
#[derive(Debug, Clone, Default)]
pub struct ImageFacts {
    /// File name the image was opened from (for filters: the child's).
    pub filename: String,
    /// Bytes the image occupies on its host storage, if known.
    pub actual_size: Option<u64>,
    /// Cluster size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// Backing file name recorded in the image.
    pub backing_filename: Option<String>,
    /// Backing file format recorded in the image.
    pub backing_format: Option<String>,
    /// Format-specific facts, as ordered key/value pairs of plain values.
    pub format_specific: Option<FormatSpecific>,
    /// The image's dirty flag (qcow2 lazy refcounts).
    pub dirty_flag: bool,
}

/// Format-specific facts shown under `image.format-specific`.
#[derive(Debug, Clone)]
pub enum FormatSpecific {
    /// The `file` protocol: no data.
    File,
    /// qcow2 header facts and the bitmaps stored in the file.
    Qcow2 {
        /// "0.10" or "1.1".
        compat: String,
        /// Lazy refcounts enabled.
        lazy_refcounts: bool,
        /// Refcount width in bits.
        refcount_bits: u64,
        /// The image is marked corrupt.
        corrupt: bool,
        /// Bitmaps in the file: (name, granularity, flags such as "in-use", "auto").
        bitmaps: Vec<(String, u64, Vec<&'static str>)>,
    },
}

/// One bitmap found in an image at open.
#[derive(Debug, Clone)]
pub struct StoredBitmap {
    /// Bitmap name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Recording after load (qcow2 `auto`).
    pub recording: bool,
    /// It was not saved cleanly (qcow2 `in_use` already set).
    pub inconsistent: bool,
    /// Serialised bits (bit i = granule i, LSB first).
    pub data: Vec<u8>,
}

/// A bitmap to be written into an image.
#[derive(Debug, Clone)]
pub struct BitmapToStore<'a> {
    /// Bitmap name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Recording (qcow2 `auto`).
    pub recording: bool,
    /// Keep it marked in use (an inconsistent bitmap stays so).
    pub inconsistent: bool,
    /// The bits, read piece by piece from the live bitmap (never copied whole); `None` for an
    /// inconsistent bitmap (nothing to write).
    pub bits: Option<crate::node::LiveBits<'a>>,
}

/// Storage of persistent bitmaps inside an image (qcow2's bitmaps extension).
pub trait BitmapStore: Send + Sync {
    /// Load every bitmap at open; on writable images also mark them in use in the file.
    fn load(&self) -> io::Result<Vec<StoredBitmap>>;
    /// Can a persistent bitmap of this name and granularity be stored? Err(message) if not.
    fn can_store(&self, name: &str, granularity: u64) -> Result<(), String>;
    /// Replace the stored set; `in_use` leaves them flagged in use (a write-back while running).
    fn store(&self, bitmaps: &[BitmapToStore<'_>], in_use: bool) -> io::Result<()>;
    /// Delete one bitmap from the file now.
    fn remove(&self, name: &str) -> io::Result<()>;
}

/// A callback taking host-file pieces (file, offset in it, length) for a kernel-side copy.
pub use qcow2::HostFn;

/// A node's implementation. All offsets are guest bytes of this node.
pub trait Driver: Send + Sync {
    /// Driver name as QEMU reports it in `drv` ("file", "raw", "qcow2", "null-co").
    fn name(&self) -> &'static str;
    /// Current virtual size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `buf.len()` bytes at `offset` (the node has checked the range).
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Write `data` at `offset` as compressed clusters (qcow2): whole aligned clusters only
    /// (EINVAL otherwise, except a last partial cluster at the disk end), never over an
    /// allocated cluster (EIO); a zero-length call pads the image file to a sector.
    /// Formats without compressed clusters: ENOTSUP.
    fn write_compressed(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
    /// Whether [`Driver::write_compressed`] is implemented (QEMU's
    /// `bdrv_supports_compressed_writes`, which backup `compress: true` checks).
    fn supports_compressed_writes(&self) -> bool {
        false
    }
    /// Whether [`Driver::read_host`] / [`Driver::write_host`] can work here (the bytes live
    /// in a plain file the kernel can copy). Default: no.
    fn host_io(&self) -> bool {
        false
    }
    /// Hand the host-file pieces holding `[offset, offset+len)` to `f`, in order.
    /// `Ok(false)` (and `f` not called): not plain file data; use [`Driver::read`].
    fn read_host(&self, _offset: u64, _len: u64, _f: &mut HostFn<'_>) -> io::Result<bool> {
        Ok(false)
    }
    /// Let `f` fill the host-file pieces of `[offset, offset+len)`, in order, allocating as a
    /// write does. `Ok(false)` (nothing changed, `f` not called): use [`Driver::write`].
    fn write_host(&self, _offset: u64, _len: u64, _f: &mut HostFn<'_>) -> io::Result<bool> {
        Ok(false)
    }
    /// Let `f` fill the whole-cluster runs `runs` (ascending) as one request: host-file
    /// pieces holding the runs back to back, in order (qcow2: one contiguous allocation, one
    /// L2 pass). `Ok(false)` (nothing changed, `f` not called): write the runs one by one.
    fn write_batch_host(&self, _runs: &[(u64, u64)], _f: &mut HostFn<'_>) -> io::Result<bool> {
        Ok(false)
    }
    /// Make the range read as zeros; `may_unmap` allows deallocating.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
    /// Hint that the range is unused; it may then read as anything the format chooses (zeros here).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Status of the first run of `[offset, offset+len)` and its length (> 0 when len > 0).
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)>;
    /// Facts for the queries.
    fn facts(&self) -> ImageFacts;
    /// Write back and release everything; called once when the node is closed.
    fn close(&self) -> io::Result<()> {
        self.flush()
    }
    /// Persistent bitmap storage, for formats that have it.
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        None
    }
    /// Protocol drivers whose storage grows on writes past the end (host files): the node then
    /// lets reads and writes past `size()` through (reads there return zeros).
    fn can_grow(&self) -> bool {
        false
    }
    /// Set the size (protocol drivers that can grow).
    fn truncate(&self, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
    /// Whether `block_status` is cheap enough to ask before every read (in-memory metadata).
    /// Host files answer with lseek, which on tmpfs walks the page cache: not cheap.
    fn status_is_cheap(&self) -> bool {
        true
    }
    /// Hold image locks for what the node's users need now (QEMU-compatible). Err is the
    /// conflict message ("Failed to get \"write\" lock"). Default: nothing to lock.
    fn set_lock(&self, _mode: LockMode) -> Result<(), String> {
        Ok(())
    }
    /// Hold what the node's edges need (`perm`) and let others do only `shared`: host files
    /// take QEMU's lock bytes. Err is the conflict message. Default: the coarse [`LockMode`].
    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<(), String> {
        let _ = shared;
        self.set_lock(if perm.intersects(Perm::WRITE | Perm::RESIZE) {
            LockMode::Write
        } else if perm.is_empty() {
            LockMode::Unused
        } else {
            LockMode::Read
        })
    }
    /// Can `write_zeroes` of this range be done without writing zeros byte by byte (NBD's
    /// FAST_ZERO)? Default: no, so a fast-only request is refused rather than slow.
    fn zero_is_fast(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// How the child edge named `child` passes this node's needs on (QEMU's child role).
    fn child_role(&self, child: &str) -> Role {
        Role::for_child(child)
    }
    /// Called once every node of a new tree holds its permissions (image locks): from here on
    /// the driver may write to its children (a writable format opens for writing, claims its
    /// bitmaps, ...). Before, a driver reads only. Default: nothing to do.
    fn activate(&self, _read_only: bool) -> crate::Result<()> {
        Ok(())
    }
    /// Switch between read-only and read-write (blockdev-reopen). Default: nothing to do.
    fn set_read_only(&self, _read_only: bool) -> io::Result<()> {
        Ok(())
    }
    /// The disk I/O of a switch to `read_only` (blockdev-reopen), done without the graph lock
    /// while the node is drained: open the image again in the new mode, write what the new
    /// mode needs written first (going read-write: after the write locks are held). Nothing
    /// changes for the node's users until [`Driver::commit_switch`]; [`Driver::abort_switch`]
    /// undoes it. `None`: nothing to swap. Errors carry "Could not reopen" and the cause.
    /// Default: [`Driver::set_read_only`] (drivers whose switch is only a check).
    fn prepare_switch(&self, read_only: bool) -> crate::Result<Option<StagedSwitch>> {
        self.set_read_only(read_only)
            .map_err(|e| crate::Error::io("Could not reopen", &e))?;
        Ok(None)
    }
    /// Make a prepared switch current: only swaps in-memory state (runs under the graph lock;
    /// nothing here waits on the disk). Returns what is left to release without the lock
    /// (the image that was replaced). Default: nothing (no driver of its own prepares one).
    fn commit_switch(&self, _staged: StagedSwitch) -> Option<AfterSwitch> {
        None
    }
    /// Give up a prepared switch (without the graph lock): the node stays as it was.
    fn abort_switch(&self, _staged: StagedSwitch) {}
    /// Swap a prepared switch in at once, before the switch is committed, for a node that
    /// only its parent in the same switch uses (an inline `file` child going read-write,
    /// which its format's prepare then writes through). Returns the state it replaced:
    /// swapped in again it puts the node back (an abort), dropped it is released (a commit).
    /// `Err(staged)`: the driver has nothing to swap early (it is committed as usual).
    fn swap_switch(&self, staged: StagedSwitch) -> std::result::Result<StagedSwitch, StagedSwitch> {
        Err(staged)
    }
    /// The image was found corrupt (formats with metadata): nothing may be written any more.
    fn is_corrupt(&self) -> bool {
        false
    }
    /// A debug event (QEMU's `BlkdebugEvent` wire name, e.g. "write_aio") delivered to this
    /// node. Only `blkdebug` reacts; everything else ignores it.
    fn debug_event(&self, _event: &str) {}
    /// Anonymous, disabled bitmaps the driver keeps for itself, as the queries list them
    /// (newest first): (granularity, dirty bytes). Default: none.
    fn internal_bitmaps(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// The backing file the image's header names, read from memory (no I/O, unlike
    /// [`Driver::facts`], which stats the file). Default: none.
    fn named_backing(&self) -> Option<String> {
        None
    }
    /// Can a backing child be attached to an open node (external snapshots)? Default: no.
    fn supports_backing(&self) -> bool {
        false
    }
    /// Read unallocated data through `edge` from now on (`None`: no backing). Only called
    /// when [`Driver::supports_backing`].
    fn attach_backing(&self, _edge: Option<std::sync::Arc<crate::edge::ChildEdge>>) {}
    /// Internal snapshots kept in the image (qcow2). Default: none.
    fn internal_snapshots(&self) -> Option<&dyn crate::internal_snapshot::InternalSnapshots> {
        None
    }
    /// The point-in-time view a copy-before-write filter offers to `snapshot-access`.
    fn snapshot_api(&self) -> Option<&dyn SnapshotApi> {
        None
    }
}

/// Reads of a frozen point-in-time view (QEMU's "snapshot API" of copy-before-write).
/// Ranges are checked by the caller against the node size.
pub trait SnapshotApi: Send + Sync {
    /// Read the view; EACCES when any byte is not readable in it.
    fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Status of the view's first run; EACCES when any byte is not readable in it.
    fn snapshot_block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)>;
    /// The reader is done with the whole clusters inside the range: stop protecting them.
    fn snapshot_discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether `snapshot_block_status` is cheap enough to ask before every read.
    fn snapshot_status_is_cheap(&self) -> bool;
}
