//! [`Chunk`]: one lazily allocated slice of leaf words with its own two-level summaries.
//!
//! A chunk holds up to [`MAX_CHUNK_WORDS`] leaf words (2^18 granules, 32 KiB). Next to
//! the words it keeps two summaries of two levels each:
//! * `nz` bit `j` ⇔ word `j` is non-zero ("has a dirty granule"), `nz_top` bit `k` ⇔ `nz[k] != 0`;
//! * `nf` bit `j` ⇔ word `j` is not full ("has a clean granule"), `nf_top` likewise.
//!
//! The words themselves live in a [`Leaf`]: sparse (non-zero words only) while few are
//! non-zero, dense otherwise; every access goes through `Leaf::get` / `Leaf::set`.
//!
//! Only the last word of the whole bitmap can be partial; `last_mask` gives the valid
//! bits of this chunk's last word (`!0` unless it is that word). Bits outside it stay 0.

use crate::bits::{clear_bits, low_bits, lowest, mask_from, mask_incl, set_bits, WORD_BITS};

/// The leaf words of a chunk: all of them, or only the non-zero ones while few are (sparse
/// dirtying of a large disk leaves most words zero, and the memory then follows the dirty
/// words). A sparse leaf turns dense once an eighth of its words are non-zero.
#[derive(Clone)]
enum Leaf {
    /// Every word.
    Dense(Box<[u64]>),
    /// `len` words, zero except `idx[i]` holding `val[i]` (indices sorted, values non-zero).
    Sparse {
        /// Number of words.
        len: usize,
        /// Indices of the non-zero words.
        idx: Vec<u16>,
        /// Their values.
        val: Vec<u64>,
    },
}

impl Leaf {
    /// Number of words.
    fn len(&self) -> usize {
        match self {
            Leaf::Dense(w) => w.len(),
            Leaf::Sparse { len, .. } => *len,
        }
    }

    /// Word `j` (`j < len`).
    #[inline]
    fn get(&self, j: usize) -> u64 {
        match self {
            Leaf::Dense(w) => w[j],
            Leaf::Sparse { idx, val, .. } => idx.binary_search(&(j as u16)).map_or(0, |k| val[k]),
        }
    }

    /// Set word `j` (`j < len`).
    #[inline]
    fn set(&mut self, j: usize, v: u64) {
        match self {
            Leaf::Dense(w) => w[j] = v,
            Leaf::Sparse { len, idx, val } => {
                match (idx.binary_search(&(j as u16)), v) {
                    (Ok(k), 0) => {
                        idx.remove(k);
                        val.remove(k);
                    }
                    (Ok(k), v) => val[k] = v,
                    (Err(_), 0) => {}
                    (Err(k), v) => {
                        idx.insert(k, j as u16);
                        val.insert(k, v);
                    }
                }
                if idx.len() > *len / 8 {
                    self.make_dense();
                }
            }
        }
    }

    /// Switch to the dense form.
    fn make_dense(&mut self) {
        if let Leaf::Sparse { len, idx, val } = self {
            let mut w = vec![0u64; *len].into_boxed_slice();
            for (&i, &v) in idx.iter().zip(val.iter()) {
                w[i as usize] = v;
            }
            *self = Leaf::Dense(w);
        }
    }

    /// Heap bytes of the words.
    fn heap_bytes(&self) -> usize {
        match self {
            Leaf::Dense(w) => w.len() * 8,
            Leaf::Sparse { idx, val, .. } => idx.capacity() * 2 + val.capacity() * 8,
        }
    }
}

/// Most leaf words a chunk holds (32 KiB of leaf, 2^18 granules).
pub(crate) const MAX_CHUNK_WORDS: usize = 4096;

/// Summary words per chunk: one bit per leaf word.
const SUMMARY_WORDS: usize = MAX_CHUNK_WORDS / WORD_BITS;

/// A chunk of leaf words; see the module doc for the invariants.
#[derive(Clone)]
pub(crate) struct Chunk {
    /// Leaf words: bit `g % 64` of word `g / 64` is local granule `g`.
    words: Leaf,
    /// Bit `j`: `words[j] != 0`.
    nz: [u64; SUMMARY_WORDS],
    /// Bit `j`: `words[j] != full_mask(j)`.
    nf: [u64; SUMMARY_WORDS],
    /// Bit `k`: `nz[k] != 0`.
    nz_top: u64,
    /// Bit `k`: `nf[k] != 0`.
    nf_top: u64,
    /// Valid bits of the last word.
    last_mask: u64,
    /// Set bits in `words`.
    dirty: u32,
}

