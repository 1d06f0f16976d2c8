//! The dirty-region log: persistent bitmaps that come back consistent after a crash.
//!
//! # Problem
//! Persistent bitmaps are stored exactly at checkpoints (see `block::node`). Before the first
//! modification after a store the bitmaps are flagged `in_use` in the file, so after a crash
//! (process killed, power lost) QEMU's rule makes them *inconsistent*: unusable, and the next
//! backup must be a full one.
//!
//! # Mechanism
//! A coarse map of "may be dirty" regions of the guest disk (default 4 MiB each, see
//! [`set_region_bytes`]) is kept in a header extension of the image's first cluster. It says:
//! *every guest byte modified since the bitmaps listed here were stored lies in a marked
//! region*. Therefore after a crash, `stored bitmap ∪ marked regions` is a superset of the true
//! bitmap, i.e. a consistent bitmap that never misses a write; the surplus is bounded by the
//! regions touched since the last checkpoint (at most one region plus one granule of rounding
//! per touched region).
//!
//! - **Claim** (first modification after a store, or at open): the log is rewritten with its
//!   region bits cleared and the list of *covered* bitmaps: the bitmap table offsets of every
//!   directory entry whose stored data is exact (not `in_use` before the claim). It goes into
//!   the same durable header write that flags the bitmaps `in_use`. A table offset names one
//!   stored version of one bitmap: every store writes new tables to fresh clusters.
//! - **Mark** (the first modification of a region since the claim): the region's bit is set,
//!   the header sector holding it is written and the file flushed — *before the data write is
//!   issued*. So any on-disk state that contains a modification also contains its mark, whether
//!   or not the client ever flushed: ordering against the data's own flushes cannot break it.
//!   Later writes into a marked region cost one atomic load. Concurrent writers needing marks
//!   share one sector write and one flush (group commit); a writer into a region whose mark is
//!   not yet durable waits for it.
//! - **Store** (checkpoint or close): marking stops; the header write that switches to the new
//!   directory still carries the old log (every header write is synced); only then a second
//!   header write empties the covered list. The next claim starts a new log.
//! - **Recovery** (load at open): a bitmap found `in_use` whose table offset is covered by a
//!   valid log is loaded as `stored ∪ marked regions` and reported `recovered` instead of
//!   inconsistent. The log is kept (not cleared) until the next store, since the file's bitmap
//!   data still lacks those regions. Every covered bitmap gets the regions, a disabled one too
//!   (it may have been enabled after its store): extra bits, never missing ones.
//! - **Claim after a crash**: a claim keeps every bitmap that is still `in_use` and covered by
//!   the valid log found at open, with the log's marks, whether or not this open loaded it: the
//!   block layer loads the bitmaps through a read-only open and claims them through a second,
//!   writable one, and the regions recovered by the first must stay covered until the next
//!   store writes them into the bitmap data (a second crash before it would otherwise make the
//!   bitmaps inconsistent).
//!
//! Contract with the caller (the block core's checkpoint gate keeps it): a store does not run
//! concurrently with modifications, and bits that reach a bitmap other than through a write
//! (merge) are stored at once.
//!
//! # Why a header extension, guarded by an autoclear bit
//! QEMU must keep working on such images unchanged. The log is an extension of an unknown type
//! inside cluster 0, so it needs no clusters of its own: `qemu-img check` has nothing to count
//! and stays clean, and `qemu-img info` lists the bitmaps exactly as they are in the directory
//! (still `in_use` after a crash, so QEMU and QSD load them inconsistent as they always did).
//! QEMU keeps unknown extensions when it rewrites the header and clears unknown *autoclear*
//! feature bits on every writable open. The log is trusted only while its bit
//! ([`AUTOCLEAR_DIRTY_LOG`]) is set: once any other program opened the image writable, the log
//! may be stale and blockd falls back to "inconsistent", never to a wrong bitmap. The bit is
//! not registered in the qcow2 specification; a high bit is used to stay clear of the ones the
//! specification hands out from the bottom.
//!
//! # Limits (each falls back to today's behaviour: inconsistent after a crash)
//! - The region map must fit into cluster 0 with room to spare for QEMU (a longest backing file
//!   name and a bitmaps extension): large disks get coarser regions (64 KiB clusters: 4 MiB
//!   regions up to 1 TiB; 4 KiB clusters: about 14 000 regions), images with clusters under
//!   4 KiB get no log. The extension has slots for the bitmaps present at open (at least 16,
//!   at most [`MAX_COVERED`]); bitmaps beyond them stay uncovered.
//! - After a resize the log is off until the image is reopened.
//! - Torn header writes: a mark rewrites only the sector(s) holding its bits, every other byte
//!   unchanged, and is flushed before any data write depends on it. Claims and stores rewrite
//!   the whole header, but the extension keeps its length for the whole open, so no byte after
//!   it moves; a mix of old and new sectors gives either the old or the new directory with
//!   either log, and every such pair is safe: a log is only ever applied to `in_use` bitmaps it
//!   names; the directory switch keeps the old log (so the old, `in use` directory with new
//!   log sectors is still covered), and the list is emptied, durably, before the tables it
//!   names can be reused. A claim is synced before the flags it announces are written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::bitmaps::{BitmapEntry, FLAG_IN_USE};
use crate::error::Result;
use crate::header::{ExtHead, Header, EXT_END, V3_HEADER_LEN};
use crate::meta::Meta;
use crate::ondisk::on_disk_struct;
use crate::Qcow2;

