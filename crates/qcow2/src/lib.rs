//! qcow2: the qcow2 image format over a small storage trait (no QMP, no block graph).
//!
//! [`Qcow2`] opens an image on a [`Storage`], reads and writes guest data with cluster
//! allocation, refcounting, zero clusters, discard and copy-on-write from a backing image,
//! creates new images ([`Qcow2::create`]), loads/stores persistent dirty bitmaps
//! (the bitmaps extension), and lists, creates and deletes internal snapshots
//! ([`Qcow2::create_snapshot`]). All I/O methods take `&self` and may run on many threads at once.
//!
//! # Layout
//! - [`storage`]: the [`Storage`] trait below the format, [`FileStorage`], [`MemStorage`].
//! - [`types`]: offset newtypes (guest vs host) and the cluster [`types::Geometry`].
//! - `ondisk`: the `on_disk_struct!` macro: each on-disk structure declared once with offsets.
//! - `header`: header fields, feature bits and header extensions (parse/validate/serialize).
//! - `mapping`: L1/L2 entry decoding.
//! - `cache`: LRU cache of cluster-sized tables with dirty ranges.
//! - `meta`: the metadata state under one mutex; table access, write-back order, corruption.
//! - `refcount`: refcounts, cluster allocation, refcount table growth.
//! - `rebuild`: recounting refcounts of an image left dirty (lazy refcounts).
//! - `io`: the request paths (read, write with COW, write zeroes, discard, block status;
//!   `io::map`: the allocation map of the image's own file, [`Qcow2::allocated_ranges`]).
//! - `bitmaps`: the bitmaps extension (directory format; `bitmaps::image` reads and writes
//!   tables and data); `image_bitmaps`: an open image's bitmap API ([`Qcow2::load_bitmaps`], ...).
//! - [`dirty_log`]: the dirty-region log that lets bitmaps survive a crash consistent.
//! - `snapshot`: internal snapshots (indexing their tables, unsharing L2 tables on write).
//! - `snapshot_table`: snapshot table entries; `snapshot_ops`: creating and deleting snapshots.
//! - `create`: new images.
//! - `inflate`: raw deflate decoder for compressed clusters.
//! - [`fuzzing`]: the entry point shared by the fuzz target and the corpus test.
//!
//! ```text
//!   Qcow2 ──(data I/O, outside the lock)──────────────► Storage (file)
//!     │  meta: Mutex<Meta> ── header, L1, L2 cache, refcounts, bitmap dir
//!     │  gate: RwLock<()>  ── data I/O shared; freeing clusters exclusive
//!     └─ backing: Option<Arc<dyn Storage>> ── unallocated clusters read from here
//! ```
//!
//! # Concurrency
//! Metadata changes happen under `meta`. A write that needs new clusters allocates them and
//! marks the guest clusters in flight under the lock, writes the data without the lock, and
//! only then publishes the L2 entries, so no reader ever sees a mapping to unwritten data.
//! Clusters unmapped by discard or overwrite are dereferenced only after the L2 change is on
//! disk and no data I/O that might still use them is in flight (the `gate`).

#![deny(missing_docs)]

mod bitmap_data;
mod bitmaps;
mod cache;
mod compress;
mod create;
mod deflate;
pub mod dirty_log;
mod error;
pub mod fuzzing;
mod header;
mod image_bitmaps;
mod inflate;
mod io;
mod l2table;
mod mapping;
mod meta;
mod ondisk;
mod overlap;
mod rebuild;
mod refcount;
mod snapshot;
mod snapshot_ops;
mod snapshot_table;
pub mod storage;
pub mod types;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

pub use bitmap_data::BitmapData;
pub use bitmaps::{BitmapInfo, LoadedBitmap, StoreBitmap};
pub use create::CreateOptions;
pub use error::{Error, ErrorKind, Result};
pub use image_bitmaps::StoreBitmapRef;
pub use io::{AllocKind, AllocatedRange};
pub use snapshot_table::{SnapshotInfo, SnapshotTime};
pub use storage::{FileStorage, HostFn, MemStorage, Storage};

use bitmaps::FLAG_IN_USE;
use header::{Header, AUTOCLEAR_KNOWN, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use meta::Meta;
use types::Geometry;

/// How to open an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Refuse all modifications and never write to the file.
    pub read_only: bool,
}