impl Chunk {
    /// A clean chunk covering `granules` (1..=2^18) granules.
    pub(crate) fn clean(granules: usize) -> Chunk {
        let n = granules.div_ceil(WORD_BITS);
        debug_assert!(n > 0 && n <= MAX_CHUNK_WORDS);
        let mut chunk = Chunk {
            words: Leaf::Sparse {
                len: n,
                idx: Vec::new(),
                val: Vec::new(),
            },
            nz: [0; SUMMARY_WORDS],
            nf: [0; SUMMARY_WORDS],
            nz_top: 0,
            nf_top: low_bits(n.div_ceil(WORD_BITS)),
            last_mask: low_bits(granules - (n - 1) * WORD_BITS),
            dirty: 0,
        };
        set_bits(&mut chunk.nf, 0, n);
        chunk
    }

    /// A chunk covering `granules` granules, all dirty.
    pub(crate) fn full(granules: usize) -> Chunk {
        let n = granules.div_ceil(WORD_BITS);
        let last_mask = low_bits(granules - (n - 1) * WORD_BITS);
        let mut words = vec![!0u64; n].into_boxed_slice();
        words[n - 1] = last_mask;
        let mut chunk = Chunk {
            words: Leaf::Dense(words),
            nz: [0; SUMMARY_WORDS],
            nf: [0; SUMMARY_WORDS],
            nz_top: low_bits(n.div_ceil(WORD_BITS)),
            nf_top: 0,
            last_mask,
            dirty: granules as u32,
        };
        set_bits(&mut chunk.nz, 0, n);
        chunk
    }

    /// A chunk of `granules` granules holding the first granules of `src` (rest clean).
    pub(crate) fn resized(src: &Chunk, granules: usize) -> Chunk {
        let mut chunk = Chunk::clean(granules);
        for j in 0..chunk.words.len().min(src.words.len()) {
            chunk.store(j, src.words.get(j) & chunk.full_mask(j));
        }
        chunk
    }

    /// Granules covered.
    pub(crate) fn granules(&self) -> usize {
        let last = if self.last_mask == !0 {
            WORD_BITS
        } else {
            self.last_mask.count_ones() as usize
        };
        (self.words.len() - 1) * WORD_BITS + last
    }

    /// Dirty granules.
    #[inline]
    pub(crate) fn dirty(&self) -> u64 {
        u64::from(self.dirty)
    }

    /// Whether some granule is dirty.
    #[inline]
    pub(crate) fn has_dirty(&self) -> bool {
        self.nz_top != 0
    }

    /// Whether some granule is clean.
    #[inline]
    pub(crate) fn has_clean(&self) -> bool {
        self.nf_top != 0
    }

    /// Leaf word `j` (0 past the end).
    #[inline]
    pub(crate) fn word(&self, j: usize) -> u64 {
        if j < self.words.len() {
            self.words.get(j)
        } else {
            0
        }
    }

    /// Number of leaf words.
    #[inline]
    pub(crate) fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Whether local granule `l` is dirty.
    #[inline]
    pub(crate) fn get(&self, l: usize) -> bool {
        (self.word(l / WORD_BITS) >> (l % WORD_BITS)) & 1 != 0
    }

    /// Valid bits of word `j`.
    #[inline]
    fn full_mask(&self, j: usize) -> u64 {
        if j + 1 == self.words.len() {
            self.last_mask
        } else {
            !0
        }
    }

    /// Replaces word `j` (which must stay inside `full_mask(j)`), keeping summaries and count.
    #[inline]
    pub(crate) fn store(&mut self, j: usize, new: u64) {
        let old = self.words.get(j);
        if old == new {
            return;
        }
        debug_assert_eq!(new & !self.full_mask(j), 0);
        self.words.set(j, new);
        self.dirty = self.dirty - old.count_ones() + new.count_ones();
        let (k, bit) = (j / WORD_BITS, 1u64 << (j % WORD_BITS));
        if (old == 0) != (new == 0) {
            if new != 0 {
                self.nz[k] |= bit;
                self.nz_top |= 1 << k;
            } else {
                self.nz[k] &= !bit;
                if self.nz[k] == 0 {
                    self.nz_top &= !(1 << k);
                }
            }
        }
        let full = self.full_mask(j);
        if (old == full) != (new == full) {
            if new == full {
                self.nf[k] &= !bit;
                if self.nf[k] == 0 {
                    self.nf_top &= !(1 << k);
                }
            } else {
                self.nf[k] |= bit;
                self.nf_top |= 1 << k;
            }
        }
    }

