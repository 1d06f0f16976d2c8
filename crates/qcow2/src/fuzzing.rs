//! The entry point shared by the fuzz target (`fuzz/`) and the corpus test.

use std::sync::Arc;

use crate::{MemStorage, OpenOptions, Qcow2};

/// Most bitmap data `open_and_read` loads (a legitimate huge image could need more).
const MAX_BITMAP_BYTES: u64 = 64 << 20;

/// Open `bytes` as an image read-only, read a few ranges, query block status, list and load
/// bitmaps. Any error is fine; a panic, hang or huge allocation is a bug.
pub fn open_and_read(bytes: &[u8]) {
    let storage = Arc::new(MemStorage::from_bytes(bytes.to_vec()));
    let Ok(img) = Qcow2::open(storage, OpenOptions { read_only: true }) else {
        return;
    };
    let size = img.virtual_size();
    let mut buf = vec![0u8; 8192];
    for off in [0, size / 2, size.saturating_sub(4096), 65536, 1 << 20, 4095] {
        if off < size {
            let n = (size - off).min(8192) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            let _ = img.block_status(off, 1 << 22);
        }
    }
    let bitmap_bytes: u64 = img
        .bitmaps()
        .iter()
        .map(|b| size.div_ceil(b.granularity).div_ceil(8))
        .sum();
    if bitmap_bytes <= MAX_BITMAP_BYTES {
        let _ = img.load_bitmaps();
    }
}
