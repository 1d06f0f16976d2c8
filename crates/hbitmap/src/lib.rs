//! hbitmap: the hierarchical dirty bitmap behind every named bitmap.
//!
//! One bit ("granule") covers `granularity` bytes of a disk of `size` bytes; the last
//! granule may be partial. Byte-range API: every operation takes byte offsets and touches
//! every granule that intersects the range. Pure data, no I/O, no locking: the block core
//! wraps each bitmap in its node's lock.
//!
//! ```
//! use hbitmap::HBitmap;
//! let mut b = HBitmap::new(1 << 30, 65536).unwrap();
//! b.set(65535, 2); // touches granules 0 and 1
//! assert_eq!(b.count(), 2 * 65536);
//! assert_eq!(b.dirty_ranges(0, u64::MAX).collect::<Vec<_>>(), [(0, 131072)]);
//! ```
//!
//! # Layout
//!
//! ```text
//!  HBitmap ─ any_dirty: Summary (bit per chunk: has a dirty granule; multi-level)
//!          ─ any_clean: Summary (bit per chunk: has a clean granule; multi-level)
//!          ─ chunks: [Option<Arc<Chunk>>]   None = all clean (costs 8 bytes); shared CoW
//!                          │
//!                          Chunk: 4096 leaf words (2^18 granules; sparse, or dense 32 KiB)
//!                                 nz/nf: bit per word (non-zero / not full) + a top word each
//! ```
//! * `bitmap` — [`HBitmap`]: construction, set/reset, searches, merge, resize.
//! * `chunk` — one leaf chunk and its in-chunk summaries.
//! * `summary` — the dense multi-level summary over chunks.
//! * `serial` — the flat serialised form (qcow2, NBD, QEMU's sha256 input).
//! * [`sha256`] — FIPS 180-4 SHA-256 for `x-debug-block-dirty-bitmap-sha256`.
//! * `error` — [`Error`].
//!
//! Memory: a chunk is allocated the first time one of its granules is dirtied and freed when
//! a reset makes it clean. Its leaf starts sparse (only the non-zero words, ~10 bytes each)
//! and turns dense (32 KiB) once an eighth of its words are non-zero, so scattered dirtying
//! costs memory by dirty words, not by disk size: 1 GiB of scattered 64 KiB writes on a
//! 1 TiB disk at 64 KiB granularity takes ~0.3 MiB instead of 2 MiB. Clean areas cost 8
//! bytes of directory per chunk plus two summary bits; a chunk's fixed part is ~1 KiB.
//! A fully dirty bitmap costs ~1 bit per granule plus ~3 %: 64 GiB at 64 KiB ≈ 130 KiB,
//! 64 TiB at 64 KiB ≈ 130 MiB.
//!
//! Sharing (`shared`): chunks are `Arc`s shared copy-on-write between bitmaps of one disk
//! (clones, merges into clean chunks, [`HBitmap::set_in_all`] marking several bitmaps at
//! once, [`HBitmap::share_identical`]). A shared chunk changes in place only when every
//! holder receives the same change; otherwise the changed bitmaps take a copy first.

#![warn(missing_docs)]

mod bitmap;
mod bits;
mod chunk;
mod error;
mod serial;
pub mod sha256;
mod shared;
mod summary;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod share_proptests;
#[cfg(test)]
mod tests;

pub use bitmap::{DirtyRanges, HBitmap, MAX_GRANULARITY, MAX_GRANULES, MIN_GRANULARITY};
pub use error::Error;
pub use shared::Select;
