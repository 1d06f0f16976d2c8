//! Serialisation: the flat bit layout shared by qcow2 persistence, NBD and QEMU's hash.
//!
//! Granule `i` is bit `i % 8` (from the least significant) of byte `i / 8`. This equals
//! the leaf words written out little-endian, so QEMU's level-0 array and the qcow2 bitmap
//! data are both slices of the same byte stream.

use crate::bits::{low_bits, read_stream_bits, WORD_BITS};
use crate::sha256::Sha256;
use crate::{Error, HBitmap};

impl HBitmap {
    /// Bytes of the serialised form: `ceil(granules / 8)`.
    pub fn serialized_len(&self) -> usize {
        usize::try_from(self.granules().div_ceil(8)).unwrap_or(usize::MAX)
    }

    /// Writes the bits of granules `start_granule .. start_granule + 8 * buf.len()` into
    /// `buf`; bits past the last granule are 0. `start_granule` should be a multiple of 8
    /// (any value works, each byte then starts at an unaligned granule).
    pub fn serialize_part(&self, start_granule: u64, buf: &mut [u8]) {
        if start_granule.is_multiple_of(WORD_BITS as u64) {
            self.serialize_words(start_granule / WORD_BITS as u64, buf);
            return;
        }
        for (i, out) in buf.chunks_mut(8).enumerate() {
            let bits = (i as u64)
                .checked_mul(WORD_BITS as u64)
                .and_then(|d| start_granule.checked_add(d))
                .map_or(0, |g| self.bits_at(g));
            out.copy_from_slice(&bits.to_le_bytes()[..out.len()]);
        }
    }

    /// [`Self::serialize_part`] from leaf word `j` on: copies whole chunks of words and
    /// zero-fills absent ones.
    fn serialize_words(&self, mut j: u64, mut out: &mut [u8]) {
        let shift = self.chunk_word_shift();
        while !out.is_empty() {
            let local = (j & ((1 << shift) - 1)) as usize;
            let span = (1usize << shift) - local;
            let (head, rest) = out.split_at_mut(out.len().min(span * 8));
            match self.chunk(j >> shift) {
                Some(ch) => {
                    let words = local..ch.word_count().max(local);
                    let mut pieces = head.chunks_mut(8);
                    for (j, piece) in words.zip(&mut pieces) {
                        piece.copy_from_slice(&ch.word(j).to_le_bytes()[..piece.len()]);
                    }
                    pieces.for_each(|piece| piece.fill(0));
                }
                None => head.fill(0),
            }
            out = rest;
            j = j.saturating_add(span as u64);
        }
    }

    /// Overwrites granules `start_granule ..` with the bits of `buf` (layout of
    /// [`Self::serialize_part`]); bits past the last granule are ignored. All-zero input
    /// over clean areas allocates nothing.
    pub fn deserialize_part(&mut self, start_granule: u64, buf: &[u8]) {
        let stream_bits = (buf.len() as u64).saturating_mul(8);
        let end = start_granule
            .saturating_add(stream_bits)
            .min(self.granules());
        if start_granule < end {
            self.write_granules(start_granule, end, |g, n| {
                read_stream_bits(buf, g - start_granule, n)
            });
        }
    }

    /// The whole bitmap in serialised form ([`Self::serialized_len`] bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.serialized_len()];
        self.serialize_part(0, &mut buf);
        buf
    }

    /// A bitmap over `size` bytes at `granularity` loaded from its serialised form.
    /// `bytes` may be longer than needed (e.g. whole qcow2 clusters; the excess is
    /// ignored) but not shorter.
    pub fn from_bytes(size: u64, granularity: u64, bytes: &[u8]) -> Result<HBitmap, Error> {
        let mut bitmap = HBitmap::new(size, granularity)?;
        let needed = bitmap.serialized_len();
        if bytes.len() < needed {
            return Err(Error::ShortBuffer {
                needed,
                got: bytes.len(),
            });
        }
        bitmap.deserialize_part(0, bytes);
        Ok(bitmap)
    }

    /// The bytes QEMU hashes for `x-debug-block-dirty-bitmap-sha256`: the leaf array of
    /// `max(ceil(granules / 64), 1)` 64-bit words, each little-endian.
    pub fn qemu_hash_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.hash_words() as usize * 8];
        self.serialize_part(0, &mut buf);
        buf
    }

    /// SHA-256 of [`Self::qemu_hash_bytes`], computed without materialising them.
    pub fn qemu_sha256(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let mut block = [0u8; 4096];
        let words = self.hash_words();
        let mut j = 0;
        while j < words {
            let n = (words - j).min(block.len() as u64 / 8) as usize;
            for (k, out) in block[..n * 8].chunks_exact_mut(8).enumerate() {
                out.copy_from_slice(&self.word(j + k as u64).to_le_bytes());
            }
            hasher.update(&block[..n * 8]);
            j += n as u64;
        }
        hasher.finalize()
    }

    /// Words in QEMU's leaf array: `max(ceil(granules / 64), 1)`.
    fn hash_words(&self) -> u64 {
        self.granules().div_ceil(WORD_BITS as u64).max(1)
    }

    /// Bits of granules `g .. g + 64` (bit k = granule g + k); 0 past the end.
    fn bits_at(&self, g: u64) -> u64 {
        let j = g / WORD_BITS as u64;
        let shift = (g % WORD_BITS as u64) as usize;
        let low = self.word(j) >> shift;
        if shift == 0 {
            return low;
        }
        let high = self.word(j + 1) & low_bits(shift);
        low | (high << (WORD_BITS - shift))
    }
}
