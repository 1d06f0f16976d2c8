//! A raw DEFLATE (RFC 1951) decoder for compressed clusters.
//!
//! QEMU writes each compressed cluster as a raw deflate stream (no zlib header). A cluster is
//! decoded into a buffer of exactly one cluster; decoding stops as soon as the buffer is full,
//! and a stream that ends earlier, or is malformed, is an error. The output buffer doubles as
//! the history window, since a stream never refers back beyond its own cluster.

use std::fmt;

/// Why a stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflateError(&'static str);

impl fmt::Display for InflateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Base lengths of length codes 257..=285.
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
/// Extra bits of length codes 257..=285.
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Base distances of distance codes 0..=29.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
/// Extra bits of distance codes 0..=29.
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// Order in which code length code lengths are transmitted.
const CLEN_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];
/// Longest Huffman code.
const MAX_BITS: usize = 15;

/// Reads the input LSB-first.
struct Bits<'a> {
    /// The compressed bytes.
    input: &'a [u8],
    /// Next byte to load.
    pos: usize,
    /// Buffered bits (low bits first).
    buf: u64,
    /// Number of valid bits in `buf`.
    count: u32,
}

impl Bits<'_> {
    /// Take `n` (≤ 32) bits.
    fn take(&mut self, n: u32) -> Result<u32, InflateError> {
        while self.count < n {
            let byte = *self
                .input
                .get(self.pos)
                .ok_or(InflateError("compressed data ends early"))?;
            self.pos += 1;
            self.buf |= (byte as u64) << self.count;
            self.count += 8;
        }
        let v = (self.buf & ((1u64 << n) - 1)) as u32;
        self.buf >>= n;
        self.count -= n;
        Ok(v)
    }

    /// Drop bits up to the next byte boundary.
    fn align(&mut self) {
        let drop = self.count % 8;
        self.buf >>= drop;
        self.count -= drop;
    }
}

/// A canonical Huffman code: number of codes per length and symbols in code order.
struct Huffman {
    /// `counts[len]` = number of codes of that length.
    counts: [u16; MAX_BITS + 1],
    /// Symbols sorted by code.
    symbols: Vec<u16>,
}

impl Huffman {
    /// Build from code lengths per symbol (0 = unused). Rejects over-subscribed codes.
    fn new(lengths: &[u8]) -> Result<Huffman, InflateError> {
        let mut counts = [0u16; MAX_BITS + 1];
        for &l in lengths {
            counts[l as usize] += 1;
        }
        counts[0] = 0;
        let mut left: i32 = 1;
        for &c in &counts[1..] {
            left = left * 2 - c as i32;
            if left < 0 {
                return Err(InflateError("over-subscribed Huffman code"));
            }
        }
        let mut offs = [0u16; MAX_BITS + 2];
        for len in 1..=MAX_BITS {
            offs[len + 1] = offs[len] + counts[len];
        }
        let mut symbols = vec![0u16; offs[MAX_BITS + 1] as usize];
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbols[offs[l as usize] as usize] = sym as u16;
                offs[l as usize] += 1;
            }
        }
        Ok(Huffman { counts, symbols })
    }

    /// Decode one symbol, reading the code MSB-first one bit at a time.
    fn decode(&self, bits: &mut Bits<'_>) -> Result<u16, InflateError> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..=MAX_BITS {
            code |= bits.take(1)? as i32;
            let count = self.counts[len] as i32;
            if code - first < count {
                return self
                    .symbols
                    .get((index + code - first) as usize)
                    .copied()
                    .ok_or(InflateError("bad Huffman code"));
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err(InflateError("invalid Huffman code"))
    }
}

/// Decode a raw deflate stream from `input` until `out` is full.
pub fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), InflateError> {
    let mut bits = Bits {
        input,
        pos: 0,
        buf: 0,
        count: 0,
    };
    let mut pos = 0usize;
    loop {
        if pos == out.len() {
            return Ok(());
        }
        let last = bits.take(1)? == 1;
        match bits.take(2)? {
            0 => stored(&mut bits, out, &mut pos)?,
            1 => {
                let (lit, dist) = fixed_codes()?;
                codes(&mut bits, out, &mut pos, &lit, &dist)?;
            }
            2 => {
                let (lit, dist) = dynamic_codes(&mut bits)?;
                codes(&mut bits, out, &mut pos, &lit, &dist)?;
            }
            _ => return Err(InflateError("invalid block type")),
        }
        if last && pos < out.len() {
            return Err(InflateError(
                "compressed stream ends before the cluster is full",
            ));
        }
    }
}

/// Copy a stored block.
fn stored(bits: &mut Bits<'_>, out: &mut [u8], pos: &mut usize) -> Result<(), InflateError> {
    bits.align();
    let len = bits.take(16)?;
    let nlen = bits.take(16)?;
    if len != !nlen & 0xffff {
        return Err(InflateError("stored block length check failed"));
    }
    for _ in 0..len {
        if *pos == out.len() {
            return Ok(());
        }
        out[*pos] = bits.take(8)? as u8;
        *pos += 1;
    }
    Ok(())
}