/// Allocation status of a range (see [`Qcow2::block_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// Allocated in this image (possibly compressed).
    Data,
    /// A zero cluster in this image.
    Zero,
    /// Not allocated here: reads fall through to the backing image (or zeros).
    Unallocated,
}

/// Format-specific facts about an image (what `qemu-img info` lists under
/// "Format specific information", minus bitmaps: see [`Qcow2::bitmaps`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatInfo {
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: &'static str,
    /// The lazy refcounts compatible feature is set.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The image is marked (or was found) corrupt.
    pub corrupt: bool,
    /// Extended L2 entries (always false: such images are refused).
    pub extended_l2: bool,
    /// Compression type name ("zlib"; zstd images are refused).
    pub compression_type: &'static str,
    /// The dirty bit is set in the header (refcounts not written back; repaired at a
    /// writable open, so only a read-only open reports it).
    pub dirty: bool,
}

/// An open qcow2 image. `Send + Sync`; every I/O method may be called from many threads.
pub struct Qcow2 {
    /// The image file.
    file: Arc<dyn Storage>,
    /// Metadata state; see [`meta::Meta`] for what each part guards.
    meta: Mutex<Meta>,
    /// Signalled whenever in-flight allocations finish (waiters hold `meta`).
    alloc_done: Condvar,
    /// Held shared by data I/O, exclusively while dropping references of unmapped clusters.
    gate: RwLock<()>,
    /// The attached backing image (None: unallocated clusters read as zeros).
    backing: RwLock<Option<Arc<dyn Storage>>>,
    /// Last decompressed cluster (host offset, bytes), to serve small sequential reads.
    zcache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Geometry (immutable).
    geo: Geometry,
    /// Virtual size (changed only by `resize`, under the metadata lock).
    size: AtomicU64,
    /// Format version (immutable).
    version: u32,
    /// Opened read-only.
    read_only: bool,
    /// Backing file name from the header.
    backing_file: Option<String>,
    /// Backing format from the header.
    backing_format: Option<String>,
    /// The bitmaps in the file have been marked in_use by this opener (or loaded).
    bitmaps_claimed: AtomicBool,
    /// `close` has run.
    closed: AtomicBool,
    /// The dirty-region log (see [`dirty_log`]).
    log: dirty_log::Runtime,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("size", &self.virtual_size())
            .field("cluster_size", &self.geo.cluster_size())
            .field("version", &self.version)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Presents an open image's guest view as a [`Storage`], e.g. to serve as another image's
/// backing file (`write_at`/`flush` go to the image; `truncate` is refused).
#[derive(Debug, Clone)]
pub struct ImageStorage(pub Arc<Qcow2>);

/// The error for a lock poisoned by a panicking thread.
pub(crate) fn gate_poisoned() -> Error {
    Error::new(ErrorKind::Io, "lock poisoned by a panic")
}

/// Convert a driver error for the `Storage` interface.
fn to_io(e: Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl Storage for ImageStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset).map_err(to_io)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset).map_err(to_io)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.0.virtual_size())
    }

    fn truncate(&self, _size: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn flush(&self) -> std::io::Result<()> {
        self.0.flush().map_err(to_io)
    }

    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len).map_err(to_io)
    }
}

/// Bytes read for the header before the cluster size is known.
const HEADER_PROBE: usize = 4096;

