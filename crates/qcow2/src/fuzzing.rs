//! The entry point shared by the fuzz target (`fuzz/`) and the corpus test.

use std::sync::Arc;

use crate::{MemStorage, OpenOptions, Qcow2};

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
    // The loader bounds every allocation itself (see `bitmaps::check_memory`).
    let _ = img.load_bitmaps();
}

/// Open `bytes` writable (in memory, capped at 256 MiB), write, zero, discard and flush a
/// little, then close. Errors are fine; a panic, hang or huge allocation is a bug.
pub fn open_and_write(bytes: &[u8]) {
    let storage = Arc::new(MemStorage::from_bytes(bytes.to_vec()).with_limit(256 << 20));
    let Ok(img) = Qcow2::open(storage, OpenOptions { read_only: false }) else {
        return;
    };
    let size = img.virtual_size();
    let data = vec![0xa5u8; 6000];
    for off in [0, size / 3, size.saturating_sub(6000), 4095] {
        if off < size {
            let n = (size - off).min(6000) as usize;
            let _ = img.write_at(&data[..n], off);
        }
    }
    let _ = img.write_zeroes(0, size.min(1 << 20), true);
    let _ = img.discard(size / 2, size.min(1 << 20) / 2);
    let _ = img.flush();
    let mut buf = vec![0u8; 6000];
    let n = size.min(6000) as usize;
    let _ = img.read_at(&mut buf[..n], 0);
    let _ = img.close();
}
