//! The crate's one error type.

use std::fmt;

/// Why an [`HBitmap`](crate::HBitmap) operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The granularity is not a power of two in 512..=2^31.
    BadGranularity(u64),
    /// The bitmap would need more than [`MAX_GRANULES`](crate::MAX_GRANULES) granules.
    TooLarge {
        /// Requested disk size in bytes.
        size: u64,
        /// Requested granularity in bytes.
        granularity: u64,
    },
    /// `merge` was given bitmaps covering disks of different sizes.
    SizeMismatch {
        /// Size of the bitmap merged into.
        target: u64,
        /// Size of the bitmap merged from.
        source: u64,
    },
    /// `from_bytes` was given fewer bytes than the bitmap needs.
    ShortBuffer {
        /// Bytes needed (`serialized_len`).
        needed: usize,
        /// Bytes given.
        got: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // QEMU's wording, so the QMP layer can pass it through unchanged.
            Error::BadGranularity(_) => {
                write!(f, "Granularity must be power of 2 and at least 512")
            }
            Error::TooLarge { size, granularity } => write!(
                f,
                "dirty bitmap too large: {size} bytes at granularity {granularity} exceeds {} bits",
                crate::MAX_GRANULES
            ),
            // QEMU's wording (observed on qemu-storage-daemon 10.0.2).
            Error::SizeMismatch { target, source } => write!(
                f,
                "Bitmaps are of different sizes (destination size is {target}, \
                 source size is {source}) and can't be merged"
            ),
            Error::ShortBuffer { needed, got } => {
                write!(f, "bitmap data too short: need {needed} bytes, got {got}")
            }
        }
    }
}

impl std::error::Error for Error {}
