//! [`HBitmap`]: the public bitmap type, its construction and its byte-range operations.

use std::fmt;
use std::sync::Arc;

use crate::bits::{mask_incl, WORD_BITS};
use crate::chunk::{Chunk, MAX_CHUNK_WORDS};
use crate::summary::Summary;
use crate::Error;

/// Smallest accepted granularity in bytes.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest accepted granularity in bytes (2 GiB).
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Most granules (bits) a bitmap may have: 2^40, i.e. 512 TiB at 512-byte granularity or
/// 64 PiB at 64 KiB. Beyond this even the chunk directory (8 bytes per 2^18 granules)
/// would be large; QEMU itself could not allocate such a bitmap either.
pub const MAX_GRANULES: u64 = 1 << 40;

/// log2 of granules per chunk in production (4096 words, 32 KiB of leaf per chunk).
const DEFAULT_CHUNK_SHIFT: u32 = (MAX_CHUNK_WORDS * WORD_BITS).trailing_zeros();

/// A dirty bitmap over a disk of `size` bytes, one bit per `granularity` bytes.
///
/// Granule `i` covers bytes `i * granularity .. (i + 1) * granularity` (the last one
/// clipped to `size`). Every operation takes byte offsets and touches every granule that
/// intersects the byte range; ranges are clipped to `size`.
///
/// Layout in memory: the leaf bits live in chunks of 2^18 granules (32 KiB), allocated
/// on first dirtying and freed when they become clean again, so clean areas cost one
/// pointer per chunk. Each chunk carries two-level "has dirty" / "has clean" summaries
/// of its words, and two dense multi-level summaries over the chunks let searches skip
/// clean (or, for clean searches, fully dirty) regions in a few word reads.
#[derive(Clone)]
pub struct HBitmap {
    /// Disk size in bytes.
    size: u64,
    /// log2 of the granularity.
    shift: u32,
    /// `ceil(size / granularity)`.
    granules: u64,
    /// log2 of granules per chunk (fixed at 18 outside tests).
    chunk_shift: u32,
    /// Leaf chunks; `None` means all clean. A present chunk always has a dirty granule.
    /// A chunk may be shared with other bitmaps (clones, merges, bitmaps marked together):
    /// it is only changed in place while this bitmap is its sole holder, or by
    /// [`HBitmap::set_in_all`] while every holder is being marked alike; otherwise a change
    /// first takes a private copy ([`Arc::make_mut`]).
    pub(crate) chunks: Vec<Option<Arc<Chunk>>>,
    /// Bit `c`: chunk `c` has a dirty granule (so it is present).
    any_dirty: Summary,
    /// Bit `c`: chunk `c` has a clean granule (always the case for an absent chunk).
    any_clean: Summary,
    /// Dirty granules.
    dirty: u64,
}

impl HBitmap {
    /// An all-clean bitmap over `size` bytes (may be 0 or not a multiple of the
    /// granularity). `granularity` must be a power of two in 512..=2^31.
    pub fn new(size: u64, granularity: u64) -> Result<HBitmap, Error> {
        HBitmap::with_chunk_shift(size, granularity, DEFAULT_CHUNK_SHIFT)
    }

    /// [`HBitmap::new`] with `2^chunk_shift` granules per chunk (tests use small chunks to
    /// exercise the chunk and summary edges with small models).
    pub(crate) fn with_chunk_shift(
        size: u64,
        granularity: u64,
        chunk_shift: u32,
    ) -> Result<HBitmap, Error> {
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(Error::BadGranularity(granularity));
        }
        debug_assert!((6..=DEFAULT_CHUNK_SHIFT).contains(&chunk_shift));
        let granules = size.div_ceil(granularity);
        let n_chunks = granules.div_ceil(1 << chunk_shift);
        let n_chunks = match usize::try_from(n_chunks) {
            Ok(n) if granules <= MAX_GRANULES => n,
            _ => return Err(Error::TooLarge { size, granularity }),
        };
        let mut chunks = Vec::new();
        chunks.resize_with(n_chunks, || None);
        Ok(HBitmap {
            size,
            shift: granularity.trailing_zeros(),
            granules,
            chunk_shift,
            chunks,
            any_dirty: Summary::new(n_chunks, false),
            any_clean: Summary::new(n_chunks, true),
            dirty: 0,
        })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of bits: `ceil(size / granularity)`.
    pub fn granules(&self) -> u64 {
        self.granules
    }

