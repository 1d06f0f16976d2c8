//! Internal snapshots: the snapshot table, and copy-on-write of L2 tables they share.
//!
//! The active layer of an image with snapshots is read like any other. For writing, the
//! snapshots' tables are indexed as metadata (so no write can land on them), and an L2 table
//! still shared with a snapshot (L1 entry without COPIED) is copied before its first change.
//! Data clusters shared with snapshots have COPIED clear in their L2 entries and are
//! copied-on-write by the ordinary write path. Creating and deleting snapshots is in
//! `snapshot_ops`; applying (reverting to) one is not supported.

use crate::error::{invalid, Error, Result};
use crate::header::{check_table, MAX_L1_BYTES};
use crate::mapping::{l1_l2_offset, COPIED};
use crate::meta::{widen, Meta};
use crate::ondisk::{decode_u64_table, on_disk_struct};

/// Total bytes of snapshot L1 tables we are willing to index at a writable open.
const MAX_SNAPSHOT_L1_BYTES: u64 = 256 << 20;

on_disk_struct! {
    /// The fixed part of a snapshot table entry (followed by extra data, id, name, padding).
    pub struct SnapshotHead [40] {
        /// Host offset of the snapshot's L1 table.
        0 => l1_table_offset: u64,
        /// Entries in that L1 table.
        8 => l1_size: u32,
        /// Length of the id string.
        12 => id_str_size: u16,
        /// Length of the name.
        14 => name_size: u16,
        /// Creation time, seconds.
        16 => date_sec: u32,
        /// Creation time, nanoseconds.
        20 => date_nsec: u32,
        /// Guest clock at creation.
        24 => vm_clock_nsec: u64,
        /// Size of the saved VM state.
        32 => vm_state_size: u32,
        /// Length of the extra data.
        36 => extra_data_size: u32,
    }
}

impl Meta {
    /// Record every cluster the snapshots use (table, L1 tables, L2 tables) as metadata.
    pub fn index_snapshots(&mut self) -> Result<()> {
        let r = self.header.raw;
        if r.nb_snapshots == 0 {
            return Ok(());
        }
        let g = self.geo;
        let cs = g.cluster_size();
        let limit = self.file_limit();
        let (entries, pos) = self.read_snapshot_table_len()?;
        let mut l1s = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let head = e.head;
            if head.l1_size as u64 * 8 > MAX_L1_BYTES {
                return Err(invalid(format!("snapshot {i}: L1 table too large")));
            }
            check_table(
                "snapshot L1 table",
                head.l1_table_offset,
                head.l1_size as u64 * 8,
                g,
                limit,
            )?;
            l1s.push((head.l1_table_offset, head.l1_size));
        }
        for k in 0..g.clusters_for(pos as u64) {
            self.meta_clusters.insert(r.snapshots_offset / cs + k);
        }
        let total: u64 = l1s.iter().map(|&(_, n)| n as u64 * 8).sum();
        if total > MAX_SNAPSHOT_L1_BYTES {
            return Err(crate::error::unsupported(
                "writing to an image whose snapshot tables are this large",
            ));
        }
        for (off, n) in l1s {
            for k in 0..g.clusters_for(n as u64 * 8) {
                self.meta_clusters.insert(off / cs + k);
            }
            let mut buf = vec![0u8; n as usize * 8];
            self.file
                .read_at(&mut buf, off)
                .map_err(|e| Error::io(e, "reading a snapshot L1 table"))?;
            for e in decode_u64_table(&buf) {
                if let Some(l2) =
                    l1_l2_offset(e, g).map_err(|b| invalid(format!("snapshot {}", b.0)))?
                {
                    if l2.0 + cs > limit {
                        return Err(invalid("snapshot L2 table beyond the end of the file"));
                    }
                    self.meta_clusters.insert(l2.0 / cs);
                }
            }
        }
        Ok(())
    }

    /// Make the L2 table of L1 entry `i` exclusively ours before changing it: if it is shared
    /// with a snapshot, copy it and point the L1 entry at the copy. Returns the table offset.
    pub fn unshare_l2(&mut self, i: usize, off: u64) -> Result<u64> {
        if self.l1[i] & COPIED != 0 {
            return Ok(off);
        }
        let c = off >> self.geo.cluster_bits;
        if self.refcount(c)? == 1 {
            self.l1[i] |= COPIED;
            widen(&mut self.l1_dirty, i, i + 1);
            return Ok(off);
        }
        let data = self.l2_table_copy(off)?;
        let new = self.alloc_clusters(1)?;
        let new_off = new << self.geo.cluster_bits;
        self.insert_l2(new_off, data)?;
        self.meta_clusters.insert(new);
        self.l1[i] = new_off | COPIED;
        widen(&mut self.l1_dirty, i, i + 1);
        // The snapshot keeps the old table; drop our reference once the new L1 is on disk.
        self.pending_free.push(c);
        Ok(new_off)
    }
}
