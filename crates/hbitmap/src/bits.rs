//! Word-level bit helpers shared by the chunk and summary code.
//!
//! Bit `i` of a `[u64]` array lives in word `i / 64` at bit `i % 64` counted from the
//! least significant bit, the same order the serialised form uses.

/// Bits per word.
pub(crate) const WORD_BITS: usize = 64;

/// A mask with bits `lo..=hi` set. Requires `lo <= hi < 64`.
#[inline]
pub(crate) fn mask_incl(lo: usize, hi: usize) -> u64 {
    debug_assert!(lo <= hi && hi < WORD_BITS);
    (!0u64 << lo) & (!0u64 >> (WORD_BITS - 1 - hi))
}

/// A mask with the bits from `lo` upwards set. Requires `lo < 64`.
#[inline]
pub(crate) fn mask_from(lo: usize) -> u64 {
    !0u64 << lo
}

/// A mask with the low `n` bits set (`n <= 64`).
#[inline]
pub(crate) fn low_bits(n: usize) -> u64 {
    if n >= WORD_BITS {
        !0
    } else {
        (1u64 << n) - 1
    }
}

/// Sets bits `lo..hi` of `arr` (empty when `lo >= hi`).
pub(crate) fn set_bits(arr: &mut [u64], lo: usize, hi: usize) {
    if lo >= hi {
        return;
    }
    let (first, last) = (lo / WORD_BITS, (hi - 1) / WORD_BITS);
    if first == last {
        arr[first] |= mask_incl(lo % WORD_BITS, (hi - 1) % WORD_BITS);
        return;
    }
    arr[first] |= mask_from(lo % WORD_BITS);
    arr[first + 1..last].fill(!0);
    arr[last] |= mask_incl(0, (hi - 1) % WORD_BITS);
}

/// Clears bits `lo..hi` of `arr` (empty when `lo >= hi`).
pub(crate) fn clear_bits(arr: &mut [u64], lo: usize, hi: usize) {
    if lo >= hi {
        return;
    }
    let (first, last) = (lo / WORD_BITS, (hi - 1) / WORD_BITS);
    if first == last {
        arr[first] &= !mask_incl(lo % WORD_BITS, (hi - 1) % WORD_BITS);
        return;
    }
    arr[first] &= !mask_from(lo % WORD_BITS);
    arr[first + 1..last].fill(0);
    arr[last] &= !mask_incl(0, (hi - 1) % WORD_BITS);
}

/// Index of the lowest set bit of a non-zero word.
#[inline]
pub(crate) fn lowest(word: u64) -> usize {
    debug_assert!(word != 0);
    word.trailing_zeros() as usize
}

/// Reads `n` (1..=64) bits of a little-endian bit stream starting at bit `pos`.
/// Bytes past the end of `buf` read as zero.
#[inline]
pub(crate) fn read_stream_bits(buf: &[u8], pos: u64, n: usize) -> u64 {
    if pos.is_multiple_of(8) && n == WORD_BITS {
        // Whole aligned word: the common case when loading a bitmap.
        let at = usize::try_from(pos / 8).unwrap_or(usize::MAX);
        if let Some(bytes) = buf.get(at..at.saturating_add(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(bytes);
            return u64::from_le_bytes(word);
        }
    }
    let first = usize::try_from(pos / 8).unwrap_or(usize::MAX);
    let shift = (pos % 8) as u32;
    let mut raw = [0u8; 16];
    if let Some(src) = buf.get(first..) {
        let take = src.len().min(9);
        raw[..take].copy_from_slice(&src[..take]);
    }
    ((u128::from_le_bytes(raw) >> shift) as u64) & low_bits(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_incl_covers_exactly_the_inclusive_range() {
        assert_eq!(mask_incl(0, 63), !0);
        assert_eq!(mask_incl(3, 3), 8);
        assert_eq!(mask_incl(60, 63), 0xf << 60);
    }

    #[test]
    fn set_and_clear_bits_span_words() {
        let mut arr = [0u64; 3];
        set_bits(&mut arr, 60, 130);
        assert_eq!(arr, [0xf << 60, !0, 0b11]);
        clear_bits(&mut arr, 62, 129);
        assert_eq!(arr, [0x3 << 60, 0, 0b10]);
    }

    #[test]
    fn read_stream_bits_crosses_byte_boundaries() {
        let buf = [0b1010_0000u8, 0b0000_0111, 0xff];
        assert_eq!(read_stream_bits(&buf, 5, 6), 0b11_1101);
        assert_eq!(read_stream_bits(&buf, 16, 64), 0xff);
        assert_eq!(read_stream_bits(&buf, 100, 8), 0);
    }
}