    /// Dirty bytes as QEMU reports them: dirty granules × granularity (the last granule
    /// counts in full even when the disk ends inside it). O(1).
    pub fn count(&self) -> u64 {
        self.dirty.saturating_mul(self.granularity())
    }

    /// Dirty granules. O(1).
    pub fn dirty_granules(&self) -> u64 {
        self.dirty
    }

    /// Whether no granule is dirty.
    pub fn is_empty(&self) -> bool {
        self.dirty == 0
    }

    /// Marks dirty every granule intersecting `offset..offset + len`, clipped to the disk.
    /// `len == 0` does nothing. Allocates only when a chunk (2^18 granules) is first dirtied.
    #[inline]
    pub fn set(&mut self, offset: u64, len: u64) {
        let Some((g0, g1)) = self.granule_span(offset, len) else {
            return;
        };
        // Fast path: the range lies in one chunk that is already allocated.
        let c = self.chunk_of(g0);
        let (lo, hi) = (self.local(g0), self.local(g1 - 1) + 1);
        if c == self.chunk_of(g1 - 1) {
            if let Some(ch) = &mut self.chunks[c] {
                if ch.covers(lo, hi) {
                    return;
                }
                let ch = Arc::make_mut(ch);
                let before = ch.dirty();
                ch.set_range(lo, hi);
                self.dirty += ch.dirty() - before;
                if !ch.has_clean() {
                    self.any_clean.assign(c, false);
                }
                return;
            }
        }
        self.set_granules(g0, g1);
    }

    /// Marks clean every granule intersecting `offset..offset + len`, clipped to the disk.
    /// Chunks that become clean are freed.
    pub fn reset(&mut self, offset: u64, len: u64) {
        let Some((g0, g1)) = self.granule_span(offset, len) else {
            return;
        };
        // Fast path: the range lies in one allocated chunk and does not cover all of it.
        let c = self.chunk_of(g0);
        let (lo, hi) = (self.local(g0), self.local(g1 - 1) + 1);
        if c == self.chunk_of(g1 - 1) && (lo, hi) != (0, self.chunk_granules(c)) {
            if let Some(ch) = &mut self.chunks[c] {
                if !ch.any_dirty_in(lo, hi) {
                    return;
                }
                let ch = Arc::make_mut(ch);
                let before = ch.dirty();
                ch.clear_range(lo, hi);
                self.dirty = self.dirty - before + ch.dirty();
                if ch.has_dirty() {
                    self.any_clean.assign(c, true);
                } else {
                    self.sync(c);
                }
            }
            return;
        }
        self.reset_granules(g0, g1);
    }

    /// Marks every granule dirty (allocates the whole leaf).
    /// Full chunks of one length are one shared block.
    pub fn set_all(&mut self) {
        let mut full: Option<Arc<Chunk>> = None;
        for c in 0..self.chunks.len() {
            let granules = self.chunk_granules(c);
            let slot = &mut self.chunks[c];
            if slot.as_ref().is_none_or(|ch| ch.has_clean()) {
                let block = match &full {
                    Some(f) if f.granules() == granules => Arc::clone(f),
                    _ => Arc::new(Chunk::full(granules)),
                };
                full = Some(Arc::clone(&block));
                *slot = Some(block);
            }
        }
        self.any_dirty.fill(true);
        self.any_clean.fill(false);
        self.dirty = self.granules;
    }

