//! The `null-co` driver: a disk of a given size that discards writes and reads zeros.

use std::io;

use crate::driver::{BlockStatus, Driver, ImageFacts};

/// QEMU's default null-co size: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// A null disk.
pub struct NullDriver {
    size: u64,
    read_zeroes: bool,
}

impl NullDriver {
    /// A null disk of `size` bytes; `read_zeroes` makes reads fill zeros (else the buffer is left as is,
    /// which for us means zeros too: we never expose uninitialised memory).
    pub fn new(size: u64, read_zeroes: bool) -> NullDriver {
        NullDriver { size, read_zeroes }
    }
}

impl Driver for NullDriver {
    fn zero_is_fast(&self, _offset: u64, _len: u64) -> bool {
        true
    }
    fn name(&self) -> &'static str {
        "null-co"
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        Ok((
            if self.read_zeroes {
                BlockStatus::Zero
            } else {
                BlockStatus::Data
            },
            len,
        ))
    }
    fn facts(&self) -> ImageFacts {
        ImageFacts {
            filename: "null-co://".to_string(),
            actual_size: Some(0),
            ..ImageFacts::default()
        }
    }
}
