//! A node of the graph: a driver, its children, its bitmaps, and the checked I/O path.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::bitmap::BitmapList;
use crate::driver::{BlockStatus, Driver, ImageFacts};
use crate::edge::ChildEdge;
use crate::error::errno;
use crate::perm::Needs;
use crate::tracking::{Tracked, Tracker};

mod host_io;
mod stored;
mod users;

pub use stored::LiveBits;
pub use users::User;

/// Attachment order of nodes and users (QEMU checks the newest parent first).
static SEQ: AtomicU64 = AtomicU64::new(1);

/// The next attachment sequence number.
pub fn next_seq() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

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

/// Told after a write, write-zeroes or discard reached the driver (with its outcome).
/// Beside [`WriteHook`], which runs before; both are per node.
pub trait WriteObserver: Send + Sync {
    /// `[offset, offset+len)` of `node` was just written (or the attempt failed).
    fn after_write(&self, node: &Node, offset: u64, len: u64, result: &io::Result<()>);
}

/// Node options: reported by the queries, and applied on the I/O path (`detect-zeroes`,
/// `cache.no-flush`, `discard`).
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
    /// Child edges; the list changes only when a backing child is attached or taken away
    /// (external snapshots).
    children: RwLock<Vec<Arc<ChildEdge>>>,
    read_only: AtomicBool,
    /// Going read-write (blockdev-reopen): it asks its children for write already (the locks
    /// are taken before its driver writes), while it still refuses writers itself.
    becoming_writable: AtomicBool,
    flags: NodeFlags,
    /// Bitmaps; the lock is per node and held only for short bit operations.
    bitmaps: Mutex<BitmapList>,
    /// Number of recording bitmaps, read without the lock to skip it on the write path.
    recording: AtomicUsize,
    /// Write hooks (backup jobs); read-locked on every write, written when a job starts or ends.
    hooks: RwLock<Vec<Arc<dyn WriteHook>>>,
    /// Told after each write.
    observers: RwLock<Vec<Arc<dyn WriteObserver>>>,
    /// Requests in flight, serialising where a job asks for it.
    tracker: Tracker,
    /// The driver options it was opened with (set by the graph; reopen compares with them).
    opened_with: std::sync::OnceLock<crate::graph::DriverOptions>,
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
    /// Counts writes begun and bitmap changes (see [`Node::changes`]).
    changes: std::sync::atomic::AtomicU64,
    /// Things other than parent nodes that use this node (exports, jobs).
    users: Mutex<Vec<User>>,
    /// What this node's edges need from it, as last applied to its driver (locks).
    applied: Mutex<Needs>,
    /// Creation order: the order of this node's edges to its children.
    seq: u64,
    closed: AtomicBool,
}

impl Node {
    /// A node over a driver. `children` are the nodes the driver was built on (fixed links;
    /// the graph builds nodes with [`Node::with_edges`], whose targets can be swapped).
    pub fn new(
        name: String,
        auto_named: bool,
        driver: Box<dyn Driver>,
        children: Vec<Child>,
        read_only: bool,
        flags: NodeFlags,
    ) -> Node {
        let edges = children
            .into_iter()
            .map(|c| ChildEdge::new(c.role, c.node))
            .collect();
        Node::with_edges(name, auto_named, driver, edges, read_only, flags)
    }

