//! The `qcow2` format driver: adapts the `qcow2` crate to the graph.
//!
//! The image lives in the `file` child node, reached through [`NodeStorage`] so that the host
//! writes the format makes go through that node (and mark its bitmaps). The backing node, if any,
//! serves reads of unallocated clusters.

use std::io;
use std::sync::{Arc, RwLock};

use qcow2::{BlockStatus as QStatus, HostFn, Qcow2, Storage};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::driver::{
    AfterSwitch, BitmapStore, BitmapToStore, BlockStatus, Driver, FormatSpecific, ImageFacts,
    NodeEvent, NodeEventSink, StagedSwitch, StoredBitmap,
};
use crate::drivers::qcow2_cache::{CacheCleaner, CachePlan, Qcow2CacheOptions};
use crate::edge::ChildEdge;
use crate::internal_snapshot::{InternalSnapshot, InternalSnapshots, SnapshotClock};
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
    fn debug_event(&self, event: &'static str) {
        self.0.debug_event(event);
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
    fn debug_event(&self, event: &'static str) {
        // To the node below now (blkdebug injects its faults there).
        self.0.node().debug_event(event);
    }
    fn host_io(&self) -> bool {
        self.0.node().host_io()
    }
    fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        self.0.node().read_host(offset, len, f)
    }
    fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        self.0.node().write_host(offset, len, f)
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
    /// Metadata cache sizes, applied to every image this driver opens.
    cache: CachePlan,
    /// Drops idle metadata cache entries of the current image (`cache-clean-interval`);
    /// replaced on reopen, stopped on drop.
    cleaner: std::sync::Mutex<Option<CacheCleaner>>,
    /// Bitmaps were stored since the last flush: give the freed buffers back then.
    trim_pending: AtomicBool,
}

/// Open the image in `file`.
fn open_image(file: &Arc<ChildEdge>, read_only: bool) -> qcow2::Result<Qcow2> {
    let storage: Arc<dyn Storage> = Arc::new(EdgeStorage(file.clone()));
    Qcow2::open(storage, qcow2::OpenOptions { read_only })
}

/// Give memory freed after a bitmap store (the serialized bitmaps, megabytes each on large
/// disks) back to the system, so resident memory follows the bitmaps and not their last
/// checkpoint.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no live data.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The I/O path speaks errno (NBD maps it to its own codes); the message goes to the log.
fn to_io(e: qcow2::Error) -> io::Error {
    tracing::warn!(error = %e, "qcow2 request failed");
    io::Error::from_raw_os_error(e.errno())
}

