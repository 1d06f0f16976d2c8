//! [`Summary`]: a dense multi-level "is anything set below?" bitmap over chunks.
//!
//! Level 0 has one bit per item; level `k + 1` has one bit per word of level `k`, set
//! exactly when that word is non-zero. The last level is a single word, so finding the
//! next set item from any position costs one word per level (at most 7 levels for
//! 2^40 items) instead of a scan.

use crate::bits::{lowest, mask_from, set_bits, WORD_BITS};

/// Multi-level summary over `items` bits. See the module doc.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Number of level-0 bits; bits at or past it are always clear.
    items: usize,
    /// `levels[0]` is the item level, the last entry has one word. Empty when `items == 0`.
    levels: Vec<Box<[u64]>>,
}

impl Summary {
    /// A summary over `items` bits, all set when `on`, else all clear.
    pub(crate) fn new(items: usize, on: bool) -> Summary {
        let mut levels = Vec::new();
        let mut bits = items;
        while bits > 0 {
            let words = bits.div_ceil(WORD_BITS);
            levels.push(vec![0u64; words].into_boxed_slice());
            if words == 1 {
                break;
            }
            bits = words;
        }
        let mut summary = Summary { items, levels };
        summary.fill(on);
        summary
    }

    /// Sets every item bit (when `on`) or clears every one, keeping the allocation.
    pub(crate) fn fill(&mut self, on: bool) {
        let mut bits = self.items;
        for level in &mut self.levels {
            level.fill(0);
            if on {
                set_bits(level, 0, bits);
            }
            bits = level.len();
        }
    }

    /// Whether item `i` is set (false past the end).
    #[inline]
    pub(crate) fn get(&self, i: usize) -> bool {
        self.levels
            .first()
            .and_then(|level| level.get(i / WORD_BITS))
            .is_some_and(|word| (word >> (i % WORD_BITS)) & 1 != 0)
    }

    /// Sets item `i` (`i < items`), marking the words above as non-empty.
    fn set(&mut self, mut i: usize) {
        for level in &mut self.levels {
            let word = &mut level[i / WORD_BITS];
            let was_empty = *word == 0;
            *word |= 1 << (i % WORD_BITS);
            if !was_empty {
                return;
            }
            i /= WORD_BITS;
        }
    }

    /// Clears item `i` (`i < items`), clearing the words above that become empty.
    fn clear(&mut self, mut i: usize) {
        for level in &mut self.levels {
            let word = &mut level[i / WORD_BITS];
            *word &= !(1 << (i % WORD_BITS));
            if *word != 0 {
                return;
            }
            i /= WORD_BITS;
        }
    }

    /// Makes item `i` equal `on`; costs one load when it already is.
    #[inline]
    pub(crate) fn assign(&mut self, i: usize, on: bool) {
        if self.get(i) != on {
            if on {
                self.set(i);
            } else {
                self.clear(i);
            }
        }
    }

    /// The first set item at or after `from`.
    pub(crate) fn next_set(&self, from: usize) -> Option<usize> {
        let mut pos = from;
        let mut depth = 0;
        // Climb until a word holds a set bit at or after `pos`.
        loop {
            let level = self.levels.get(depth)?;
            let w = pos / WORD_BITS;
            let word = level.get(w)? & mask_from(pos % WORD_BITS);
            if word != 0 {
                pos = w * WORD_BITS + lowest(word);
                break;
            }
            pos = w + 1;
            depth += 1;
        }
        // Descend: every set bit above guarantees a non-zero word below.
        while depth > 0 {
            depth -= 1;
            pos = pos * WORD_BITS + lowest(self.levels[depth][pos]);
        }
        Some(pos)
    }

    /// Heap bytes used.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.levels.capacity() * std::mem::size_of::<Box<[u64]>>()
            + self.levels.iter().map(|l| l.len() * 8).sum::<usize>()
    }

    /// Checks that every upper bit matches its word below (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        for k in 1..self.levels.len() {
            for (i, word) in self.levels[k - 1].iter().enumerate() {
                let bit = (self.levels[k][i / WORD_BITS] >> (i % WORD_BITS)) & 1 != 0;
                assert_eq!(bit, *word != 0, "summary level {k} bit {i}");
            }
        }
        if let Some(level) = self.levels.first() {
            for i in self.items..level.len() * WORD_BITS {
                assert!(!self.get(i), "summary bit {i} past the end");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_set_finds_item_across_three_levels() {
        let mut s = Summary::new(300_000, false);
        s.assign(5, true);
        s.assign(299_999, true);
        s.check();
        assert_eq!(s.next_set(0), Some(5));
        assert_eq!(s.next_set(6), Some(299_999));
        assert_eq!(s.next_set(300_000), None);
    }

    #[test]
    fn clearing_last_item_empties_upper_levels() {
        let mut s = Summary::new(10_000, false);
        s.assign(4321, true);
        s.assign(4321, false);
        s.check();
        assert_eq!(s.next_set(0), None);
    }

    #[test]
    fn full_summary_has_no_bits_past_the_end() {
        let s = Summary::new(130, true);
        s.check();
        assert_eq!(s.next_set(129), Some(129));
        assert_eq!(s.next_set(130), None);
    }

    #[test]
    fn empty_summary_finds_nothing() {
        let s = Summary::new(0, true);
        assert_eq!(s.next_set(0), None);
        assert!(!s.get(0));
    }
}
