//! Leaf chunks shared between bitmaps of one disk.
//!
//! Bitmaps that hold the same bits in a chunk may hold one `Arc<Chunk>` between them
//! (copy-on-write): clones share every chunk, a merge into a clean chunk shares the
//! source's, [`HBitmap::set_in_all`] gives bitmaps it marks together one chunk, and
//! [`HBitmap::share_identical`] finds identical chunks (bitmaps loaded from an image).
//!
//! The rule that keeps every bitmap's bits its own: a shared chunk changes in place only
//! while every holder gets the very same change. [`HBitmap::set_in_all`] checks that with
//! the strong count: when all holders are among the bitmaps being marked, it marks the
//! chunk once; when anyone else holds it (a job's frozen copy, a disabled bitmap, a clone
//! kept for a transaction's undo), the marked ones get one new copy together and the others
//! keep the old chunk. Every other change (`set`, `reset`, `merge`, `deserialize_part`, ...)
//! goes through [`Arc::make_mut`], i.e. takes a private copy first when the chunk is shared,
//! and only when the change would alter a bit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::chunk::Chunk;
use crate::HBitmap;

/// What two bitmaps must agree on to share a chunk at the same index.
type Geometry = (u64, u32, u32);

/// Picks the bitmap of an item, if it takes part (e.g. only recording bitmaps are marked).
pub type Select<T> = fn(&mut T) -> Option<&mut HBitmap>;

impl HBitmap {
    fn geometry(&self) -> Geometry {
        (
            self.size(),
            self.granularity().trailing_zeros(),
            self.chunk_shift(),
        )
    }

    /// Marks dirty every granule intersecting `offset..offset + len` in every bitmap that
    /// `select` picks from `items`: the same result as calling [`HBitmap::set`] on each, but
    /// a chunk held by several of them (and by no one else) is marked once, and bitmaps
    /// whose chunk is still clean get one new chunk between them. No allocation beyond the
    /// chunks themselves; O(number of items) per touched chunk while chunks are shared.
    pub fn set_in_all<T>(items: &mut [T], select: Select<T>, offset: u64, len: u64) {
        for i in 0..items.len() {
            let Some(b) = select(&mut items[i]) else {
                continue;
            };
            let Some((g0, g1)) = b.granule_span(offset, len) else {
                continue;
            };
            if b.set_if_unshared(g0, g1) {
                continue;
            }
            let geometry = b.geometry();
            for c in b.chunk_of(g0)..=b.chunk_of(g1 - 1) {
                let Some(b) = select(&mut items[i]) else {
                    break;
                };
                let base = b.chunk_base(c);
                let total = b.chunk_granules(c);
                let lo = (g0.max(base) - base) as usize;
                let hi = (g1.min(base + total as u64) - base) as usize;
                let job = Job {
                    geometry,
                    c,
                    lo,
                    hi,
                    total,
                };
                job.run(items, select, i);
            }
        }
    }

    /// The common cases of [`HBitmap::set_in_all`] for one bitmap, as cheap as [`HBitmap::set`]:
    /// granules `g0..g1` lie in one chunk that is already dirty there, or that only this
    /// bitmap holds. Returns false (nothing done) otherwise.
    #[inline]
    fn set_if_unshared(&mut self, g0: u64, g1: u64) -> bool {
        let c = self.chunk_of(g0);
        if c != self.chunk_of(g1 - 1) {
            return false;
        }
        let (lo, hi) = (self.local(g0), self.local(g1 - 1) + 1);
        let Some(ch) = &mut self.chunks[c] else {
            return false;
        };
        if ch.covers(lo, hi) {
            return true;
        }
        if Arc::strong_count(ch) != 1 {
            return false;
        }
        let ch = Arc::make_mut(ch);
        let before = ch.dirty();
        ch.set_range(lo, hi);
        let (after, full) = (ch.dirty(), !ch.has_clean());
        self.add_dirty(before, after);
        if full {
            self.sync(c);
        }
        true
    }