    /// Sets the bits `mask` (inside `full_mask(j)`) of word `j`: the marking hot path.
    #[inline]
    fn or_word(&mut self, j: usize, mask: u64) {
        let old = self.words.get(j);
        let new = old | mask;
        if new == old {
            return;
        }
        debug_assert_eq!(new & !self.full_mask(j), 0);
        self.words.set(j, new);
        self.dirty += (new ^ old).count_ones();
        let (k, bit) = (j / WORD_BITS, 1u64 << (j % WORD_BITS));
        if old == 0 {
            self.nz[k] |= bit;
            self.nz_top |= 1 << k;
        }
        if new == self.full_mask(j) {
            self.nf[k] &= !bit;
            if self.nf[k] == 0 {
                self.nf_top &= !(1 << k);
            }
        }
    }

    /// Marks local granules `lo..hi` dirty (`lo < hi <= granules()`).
    #[inline]
    pub(crate) fn set_range(&mut self, lo: usize, hi: usize) {
        let (first, last) = (lo / WORD_BITS, (hi - 1) / WORD_BITS);
        if first == last {
            let mask = mask_incl(lo % WORD_BITS, (hi - 1) % WORD_BITS);
            self.or_word(first, mask);
            return;
        }
        self.or_word(first, mask_from(lo % WORD_BITS));
        self.fill_words(first + 1, last, true);
        self.or_word(last, mask_incl(0, (hi - 1) % WORD_BITS));
    }

    /// Marks local granules `lo..hi` clean (`lo < hi <= granules()`).
    pub(crate) fn clear_range(&mut self, lo: usize, hi: usize) {
        let (first, last) = (lo / WORD_BITS, (hi - 1) / WORD_BITS);
        if first == last {
            let mask = mask_incl(lo % WORD_BITS, (hi - 1) % WORD_BITS);
            self.store(first, self.words.get(first) & !mask);
            return;
        }
        self.store(first, self.words.get(first) & !mask_from(lo % WORD_BITS));
        self.fill_words(first + 1, last, false);
        let mask = mask_incl(0, (hi - 1) % WORD_BITS);
        self.store(last, self.words.get(last) & !mask);
    }

    /// Sets words `a..b` to all ones (`on`) or zero. They must not include the last word,
    /// whose mask may be partial; the summaries are updated by range, not word by word.
    fn fill_words(&mut self, a: usize, b: usize, on: bool) {
        if a >= b {
            return;
        }
        debug_assert!(b < self.words.len());
        let before: u32 = match &self.words {
            Leaf::Dense(w) => w[a..b].iter().map(|w| w.count_ones()).sum(),
            Leaf::Sparse { idx, val, .. } => idx
                .iter()
                .zip(val)
                .filter(|(&i, _)| (a..b).contains(&(i as usize)))
                .map(|(_, v)| v.count_ones())
                .sum(),
        };
        let (ka, kb) = (a / WORD_BITS, (b - 1) / WORD_BITS + 1);
        if on {
            if b - a > self.words.len() / 8 {
                self.words.make_dense();
            }
            for j in a..b {
                self.words.set(j, !0);
            }
            self.dirty = self.dirty - before + (WORD_BITS * (b - a)) as u32;
            set_bits(&mut self.nz, a, b);
            set_bits(std::slice::from_mut(&mut self.nz_top), ka, kb);
            clear_bits(&mut self.nf, a, b);
            for k in ka..kb {
                if self.nf[k] == 0 {
                    self.nf_top &= !(1 << k);
                }
            }
        } else {
            match &mut self.words {
                Leaf::Dense(w) => w[a..b].fill(0),
                Leaf::Sparse { idx, val, .. } => {
                    let lo = idx.partition_point(|&i| (i as usize) < a);
                    let hi = idx.partition_point(|&i| (i as usize) < b);
                    idx.drain(lo..hi);
                    val.drain(lo..hi);
                }
            }
            self.dirty -= before;
            clear_bits(&mut self.nz, a, b);
            for k in ka..kb {
                if self.nz[k] == 0 {
                    self.nz_top &= !(1 << k);
                }
            }
            set_bits(&mut self.nf, a, b);
            set_bits(std::slice::from_mut(&mut self.nf_top), ka, kb);
        }
    }