/// Header extension type of the dirty-region log ("bkdl").
pub const EXT_DIRTY_LOG: u32 = 0x626b_646c;
/// Autoclear feature bit: the dirty-region log is valid (cleared by any other writer).
pub const AUTOCLEAR_DIRTY_LOG: u64 = 1 << 62;
/// Most bitmaps one log covers.
pub const MAX_COVERED: usize = 256;
/// Format version of the extension.
const VERSION: u32 = 1;
/// Bytes of cluster 0 left free for QEMU to grow the header (a 1023-byte backing file name,
/// its format, a bitmaps extension, rounding).
const HEADER_SLACK: usize = 1536;
/// Region sizes accepted (512 B .. 2^62).
const REGION_BITS: std::ops::RangeInclusive<u32> = 9..=62;
/// Unit of the sector writes that set a mark.
const SECTOR: usize = 512;

/// Configured region size in bytes (0: no log). A power of two, at least 512.
static REGION_BYTES: AtomicU64 = AtomicU64::new(4 << 20);

/// Set the region size for images opened from now on. `0` turns the log off (bitmaps come back
/// inconsistent after a crash, as in QEMU); other values are rounded up to a power of two, at
/// least 512 bytes.
pub fn set_region_bytes(bytes: u64) {
    let v = if bytes == 0 {
        0
    } else {
        bytes
            .max(512)
            .checked_next_power_of_two()
            .unwrap_or(1 << 62)
    };
    REGION_BYTES.store(v, Ordering::Relaxed);
}

/// The configured region size in bytes (0: off).
pub fn region_bytes() -> u64 {
    REGION_BYTES.load(Ordering::Relaxed)
}

on_disk_struct! {
    /// Fixed part of the extension; followed by `cov_capacity` u64 slots (the first
    /// `n_covered` hold covered table offsets, the rest zero), then the region bits (bit r in
    /// byte r/8 at position r%8 from the LSB). The fixed capacity keeps the extension's length,
    /// and so the position of everything after it in cluster 0, unchanged by claims.
    pub struct LogHead [32] {
        /// [`VERSION`].
        0 => version: u32,
        /// log2 of the region size.
        4 => region_bits: u32,
        /// Virtual disk size the regions cover.
        8 => disk_size: u64,
        /// Number of regions (`ceil(disk_size / region)`).
        16 => nb_regions: u64,
        /// Number of covered bitmap table offsets.
        24 => n_covered: u32,
        /// Number of table offset slots.
        28 => cov_capacity: u32,
    }
}

/// The extension's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogExt {
    /// log2 of the region size.
    pub region_bits: u32,
    /// Disk size covered.
    pub disk_size: u64,
    /// Table offsets of the bitmaps whose stored data plus the marked regions is complete.
    pub covered: Vec<u64>,
    /// Slots for `covered` (at least its length).
    pub capacity: usize,
    /// Region bits.
    pub bits: Vec<u8>,
}

impl LogExt {
    /// An empty log (no marks) for `covered`.
    fn empty(region_bits: u32, disk_size: u64, covered: Vec<u64>, capacity: usize) -> LogExt {
        let n = disk_size.div_ceil(1u64 << region_bits);
        LogExt {
            region_bits,
            disk_size,
            capacity: capacity.max(covered.len()),
            covered,
            bits: vec![0; n.div_ceil(8) as usize],
        }
    }

    /// Number of regions.
    pub fn nb_regions(&self) -> u64 {
        self.disk_size.div_ceil(1u64 << self.region_bits)
    }