    /// Makes bitmaps of the same geometry that hold identical bits in a chunk share one
    /// copy of it (e.g. after loading several identical bitmaps from an image). Bits never
    /// change.
    pub fn share_identical<T>(items: &mut [T], select: Select<T>) {
        let mut seen: HashMap<(Geometry, usize, u64), Vec<Arc<Chunk>>> = HashMap::new();
        for item in items.iter_mut() {
            let Some(b) = select(item) else { continue };
            let geometry = b.geometry();
            for (c, slot) in b.chunks.iter_mut().enumerate() {
                let Some(ch) = slot else { continue };
                let known = seen.entry((geometry, c, ch.bits_hash())).or_default();
                match known.iter().find(|k| Arc::ptr_eq(k, ch) || k.same_bits(ch)) {
                    Some(k) => *ch = Arc::clone(k),
                    None => known.push(Arc::clone(ch)),
                }
            }
        }
    }

    /// Heap bytes of a set of bitmaps, each chunk shared between them counted once.
    pub fn memory_usage_together<'a>(bitmaps: impl IntoIterator<Item = &'a HBitmap>) -> usize {
        let mut seen = HashSet::new();
        let mut total = 0;
        for b in bitmaps {
            total += b.memory_usage_without_chunks();
            for ch in b.chunks.iter().flatten() {
                if seen.insert(Arc::as_ptr(ch)) {
                    total += ch.heap_bytes();
                }
            }
        }
        total
    }

    /// Distinct leaf chunks held by a set of bitmaps (shared ones once).
    pub fn distinct_chunks<'a>(bitmaps: impl IntoIterator<Item = &'a HBitmap>) -> usize {
        let mut seen = HashSet::new();
        for b in bitmaps {
            for ch in b.chunks.iter().flatten() {
                seen.insert(Arc::as_ptr(ch));
            }
        }
        seen.len()
    }
}

/// Marking local granules `lo..hi` of chunk `c` in every selected bitmap of one geometry.
struct Job {
    geometry: Geometry,
    c: usize,
    lo: usize,
    hi: usize,
    total: usize,
}

impl Job {
    /// Marks the range for item `i` and every later item that holds the same chunk (or,
    /// when `i`'s chunk is clean, every later item whose chunk is clean too). Earlier items
    /// have had their turn, so they already hold the range dirty.
    fn run<T>(&self, items: &mut [T], select: Select<T>, i: usize) {
        let Some(b) = select(&mut items[i]) else {
            return;
        };
        let shared = match &b.chunks[self.c] {
            Some(ch) if ch.covers(self.lo, self.hi) => return,
            Some(ch) if Arc::strong_count(ch) == 1 => {
                self.mark_private(b);
                return;
            }
            Some(ch) => Arc::clone(ch),
            None => {
                self.mark_clean_group(items, select, i);
                return;
            }
        };
        // Clean chunks among the later members first: below, a clean slot marks a holder
        // whose reference was taken out for the in-place change.
        if let Some(j) = self.first_clean_after(items, select, i) {
            self.mark_clean_group(items, select, j);
        }
        let holders = 1 + self.count_holders(items, select, i, &shared);
        // Our clone counts as one more holder.
        if Arc::strong_count(&shared) == holders + 1 {
            self.mark_in_place(items, select, i, shared);
        } else {
            self.mark_joint_copy(items, select, i, shared);
        }
    }

    /// Marks a chunk only `b` holds.
    fn mark_private(&self, b: &mut HBitmap) {
        if let Some(ch) = &mut b.chunks[self.c] {
            let ch = Arc::make_mut(ch);
            let before = ch.dirty();
            ch.set_range(self.lo, self.hi);
            let after = ch.dirty();
            self.account(b, before, after);
        }
    }