    /// Marks every granule clean and frees the whole leaf.
    pub fn reset_all(&mut self) {
        self.chunks.iter_mut().for_each(|slot| *slot = None);
        self.any_dirty.fill(false);
        self.any_clean.fill(true);
        self.dirty = 0;
    }

    /// Whether the granule containing byte `offset` is dirty (false past the end).
    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let g = offset >> self.shift;
        self.chunks[self.chunk_of(g)]
            .as_ref()
            .is_some_and(|ch| ch.get(self.local(g)))
    }

    /// The first dirty byte in `offset..end` (end clipped to the disk): `offset` itself
    /// when its granule is dirty, else the start of the next dirty granule.
    pub fn next_dirty(&self, offset: u64, end: u64) -> Option<u64> {
        let end = end.min(self.size);
        if offset >= end {
            return None;
        }
        let g = self.next_dirty_granule(offset >> self.shift)?;
        let byte = offset.max(g << self.shift);
        (byte < end).then_some(byte)
    }

    /// The first clean byte in `offset..end`, with the conventions of [`Self::next_dirty`].
    pub fn next_clean(&self, offset: u64, end: u64) -> Option<u64> {
        let end = end.min(self.size);
        if offset >= end {
            return None;
        }
        let g = self.next_clean_granule(offset >> self.shift)?;
        let byte = offset.max(g << self.shift);
        (byte < end).then_some(byte)
    }

    /// The first dirty run inside `offset..end` as `(start, len)`: `start >= offset`,
    /// `start + len <= min(end, size)`, `0 < len <= max_len`. `None` when there is none or
    /// `max_len == 0`.
    pub fn next_dirty_area(&self, offset: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        if max_len == 0 {
            return None;
        }
        let end = end.min(self.size);
        let start = self.next_dirty(offset, end)?;
        let limit = end.min(start.saturating_add(max_len));
        let stop = self.next_clean(start, limit).unwrap_or(limit);
        Some((start, stop - start))
    }

    /// The maximal dirty byte runs `(start, len)` inside `offset..end`, clipped to it and
    /// to the disk, in increasing order.
    pub fn dirty_ranges(&self, offset: u64, end: u64) -> DirtyRanges<'_> {
        DirtyRanges {
            bitmap: self,
            pos: offset,
            end: end.min(self.size),
        }
    }

    /// `self |= src`. Both must cover the same disk size; granularities may differ, in
    /// which case a granule of `self` becomes dirty when its bytes intersect a dirty
    /// granule of `src` (both clipped to the disk). With the same geometry, a chunk of
    /// `self` that is clean or a subset of the source's becomes the source's (shared).
    pub fn merge(&mut self, src: &HBitmap) -> Result<(), Error> {
        if src.size != self.size {
            return Err(Error::SizeMismatch {
                target: self.size,
                source: src.size,
            });
        }
        if src.shift != self.shift || src.chunk_shift != self.chunk_shift {
            for (start, len) in src.dirty_ranges(0, src.size) {
                self.set(start, len);
            }
            return Ok(());
        }
        for (c, src_chunk) in src.chunks.iter().enumerate() {
            let Some(src_chunk) = src_chunk else { continue };
            match &mut self.chunks[c] {
                Some(dst) if Arc::ptr_eq(dst, src_chunk) || src_chunk.is_subset_of(dst) => {}
                Some(dst) if dst.is_subset_of(src_chunk) => {
                    self.dirty = self.dirty - dst.dirty() + src_chunk.dirty();
                    *dst = Arc::clone(src_chunk);
                }
                Some(dst) => {
                    let before = dst.dirty();
                    let dst = Arc::make_mut(dst);
                    dst.or_from(src_chunk);
                    self.dirty = self.dirty - before + dst.dirty();
                }
                slot @ None => {
                    self.dirty += src_chunk.dirty();
                    *slot = Some(Arc::clone(src_chunk));
                }
            }
            self.sync(c);
        }
        Ok(())
    }

    /// Changes the disk size to `new_size`: granules past the new end are dropped, new
    /// granules are clean. Fails (leaving the bitmap unchanged) only when the new size
    /// exceeds [`MAX_GRANULES`].
    pub fn resize(&mut self, new_size: u64) -> Result<(), Error> {
        let mut new = HBitmap::with_chunk_shift(new_size, self.granularity(), self.chunk_shift)?;
        let common = self.chunks.len().min(new.chunks.len());
        for c in 0..common {
            let Some(old) = self.chunks[c].take() else {
                continue;
            };
            let granules = new.chunk_granules(c);
            let chunk = if old.granules() == granules {
                old
            } else {
                Arc::new(Chunk::resized(&old, granules))
            };
            new.dirty += chunk.dirty();
            new.chunks[c] = Some(chunk);
            new.sync(c);
        }
        *self = new;
        Ok(())
    }

    /// Heap bytes besides the chunks: the chunk directory and the summaries.
    pub(crate) fn memory_usage_without_chunks(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Option<Arc<Chunk>>>()
            + self.any_dirty.heap_bytes()
            + self.any_clean.heap_bytes()
    }

    /// log2 of granules per chunk.
    pub(crate) fn chunk_shift(&self) -> u32 {
        self.chunk_shift
    }

    /// Chunk count went from `before` to `after` dirty granules somewhere.
    #[inline]
    pub(crate) fn add_dirty(&mut self, before: u64, after: u64) {
        self.dirty = self.dirty - before + after;
    }

    /// Approximate heap bytes used: the chunk directory, the summaries and the allocated
    /// chunks, counting chunks shared with other bitmaps in full (see
    /// [`HBitmap::memory_usage_together`] for a set of bitmaps).
    pub fn memory_usage(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Option<Arc<Chunk>>>()
            + self.any_dirty.heap_bytes()
            + self.any_clean.heap_bytes()
            + self
                .chunks
                .iter()
                .flatten()
                .map(|ch| ch.heap_bytes())
                .sum::<usize>()
    }

    /// Number of allocated leaf chunks (each covers 2^18 granules).
    pub fn allocated_chunks(&self) -> usize {
        self.chunks.iter().flatten().count()
    }

    // ---- granule-level internals ----

    /// The granules `g0..g1` intersecting the byte range clipped to the disk.
    #[inline]
    pub(crate) fn granule_span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift, ((end - 1) >> self.shift) + 1))
    }

    /// Chunk index of granule `g` (`g < granules`).
    #[inline]
    pub(crate) fn chunk_of(&self, g: u64) -> usize {
        (g >> self.chunk_shift) as usize
    }

    /// Index of granule `g` inside its chunk.
    #[inline]
    pub(crate) fn local(&self, g: u64) -> usize {
        (g & ((1 << self.chunk_shift) - 1)) as usize
    }

    /// First granule of chunk `c`.
    #[inline]
    pub(crate) fn chunk_base(&self, c: usize) -> u64 {
        (c as u64) << self.chunk_shift
    }

    /// Granules in chunk `c` (all but the last chunk are full size).
    #[inline]
    pub(crate) fn chunk_granules(&self, c: usize) -> usize {
        (self.granules - self.chunk_base(c)).min(1 << self.chunk_shift) as usize
    }

    /// log2 of leaf words per chunk.
    #[inline]
    pub(crate) fn chunk_word_shift(&self) -> u32 {
        self.chunk_shift - WORD_BITS.trailing_zeros()
    }

    /// Brings the chunk summaries in line with chunk `c`, freeing it when clean.
    #[inline]
    pub(crate) fn sync(&mut self, c: usize) {
        let (has_dirty, has_clean) = match &self.chunks[c] {
            Some(ch) => (ch.has_dirty(), ch.has_clean()),
            None => (false, true),
        };
        if !has_dirty {
            self.chunks[c] = None;
        }
        self.any_dirty.assign(c, has_dirty);
        self.any_clean.assign(c, has_clean);
    }

    /// Marks granules `g0..g1` dirty (`g0 < g1 <= granules`).
    #[inline]
    fn set_granules(&mut self, g0: u64, g1: u64) {
        for c in self.chunk_of(g0)..=self.chunk_of(g1 - 1) {
            let base = self.chunk_base(c);
            let total = self.chunk_granules(c);
            let lo = (g0.max(base) - base) as usize;
            let hi = (g1.min(base + total as u64) - base) as usize;
            let slot = &mut self.chunks[c];
            let before = match slot {
                Some(ch) if ch.covers(lo, hi) => continue,
                Some(ch) => ch.dirty(),
                None => 0,
            };
            let after = if lo == 0 && hi == total {
                *slot = Some(Arc::new(Chunk::full(total)));
                total as u64
            } else {
                let ch = Arc::make_mut(slot.get_or_insert_with(|| Arc::new(Chunk::clean(total))));
                ch.set_range(lo, hi);
                ch.dirty()
            };
            self.dirty = self.dirty - before + after;
            self.sync(c);
        }
    }

    /// Marks granules `g0..g1` clean (`g0 < g1 <= granules`).
    fn reset_granules(&mut self, g0: u64, g1: u64) {
        for c in self.chunk_of(g0)..=self.chunk_of(g1 - 1) {
            let base = self.chunk_base(c);
            let total = self.chunk_granules(c);
            let lo = (g0.max(base) - base) as usize;
            let hi = (g1.min(base + total as u64) - base) as usize;
            let Some(ch) = &mut self.chunks[c] else {
                continue;
            };
            let before = ch.dirty();
            if lo == 0 && hi == total {
                self.chunks[c] = None;
                self.dirty -= before;
            } else if ch.any_dirty_in(lo, hi) {
                let ch = Arc::make_mut(ch);
                ch.clear_range(lo, hi);
                self.dirty = self.dirty - before + ch.dirty();
            }
            self.sync(c);
        }
    }

    /// The first dirty granule at or after `g`.
    fn next_dirty_granule(&self, g: u64) -> Option<u64> {
        if g >= self.granules {
            return None;
        }
        let c = self.chunk_of(g);
        if let Some(ch) = &self.chunks[c] {
            if let Some(l) = ch.next_dirty(self.local(g)) {
                return Some(self.chunk_base(c) + l as u64);
            }
        }
        let c = self.any_dirty.next_set(c + 1)?;
        let l = self.chunks.get(c)?.as_ref()?.next_dirty(0)?;
        Some(self.chunk_base(c) + l as u64)
    }

    /// The first clean granule at or after `g`.
    fn next_clean_granule(&self, g: u64) -> Option<u64> {
        if g >= self.granules {
            return None;
        }
        let c = self.chunk_of(g);
        match &self.chunks[c] {
            None => return Some(g),
            Some(ch) => {
                if let Some(l) = ch.next_clean(self.local(g)) {
                    return Some(self.chunk_base(c) + l as u64);
                }
            }
        }
        let c = self.any_clean.next_set(c + 1)?;
        match &self.chunks[c] {
            None => Some(self.chunk_base(c)),
            Some(ch) => Some(self.chunk_base(c) + ch.next_clean(0)? as u64),
        }
    }

    /// Leaf word `j` (bits of granules `64 j .. 64 j + 64`); 0 past the end.
    #[inline]
    pub(crate) fn word(&self, j: u64) -> u64 {
        let c = j >> self.chunk_word_shift();
        let local = (j & ((1 << self.chunk_word_shift()) - 1)) as usize;
        match usize::try_from(c).ok().and_then(|c| self.chunks.get(c)) {
            Some(Some(ch)) => ch.word(local),
            _ => 0,
        }
    }

    /// The allocated chunk `c`, if any (`None` also past the end).
    #[inline]
    pub(crate) fn chunk(&self, c: u64) -> Option<&Chunk> {
        usize::try_from(c)
            .ok()
            .and_then(|c| self.chunks.get(c))?
            .as_deref()
    }

    /// Overwrites granules `g0..g1` (`g1 <= granules`) with bits from `bits(g, n)`, which
    /// returns the `n` (1..=64) bits for granules `g..g + n`, lowest bit first. Chunks
    /// are only allocated for non-zero bits, and re-synced once each.
    pub(crate) fn write_granules(
        &mut self,
        g0: u64,
        g1: u64,
        mut bits: impl FnMut(u64, usize) -> u64,
    ) {
        let mut g = g0;
        while g < g1 {
            let c = self.chunk_of(g);
            let base = self.chunk_base(c);
            let granules = self.chunk_granules(c);
            let stop = g1.min(base + granules as u64);
            let slot = &mut self.chunks[c];
            let before = slot.as_ref().map_or(0, |ch| ch.dirty());
            while g < stop {
                let local = (g - base) as usize;
                let (j, lo) = (local / WORD_BITS, local % WORD_BITS);
                let n = ((stop - g) as usize).min(WORD_BITS - lo);
                let mask = mask_incl(lo, lo + n - 1);
                let value = (bits(g, n) << lo) & mask;
                let old = slot.as_ref().map_or(0, |ch| ch.word(j));
                let new = (old & !mask) | value;
                if new != old {
                    let ch = slot.get_or_insert_with(|| Arc::new(Chunk::clean(granules)));
                    Arc::make_mut(ch).store(j, new);
                }
                g += n as u64;
            }
            let after = slot.as_ref().map_or(0, |ch| ch.dirty());
            self.dirty = self.dirty - before + after;
            self.sync(c);
        }
    }

    /// Checks every internal invariant (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        self.any_dirty.check();
        self.any_clean.check();
        let mut dirty = 0;
        for (c, slot) in self.chunks.iter().enumerate() {
            if let Some(ch) = slot {
                ch.check();
                assert!(ch.has_dirty(), "clean chunk {c} kept allocated");
                assert_eq!(ch.granules(), self.chunk_granules(c), "chunk {c} length");
                dirty += ch.dirty();
            }
            let (d, cl) = slot
                .as_ref()
                .map_or((false, true), |ch| (ch.has_dirty(), ch.has_clean()));
            assert_eq!(self.any_dirty.get(c), d, "any_dirty bit {c}");
            assert_eq!(self.any_clean.get(c), cl, "any_clean bit {c}");
        }
        assert_eq!(self.dirty, dirty, "total count");
    }
}