    /// Parse; `None` when malformed (treated as no log).
    pub fn parse(data: &[u8]) -> Option<LogExt> {
        let h = LogHead::load(data)?;
        if h.version != VERSION || !REGION_BITS.contains(&h.region_bits) {
            return None;
        }
        let n = h.disk_size.div_ceil(1u64 << h.region_bits);
        let cap = h.cov_capacity as usize;
        if h.nb_regions != n || h.n_covered > h.cov_capacity || cap > MAX_COVERED {
            return None;
        }
        let cov_end = LogHead::SIZE + 8 * cap;
        let bits_len = usize::try_from(n.div_ceil(8)).ok()?;
        if data.len() != cov_end.checked_add(bits_len)? {
            return None;
        }
        let covered = data[LogHead::SIZE..cov_end]
            .chunks_exact(8)
            .take(h.n_covered as usize)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Some(LogExt {
            region_bits: h.region_bits,
            disk_size: h.disk_size,
            covered,
            capacity: cap,
            bits: data[cov_end..].to_vec(),
        })
    }

    /// Offset of the region bits within the encoded extension.
    fn bits_offset(&self) -> usize {
        LogHead::SIZE + 8 * self.capacity
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let head = LogHead {
            version: VERSION,
            region_bits: self.region_bits,
            disk_size: self.disk_size,
            nb_regions: self.nb_regions(),
            n_covered: self.covered.len() as u32,
            cov_capacity: self.capacity as u32,
        };
        let mut out = head.to_bytes().to_vec();
        for c in &self.covered {
            out.extend_from_slice(&c.to_be_bytes());
        }
        out.resize(self.bits_offset(), 0);
        out.extend_from_slice(&self.bits);
        out
    }

    /// Is region `r` marked?
    fn is_marked(&self, r: u64) -> bool {
        self.bits
            .get((r / 8) as usize)
            .is_some_and(|b| b & (1 << (r % 8)) != 0)
    }

    /// Marked regions, in order.
    pub fn marked(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.nb_regions()).filter(|&r| self.is_marked(r))
    }

    /// OR the marked regions into bitmap data of granularity `1 << gbits` (layout of
    /// `LoadedBitmap::data`) for a disk of `size` bytes.
    pub fn apply(&self, data: &mut [u8], gbits: u32, size: u64) {
        let rb = self.region_bits;
        for r in self.marked() {
            let start = r << rb;
            let end = start.saturating_add(1u64 << rb).min(size);
            if start >= end {
                continue;
            }
            set_bit_run(data, start >> gbits, (end - 1) >> gbits);
        }
    }
}

/// Set bits `first..=last` (clamped to the buffer).
fn set_bit_run(data: &mut [u8], first: u64, last: u64) {
    let max = (data.len() as u64 * 8).saturating_sub(1);
    for i in first..=last.min(max) {
        data[(i / 8) as usize] |= 1 << (i % 8);
    }
}

/// The log's state while an image is open; lives in [`Qcow2`].
#[derive(Debug, Default)]
pub struct Runtime {
    /// log2 of the region size for this open (0: no log).
    region_bits: u32,
    /// Disk size the region map covers.
    disk_size: u64,
    /// Covered-offset slots of this open's extension.
    capacity: usize,
    /// Marks are being written (a log was claimed and no store or resize happened since).
    active: AtomicBool,
    /// Regions whose mark is durable, one bit each (set only after the flush).
    marked: Vec<AtomicU64>,
    /// The valid log found at open (for recovery, and kept by the first claim for the bitmaps
    /// it still covers); consumed by that claim. Guarded by its own lock, taken under the
    /// metadata lock.
    found: Mutex<Option<LogExt>>,
    /// Regions writers wait to have marked (group commit); taken by the `io` holder.
    pending: Mutex<Vec<u64>>,
    /// Held while marking: one writer writes and flushes the marks of all pending regions.
    /// Taken before the metadata lock, never while holding it.
    io: Mutex<()>,
}

/// Where the log extension's data starts in a serialized header.
fn ext_data_pos(buf: &[u8]) -> Option<usize> {
    let mut pos = V3_HEADER_LEN as usize;
    while pos + ExtHead::SIZE <= buf.len() {
        let h = ExtHead::load(&buf[pos..])?;
        if h.ext_type == EXT_END {
            return None;
        }
        if h.ext_type == EXT_DIRTY_LOG {
            return Some(pos + ExtHead::SIZE);
        }
        pos += ExtHead::SIZE + (h.len as usize).div_ceil(8) * 8;
    }
    None
}

