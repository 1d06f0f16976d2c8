//! Creating and deleting internal snapshots (disk-only, as `blockdev-snapshot-internal-sync`
//! and `qemu-img snapshot -c/-d` make them).
//!
//! Refcounts count paths: a data cluster's refcount is the number of L1 tables (the active one
//! and every snapshot's) that reach it through an L2 table; an L2 table's refcount is the
//! number of L1 tables pointing at it. COPIED is set on active L1/L2 entries exactly where the
//! refcount is 1.
//!
//! Creation, in this order, each step durable before the next:
//! 1. the snapshot's L1 table (a copy of the active one) and the new snapshot table are
//!    written to newly allocated clusters;
//! 2. the refcounts of every L2 table and data cluster the active L1 reaches go up by one;
//! 3. COPIED is cleared on the active entries whose refcount is now above 1;
//! 4. one header write switches `nb_snapshots` and `snapshots_offset` (same sector);
//! 5. the old snapshot table is freed.
//!
//! A power cut before step 4 leaves the old image (no new snapshot, the active data
//! unchanged) with leaked clusters, which `qemu-img check` reports as leaks; between steps 2
//! and 3 it may also report COPIED flags that `qemu-img check -r all` corrects, as for QEMU's
//! own snapshots (the flags only cost an extra copy-on-write, never data). After step 4 the
//! new state is complete.
//!
//! Deletion mirrors it: the new table without the entry is written, the header switched, then
//! the references of the snapshot's tables and data are dropped and COPIED set again on the
//! active entries whose refcount fell back to 1. A power cut after the switch leaks clusters.

use crate::error::{Error, ErrorKind, Result};
use crate::mapping::{l1_l2_offset, L2Entry, COMPRESSED, COPIED, OFFSET_MASK};
use crate::meta::{widen, Meta};
use crate::ondisk::{decode_u64_table, encode_u64_table};
use crate::snapshot_table::{self, Entry, SnapshotInfo, SnapshotTime};
use crate::Qcow2;

impl Qcow2 {
    /// The internal snapshots in the image, in table order.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.check_open()?;
        let mut m = self.lock()?;
        Ok(m.read_snapshot_table()?.iter().map(Entry::info).collect())
    }

    /// Take a disk-only internal snapshot called `name` of the current state. The id is the
    /// next free number, as QEMU picks it. Data I/O is held off while it runs.
    pub fn create_snapshot(&self, name: &str, when: SnapshotTime) -> Result<SnapshotInfo> {
        self.check_writable()?;
        if name.len() > u16::MAX as usize {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "snapshot name too long",
            ));
        }
        let _exclusive = self.exclusive()?;
        let mut m = self.lock()?;
        m.settle()?;
        let info = m.create_snapshot(name, when)?;
        Ok(info)
    }

    /// Delete the snapshot matching `id` and/or `name` (both must match when both are given).
    /// Returns the deleted snapshot, or None when none matches (nothing changed).
    pub fn delete_snapshot(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<Option<SnapshotInfo>> {
        self.check_writable()?;
        let _exclusive = self.exclusive()?;
        let mut m = self.lock()?;
        m.settle()?;
        m.delete_snapshot(id, name)
    }
}

impl Meta {
    /// Write everything back and apply pending frees (no data I/O may run: the caller holds
    /// the gate exclusively), so the tables on disk are the tables in memory.
    fn settle(&mut self) -> Result<()> {
        self.flush_mappings()?;
        self.sync()?;
        let pending = std::mem::take(&mut self.pending_free);
        self.apply_frees(pending)?;
        self.sync()
    }

    /// Write `bytes` into newly allocated clusters, recorded as metadata; returns the offset.
    fn write_new_meta(&mut self, bytes: &[u8], what: &str) -> Result<u64> {
        let g = self.geo;
        let n = g.clusters_for(bytes.len() as u64).max(1);
        let c = self.alloc_clusters(n)?;
        let mut buf = bytes.to_vec();
        buf.resize((n * g.cluster_size()) as usize, 0);
        self.write_raw(&buf, c << g.cluster_bits, what)?;
        for k in 0..n {
            self.meta_clusters.insert(c + k);
        }
        Ok(c << g.cluster_bits)
    }