    /// Indices of the non-zero words, ascending (from the `nz` summaries, not a scan).
    fn nonzero_words(&self) -> impl Iterator<Item = usize> + '_ {
        let (mut top, mut k, mut sub) = (self.nz_top, 0, 0u64);
        std::iter::from_fn(move || loop {
            if sub != 0 {
                let j = k * WORD_BITS + lowest(sub);
                sub &= sub - 1;
                return Some(j);
            }
            if top == 0 {
                return None;
            }
            k = lowest(top);
            top &= top - 1;
            sub = self.nz[k];
        })
    }

    /// `self |= other`, where both cover the same granules.
    pub(crate) fn or_from(&mut self, other: &Chunk) {
        debug_assert_eq!(self.words.len(), other.words.len());
        for j in other.nonzero_words() {
            self.store(j, self.words.get(j) | other.words.get(j));
        }
    }

    /// Whether every local granule in `lo..hi` is already dirty (`lo < hi <= granules()`).
    #[inline]
    pub(crate) fn covers(&self, lo: usize, hi: usize) -> bool {
        let (first, last) = (lo / WORD_BITS, (hi - 1) / WORD_BITS);
        if first == last {
            let mask = mask_incl(lo % WORD_BITS, (hi - 1) % WORD_BITS);
            return self.words.get(first) & mask == mask;
        }
        self.next_clean(lo).is_none_or(|l| l >= hi)
    }

    /// Whether some local granule in `lo..hi` is dirty.
    #[inline]
    pub(crate) fn any_dirty_in(&self, lo: usize, hi: usize) -> bool {
        let (first, last) = (lo / WORD_BITS, (hi - 1) / WORD_BITS);
        if first == last {
            let mask = mask_incl(lo % WORD_BITS, (hi - 1) % WORD_BITS);
            return self.words.get(first) & mask != 0;
        }
        self.next_dirty(lo).is_some_and(|l| l < hi)
    }

    /// Whether every dirty granule of `self` is dirty in `other` (same length).
    pub(crate) fn is_subset_of(&self, other: &Chunk) -> bool {
        debug_assert_eq!(self.words.len(), other.words.len());
        if self.dirty > other.dirty {
            return false;
        }
        self.nonzero_words()
            .all(|j| self.words.get(j) & !other.words.get(j) == 0)
    }

    /// Whether both hold the same granules, dirty alike.
    pub(crate) fn same_bits(&self, other: &Chunk) -> bool {
        self.words.len() == other.words.len()
            && self.last_mask == other.last_mask
            && self.dirty == other.dirty
            && self.nz == other.nz
            && self.is_subset_of(other)
    }

    /// A cheap hash of the words (equal bits give equal hashes), to find identical chunks.
    pub(crate) fn bits_hash(&self) -> u64 {
        let mut h = (self.words.len() as u64) ^ (u64::from(self.dirty) << 32);
        for j in self.nonzero_words() {
            h = (h.rotate_left(5) ^ (j as u64) ^ self.words.get(j))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        h
    }

    /// The first dirty local granule at or after `l`.
    pub(crate) fn next_dirty(&self, l: usize) -> Option<usize> {
        let j = l / WORD_BITS;
        if j >= self.words.len() {
            return None;
        }
        let word = self.words.get(j) & mask_from(l % WORD_BITS);
        if word != 0 {
            return Some(j * WORD_BITS + lowest(word));
        }
        let j = next_in_two_levels(self.nz_top, &self.nz, j + 1)?;
        Some(j * WORD_BITS + lowest(self.words.get(j)))
    }

    /// The first clean local granule at or after `l`.
    pub(crate) fn next_clean(&self, l: usize) -> Option<usize> {
        let j = l / WORD_BITS;
        if j >= self.words.len() {
            return None;
        }
        let word = !self.words.get(j) & self.full_mask(j) & mask_from(l % WORD_BITS);
        if word != 0 {
            return Some(j * WORD_BITS + lowest(word));
        }
        let j = next_in_two_levels(self.nf_top, &self.nf, j + 1)?;
        Some(j * WORD_BITS + lowest(!self.words.get(j) & self.full_mask(j)))
    }

    /// Heap bytes used by this chunk (including its box).
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Chunk>() + self.words.heap_bytes()
    }

    /// Checks every summary bit and the count against the words (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut dirty = 0;
        if let Leaf::Sparse { len, idx, val } = &self.words {
            assert!(idx.windows(2).all(|p| p[0] < p[1]), "sparse indices sorted");
            assert!(val.iter().all(|&v| v != 0), "sparse values non-zero");
            assert!(idx.len() <= len / 8, "sparse leaf over its limit");
        }
        for j in 0..self.words.len() {
            let w = self.words.get(j);
            let (k, b) = (j / WORD_BITS, j % WORD_BITS);
            assert_eq!(w & !self.full_mask(j), 0, "bits past the end in word {j}");
            assert_eq!((self.nz[k] >> b) & 1 != 0, w != 0, "nz bit {j}");
            assert_eq!(
                (self.nf[k] >> b) & 1 != 0,
                w != self.full_mask(j),
                "nf bit {j}"
            );
            dirty += w.count_ones();
        }
        for j in self.words.len()..MAX_CHUNK_WORDS {
            let (k, b) = (j / WORD_BITS, j % WORD_BITS);
            assert_eq!((self.nz[k] >> b) & 1, 0, "nz bit {j} past the end");
            assert_eq!((self.nf[k] >> b) & 1, 0, "nf bit {j} past the end");
        }
        for k in 0..SUMMARY_WORDS {
            assert_eq!(
                (self.nz_top >> k) & 1 != 0,
                self.nz[k] != 0,
                "nz_top bit {k}"
            );
            assert_eq!(
                (self.nf_top >> k) & 1 != 0,
                self.nf[k] != 0,
                "nf_top bit {k}"
            );
        }
        assert_eq!(self.dirty, dirty, "chunk count");
    }
}