/// The fixed literal/length and distance codes.
fn fixed_codes() -> Result<(Huffman, Huffman), InflateError> {
    let mut l = [0u8; 288];
    l[..144].fill(8);
    l[144..256].fill(9);
    l[256..280].fill(7);
    l[280..].fill(8);
    Ok((Huffman::new(&l)?, Huffman::new(&[5u8; 30])?))
}

/// Read the code descriptions of a dynamic block.
fn dynamic_codes(bits: &mut Bits<'_>) -> Result<(Huffman, Huffman), InflateError> {
    let nlen = bits.take(5)? as usize + 257;
    let ndist = bits.take(5)? as usize + 1;
    let ncode = bits.take(4)? as usize + 4;
    if nlen > 286 || ndist > 30 {
        return Err(InflateError("bad code counts"));
    }
    let mut clen = [0u8; 19];
    for &i in CLEN_ORDER.iter().take(ncode) {
        clen[i] = bits.take(3)? as u8;
    }
    let clcode = Huffman::new(&clen)?;
    let mut lengths = vec![0u8; nlen + ndist];
    let mut i = 0;
    while i < nlen + ndist {
        let sym = clcode.decode(bits)?;
        let (value, repeat) = match sym {
            0..=15 => (sym as u8, 1),
            16 => {
                let prev = *lengths
                    .get(i.wrapping_sub(1))
                    .ok_or(InflateError("repeat with no previous length"))?;
                (prev, 3 + bits.take(2)? as usize)
            }
            17 => (0, 3 + bits.take(3)? as usize),
            _ => (0, 11 + bits.take(7)? as usize),
        };
        if i + repeat > nlen + ndist {
            return Err(InflateError("code lengths overflow"));
        }
        lengths[i..i + repeat].fill(value);
        i += repeat;
    }
    if lengths[256] == 0 {
        return Err(InflateError("no end-of-block code"));
    }
    Ok((
        Huffman::new(&lengths[..nlen])?,
        Huffman::new(&lengths[nlen..])?,
    ))
}

/// Decode literals and matches until end of block (or until `out` is full).
fn codes(
    bits: &mut Bits<'_>,
    out: &mut [u8],
    pos: &mut usize,
    lit: &Huffman,
    dist: &Huffman,
) -> Result<(), InflateError> {
    loop {
        let sym = lit.decode(bits)? as usize;
        if sym < 256 {
            if *pos == out.len() {
                return Ok(());
            }
            out[*pos] = sym as u8;
            *pos += 1;
            continue;
        }
        if sym == 256 {
            return Ok(());
        }
        let i = sym - 257;
        if i >= LEN_BASE.len() {
            return Err(InflateError("bad length code"));
        }
        let len = LEN_BASE[i] as usize + bits.take(LEN_EXTRA[i] as u32)? as usize;
        let d = dist.decode(bits)? as usize;
        if d >= DIST_BASE.len() {
            return Err(InflateError("bad distance code"));
        }
        let distance = DIST_BASE[d] as usize + bits.take(DIST_EXTRA[d] as u32)? as usize;
        if distance > *pos {
            return Err(InflateError(
                "distance reaches before the start of the cluster",
            ));
        }
        for _ in 0..len {
            if *pos == out.len() {
                return Ok(());
            }
            out[*pos] = out[*pos - distance];
            *pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_block_copies_bytes() {
        // final stored block, len 3, "abc"
        let input = [0x01, 0x03, 0x00, 0xfc, 0xff, b'a', b'b', b'c'];
        let mut out = [0u8; 3];
        inflate(&input, &mut out).expect("valid");
        assert_eq!(&out, b"abc");
    }

    #[test]
    fn fixed_block_with_back_reference_expands() {
        // Raw deflate of b"aaaaaaaaaa" (fixed Huffman): literal 'a' + match len 9 dist 1.
        let input = [0x4b, 0x4c, 0x84, 0x01, 0x00];
        let mut out = [0u8; 10];
        inflate(&input, &mut out).expect("valid");
        assert_eq!(&out, b"aaaaaaaaaa");
    }

    #[test]
    fn stream_ending_early_is_an_error() {
        let input = [0x01, 0x03, 0x00, 0xfc, 0xff, b'a', b'b', b'c'];
        let mut out = [0u8; 4];
        assert!(inflate(&input, &mut out).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for seed in 0u32..200 {
            let input: Vec<u8> = (0..64)
                .map(|i| (seed.wrapping_mul(2654435761) >> (i % 24)) as u8 ^ i as u8)
                .collect();
            let mut out = [0u8; 512];
            let _ = inflate(&input, &mut out);
        }
    }
}