    /// Drop metadata clusters `[off, off + bytes)` (one reference each).
    fn free_meta(&mut self, off: u64, bytes: u64) -> Result<()> {
        let g = self.geo;
        if off == 0 || bytes == 0 {
            return Ok(());
        }
        let c0 = off >> g.cluster_bits;
        for k in 0..g.clusters_for(bytes) {
            self.decref(c0 + k)?;
            if self.refcount(c0 + k)? == 0 {
                self.meta_clusters.remove(&(c0 + k));
            }
        }
        Ok(())
    }

    /// Clusters referenced by one raw L2 entry (none for a malformed one: the walk reports it).
    fn entry_refs(&mut self, raw: u64) -> Result<Vec<u64>> {
        match L2Entry::decode(raw, self.geo) {
            Ok(e) => Ok(e.referenced_clusters(self.geo)),
            Err(b) => Err(self.corrupt(b.0)),
        }
    }

    /// The L2 tables (by L1 index) an L1 table points at.
    fn l2_tables(&mut self, l1: &[u64]) -> Result<Vec<(usize, u64)>> {
        let mut out = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            match l1_l2_offset(e, self.geo) {
                Ok(Some(off)) => out.push((i, off.0)),
                Ok(None) => {}
                Err(b) => return Err(self.corrupt(b.0)),
            }
        }
        Ok(out)
    }

    /// Add one reference to every L2 table and data cluster the active L1 reaches.
    fn ref_active(&mut self) -> Result<()> {
        let max = self.geo.max_refcount();
        let l1 = self.l1.clone();
        let tables = self.l2_tables(&l1)?;
        // First make sure no count would overflow, so a refusal changes nothing.
        for &(_, off) in &tables {
            let c = off >> self.geo.cluster_bits;
            if self.refcount(c)? >= max {
                return Err(too_many_refs());
            }
            for raw in decode_u64_table(&self.l2_table_copy(off)?) {
                for c in self.entry_refs(raw)? {
                    if self.refcount(c)? >= max {
                        return Err(too_many_refs());
                    }
                }
            }
        }
        for &(_, off) in &tables {
            let c = off >> self.geo.cluster_bits;
            let rc = self.refcount(c)?;
            self.set_refcount(c, rc + 1)?;
            for raw in decode_u64_table(&self.l2_table_copy(off)?) {
                for c in self.entry_refs(raw)? {
                    let rc = self.refcount(c)?;
                    self.set_refcount(c, rc + 1)?;
                }
            }
        }
        Ok(())
    }

    /// Set COPIED on active L1 and L2 entries exactly where the refcount is 1.
    fn fix_copied(&mut self) -> Result<()> {
        let g = self.geo;
        let l1 = self.l1.clone();
        for (i, off) in self.l2_tables(&l1)? {
            let table_rc = self.refcount(off >> g.cluster_bits)?;
            let want = if table_rc == 1 { COPIED } else { 0 };
            if self.l1[i] & COPIED != want {
                self.l1[i] = (self.l1[i] & !COPIED) | want;
                widen(&mut self.l1_dirty, i, i + 1);
            }
            let entries = decode_u64_table(&self.l2_table_copy(off)?);
            let mut changes = Vec::new();
            for (j, &raw) in entries.iter().enumerate() {
                if raw & COMPRESSED != 0 {
                    continue;
                }
                let host = raw & OFFSET_MASK;
                if host == 0 {
                    continue;
                }
                let rc = self.refcount(host >> g.cluster_bits)?;
                let want = if rc == 1 { COPIED } else { 0 };
                if raw & COPIED != want {
                    changes.push((j, (raw & !COPIED) | want));
                }
            }
            if changes.is_empty() {
                continue;
            }
            for (j, v) in changes {
                self.set_l2_table_entry(off, j, v)?;
            }
        }
        Ok(())
    }

    /// Switch the header to a new snapshot table; restores the old fields on failure.
    fn switch_table(&mut self, nb: u32, offset: u64) -> Result<()> {
        let old = self.header.raw;
        self.header.raw.nb_snapshots = nb;
        self.header.raw.snapshots_offset = offset;
        if let Err(e) = self.write_header() {
            self.header.raw = old;
            return Err(e);
        }
        Ok(())
    }

    /// See [`Qcow2::create_snapshot`]; the caller settled the tables.
    fn create_snapshot(&mut self, name: &str, when: SnapshotTime) -> Result<SnapshotInfo> {
        let g = self.geo;
        if g.max_refcount() < 2 {
            // EINVAL, as QEMU answers (its refcount update overflows).
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "internal snapshots need refcounts of at least 2 bits",
            ));
        }
        let mut table = self.read_snapshot_table()?;
        if table.len() as u32 >= crate::header::MAX_SNAPSHOTS {
            return Err(Error::new(ErrorKind::NoSpace, "too many snapshots"));
        }
        let next = table
            .iter()
            .filter_map(|e| std::str::from_utf8(&e.id).ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        // 1. The snapshot's L1 table and the new snapshot table.
        let l1_copy: Vec<u64> = self.l1.iter().map(|e| e & !COPIED).collect();
        let l1_size = self.header.raw.l1_size;
        let l1_off = self.write_new_meta(&encode_u64_table(&l1_copy), "a snapshot L1 table")?;
        let entry = Entry::new(
            next.to_string(),
            name,
            when,
            (l1_off, l1_size),
            self.header.raw.size,
        );
        let info = entry.info();
        table.push(entry);
        let bytes = snapshot_table::serialize(&table)?;
        let table_off = self.write_new_meta(&bytes, "the snapshot table")?;
        self.flush_refcounts()?;
        self.sync()?;
        // 2. and 3. Share the active tables and data with the snapshot.
        self.ref_active()?;
        self.flush_refcounts()?;
        self.sync()?;
        self.fix_copied()?;
        self.flush_mappings()?;
        self.sync()?;
        // 4. The switch.
        let (old_nb, old_off) = (
            self.header.raw.nb_snapshots,
            self.header.raw.snapshots_offset,
        );
        let old_len = self.table_bytes(&table[..table.len() - 1])?;
        self.switch_table(table.len() as u32, table_off)?;
        // 5. The old table.
        if old_nb > 0 {
            self.free_meta(old_off, old_len)?;
        }
        self.flush_refcounts()?;
        Ok(info)
    }

    /// Bytes of a table holding `entries`.
    fn table_bytes(&self, entries: &[Entry]) -> Result<u64> {
        Ok(snapshot_table::serialize(entries)?.len() as u64)
    }

    /// See [`Qcow2::delete_snapshot`]; the caller settled the tables.
    fn delete_snapshot(
        &mut self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<Option<SnapshotInfo>> {
        let g = self.geo;
        let mut table = self.read_snapshot_table()?;
        let Some(pos) = table.iter().position(|e| e.matches(id, name)) else {
            return Ok(None);
        };
        let old_len = self.table_bytes(&table)?;
        let old_off = self.header.raw.snapshots_offset;
        let gone = table.remove(pos);
        let info = gone.info();
        // 1. The new table, 2. the switch.
        let new_off = if table.is_empty() {
            0
        } else {
            let bytes = snapshot_table::serialize(&table)?;
            let off = self.write_new_meta(&bytes, "the snapshot table")?;
            self.flush_refcounts()?;
            self.sync()?;
            off
        };
        self.switch_table(table.len() as u32, new_off)?;
        // 3. Drop what the snapshot referenced.
        let l1_bytes = gone.head.l1_size as u64 * 8;
        let mut buf = vec![0u8; l1_bytes as usize];
        self.file
            .read_at(&mut buf, gone.head.l1_table_offset)
            .map_err(|e| Error::io(e, "reading a snapshot L1 table"))?;
        let snap_l1 = decode_u64_table(&buf);
        for (_, off) in self.l2_tables(&snap_l1)? {
            let c = off >> g.cluster_bits;
            let entries = if self.refcount(c)? == 1 {
                // Only this snapshot used it: read it without caching it.
                let mut t = vec![0u8; g.cluster_size() as usize];
                self.file
                    .read_at(&mut t, off)
                    .map_err(|e| Error::io(e, "reading a snapshot L2 table"))?;
                decode_u64_table(&t)
            } else {
                decode_u64_table(&self.l2_table_copy(off)?)
            };
            for raw in entries {
                for d in self.entry_refs(raw)? {
                    self.decref(d)?;
                }
            }
            self.decref(c)?;
            if self.refcount(c)? == 0 {
                // A stale cached copy is harmless: a table reusing the cluster replaces it.
                self.meta_clusters.remove(&c);
            }
        }
        self.free_meta(gone.head.l1_table_offset, l1_bytes)?;
        self.free_meta(old_off, old_len)?;
        self.flush_refcounts()?;
        self.sync()?;
        // 4. COPIED back where the active layer is alone again.
        self.fix_copied()?;
        self.flush_mappings()?;
        self.sync()?;
        Ok(Some(info))
    }
}

fn too_many_refs() -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        "a cluster's refcount would exceed the refcount width",
    )
}