/// A switch of the image between read-only and read-write, prepared and not yet in use.
struct Qcow2Switch {
    image: Arc<Qcow2>,
    cleaner: Option<CacheCleaner>,
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
        cache: &Qcow2CacheOptions,
    ) -> Result<Qcow2Driver, String> {
        Qcow2Driver::open_edge(ChildEdge::new("file", file), read_only, name, events, cache)
    }

    /// [`Qcow2Driver::open`] over a re-wirable edge.
    pub fn open_edge(
        file: Arc<ChildEdge>,
        _read_only: bool,
        name: &str,
        events: Option<NodeEventSink>,
        cache: &Qcow2CacheOptions,
    ) -> Result<Qcow2Driver, String> {
        let image = Arc::new(open_image(&file, true).map_err(|e| e.to_string())?);
        let plan = cache.plan(image.virtual_size(), image.cluster_size())?;
        plan.apply(&image).map_err(|e| e.to_string())?;
        let cleaner = CacheCleaner::start(&image, plan.clean_interval);
        let corruption = CorruptionReport {
            node_name: name.to_string(),
            sink: events,
            reported: AtomicBool::new(image.is_corrupt()),
        };
        Ok(Qcow2Driver {
            image: RwLock::new(image),
            file,
            backing: RwLock::new(None),
            corruption,
            cache: plan,
            cleaner: std::sync::Mutex::new(cleaner),
            trim_pending: AtomicBool::new(false),
        })
    }

    /// The open image (a clone of the handle: a reopen may swap it meanwhile).
    fn img(&self) -> Arc<Qcow2> {
        self.image.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Open the image again in `read_only` mode and use that from now on. Going read-only
    /// first writes back everything of the writable one.
    fn switch_mode(&self, read_only: bool) -> Result<(), qcow2::Error> {
        let Some(staged) = self.stage_mode(read_only)? else {
            return Ok(());
        };
        let (old, old_cleaner) = self.swap_in(staged);
        drop(old_cleaner);
        if read_only {
            old.close()?;
        }
        Ok(())
    }

    /// The disk I/O of a switch to `read_only`, nothing swapped yet: going read-only flushes
    /// the writable image (everything it cached must be in the file the reader opens), then
    /// opens the image again in the new mode; going read-write also flags the bitmaps in use
    /// (as QEMU: as soon as the image is writable; the caller holds the write locks).
    /// `None`: already in that mode.
    fn stage_mode(&self, read_only: bool) -> Result<Option<Qcow2Switch>, qcow2::Error> {
        let old = self.img();
        if old.is_read_only() == read_only {
            return Ok(None);
        }
        if read_only {
            old.flush()?;
        }
        let image = Arc::new(open_image(&self.file, read_only)?);
        let ready = self.cache.apply(&image).and_then(|()| {
            if read_only {
                Ok(())
            } else {
                image.claim_bitmaps()
            }
        });
        if let Err(e) = ready {
            if let Err(c) = image.close() {
                tracing::warn!(error = %c, "closing an image a reopen did not use");
            }
            return Err(e);
        }
        let cleaner = CacheCleaner::start(&image, self.cache.clean_interval);
        Ok(Some(Qcow2Switch { image, cleaner }))
    }

    /// Use a staged image from now on (in memory only); returns the replaced image and its
    /// cache cleaner, for the caller to close and stop (requests that still hold the old
    /// image fail once it is closed: a reopen drains first).
    fn swap_in(&self, staged: Qcow2Switch) -> (Arc<Qcow2>, Option<CacheCleaner>) {
        let Qcow2Switch { image, cleaner } = staged;
        // The backing as it is now (a reopen may have changed it since the prepare).
        if let Some(b) = self
            .backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            image.set_backing(Some(Arc::new(EdgeStorage(b))));
        }
        let old = std::mem::replace(
            &mut *self.image.write().unwrap_or_else(|p| p.into_inner()),
            image,
        );
        let old_cleaner = std::mem::replace(
            &mut *self.cleaner.lock().unwrap_or_else(|p| p.into_inner()),
            cleaner,
        );
        (old, old_cleaner)
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
    fn host_io(&self) -> bool {
        self.img().host_io()
    }
    fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        self.img()
            .read_host(offset, len, f)
            .map_err(|e| self.io_err(e))
    }
    fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        self.img()
            .write_host(offset, len, f)
            .map_err(|e| self.io_err(e))
    }
    fn write_batch_host(&self, runs: &[(u64, u64)], f: &mut HostFn<'_>) -> io::Result<bool> {
        self.img()
            .write_batch_host(runs, f)
            .map_err(|e| self.io_err(e))
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.img()
            .write_at(data, offset)
            .map_err(|e| self.io_err(e))
    }
    fn supports_compressed_writes(&self) -> bool {
        true
    }
    fn write_compressed(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.img()
            .write_compressed(offset, data)
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
        let result = self.img().flush().map_err(|e| self.io_err(e));
        if self.trim_pending.swap(false, Ordering::AcqRel) {
            release_freed_memory();
        }
        result
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
        let info = image.format_info();
        ImageFacts {
            filename: file.filename,
            actual_size: file.actual_size,
            cluster_size: Some(image.cluster_size()),
            backing_filename: image.backing_file(),
            backing_format: image.backing_format(),
            format_specific: Some(FormatSpecific::Qcow2 {
                compat: info.compat.to_string(),
                lazy_refcounts: info.lazy_refcounts,
                refcount_bits: u64::from(info.refcount_bits),
                corrupt: info.corrupt,
                bitmaps,
            }),
            dirty_flag: info.dirty,
        }
    }
    fn close(&self) -> io::Result<()> {
        self.img().close().map_err(to_io)
    }
    fn is_corrupt(&self) -> bool {
        self.img().is_corrupt()
    }
    fn zero_is_fast(&self, offset: u64, len: u64) -> bool {
        // v3 zero clusters are a metadata change; partial clusters would write data.
        let image = self.img();
        let cs = image.cluster_size();
        image.version() >= 3
            && offset.is_multiple_of(cs)
            && (len.is_multiple_of(cs) || offset + len == image.virtual_size())
    }
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        Some(self)
    }
    fn activate(&self, read_only: bool) -> crate::Result<()> {
        self.switch_mode(read_only)
            .map_err(|e| crate::Error::generic(e.to_string()).with_source(e))
    }
    fn set_read_only(&self, read_only: bool) -> io::Result<()> {
        self.switch_mode(read_only).map_err(to_io)
    }
    fn named_backing(&self) -> Option<String> {
        self.img().backing_file()
    }
    fn prepare_switch(&self, read_only: bool) -> crate::Result<Option<StagedSwitch>> {
        match self.stage_mode(read_only) {
            Ok(staged) => Ok(staged.map(|s| StagedSwitch(Box::new(s)))),
            // The texts the switch gave before it was staged: going read-write with the
            // format's message, going read-only with the errno's.
            Err(e) if read_only => Err(crate::Error::io("Could not reopen", &to_io(e))),
            Err(e) => Err(crate::Error::generic(e.to_string())
                .with_source(e)
                .context("Could not reopen")),
        }
    }
    fn commit_switch(&self, staged: StagedSwitch) -> Option<AfterSwitch> {
        let Ok(staged) = staged.0.downcast::<Qcow2Switch>() else {
            tracing::warn!("a reopen committed a switch this driver did not prepare");
            return None;
        };
        let (old, old_cleaner) = self.swap_in(*staged);
        Some(Box::new(move || {
            drop(old_cleaner);
            // A writable one was flushed by the prepare: nothing left to write. (A read-only
            // one is dropped, as before the switch was staged.)
            if old.is_read_only() {
                return;
            }
            if let Err(e) = old.close() {
                tracing::warn!(error = %e, "closing the image a reopen replaced");
            }
        }))
    }
    fn abort_switch(&self, staged: StagedSwitch) {
        if let Ok(staged) = staged.0.downcast::<Qcow2Switch>() {
            let Qcow2Switch { image, cleaner } = *staged;
            drop(cleaner);
            if let Err(e) = image.close() {
                tracing::warn!(error = %e, "closing an image a reopen did not use");
            }
        }
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn attach_backing(&self, edge: Option<Arc<ChildEdge>>) {
        self.set_backing_edge(edge);
    }
    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        Some(self)
    }
}