    /// A node over a driver whose child edges (shared with the driver) may be re-wired.
    pub fn with_edges(
        name: String,
        auto_named: bool,
        driver: Box<dyn Driver>,
        children: Vec<Arc<ChildEdge>>,
        read_only: bool,
        flags: NodeFlags,
    ) -> Node {
        Node {
            name,
            auto_named,
            driver,
            children: RwLock::new(children),
            read_only: AtomicBool::new(read_only),
            becoming_writable: AtomicBool::new(false),
            flags,
            bitmaps: Mutex::new(BitmapList::default()),
            recording: AtomicUsize::new(0),
            hooks: RwLock::new(Vec::new()),
            observers: RwLock::new(Vec::new()),
            tracker: Tracker::default(),
            opened_with: std::sync::OnceLock::new(),
            writers: AtomicUsize::new(0),
            checkpoint_gate: RwLock::new(()),
            last_checkpoint: Mutex::new(None),
            bitmaps_changed: AtomicBool::new(false),
            changes: std::sync::atomic::AtomicU64::new(0),
            users: Mutex::new(Vec::new()),
            applied: Mutex::new(Needs::default()),
            seq: next_seq(),
            closed: AtomicBool::new(false),
        }
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Was the node created with a parent (inline, or a backing file the image names), its
    /// name generated or given? Its parents own it, not the monitor: `blockdev-del` refuses
    /// it and it goes away with its last parent, as in QEMU.
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

    /// Children with their roles, as wired now.
    pub fn children(&self) -> Vec<Child> {
        self.edges()
            .iter()
            .map(|e| Child {
                role: e.role(),
                node: e.node(),
            })
            .collect()
    }

    /// The child edges (swappable links).
    pub fn edges(&self) -> Vec<Arc<ChildEdge>> {
        self.children
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Add a child edge (a backing child attached to an overlay).
    pub(crate) fn push_edge(&self, edge: Arc<ChildEdge>) {
        self.children
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(edge);
    }

    /// Take a child edge away again.
    pub(crate) fn remove_edge(&self, edge: &Arc<ChildEdge>) {
        self.children
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| !Arc::ptr_eq(e, edge));
    }

    /// The child with this role, as wired now.
    pub fn child(&self, role: &str) -> Option<NodeRef> {
        self.edges()
            .iter()
            .find(|c| c.role() == role)
            .map(|c| c.node())
    }

    /// The child a format or filter keeps its data in (`file`, or blkdebug's `image`).
    pub fn primary_child(&self) -> Option<NodeRef> {
        self.edges()
            .iter()
            .find(|c| c.role() == "file" || c.role() == "image")
            .map(|c| c.node())
    }

    /// Deliver a debug event (QEMU's `BlkdebugEvent` name) to this node's driver; only
    /// `blkdebug` nodes act on it. Formats fire their events on their `file` child.
    pub fn debug_event(&self, event: &str) {
        self.driver.debug_event(event);
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

    /// Set only the read-only flag (the graph reopens the driver around it).
    pub(crate) fn set_read_only_flag(&self, ro: bool) {
        self.read_only.store(ro, Ordering::Release);
    }

    /// Whether it asks its children for write: read-write, or going read-write.
    pub(crate) fn asks_write(&self) -> bool {
        !self.read_only() || self.becoming_writable.load(Ordering::Acquire)
    }

    /// Mark it as going read-write (see [`Node::asks_write`]), or not any more.
    pub(crate) fn set_becoming_writable(&self, on: bool) {
        self.becoming_writable.store(on, Ordering::Release);
    }

    /// Mark every bitmap read-only or writable after a reopen.
    pub(crate) fn set_bitmaps_read_only(&self, ro: bool) {
        for b in self.bitmaps().items.iter_mut() {
            b.readonly = ro;
        }
    }

    /// Remember the driver options the node was opened with (once).
    pub(crate) fn set_opened_with(&self, opts: crate::graph::DriverOptions) {
        let _ = self.opened_with.set(opts);
    }

    /// The driver options the node was opened with, when the graph opened it.
    pub fn opened_with(&self) -> Option<&crate::graph::DriverOptions> {
        self.opened_with.get()
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

    /// Install an observer told after every write.
    pub fn add_observer(&self, o: Arc<dyn WriteObserver>) {
        self.observers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(o);
    }

    /// Remove an observer (by identity).
    pub fn remove_observer(&self, o: &Arc<dyn WriteObserver>) {
        let mut list = self.observers.write().unwrap_or_else(|p| p.into_inner());
        list.retain(|x| !Arc::ptr_eq(x, o));
    }

    /// A serialising request over `[offset, offset+len)` (a job's copy): waits for overlapping
    /// writes in flight, and overlapping writes wait for it until the guard is dropped.
    pub fn track_serialising(&self, offset: u64, len: u64) -> Tracked<'_> {
        self.tracker.begin(offset, len, false, true)
    }

    /// Reads and writes of this node in flight now.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    /// Wait until no request is in flight on this node (stop new ones first).
    pub fn wait_idle(&self) {
        self.tracker.wait_idle()
    }

    fn observe(&self, offset: u64, len: u64, result: &io::Result<()>) {
        let list = self.observers.read().unwrap_or_else(|p| p.into_inner());
        for o in list.iter() {
            o.after_write(self, offset, len, result);
        }
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
        self.changes.fetch_add(1, Ordering::Relaxed);
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

    /// Note that bitmaps changed other than by a write (merge, clear, add, enable, ...).
    pub fn note_bitmaps_changed(&self) {
        self.bitmaps_changed.store(true, Ordering::Release);
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// A count that grows with every write begun on this node and every bitmap change other
    /// than by a write: equal readings mean nothing was written and no bitmap changed
    /// between them (a read-only reopen that stored and flushed without the graph lock uses
    /// it to know whether it must do so again).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _t = self.tracker.begin(offset, buf.len() as u64, false, false);
        self.driver.read(offset, buf)
    }

    /// `detect-zeroes`: for a buffer of zeros, `Some(may_unmap)` to write zeros instead
    /// (`unmap` unmaps only where discards are passed down, as in QEMU).
    fn detect_zeroes(&self, data: &[u8]) -> Option<bool> {
        let unmap = match self.flags.detect_zeroes.as_str() {
            "on" => false,
            "unmap" => self.flags.discard_unmap,
            _ => return None,
        };
        data.iter().all(|&b| b == 0).then_some(unmap)
    }

    /// Write `data` at `offset`, then mark the node's recording bitmaps.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(may_unmap) = self.detect_zeroes(data) {
            return self.write_zeroes(offset, len, may_unmap);
        }
        let _gate = self.gate();
        self.run_hooks(offset, len)?;
        self.driver.debug_event("pwritev");
        let _t = self.tracker.begin(offset, len, true, false);
        let result = self.driver.write(offset, data);
        // Mark even on failure: part of the range may have changed.
        self.mark_dirty(offset, len);
        self.observe(offset, len, &result);
        self.driver.debug_event("pwritev_done");
        result
    }

    /// Whether the driver takes compressed writes (qcow2); backup `compress: true` refuses
    /// other targets ("Compression is not supported for this drive ").
    pub fn supports_compressed_writes(&self) -> bool {
        self.driver.supports_compressed_writes()
    }

    /// Write `data` at `offset` as compressed clusters (see [`Driver::write_compressed`]),
    /// with the same checks, hooks and bitmap marking as [`Node::write`]. A zero-length call
    /// goes to the driver (qcow2 pads its file to a sector) and marks nothing.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        if !self.driver.supports_compressed_writes() {
            return Err(errno(libc::ENOTSUP));
        }
        if len == 0 {
            return self.driver.write_compressed(offset, data);
        }
        let _gate = self.gate();
        self.run_hooks(offset, len)?;
        let _t = self.tracker.begin(offset, len, true, false);
        let result = self.driver.write_compressed(offset, data);
        // Mark even on failure: clusters before the failing one may have been written.
        self.mark_dirty(offset, len);
        self.observe(offset, len, &result);
        self.driver.debug_event("pwritev_done");
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
        self.driver.debug_event("pwritev_zero");
        let _t = self.tracker.begin(offset, len, true, false);
        let result = self.driver.write_zeroes(offset, len, may_unmap);
        self.mark_dirty(offset, len);
        self.observe(offset, len, &result);
        self.driver.debug_event("pwritev_done");
        result
    }

    /// Can zeros be written over `[offset, offset+len)` quickly (NBD FAST_ZERO)?
    pub fn zero_is_fast(&self, offset: u64, len: u64) -> bool {
        self.driver.zero_is_fast(offset, len)
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
        let _t = self.tracker.begin(offset, len, true, false);
        let result = self.driver.discard(offset, len);
        self.mark_dirty(offset, len);
        self.observe(offset, len, &result);
        result
    }

    /// Flush the driver (formats flush their children themselves), then checkpoint the
    /// persistent bitmaps if the last checkpoint is at least a second old.
    /// With `cache.no-flush` the flush succeeds without reaching the disk, as in QEMU.
    pub fn flush(&self) -> io::Result<()> {
        if let Some(primary) = self.primary_child() {
            primary.debug_event("flush_to_os");
            primary.debug_event("flush_to_disk");
        }
        if self.flags.cache_no_flush {
            return Ok(());
        }
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