/// The first set bit at or after `from` of `mid`, with `top` bit `k` ⇔ `mid[k] != 0`.
#[inline]
fn next_in_two_levels(top: u64, mid: &[u64; SUMMARY_WORDS], from: usize) -> Option<usize> {
    let k = from / WORD_BITS;
    let word = mid.get(k)? & mask_from(from % WORD_BITS);
    if word != 0 {
        return Some(k * WORD_BITS + lowest(word));
    }
    if k + 1 >= SUMMARY_WORDS {
        return None;
    }
    let rest = top & mask_from(k + 1);
    if rest == 0 {
        return None;
    }
    let k = lowest(rest);
    Some(k * WORD_BITS + lowest(mid[k]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_range_across_many_words_keeps_summaries_exact() {
        let mut c = Chunk::clean(MAX_CHUNK_WORDS * WORD_BITS);
        c.set_range(100, 70_000);
        c.check();
        assert_eq!(c.dirty(), 69_900);
        assert_eq!(c.next_dirty(0), Some(100));
        assert_eq!(c.next_clean(100), Some(70_000));
    }

    #[test]
    fn clear_range_back_to_empty_reports_no_dirty() {
        let mut c = Chunk::clean(1000);
        c.set_range(10, 900);
        c.clear_range(0, 1000);
        c.check();
        assert!(!c.has_dirty());
        assert_eq!(c.next_dirty(0), None);
    }

    #[test]
    fn full_partial_chunk_has_no_clean_granule() {
        let c = Chunk::full(130);
        c.check();
        assert_eq!(c.granules(), 130);
        assert!(!c.has_clean());
        assert_eq!(c.next_clean(0), None);
    }

    #[test]
    fn resized_chunk_drops_bits_past_new_end() {
        let c = Chunk::full(200);
        let r = Chunk::resized(&c, 70);
        r.check();
        assert_eq!(r.dirty(), 70);
        let g = Chunk::resized(&r, 300);
        g.check();
        assert_eq!(g.dirty(), 70);
        assert_eq!(g.next_clean(0), Some(70));
    }

    #[test]
    fn or_from_unions_words() {
        let mut a = Chunk::clean(5000);
        let mut b = Chunk::clean(5000);
        a.set_range(0, 3);
        b.set_range(2, 4000);
        a.or_from(&b);
        a.check();
        assert_eq!(a.dirty(), 4000);
    }
}
