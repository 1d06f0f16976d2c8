//! Where a store takes a bitmap's bits from: [`BitmapData`], read one bitmap-data cluster at a
//! time into one reused buffer, so storing a sparse bitmap of a large disk materialises only
//! its non-zero clusters (never a dense copy of the whole bitmap).

/// A bitmap's serialized bits (granule `i` is bit `i % 8`, from the least significant, of byte
/// `i / 8`, the layout of [`crate::LoadedBitmap::data`]). Bytes past [`BitmapData::len`] read
/// as zero; bits past the disk are ignored by the store.
pub trait BitmapData: Sync {
    /// Bytes the source holds.
    fn len(&self) -> u64;

    /// Whether the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy bytes `offset .. offset + buf.len()` into `buf` (zero past the end).
    fn read(&self, offset: u64, buf: &mut [u8]);

    /// Whether bytes `offset .. offset + len` are all zero (a `false` only costs a read).
    fn is_zero(&self, offset: u64, len: u64) -> bool;
}

/// The bytes of `data` in `offset .. offset + len`, clipped to it.
fn window(data: &[u8], offset: u64, len: u64) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let end = usize::try_from(offset.saturating_add(len))
        .unwrap_or(usize::MAX)
        .min(data.len());
    &data[start..end]
}

impl BitmapData for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let src = window(self, offset, buf.len() as u64);
        buf[..src.len()].copy_from_slice(src);
        buf[src.len()..].fill(0);
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        window(self, offset, len).iter().all(|&b| b == 0)
    }
}

impl BitmapData for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) {
        BitmapData::read(self.as_slice(), offset, buf)
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        BitmapData::is_zero(self.as_slice(), offset, len)
    }
}

impl<const N: usize> BitmapData for [u8; N] {
    fn len(&self) -> u64 {
        N as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) {
        BitmapData::read(self.as_slice(), offset, buf)
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        BitmapData::is_zero(self.as_slice(), offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_read_zero_past_their_end() {
        let d = vec![1u8, 2, 3];
        let mut buf = [9u8; 4];
        BitmapData::read(&d, 2, &mut buf);
        assert_eq!(buf, [3, 0, 0, 0]);
        assert!(BitmapData::is_zero(&d, 3, 100));
        assert!(!BitmapData::is_zero(&d, 0, 1));
        assert!(BitmapData::is_zero(&d, u64::MAX, 1));
    }
}