fn snapshot_info(s: qcow2::SnapshotInfo) -> InternalSnapshot {
    InternalSnapshot {
        id: s.id,
        name: s.name,
        vm_state_size: s.vm_state_size,
        date_sec: s.date_sec,
        date_nsec: s.date_nsec,
        vm_clock_nsec: s.vm_clock_nsec,
        icount: s.icount,
    }
}

impl InternalSnapshots for Qcow2Driver {
    fn list(&self) -> io::Result<Vec<InternalSnapshot>> {
        let list = self.img().snapshots().map_err(|e| self.io_err(e))?;
        Ok(list.into_iter().map(snapshot_info).collect())
    }
    fn create(&self, name: &str, when: SnapshotClock) -> io::Result<InternalSnapshot> {
        let when = qcow2::SnapshotTime {
            date_sec: when.date_sec,
            date_nsec: when.date_nsec,
            vm_clock_nsec: when.vm_clock_nsec,
        };
        let info = self
            .img()
            .create_snapshot(name, when)
            .map_err(|e| self.io_err(e))?;
        Ok(snapshot_info(info))
    }
    fn delete(&self, id: Option<&str>, name: Option<&str>) -> io::Result<Option<InternalSnapshot>> {
        let gone = self
            .img()
            .delete_snapshot(id, name)
            .map_err(|e| self.io_err(e))?;
        Ok(gone.map(snapshot_info))
    }
}

impl BitmapStore for Qcow2Driver {
    fn load(&self) -> io::Result<Vec<StoredBitmap>> {
        let image = self.img();
        let loaded = image.load_bitmaps().map_err(|e| match e.kind() {
            qcow2::ErrorKind::Io => to_io(e),
            // A refused image: keep the reason ("Bitmap 'x' is too big: ...").
            _ => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })?;
        for b in loaded.iter().filter(|b| b.recovered) {
            // Beyond QEMU: see qcow2::dirty_log. The bitmap loads consistent.
            tracing::warn!(
                bitmap = %b.name,
                region_bytes = image.dirty_log_region(),
                "persistent bitmap was not stored cleanly; recovered from the dirty-region log \
                 (every region written since its last checkpoint is marked dirty)"
            );
        }
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
    fn store(&self, bitmaps: &[BitmapToStore<'_>], in_use: bool) -> io::Result<()> {
        let sources: Vec<StoredBits<'_, '_>> =
            bitmaps.iter().map(|b| StoredBits(&b.bits)).collect();
        let list: Vec<qcow2::StoreBitmapRef<'_>> = bitmaps
            .iter()
            .zip(&sources)
            .map(|(b, src)| qcow2::StoreBitmapRef {
                name: &b.name,
                granularity: b.granularity,
                auto: b.recording,
                inconsistent_keep_in_use: b.inconsistent,
                data: src,
            })
            .collect();
        // The caller frees its serialized bitmaps after this returns; the next flush (the
        // checkpoint's own) hands that memory back.
        self.trim_pending.store(true, Ordering::Release);
        self.img()
            .store_bitmaps_ref(&list, in_use)
            .map_err(|e| self.io_err(e))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        // A persistent bitmap added since the last store is not in the file yet: nothing to
        // delete there (QEMU's remove succeeds too).
        let image = self.img();
        if !image.bitmaps().iter().any(|b| b.name == name) {
            return Ok(());
        }
        image.remove_bitmap(name).map_err(|e| self.io_err(e))
    }
}

/// A bitmap's bits as the qcow2 store reads them: one cluster of serialised bytes at a time
/// from the live bitmap, zero clusters answered from its summary without serialising them.
struct StoredBits<'a, 'b>(&'a Option<crate::node::LiveBits<'b>>);

impl qcow2::BitmapData for StoredBits<'_, '_> {
    fn len(&self) -> u64 {
        self.0.as_ref().map_or(0, |b| b.serialized_len() as u64)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) {
        match self.0 {
            Some(b) => b.serialize_part(offset.saturating_mul(8), buf),
            None => buf.fill(0),
        }
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        let Some(b) = self.0 else {
            return true;
        };
        // Bytes -> granules -> disk bytes.
        let g = b.granularity();
        let start = offset.saturating_mul(8).saturating_mul(g);
        let end = offset
            .saturating_add(len)
            .saturating_mul(8)
            .saturating_mul(g);
        !b.any_dirty(start, end)
    }
}
