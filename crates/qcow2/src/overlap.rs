//! Metadata overlap rules: no two structures may share a host cluster, and nothing the image
//! writes for itself may land on a cluster that guest data uses.
//!
//! Two checks live here:
//! - at open, the bitmap directory, every bitmap table and every bitmap data cluster are
//!   checked against the header, L1 table, refcount table and blocks, L2 tables and each
//!   other (as QEMU's metadata overlap check does for the structures it knows), and an image
//!   that breaks the rules is refused before anything is freed or written;
//! - before a cluster below the end of the file is handed out again, the allocator asks
//!   whether an L2 entry still maps it. That happens only when a refcount is too low (a
//!   corruption `qemu-img check` reports); the image is then marked corrupt instead of
//!   having guest data overwritten.
//!
//! The second check needs the set of host clusters that L2 entries map. It is built from the
//! L2 tables the first time a reused cluster is about to be handed out (a bit per cluster of
//! the file, so bounded by the file's size), then kept current: new mappings add to it and a
//! cluster whose refcount drops to zero leaves it.

use std::collections::HashMap;

use crate::bitmaps::{BitmapEntry, FLAG_IN_USE};
use crate::error::{invalid, Result};
use crate::header::BitmapsExt;
use crate::mapping::{l1_l2_offset, L2Entry};
use crate::meta::Meta;
use crate::ondisk::be64_at;

/// Bit set of host clusters mapped by L2 entries of the active layer.
#[derive(Debug, Default)]
pub struct GuestRefs {
    /// Bit `c % 64` of word `c / 64`: host cluster `c` is mapped.
    words: Vec<u64>,
}

impl GuestRefs {
    /// Whether host cluster `c` is mapped.
    pub fn contains(&self, c: u64) -> bool {
        self.words
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    /// Record host cluster `c` as mapped (`c` is below the file's end in clusters, or was
    /// just allocated: the set grows with the file).
    pub fn insert(&mut self, c: u64) {
        let i = (c / 64) as usize;
        if i >= self.words.len() {
            self.words.resize(i + 1, 0);
        }
        self.words[i] |= 1 << (c % 64);
    }

    /// Forget host cluster `c`.
    pub fn remove(&mut self, c: u64) {
        if let Some(w) = self.words.get_mut((c / 64) as usize) {
            *w &= !(1 << (c % 64));
        }
    }
}

impl Meta {
    /// What the metadata cluster `c` holds, in words (for error messages).
    pub fn describe_cluster(&self, c: u64) -> String {
        let g = self.geo;
        let r = self.header.raw;
        let within = |off: u64, bytes: u64| {
            let first = off >> g.cluster_bits;
            c >= first && c < first + g.clusters_for(bytes)
        };
        if c == 0 {
            return "the image header".into();
        }
        if within(r.l1_table_offset, r.l1_size as u64 * 8) {
            return "the active L1 table".into();
        }
        if within(
            r.refcount_table_offset,
            r.refcount_table_clusters as u64 * g.cluster_size(),
        ) {
            return "the refcount table".into();
        }
        let off = c << g.cluster_bits;
        if self.rt.iter().any(|&e| e & !511 == off) {
            return "a refcount block".into();
        }
        if self
            .l1
            .iter()
            .any(|&e| matches!(l1_l2_offset(e, g), Ok(Some(h)) if h.0 == off))
        {
            return "an active L2 table".into();
        }
        "other metadata".into()
    }

    /// Check the bitmap directory, tables and data clusters against all other metadata and
    /// each other (at open, before anything may be freed); then record them as metadata.
    pub fn check_bitmap_layout(&mut self, ext: &BitmapsExt, entries: &[BitmapEntry]) -> Result<()> {
        let g = self.geo;
        let mut owner: HashMap<u64, String> = HashMap::new();
        let dir_first = ext.directory_offset >> g.cluster_bits;
        for c in dir_first..dir_first + g.clusters_for(ext.directory_size) {
            if self.meta_clusters.contains(&c) {
                return Err(invalid(format!(
                    "bitmap directory overlaps {}",
                    self.describe_cluster(c)
                )));
            }
            owner.insert(c, "the bitmap directory".into());
        }
        for e in entries {
            let first = e.table_offset >> g.cluster_bits;
            for c in first..first + g.clusters_for(e.table_size as u64 * 8) {
                self.claim_cluster(&mut owner, c, e, "bitmap table")?;
                owner.insert(c, format!("the bitmap table of '{}'", e.name));
            }
        }
        for e in entries {
            let table = match self.read_bitmap_table(e) {
                Ok(t) => t,
                // An in-use bitmap's data is never read; its table is checked when it is freed.
                Err(_) if e.flags & FLAG_IN_USE != 0 => continue,
                Err(err) => return Err(err),
            };
            for t in table {
                let off = t & crate::mapping::OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                let c = off >> g.cluster_bits;
                self.claim_cluster(&mut owner, c, e, "data cluster")?;
                owner.insert(c, format!("data of bitmap '{}'", e.name));
            }
        }
        self.meta_clusters.extend(owner.into_keys());
        Ok(())
    }

