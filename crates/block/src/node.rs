//! A node of the graph: a driver, its children, its bitmaps, and the checked I/O path.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::bitmap::BitmapList;
use crate::driver::{BitmapToStore, BlockStatus, Driver, ImageFacts};
use crate::error::errno;

/// Whether a flush also checkpoints persistent bitmaps (on by default; the daemon turns it off
/// together with the periodic checkpoints, e.g. to measure their cost).
pub static FLUSH_CHECKPOINTS: AtomicBool = AtomicBool::new(true);

/// Shared handle to a node. The graph owns the name table; handles are cloned for I/O.
pub type NodeRef = Arc<Node>;

/// A child link: the role ("file", "backing") and the child.
#[derive(Clone)]
pub struct Child {
    /// Role name as QEMU uses it.
    pub role: &'static str,
    /// The child node.
    pub node: NodeRef,
}

/// Called before a write reaches a node's driver (copy-before-write for backups).
/// It gets the range about to change and may read the old contents first.
pub trait WriteHook: Send + Sync {
    /// Runs before `[offset, offset+len)` of `node` is overwritten; an error fails the write.
    fn before_write(&self, node: &Node, offset: u64, len: u64) -> io::Result<()>;
}

/// Options that only the queries report.
#[derive(Debug, Clone, Default)]
pub struct NodeFlags {
    /// `detect-zeroes` setting as given.
    pub detect_zeroes: String,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`.
    pub cache_no_flush: bool,
    /// `discard=unmap`: pass discards down. QEMU's default (`ignore`) drops them entirely.
    pub discard_unmap: bool,
}

/// One node.
pub struct Node {
    name: String,
    auto_named: bool,
    driver: Box<dyn Driver>,
    children: Vec<Child>,
    read_only: AtomicBool,
    flags: NodeFlags,
    /// Bitmaps; the lock is per node and held only for short bit operations.
    bitmaps: Mutex<BitmapList>,
    /// Number of recording bitmaps, read without the lock to skip it on the write path.
    recording: AtomicUsize,
    /// Write hooks (backup jobs); read-locked on every write, written when a job starts or ends.
    hooks: RwLock<Vec<Arc<dyn WriteHook>>>,
    /// Users that write through this node (writable exports); read-only reopen is refused while any.
    writers: AtomicUsize,
    /// Persistent-bitmap checkpoints: writes hold it shared from before the driver call until
    /// the bitmaps are marked; a checkpoint holds it exclusively while it snapshots and stores,
    /// so a stored bitmap always covers every write that may have reached the disk before it.
    checkpoint_gate: RwLock<()>,
    /// When the last checkpoint ran (rate limit for flush-triggered ones).
    last_checkpoint: Mutex<Option<Instant>>,
    /// Bitmaps changed since the last checkpoint.
    bitmaps_changed: AtomicBool,
    /// Things other than parent nodes that use this node (exports, jobs), by description.
    users: Mutex<Vec<String>>,
    closed: AtomicBool,
}

impl Node {
    /// A node over a driver. `children` are the nodes the driver was built on.
    pub fn new(
        name: String,
        auto_named: bool,
        driver: Box<dyn Driver>,
        children: Vec<Child>,
        read_only: bool,
        flags: NodeFlags,
    ) -> Node {
        Node {
            name,
            auto_named,
            driver,
            children,
            read_only: AtomicBool::new(read_only),
            flags,
            bitmaps: Mutex::new(BitmapList::default()),
            recording: AtomicUsize::new(0),
            hooks: RwLock::new(Vec::new()),
            writers: AtomicUsize::new(0),
            checkpoint_gate: RwLock::new(()),
            last_checkpoint: Mutex::new(None),
            bitmaps_changed: AtomicBool::new(false),
            users: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Was the name generated (no node-name given)?
    pub fn auto_named(&self) -> bool {
        self.auto_named
    }

    /// Driver name.
    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    /// The driver (for format-specific calls such as persistent bitmaps).
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    /// Children with their roles.
    pub fn children(&self) -> &[Child] {
        &self.children
    }

    /// The child with this role.
    pub fn child(&self, role: &str) -> Option<&NodeRef> {
        self.children
            .iter()
            .find(|c| c.role == role)
            .map(|c| &c.node)
    }

    /// Read-only?
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Switch read-only state (blockdev-reopen).
    pub fn set_read_only(&self, ro: bool) -> io::Result<()> {
        self.driver.set_read_only(ro)?;
        self.read_only.store(ro, Ordering::Release);
        Ok(())
    }

    /// Query-only flags.
    pub fn flags(&self) -> &NodeFlags {
        &self.flags
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// Facts for the queries.
    pub fn facts(&self) -> ImageFacts {
        self.driver.facts()
    }

    /// Lock the bitmaps. Keep the guard short and never across `.await`.
    pub fn bitmaps(&self) -> MutexGuard<'_, BitmapList> {
        self.bitmaps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// After changing the bitmap list or recording flags: refresh the lock-free recording count.
    pub fn refresh_recording(&self, list: &BitmapList) {
        self.recording
            .store(list.recording_count(), Ordering::Release);
    }

    /// Register a user (export, job) so the node cannot be deleted under it.
    pub fn add_user(&self, who: String) {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(who);
    }

    /// Drop a user registered with [`Node::add_user`].
    pub fn remove_user(&self, who: &str) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = users.iter().position(|u| u == who) {
            users.remove(i);
        }
    }

    /// First registered user, if any.
    pub fn first_user(&self) -> Option<String> {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .cloned()
    }

    /// A user that writes through this node came (`true`) or went (`false`).
    pub fn set_writer(&self, came: bool) {
        if came {
            self.writers.fetch_add(1, Ordering::AcqRel);
        } else {
            self.writers.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Number of users writing through this node.
    pub fn writers(&self) -> usize {
        self.writers.load(Ordering::Acquire)
    }

    /// Install a write hook.
    pub fn add_hook(&self, hook: Arc<dyn WriteHook>) {
        self.hooks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Remove a write hook (by identity).
    pub fn remove_hook(&self, hook: &Arc<dyn WriteHook>) {
        let mut hooks = self.hooks.write().unwrap_or_else(|p| p.into_inner());
        hooks.retain(|h| !Arc::ptr_eq(h, hook));
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() || self.driver.can_grow() => Ok(()),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only() {
            return Err(errno(libc::EPERM));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(errno(libc::EIO));
        }
        self.check_range(offset, len)
    }

    fn run_hooks(&self, offset: u64, len: u64) -> io::Result<()> {
        let hooks = self.hooks.read().unwrap_or_else(|p| p.into_inner());
        for hook in hooks.iter() {
            hook.before_write(self, offset, len)?;
        }
        Ok(())
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        if len > 0 && self.recording.load(Ordering::Acquire) > 0 {
            self.bitmaps().mark(offset, len);
            self.bitmaps_changed.store(true, Ordering::Release);
        }
    }

    fn gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.checkpoint_gate
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Hold off writes to this node (those already past the gate finish first) while the guard
    /// lives: a point in time for starting a backup (bitmap freeze and hook install together).
    /// Never hold it across I/O on this node.
    pub fn quiesce(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.checkpoint_gate
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Write whole clusters compressed (formats that can: qcow2), then mark bitmaps.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        let _gate = self.gate();
        self.run_hooks(offset, len)?;
        let result = self.driver.write_compressed(offset, data);
        self.mark_dirty(offset, len);
        result
    }

    /// Note that bitmaps changed other than by a write (merge, clear, add, enable, ...).
    pub fn note_bitmaps_changed(&self) {
        self.bitmaps_changed.store(true, Ordering::Release);
    }

    /// Write the persistent bitmaps into the image. `in_use` leaves them flagged as loaded.
    pub fn store_bitmaps(&self, in_use: bool) -> crate::Result<()> {
        let Some(store) = self.driver.bitmap_store() else {
            return Ok(());
        };
        if self.read_only() {
            return Ok(());
        }
        let list = snapshot_persistent(&self.bitmaps());
        store
            .store(&list, in_use)
            .map_err(|e| crate::Error::io("Could not store bitmaps", &e))
    }

    /// Checkpoint (beyond QEMU, which stores bitmaps only at close): store the persistent
    /// bitmaps exactly, not in use, while no write is in flight. The format flags them in use
    /// again before the next modification reaches the image, so after a crash a bitmap is
    /// either exact as of its last checkpoint or marked inconsistent, never silently short.
    /// Does nothing when nothing changed since the last one. Returns whether it stored.
    pub fn checkpoint_bitmaps(&self) -> crate::Result<bool> {
        if self.driver.bitmap_store().is_none() || self.read_only() {
            return Ok(false);
        }
        if !self.bitmaps().items.iter().any(|b| b.persistent) {
            return Ok(false);
        }
        let _gate = self
            .checkpoint_gate
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if !self.bitmaps_changed.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let stored = self.store_bitmaps(false).and_then(|_| {
            self.driver
                .flush()
                .map_err(|e| crate::Error::io("Could not flush bitmaps", &e))
        });
        if stored.is_err() {
            self.bitmaps_changed.store(true, Ordering::Release);
        }
        stored.map(|_| true)
    }

    /// A flush-triggered checkpoint, at most once per `min_interval`.
    fn checkpoint_after_flush(&self, min_interval: Duration) {
        if !FLUSH_CHECKPOINTS.load(Ordering::Relaxed) {
            return;
        }
        let due = self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= min_interval);
        if due {
            if let Err(e) = self.checkpoint_bitmaps() {
                tracing::warn!(node = %self.name, error = %e, "bitmap checkpoint failed");
            }
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.driver.read(offset, buf)
    }

    /// Write `data` at `offset`, then mark the node's recording bitmaps.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _gate = self.gate();
        self.run_hooks(offset, len)?;
        let result = self.driver.write(offset, data);
        // Mark even on failure: part of the range may have changed.
        self.mark_dirty(offset, len);
        result
    }

    /// Make `[offset, offset+len)` read as zeros, then mark bitmaps.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _gate = self.gate();
        self.run_hooks(offset, len)?;
        let result = self.driver.write_zeroes(offset, len, may_unmap);
        self.mark_dirty(offset, len);
        result
    }

    /// Discard `[offset, offset+len)`, then mark bitmaps. With `discard=ignore` (the default)
    /// the request is dropped: nothing changes, so nothing is marked.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write(offset, len)?;
        if len == 0 || !self.flags.discard_unmap {
            return Ok(());
        }
        let _gate = self.gate();
        self.run_hooks(offset, len)?;
        let result = self.driver.discard(offset, len);
        self.mark_dirty(offset, len);
        result
    }

    /// Flush the driver (formats flush their children themselves), then checkpoint the
    /// persistent bitmaps if the last checkpoint is at least a second old.
    pub fn flush(&self) -> io::Result<()> {
        self.driver.flush()?;
        self.checkpoint_after_flush(Duration::from_secs(1));
        Ok(())
    }

    /// Allocation status of the first run in `[offset, offset+len)`.
    pub fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok((BlockStatus::Data, 0));
        }
        self.driver.block_status(offset, len)
    }

    /// Set the size of a growable (protocol) node.
    pub fn truncate(&self, size: u64) -> io::Result<()> {
        if self.read_only() {
            return Err(errno(libc::EPERM));
        }
        self.driver.truncate(size)
    }

    /// Is `[offset, offset+len)` known to read as zeros, as far as a cheap look can tell?
    /// (False when unsure; used to send holes instead of data.)
    pub fn reads_as_zero(&self, offset: u64, len: u64) -> bool {
        if !self.driver.status_is_cheap() {
            return false;
        }
        matches!(self.status_above(offset, len), Ok((s, _, n)) if s != BlockStatus::Data && n >= len)
    }

    /// Status through the backing chain: the first run of `[offset, offset+len)` with one status,
    /// and the depth of the layer that decides it (1 = this node, 2 = its backing, ...; 0 = no
    /// layer has it, which reads as zeros and is reported `Unallocated`).
    pub fn status_above(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u32, u64)> {
        let (status, n) = self.block_status(offset, len)?;
        if status != BlockStatus::Unallocated {
            return Ok((status, 1, n));
        }
        let Some(backing) = self.child("backing") else {
            return Ok((BlockStatus::Unallocated, 0, n));
        };
        let bsize = backing.size();
        if offset >= bsize {
            return Ok((BlockStatus::Unallocated, 0, n));
        }
        let (s, depth, m) = backing.status_above(offset, n.min(bsize - offset))?;
        Ok((s, if depth == 0 { 0 } else { depth + 1 }, m))
    }

    /// Close the driver once (flush and release); later writes fail.
    pub fn close(&self) -> io::Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.driver.close()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(node = %self.name, error = %e, "closing node failed");
        }
    }
}

fn snapshot_persistent(list: &BitmapList) -> Vec<BitmapToStore> {
    list.items
        .iter()
        .filter(|b| b.persistent && b.name.is_some())
        .map(|b| BitmapToStore {
            name: b.name.clone().unwrap_or_default(),
            granularity: b.bits.granularity(),
            recording: b.recording,
            inconsistent: b.inconsistent,
            data: if b.inconsistent {
                Vec::new()
            } else {
                b.bits.to_bytes()
            },
        })
        .collect()
}