    /// Whether item `j` takes part with this geometry; its bitmap if so.
    fn member<'a, T>(&self, item: &'a mut T, select: Select<T>) -> Option<&'a mut HBitmap> {
        select(item).filter(|b| b.geometry() == self.geometry)
    }

    fn first_clean_after<T>(&self, items: &mut [T], select: Select<T>, i: usize) -> Option<usize> {
        (i + 1..items.len()).find(|&j| {
            self.member(&mut items[j], select)
                .is_some_and(|b| b.chunks[self.c].is_none())
        })
    }

    fn count_holders<T>(
        &self,
        items: &mut [T],
        select: Select<T>,
        i: usize,
        shared: &Arc<Chunk>,
    ) -> usize {
        items[i + 1..]
            .iter_mut()
            .filter_map(|item| self.member(item, select))
            .filter(|b| {
                b.chunks[self.c]
                    .as_ref()
                    .is_some_and(|ch| Arc::ptr_eq(ch, shared))
            })
            .count()
    }

    /// Items `from..` whose chunk is clean get one new chunk with the range dirty.
    fn mark_clean_group<T>(&self, items: &mut [T], select: Select<T>, from: usize) {
        let mut block = Chunk::clean(self.total);
        block.set_range(self.lo, self.hi);
        let block = Arc::new(block);
        let after = block.dirty();
        for item in &mut items[from..] {
            let Some(b) = self.member(item, select) else {
                continue;
            };
            if b.chunks[self.c].is_none() {
                b.chunks[self.c] = Some(Arc::clone(&block));
                self.account(b, 0, after);
            }
        }
    }

    /// Every holder of `shared` is an item from `i` on: mark it once, in place.
    fn mark_in_place<T>(&self, items: &mut [T], select: Select<T>, i: usize, shared: Arc<Chunk>) {
        // Take every holder's reference out, so that ours is the only one left.
        let mut ours = shared;
        for item in &mut items[i..] {
            if let Some(b) = self.member(item, select) {
                if b.chunks[self.c]
                    .as_ref()
                    .is_some_and(|ch| Arc::ptr_eq(ch, &ours))
                {
                    b.chunks[self.c] = None;
                }
            }
        }
        // Unique now (no one else held it); were it not, make_mut would copy, still exact.
        let ch = Arc::make_mut(&mut ours);
        let before = ch.dirty();
        ch.set_range(self.lo, self.hi);
        let after = ch.dirty();
        // The clean slots from `i` on are exactly the holders: clean non-holders were
        // given a chunk before.
        for item in &mut items[i..] {
            if let Some(b) = self.member(item, select) {
                if b.chunks[self.c].is_none() {
                    b.chunks[self.c] = Some(Arc::clone(&ours));
                    self.account(b, before, after);
                }
            }
        }
    }

    /// Someone outside the marked items holds `shared`: the holders among the items get
    /// one marked copy together; the others keep `shared` as it is.
    fn mark_joint_copy<T>(&self, items: &mut [T], select: Select<T>, i: usize, shared: Arc<Chunk>) {
        let mut copy = Chunk::clone(&shared);
        let before = copy.dirty();
        copy.set_range(self.lo, self.hi);
        let after = copy.dirty();
        let copy = Arc::new(copy);
        for item in &mut items[i..] {
            if let Some(b) = self.member(item, select) {
                if b.chunks[self.c]
                    .as_ref()
                    .is_some_and(|ch| Arc::ptr_eq(ch, &shared))
                {
                    b.chunks[self.c] = Some(Arc::clone(&copy));
                    self.account(b, before, after);
                }
            }
        }
    }

    /// Brings `b`'s count and summaries in line after chunk `c` went from `before` to
    /// `after` dirty granules.
    fn account(&self, b: &mut HBitmap, before: u64, after: u64) {
        b.add_dirty(before, after);
        b.sync(self.c);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const TIB: u64 = 1 << 40;
    const CLUSTER: u64 = 65536;

    fn all(b: &mut HBitmap) -> Option<&mut HBitmap> {
        Some(b)
    }

    /// `n` pseudo-random cluster-aligned offsets on a 1 TiB disk (the bench's pattern).
    fn offsets(n: usize) -> impl Iterator<Item = u64> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..n).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (TIB / CLUSTER)) * CLUSTER
        })
    }

    fn bitmaps(n: usize) -> Vec<HBitmap> {
        (0..n)
            .map(|_| HBitmap::new(TIB, CLUSTER).expect("valid"))
            .collect()
    }

    #[test]
    fn bitmaps_marked_together_hold_one_bitmaps_leaves() {
        let mut set = bitmaps(64);
        let mut alone = HBitmap::new(TIB, CLUSTER).expect("valid");
        for off in offsets(16384) {
            HBitmap::set_in_all(&mut set, all, off, CLUSTER);
            alone.set(off, CLUSTER);
        }
        let together = HBitmap::memory_usage_together(&set);
        let directories = 64 * alone.memory_usage_without_chunks();
        assert!(set.iter().all(|b| *b == alone));
        assert_eq!(HBitmap::distinct_chunks(&set), alone.allocated_chunks());
        assert!(
            together <= alone.memory_usage() + directories,
            "64 bitmaps hold {together} bytes, one alone {}",
            alone.memory_usage()
        );
    }

    #[test]
    fn a_kept_copy_keeps_its_bits_and_the_marked_bitmaps_share_one_new_block() {
        let mut set = bitmaps(4);
        HBitmap::set_in_all(&mut set, all, 0, CLUSTER);
        let frozen = set[0].clone();
        HBitmap::set_in_all(&mut set, all, 5 * CLUSTER, CLUSTER);
        assert_eq!(frozen.dirty_granules(), 1);
        assert!(set.iter().all(|b| b.dirty_granules() == 2));
        assert_eq!(HBitmap::distinct_chunks(&set), 1);
        assert_eq!(HBitmap::distinct_chunks(set.iter().chain([&frozen])), 2);
    }

    #[test]
    fn marking_a_disabled_bitmaps_block_leaves_it_alone() {
        let mut set = bitmaps(3);
        HBitmap::set_in_all(&mut set, all, 0, CLUSTER);
        let (enabled, disabled) = set.split_at_mut(2);
        HBitmap::set_in_all(enabled, all, CLUSTER, CLUSTER);
        assert_eq!(disabled[0].dirty_granules(), 1);
        assert_eq!(enabled[0].dirty_granules(), 2);
        assert_eq!(enabled[1].dirty_granules(), 2);
        assert_eq!(HBitmap::distinct_chunks(&set), 2);
    }

    #[test]
    fn identical_loaded_bitmaps_share_and_others_do_not() {
        let mut set = bitmaps(3);
        for b in &mut set {
            b.set(0, CLUSTER);
        }
        set[2].set(CLUSTER, CLUSTER);
        HBitmap::share_identical(&mut set, all);
        assert_eq!(HBitmap::distinct_chunks(&set), 2);
        set[0].reset(0, CLUSTER);
        assert_eq!(set[1].dirty_granules(), 1);
        assert_eq!(set[0].dirty_granules(), 0);
    }

    /// Timing, printed not asserted (`--nocapture`): 64 bitmaps marked one by one vs
    /// together, 1 GiB of scattered 64 KiB writes on 1 TiB.
    #[test]
    fn marking_many_bitmaps_together_timing() {
        let writes: Vec<u64> = offsets(16384).collect();
        let mut one_by_one = bitmaps(64);
        let start = Instant::now();
        for &off in &writes {
            for b in &mut one_by_one {
                b.set(off, CLUSTER);
            }
        }
        let separate = start.elapsed();
        let mut set = bitmaps(64);
        let start = Instant::now();
        for &off in &writes {
            HBitmap::set_in_all(&mut set, all, off, CLUSTER);
        }
        let together = start.elapsed();
        assert!(set.iter().zip(&one_by_one).all(|(a, b)| a == b));
        println!(
            "64 bitmaps x {} writes: one by one {:?} ({:?}/write), together {:?} ({:?}/write); \
             memory {} vs {} bytes",
            writes.len(),
            separate,
            separate / writes.len() as u32,
            together,
            together / writes.len() as u32,
            HBitmap::memory_usage_together(&one_by_one),
            HBitmap::memory_usage_together(&set),
        );
    }
}
