//! hbitmap: the hierarchical dirty bitmap behind every named bitmap.
//!
//! (Contract fixed by the skeleton; the implementation fills it in.)
//!
//! One bit ("granule") covers `granularity` bytes of a disk of `size` bytes; the last
//! granule may be partial. Byte-range API: every operation takes byte offsets and touches
//! every granule that intersects the range. Pure data, no I/O, no locking: the block core
//! wraps each bitmap in its node's lock.