/// The log extension in a header, if any (raw).
fn ext_bytes(h: &Header) -> Option<&Vec<u8>> {
    h.unknown_exts
        .iter()
        .find(|(t, _)| *t == EXT_DIRTY_LOG)
        .map(|(_, d)| d)
}

/// Replace (or with `None` remove) the log extension and its autoclear bit in memory.
fn set_ext(h: &mut Header, ext: Option<&LogExt>) {
    h.unknown_exts.retain(|(t, _)| *t != EXT_DIRTY_LOG);
    match ext {
        Some(e) => {
            h.unknown_exts.push((EXT_DIRTY_LOG, e.encode()));
            h.raw.autoclear_features |= AUTOCLEAR_DIRTY_LOG;
        }
        None => h.raw.autoclear_features &= !AUTOCLEAR_DIRTY_LOG,
    }
}

impl Runtime {
    /// At open: validate a log found in the header (dropping an invalid or stale one from the
    /// in-memory header when writable; returns whether the header must be rewritten) and pick
    /// this open's region size.
    pub fn at_open(m: &mut Meta) -> (Runtime, bool) {
        let h = &m.header;
        let valid_bit = h.raw.autoclear_features & AUTOCLEAR_DIRTY_LOG != 0;
        let found = ext_bytes(h)
            .and_then(|d| LogExt::parse(d))
            .filter(|e| valid_bit && e.disk_size == h.raw.size && h.raw.version >= 3);
        let present = ext_bytes(h).is_some() || valid_bit;
        let mut rewrite = false;
        if found.is_none() && present && m.writable {
            set_ext(&mut m.header, None);
            rewrite = true;
        }
        let size = m.header.raw.size;
        let capacity = match &found {
            Some(e) => e.capacity,
            None => m.bitmaps.len().next_power_of_two().clamp(16, MAX_COVERED),
        };
        let region_bits = match &found {
            Some(e) => e.region_bits,
            None if m.writable && m.header.raw.version >= 3 => pick_region_bits(m, size, capacity),
            None => 0,
        };
        let words = if region_bits == 0 {
            0
        } else {
            size.div_ceil(1u64 << region_bits).div_ceil(64) as usize
        };
        let rt = Runtime {
            region_bits,
            disk_size: size,
            capacity,
            active: AtomicBool::new(false),
            marked: (0..words).map(|_| AtomicU64::new(0)).collect(),
            found: Mutex::new(found),
            pending: Mutex::new(Vec::new()),
            io: Mutex::new(()),
        };
        (rt, rewrite)
    }

    /// Region size of this open in bytes (0: no log).
    pub fn region_size(&self) -> u64 {
        if self.region_bits == 0 {
            0
        } else {
            1u64 << self.region_bits
        }
    }

    fn found(&self) -> std::sync::MutexGuard<'_, Option<LogExt>> {
        self.found.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recovery at load: for an `in_use` entry covered by the log found at open, OR the marked
    /// regions into its stored `data` and return true (the bitmap is consistent).
    pub fn recover(&self, e: &BitmapEntry, data: &mut [u8], size: u64) -> bool {
        let found = self.found();
        let Some(log) = found.as_ref() else {
            return false;
        };
        if e.flags & FLAG_IN_USE == 0 || !log.covered.contains(&e.table_offset) {
            return false;
        }
        log.apply(data, e.granularity_bits as u32, size);
        true
    }

    /// Claim: put the new log into the in-memory header (covered: bitmaps exact on disk now,
    /// plus those still `in_use` and covered by the valid log found at open, whose marks are
    /// then kept; see "Claim after a crash" above). The caller writes the header
    /// durably and then calls [`Runtime::activate`] with the returned log. Returns whether the
    /// header changed.
    pub fn claim(&self, m: &mut Meta) -> (bool, Option<LogExt>) {
        let before = ext_bytes(&m.header).cloned();
        let had_bit = m.header.raw.autoclear_features & AUTOCLEAR_DIRTY_LOG != 0;
        let new = self.new_log(m);
        set_ext(&mut m.header, new.as_ref());
        let changed = ext_bytes(&m.header).cloned() != before
            || (m.header.raw.autoclear_features & AUTOCLEAR_DIRTY_LOG != 0) != had_bit;
        (changed, new)
    }