impl fmt::Debug for HBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("granules", &self.granules)
            .field("dirty_granules", &self.dirty)
            .field("allocated_chunks", &self.allocated_chunks())
            .finish()
    }
}

/// Two bitmaps are equal when they cover the same size at the same granularity and
/// have the same dirty granules.
impl PartialEq for HBitmap {
    fn eq(&self, other: &HBitmap) -> bool {
        if self.size != other.size || self.shift != other.shift || self.dirty != other.dirty {
            return false;
        }
        let words = self.granules.div_ceil(WORD_BITS as u64);
        (0..words).all(|j| self.word(j) == other.word(j))
    }
}

impl Eq for HBitmap {}

/// Iterator over maximal dirty byte runs; see [`HBitmap::dirty_ranges`].
#[derive(Debug, Clone)]
pub struct DirtyRanges<'a> {
    /// The bitmap walked.
    bitmap: &'a HBitmap,
    /// Where the next search starts.
    pos: u64,
    /// Exclusive end (already clipped to the disk).
    end: u64,
}

impl Iterator for DirtyRanges<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bitmap.next_dirty(self.pos, self.end)?;
        let stop = self.bitmap.next_clean(start, self.end).unwrap_or(self.end);
        self.pos = stop;
        Some((start, stop - start))
    }
}

impl std::iter::FusedIterator for DirtyRanges<'_> {}
