//! L1 and L2 table entries: decoding guest-to-host mappings.
//!
//! The L1 table (one per image, kept in memory) points at L2 tables (one cluster each, cached);
//! each L2 entry maps one guest cluster. This module only interprets entries; the tables live
//! in [`crate::meta::Meta`].

use crate::types::{Geometry, HostOffset};

/// L1/L2 entry bit 63: refcount is exactly one, the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0 (standard, uncompressed): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Host offset bits 9..=55 of an L1 or uncompressed L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Largest host offset representable in an entry (exclusive).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing file (or zeros without one).
    Unallocated,
    /// Reads as zeros; `prealloc` is a host cluster kept allocated for it, if any.
    Zero {
        /// Preallocated host cluster (still refcounted), if any.
        prealloc: Option<HostOffset>,
    },
    /// Data in a host cluster; `copied` means it may be written in place.
    Data {
        /// Start of the host cluster.
        host: HostOffset,
        /// Refcount is one: writable in place.
        copied: bool,
    },
    /// Compressed data starting at `host` spanning `len` bytes (sector granular).
    Compressed {
        /// Host byte offset of the compressed stream.
        host: HostOffset,
        /// Bytes to read: up to the end of the last 512-byte sector it occupies.
        len: u64,
    },
}

/// Why an L2 entry cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry(pub String);

impl L2Entry {
    /// Decode a raw L2 entry.
    pub fn decode(raw: u64, g: Geometry) -> Result<L2Entry, BadEntry> {
        if raw & COMPRESSED != 0 {
            let x = 62 - (g.cluster_bits - 8);
            let host = raw & ((1u64 << x) - 1);
            let sectors = ((raw >> x) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            return Ok(L2Entry::Compressed {
                host: HostOffset(host),
                len,
            });
        }
        let off = raw & OFFSET_MASK;
        if !g.is_aligned(off) {
            return Err(BadEntry(format!(
                "L2 entry {raw:#018x}: host offset {off:#x} is not cluster aligned"
            )));
        }
        let copied = raw & COPIED != 0;
        if raw & ZERO != 0 {
            let prealloc = (off != 0).then_some(HostOffset(off));
            return Ok(L2Entry::Zero { prealloc });
        }
        if off == 0 {
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Data {
            host: HostOffset(off),
            copied,
        })
    }

    /// Host clusters this entry holds a reference on (to drop when it is replaced).
    pub fn referenced_clusters(&self, g: Geometry) -> Vec<u64> {
        match *self {
            L2Entry::Unallocated | L2Entry::Zero { prealloc: None } => Vec::new(),
            L2Entry::Zero { prealloc: Some(h) } | L2Entry::Data { host: h, .. } => {
                vec![g.host_cluster(h).0]
            }
            L2Entry::Compressed { host, len } => {
                let start = host.0 & !511;
                let end = host.0 + len;
                (start >> g.cluster_bits..=(end - 1) >> g.cluster_bits).collect()
            }
        }
    }
}

/// Decode an L1 entry into its L2 table offset (`None` when unallocated).
pub fn l1_l2_offset(raw: u64, g: Geometry) -> Result<Option<HostOffset>, BadEntry> {
    let off = raw & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if !g.is_aligned(off) {
        return Err(BadEntry(format!(
            "L1 entry {raw:#018x}: L2 table offset is not cluster aligned"
        )));
    }
    Ok(Some(HostOffset(off)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G64K: Geometry = Geometry {
        cluster_bits: 16,
        refcount_order: 4,
    };

    #[test]
    fn zero_entry_without_offset_is_plain_zero() {
        assert_eq!(
            L2Entry::decode(1, G64K),
            Ok(L2Entry::Zero { prealloc: None })
        );
    }

    #[test]
    fn data_entry_with_copied_is_writable_in_place() {
        let e = L2Entry::decode(COPIED | 0x50000, G64K);
        assert_eq!(
            e,
            Ok(L2Entry::Data {
                host: HostOffset(0x50000),
                copied: true
            })
        );
    }

    #[test]
    fn unaligned_data_entry_is_rejected() {
        assert!(L2Entry::decode(0x50200, G64K).is_err());
    }

    #[test]
    fn compressed_entry_decodes_offset_and_sector_count() {
        // 64 KiB clusters: x = 54; two additional sectors.
        let raw = COMPRESSED | (2u64 << 54) | 0x12345;
        let e = L2Entry::decode(raw, G64K);
        assert_eq!(
            e,
            Ok(L2Entry::Compressed {
                host: HostOffset(0x12345),
                len: 3 * 512 - 0x145
            })
        );
    }
}