    /// The log a claim writes, or None (no log: off, nothing covered, or it does not fit).
    fn new_log(&self, m: &Meta) -> Option<LogExt> {
        if self.region_bits == 0 || m.header.raw.size != self.disk_size {
            return None;
        }
        let found = self.found();
        // Recoverable from the found log, whichever open loaded them: their stored data still
        // lacks the marked regions, so the marks stay until a store.
        let recoverable = |off: &u64| found.as_ref().is_some_and(|l| l.covered.contains(off));
        let mut covered: Vec<u64> = Vec::new();
        let mut keep = false;
        for e in &m.bitmaps {
            if e.flags & FLAG_IN_USE == 0 {
                covered.push(e.table_offset);
            } else if recoverable(&e.table_offset) {
                covered.push(e.table_offset);
                keep = true;
            }
        }
        if covered.is_empty() && ext_bytes(&m.header).is_none() {
            return None; // no bitmaps to cover: leave the header alone
        }
        // Bitmaps beyond the capacity stay uncovered (inconsistent after a crash).
        covered.truncate(self.capacity);
        let mut log = LogExt::empty(self.region_bits, self.disk_size, covered, self.capacity);
        if keep {
            if let Some(old) = found.as_ref().filter(|o| o.bits.len() == log.bits.len()) {
                log.bits = old.bits.clone();
            }
        }
        let mut probe = m.header.clone();
        set_ext(&mut probe, Some(&log));
        let fits = probe
            .serialize()
            .is_ok_and(|b| b.len() + HEADER_SLACK <= m.geo.cluster_size() as usize);
        fits.then_some(log)
    }

    /// After the claim's header is durable: start marking, with `log`'s marks as durable.
    pub fn activate(&self, log: Option<LogExt>) {
        *self.found() = None;
        for w in &self.marked {
            w.store(0, Ordering::Release);
        }
        if let Some(log) = &log {
            for r in log.marked() {
                self.set_marked(r);
            }
        }
        let covers = log.as_ref().is_some_and(|l| !l.covered.is_empty());
        self.active.store(covers, Ordering::Release);
    }

    /// Stop marking (before a store: the caller empties the log once the store is durable).
    pub fn stop(&self) {
        self.active.store(false, Ordering::Release);
    }

    /// Before a resize, after a store: stop marking and empty the covered list in the in-memory header
    /// (written by the caller's header write). Bitmaps then written exact need no log; bitmaps
    /// left `in_use` fall back to inconsistent.
    pub fn retire(&self, m: &mut Meta) {
        self.active.store(false, Ordering::Release);
        if let Some(mut log) = ext_bytes(&m.header).and_then(|d| LogExt::parse(d)) {
            log.covered.clear();
            log.bits.fill(0);
            set_ext(&mut m.header, Some(&log));
        }
    }

    fn set_marked(&self, r: u64) {
        if let Some(w) = self.marked.get((r / 64) as usize) {
            w.fetch_or(1 << (r % 64), Ordering::AcqRel);
        }
    }

    fn is_marked(&self, r: u64) -> bool {
        self.marked
            .get((r / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (r % 64)) != 0)
    }

    /// Regions touched by `[offset, offset+len)` (len > 0).
    fn regions(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let last = offset
            .saturating_add(len - 1)
            .min(self.disk_size.saturating_sub(1));
        (offset >> self.region_bits)..=(last >> self.region_bits)
    }
}

/// The region size for a fresh log: the configured one, coarsened until the map fits into
/// cluster 0 with [`HEADER_SLACK`] to spare and room for `capacity` covered offsets; 0 if not
/// even one byte of map fits.
fn pick_region_bits(m: &Meta, size: u64, capacity: usize) -> u32 {
    let want = region_bytes();
    if want == 0 || size == 0 {
        return 0;
    }
    let mut probe = m.header.clone();
    set_ext(&mut probe, None);
    let Ok(hdr) = probe.serialize() else {
        return 0;
    };
    let cs = m.geo.cluster_size() as usize;
    let fixed = hdr.len() + HEADER_SLACK + ExtHead::SIZE + LogHead::SIZE + 8 * capacity + 8;
    let Some(budget) = cs.checked_sub(fixed).filter(|&b| b > 0) else {
        return 0;
    };
    let mut bits = want.trailing_zeros().max(*REGION_BITS.start());
    while size.div_ceil(1u64 << bits).div_ceil(8) > budget as u64 {
        bits += 1;
        if bits > *REGION_BITS.end() {
            return 0;
        }
    }
    bits
}