    /// Refuse cluster `c` for bitmap `e` if other metadata or another bitmap structure has it.
    fn claim_cluster(
        &self,
        owner: &mut HashMap<u64, String>,
        c: u64,
        e: &BitmapEntry,
        what: &str,
    ) -> Result<()> {
        let other = if self.meta_clusters.contains(&c) {
            Some(self.describe_cluster(c))
        } else {
            owner.get(&c).cloned()
        };
        match other {
            Some(other) => Err(invalid(format!(
                "Bitmap '{}': {what} at {:#x} overlaps {other}",
                e.name,
                c << self.geo.cluster_bits
            ))),
            None => Ok(()),
        }
    }

    /// Whether an L2 entry of the active layer maps host cluster `c` (builds the set of
    /// mapped clusters on first use).
    pub fn guest_maps(&mut self, c: u64) -> Result<bool> {
        if self.guest_refs.is_none() {
            let refs = self.scan_guest_refs()?;
            self.guest_refs = Some(refs);
        }
        Ok(self.guest_refs.as_ref().is_some_and(|r| r.contains(c)))
    }

    /// Read every active L2 table (the cached copy when there is one) and collect the host
    /// clusters its entries map. Entries beyond the end of the file are ignored here (they
    /// are refused when used).
    fn scan_guest_refs(&mut self) -> Result<GuestRefs> {
        let g = self.geo;
        let cs = g.cluster_size();
        let limit_clusters = self.file_limit() / cs;
        let mut refs = GuestRefs::default();
        let mut buf = vec![0u8; cs as usize];
        for i in 0..self.l1.len() {
            let Ok(Some(off)) = l1_l2_offset(self.l1[i], g) else {
                continue;
            };
            self.l2_table_peek(off.0, &mut buf)?;
            let table: &[u8] = &buf;
            for k in 0..g.l2_entries() as usize {
                let (host, len) = match L2Entry::decode(be64_at(table, k), g) {
                    Ok(L2Entry::Data { host, .. }) => (host.0, cs),
                    Ok(L2Entry::Zero {
                        prealloc: Some(host),
                    }) => (host.0, cs),
                    Ok(L2Entry::Compressed { host, len }) => (host.0, len),
                    _ => continue,
                };
                let first = host >> g.cluster_bits;
                let last = (host.saturating_add(len.max(1)) - 1) >> g.cluster_bits;
                for c in first..=last.min(limit_clusters) {
                    if c < limit_clusters {
                        refs.insert(c);
                    }
                }
            }
        }
        Ok(refs)
    }

    /// Note a new raw L2 entry (keeps the set of mapped clusters current once built).
    pub fn note_l2_entry(&mut self, raw: u64) {
        let g = self.geo;
        let Some(refs) = self.guest_refs.as_mut() else {
            return;
        };
        match L2Entry::decode(raw, g) {
            Ok(L2Entry::Data { host, .. })
            | Ok(L2Entry::Zero {
                prealloc: Some(host),
            }) => refs.insert(host.0 >> g.cluster_bits),
            Ok(L2Entry::Compressed { host, len }) => {
                let first = host.0 >> g.cluster_bits;
                let last = (host.0 + len.max(1) - 1) >> g.cluster_bits;
                for c in first..=last {
                    refs.insert(c);
                }
            }
            _ => {}
        }
    }

    /// Host cluster `c` became free: no L2 entry maps it any more.
    pub fn forget_guest_ref(&mut self, c: u64) {
        if let Some(refs) = self.guest_refs.as_mut() {
            refs.remove(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_refs_grow_and_forget() {
        let mut r = GuestRefs::default();
        assert!(!r.contains(700));
        r.insert(700);
        r.insert(3);
        assert!(r.contains(700) && r.contains(3) && !r.contains(701));
        r.remove(700);
        assert!(!r.contains(700) && r.contains(3));
    }
}