impl Qcow2 {
    /// Open an image. Validates the header and tables; refuses unsupported features clearly.
    /// A writable open clears unknown autoclear bits and drops a stale bitmaps extension.
    pub fn open(file: Arc<dyn Storage>, opts: OpenOptions) -> Result<Qcow2> {
        let file_len = file
            .size()
            .map_err(|e| Error::io(e, "getting the image size"))?;
        let mut probe = vec![0u8; HEADER_PROBE];
        file.read_at(&mut probe, 0)
            .map_err(|e| Error::io(e, "reading the header"))?;
        let bits = u32::from_be_bytes([probe[20], probe[21], probe[22], probe[23]]);
        let cs = 1usize << bits.clamp(header::MIN_CLUSTER_BITS, header::MAX_CLUSTER_BITS);
        let mut buf = vec![0u8; cs + 1024];
        file.read_at(&mut buf, 0)
            .map_err(|e| Error::io(e, "reading the header"))?;
        let header = Header::parse(&buf, file_len)?;
        let writable = !opts.read_only;
        let inc = header.raw.incompatible_features;
        if writable && inc & INCOMPAT_CORRUPT != 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "image is marked corrupt; it can be opened read-only, or repaired with 'qemu-img check -r all'",
            ));
        }
        let dirty = writable && inc & INCOMPAT_DIRTY != 0;
        if dirty && header.raw.nb_snapshots > 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "image with internal snapshots has the dirty bit set (lazy refcounts not written back); repair it with 'qemu-img check -r all' or open it read-only",
            ));
        }
        let stale_bitmaps = header.stale_bitmaps;
        let mut meta = Meta::load(file.clone(), header, writable, file_len)?;
        meta.load_directory()?;
        let (log, stale_log) = dirty_log::Runtime::at_open(&mut meta);
        if writable {
            meta.index_snapshots()?;
        }
        if dirty {
            meta.rebuild_refcounts()
                .map_err(|e| e.while_("rebuilding refcounts of a dirty image"))?;
        }
        if writable {
            let auto = meta.header.raw.autoclear_features;
            if auto & !AUTOCLEAR_KNOWN != 0 || stale_bitmaps || stale_log {
                meta.header.raw.autoclear_features &= AUTOCLEAR_KNOWN;
                meta.write_header()?;
            }
        }
        let h = &meta.header;
        Ok(Qcow2 {
            file,
            geo: meta.geo,
            size: AtomicU64::new(h.raw.size),
            version: h.raw.version,
            read_only: !writable,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            gate: RwLock::new(()),
            backing: RwLock::new(None),
            zcache: Mutex::new(None),
            bitmaps_claimed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            log,
        })
    }

    /// Create a new empty image on `file`.
    pub fn create(file: &dyn Storage, opts: &CreateOptions) -> Result<()> {
        create::create(file, opts)
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.geo.refcount_order
    }

    /// Format-specific facts for `query-block`-style output.
    pub fn format_info(&self) -> FormatInfo {
        let (lazy, corrupt, dirty) = self
            .lock()
            .map(|m| {
                let lazy = m.header.raw.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0;
                let dirty = m.header.raw.incompatible_features & INCOMPAT_DIRTY != 0;
                (lazy, m.corrupt, dirty)
            })
            .unwrap_or((false, true, false));
        FormatInfo {
            compat: if self.version >= 3 { "1.1" } else { "0.10" },
            lazy_refcounts: lazy,
            refcount_bits: self.refcount_bits(),
            corrupt,
            extended_l2: false,
            compression_type: "zlib",
            dirty,
        }
    }

    /// Bound the metadata caches: at most `l2_tables` L2 tables and `refblocks` refcount
    /// blocks (each at least 2) are held; tables beyond are written back and dropped now.
    /// The defaults are QEMU's: L2 tables for the whole disk up to 32 MiB, 4 refcount blocks.
    pub fn set_cache_capacity(&self, l2_tables: usize, refblocks: usize) -> Result<()> {
        self.lock()?.set_cache_capacity(l2_tables, refblocks)
    }

    /// Cache L2 tables in slices of `bytes` (QEMU's `l2-cache-entry-size`: a power of two from
    /// 512 to the cluster size; the cluster size caches whole tables, the default). The L2
    /// capacity of [`Qcow2::set_cache_capacity`] then counts slices. Dirty mappings are written
    /// back and the L2 cache emptied first.
    pub fn set_l2_slice_size(&self, bytes: usize) -> Result<()> {
        self.lock()?.set_l2_slice_size(bytes)
    }

    /// Drop the cached tables not used since the previous call (dirty ones stay until written
    /// back), as QEMU's `cache-clean-interval` timer does. Returns how many were dropped.
    pub fn clean_caches(&self) -> usize {
        self.lock()
            .map(|mut m| m.l2.clean_unused() + m.rb.clean_unused())
            .unwrap_or(0)
    }

    /// Tables currently cached: (L2 tables, refcount blocks).
    pub fn cached_tables(&self) -> (usize, usize) {
        self.lock()
            .map(|m| (m.l2.len(), m.rb.len()))
            .unwrap_or((0, 0))
    }

    /// Heap bytes held by the cached tables (L2 tables with few mappings are kept sparsely).
    pub fn cache_memory(&self) -> usize {
        self.lock()
            .map(|m| m.l2.heap_bytes() + m.rb.heap_bytes())
            .unwrap_or(0)
    }

    /// Heap bytes of the cached L2 tables or slices alone: at most their on-disk size each.
    pub fn l2_cache_memory(&self) -> usize {
        self.lock().map(|m| m.l2.heap_bytes()).unwrap_or(0)
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Backing file name from the header.
    pub fn backing_file(&self) -> Option<String> {
        self.backing_file.clone()
    }

    /// Backing file format from the header.
    pub fn backing_format(&self) -> Option<String> {
        self.backing_format.clone()
    }

    /// Attach the opened backing image. Unallocated clusters read from it; bytes beyond its
    /// size read as zeros. None: unallocated clusters read as zeros.
    pub fn set_backing(&self, backing: Option<Arc<dyn Storage>>) {
        if let Ok(mut b) = self.backing.write() {
            *b = backing;
        }
    }

    /// Bytes the image file occupies (its length).
    pub fn actual_size(&self) -> Result<u64> {
        self.file
            .size()
            .map_err(|e| Error::io(e, "getting the image size"))
    }

    /// Whether corruption was detected (or the image was marked corrupt in the file).
    pub fn is_corrupt(&self) -> bool {
        self.lock().map(|m| m.corrupt).unwrap_or(true)
    }

    /// Lock the metadata.
    fn lock(&self) -> Result<MutexGuard<'_, Meta>> {
        self.meta
            .lock()
            .map_err(|_| Error::new(ErrorKind::Io, "metadata lock poisoned by a panic"))
    }

    /// Refuse modifications on read-only, closed or corrupt images.
    fn check_writable(&self) -> Result<()> {
        self.check_open()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "image was opened read-only",
            ));
        }
        if self.is_corrupt() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "image is marked corrupt; writes are refused",
            ));
        }
        Ok(())
    }

    /// Refuse I/O after close.
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Closed, "image has been closed"));
        }
        Ok(())
    }

    /// Check that `[offset, offset+len)` lies within the virtual disk.
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "request {offset:#x}+{len:#x} beyond the virtual size {:#x}",
                    size
                ),
            )),
        }
    }

    /// Grow the virtual disk to `new_size` bytes (rounded up to 512), growing the L1 table
    /// if needed. Shrinking is refused. Bitmaps in the file must be loaded (in_use) first:
    /// they are stored later with the new size.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let new_size = new_size
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "size too large"))?;
        let mut m = self.lock()?;
        let old = m.header.raw.size;
        if new_size < old {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "shrinking a qcow2 image",
            ));
        }
        if new_size == old {
            return Ok(());
        }
        if m.bitmaps.iter().any(|b| b.flags & FLAG_IN_USE == 0) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "resizing an image with persistent bitmaps that are not loaded",
            ));
        }
        self.log.retire(&mut m);
        m.grow(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Write back all metadata and flush the file; then free clusters unmapped since the
    /// last flush.
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        if self.read_only {
            return Ok(());
        }
        self.flush_inner()
    }

    /// Wait until no data request is in flight, and keep new ones out while the guard lives.
    fn exclusive(&self) -> Result<RwLockWriteGuard<'_, ()>> {
        self.gate.write().map_err(|_| gate_poisoned())
    }

    /// Flush implementation (also used at close).
    fn flush_inner(&self) -> Result<()> {
        let pending = {
            let mut m = self.lock()?;
            m.flush_mappings()?;
            m.sync()?;
            std::mem::take(&mut m.pending_free)
        };
        if !pending.is_empty() {
            // Wait until no data I/O that may still use these clusters is in flight.
            let _exclusive = self.exclusive()?;
            self.lock()?.apply_frees(pending)?;
        }
        Ok(())
    }

    /// Flush everything and refuse further I/O. Bitmaps must have been stored by the caller
    /// (with `in_use = false`) before.
    pub fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.read_only {
            self.flush_inner()?;
        }
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