impl Qcow2 {
    /// Before a modification of `[offset, offset+len)` is issued: make sure every region it
    /// touches is durably marked (no-op without an active log).
    ///
    /// Group commit: writers needing marks queue their regions in `pending` and take turns on
    /// the `io` lock; the writer holding it marks everything queued so far with one sector
    /// write and one flush, so concurrent writers (queue depth) share a flush. Durability is
    /// tracked only by the `marked` atomics, set after the flush: a failed attempt leaves
    /// them clear and the next writer writes the bits again.
    pub(crate) fn log_modification(&self, offset: u64, len: u64) -> Result<()> {
        let log = &self.log;
        if len == 0 || !log.active.load(Ordering::Acquire) {
            return Ok(());
        }
        let regions = log.regions(offset, len);
        let mut mine: Vec<u64> = regions.filter(|&r| !log.is_marked(r)).collect();
        if mine.is_empty() {
            return Ok(());
        }
        lock(&log.pending).extend_from_slice(&mine);
        let _io = lock(&log.io);
        mine.retain(|&r| !log.is_marked(r));
        if mine.is_empty() {
            return Ok(()); // the previous holder marked them for us
        }
        let mut batch = std::mem::take(&mut *lock(&log.pending));
        batch.append(&mut mine);
        batch.retain(|&r| !log.is_marked(r));
        batch.sort_unstable();
        batch.dedup();
        {
            let mut m = self.lock()?;
            if !log.active.load(Ordering::Acquire) {
                return Ok(()); // retired by a store or resize meanwhile
            }
            let Some(mut ext) = ext_bytes(&m.header).and_then(|d| LogExt::parse(d)) else {
                return Ok(());
            };
            for &r in &batch {
                if let Some(b) = ext.bits.get_mut((r / 8) as usize) {
                    *b |= 1 << (r % 8);
                }
            }
            set_ext(&mut m.header, Some(&ext));
            // Written under the metadata lock, so no other header write can interleave.
            write_marks(&mut m, &ext, &batch)?;
        }
        self.file
            .flush()
            .map_err(|e| crate::Error::io(e, "flushing the dirty-region log"))?;
        for &r in &batch {
            log.set_marked(r);
        }
        Ok(())
    }
}

/// Lock a mutex whose data stays valid even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Write the header sector(s) holding the bits of regions `batch` (sorted; not flushed).
fn write_marks(m: &mut Meta, ext: &LogExt, batch: &[u64]) -> Result<()> {
    let buf = m.header.serialize()?;
    let (Some(pos), Some(&first), Some(&last)) = (ext_data_pos(&buf), batch.first(), batch.last())
    else {
        return m.write_header();
    };
    let base = pos + ext.bits_offset();
    let lo = base + (first / 8) as usize;
    let hi = base + (last / 8) as usize + 1;
    let start = lo / SECTOR * SECTOR;
    let end = hi.next_multiple_of(SECTOR).min(buf.len());
    m.write_raw(&buf[start..end], start as u64, "the dirty-region log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_round_trips() {
        let mut e = LogExt::empty(22, (1 << 30) + 1, vec![0x70000, 0x90000], 16);
        e.bits[0] = 0b101;
        let back = LogExt::parse(&e.encode()).expect("parses");
        assert_eq!(back, e);
        assert_eq!(back.nb_regions(), 257);
        assert_eq!(back.marked().collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn truncated_or_inconsistent_extension_is_no_log() {
        let e = LogExt::empty(22, 1 << 30, vec![0x70000], 16);
        let enc = e.encode();
        assert!(LogExt::parse(&enc[..enc.len() - 1]).is_none());
        let mut bad = enc.clone();
        bad[23] ^= 1; // nb_regions
        assert!(LogExt::parse(&bad).is_none());
    }

    #[test]
    fn marked_region_sets_every_granule_it_touches() {
        // Regions of 1 MiB, granularity 64 KiB: region 1 = granules 16..=31.
        let mut e = LogExt::empty(20, 4 << 20, vec![], 16);
        e.bits[0] = 0b10;
        let mut data = vec![0u8; 8];
        e.apply(&mut data, 16, 4 << 20);
        assert_eq!(data, vec![0, 0, 0xff, 0xff, 0, 0, 0, 0]);
    }

    #[test]
    fn last_region_is_clamped_to_the_disk() {
        // 3 MiB disk, 2 MiB regions, 1 MiB granularity: region 1 covers only granule 2.
        let mut e = LogExt::empty(21, 3 << 20, vec![], 16);
        e.bits[0] = 0b10;
        let mut data = vec![0u8; 1];
        e.apply(&mut data, 20, 3 << 20);
        assert_eq!(data, vec![0b100]);
    }
}
