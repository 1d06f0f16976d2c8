//! The mutable metadata state of an open image, guarded by one mutex in [`crate::Qcow2`].
//!
//! [`Meta`] owns the header, the in-memory L1 table, the L2 table cache, the refcount table and
//! refcount block cache, the allocator hints, the set of guest clusters being allocated, and the
//! set of host clusters holding metadata (for overlap checks). Refcount handling lives in
//! [`crate::refcount`]; this file has table access, write-back ordering and corruption marking.
//!
//! Write-back order (so a crash leaks clusters at worst, never loses a reference):
//! 1. refcount blocks (only increases are ever pending here), then the refcount table;
//! 2. storage flush; L2 tables; then (after another flush) the L1 table;
//! 3. storage flush; only now are clusters unmapped by discard/overwrite dereferenced.

use std::collections::HashSet;
use std::sync::Arc;

use crate::bitmaps::BitmapEntry;
use crate::cache::TableCache;
use crate::error::{Error, ErrorKind, Result};
use crate::header::{Header, INCOMPAT_CORRUPT};
use crate::mapping::{l1_l2_offset, L2Entry, COPIED};
use crate::ondisk::{decode_u64_table, encode_u64_table};
use crate::overlap::GuestRefs;
use crate::storage::Storage;
use crate::types::{Geometry, GuestCluster};

/// Default bound of the L2 cache in bytes (QEMU's on Linux): enough for the whole disk up to
/// this much (256 GiB of disk with 64 KiB clusters).
pub const DEFAULT_L2_CACHE_MAX_BYTES: u64 = 32 << 20;
/// Default number of refcount blocks cached (QEMU's minimum and default).
pub const DEFAULT_REFBLOCK_CACHE_TABLES: usize = 4;

/// L2 tables needed to cache every L2 table of a disk of `size` bytes.
pub fn l2_tables_for_disk(size: u64, g: Geometry) -> u64 {
    size.div_ceil(g.cluster_size())
        .saturating_mul(8)
        .div_ceil(g.cluster_size())
}

/// The metadata state. Every field is guarded by the `Qcow2::meta` mutex.
pub struct Meta {
    /// The image file.
    pub file: Arc<dyn Storage>,
    /// The parsed header, updated and rewritten as tables move.
    pub header: Header,
    /// Cluster geometry (from the header).
    pub geo: Geometry,
    /// Whether the image was opened writable.
    pub writable: bool,
    /// The active L1 table (raw entries).
    pub l1: Vec<u64>,
    /// Range of L1 entries modified since the last write-back.
    pub l1_dirty: Option<(usize, usize)>,
    /// Cached L2 tables, or slices of `l2_slice` bytes of them (keyed by host offset).
    pub l2: TableCache,
    /// Bytes of one L2 cache entry (`l2-cache-entry-size`): the cluster size, or a power of
    /// two from 512 below it.
    pub l2_slice: usize,
    /// The refcount table (raw entries).
    pub rt: Vec<u64>,
    /// Range of refcount table entries modified since the last write-back.
    pub rt_dirty: Option<(usize, usize)>,
    /// Cached refcount blocks.
    pub rb: TableCache,
    /// Lowest host cluster that may be free.
    pub free_hint: u64,
    /// First host cluster beyond everything known to be used (allocation high-water mark).
    pub end_cluster: u64,
    /// Bytes known to exist in the file (its size at open, grown by our writes).
    pub file_len: u64,
    /// Host clusters unmapped from L2 tables whose references are dropped after the next
    /// durable L2 write-back (one element per reference).
    pub pending_free: Vec<u64>,
    /// Guest clusters with an allocating write in flight.
    pub inflight: HashSet<u64>,
    /// Host clusters holding metadata (header, L1, L2, refcount structures, bitmap tables).
    pub meta_clusters: HashSet<u64>,
    /// Corruption was detected; writes are refused.
    pub corrupt: bool,
    /// The bitmap directory as currently in the file.
    pub bitmaps: Vec<BitmapEntry>,
    /// Host clusters mapped by active L2 entries, built on first need (see `overlap`).
    pub guest_refs: Option<GuestRefs>,
    /// Where the next compressed stream may be packed (0: start a new host cluster).
    pub compressed_tail: u64,
}

/// Grow a dirty range to include `[start, end)`.
pub fn widen(range: &mut Option<(usize, usize)>, start: usize, end: usize) {
    *range = Some(match *range {
        None => (start, end),
        Some((s, e)) => (s.min(start), e.max(end)),
    });
}

impl Meta {
    /// Build the state from a validated header: load L1 and refcount tables and check them.
    pub fn load(
        file: Arc<dyn Storage>,
        header: Header,
        writable: bool,
        file_len: u64,
    ) -> Result<Meta> {
        let geo = header.geometry();
        let cs = geo.cluster_size();
        let r = header.raw;
        let mut l1_bytes = vec![0u8; r.l1_size as usize * 8];
        file.read_at(&mut l1_bytes, r.l1_table_offset)
            .map_err(|e| Error::io(e, "reading the L1 table"))?;
        let l1 = decode_u64_table(&l1_bytes);
        let rt_len = r.refcount_table_clusters as u64 * cs;
        let mut rt_bytes = vec![0u8; rt_len as usize];
        file.read_at(&mut rt_bytes, r.refcount_table_offset)
            .map_err(|e| Error::io(e, "reading the refcount table"))?;
        let rt = decode_u64_table(&rt_bytes);
        let mut m = Meta {
            file,
            header,
            geo,
            writable,
            l1,
            l1_dirty: None,
            l2: TableCache::new_l2(
                l2_tables_for_disk(r.size, geo).min(DEFAULT_L2_CACHE_MAX_BYTES / cs) as usize,
                geo.cluster_bits,
            ),
            l2_slice: cs as usize,
            rt,
            rt_dirty: None,
            rb: TableCache::new(DEFAULT_REFBLOCK_CACHE_TABLES),
            free_hint: 0,
            end_cluster: file_len.div_ceil(cs),
            file_len,
            pending_free: Vec::new(),
            inflight: HashSet::new(),
            meta_clusters: HashSet::new(),
            corrupt: r.incompatible_features & INCOMPAT_CORRUPT != 0,
            bitmaps: Vec::new(),
            guest_refs: None,
            compressed_tail: 0,
        };
        m.index_metadata()?;
        Ok(m)
    }

    /// Record the clusters of fixed metadata and validate L1 and refcount table entries.
    fn index_metadata(&mut self) -> Result<()> {
        let g = self.geo;
        let r = self.header.raw;
        let mut fixed = HashSet::new();
        fixed.insert(0u64);
        for c in 0..g.clusters_for(r.l1_size as u64 * 8) {
            fixed.insert((r.l1_table_offset >> g.cluster_bits) + c);
        }
        for c in 0..r.refcount_table_clusters as u64 {
            fixed.insert((r.refcount_table_offset >> g.cluster_bits) + c);
        }
        let limit = self.file_limit();
        for (i, &e) in self.rt.iter().enumerate() {
            let off = e & !(g.cluster_size() - 1);
            if e == 0 {
                continue;
            }
            if e & (g.cluster_size() - 1) != 0 {
                return Err(invalid_at(
                    "refcount table",
                    i,
                    e,
                    "reserved bits set / unaligned",
                ));
            }
            if off + g.cluster_size() > limit {
                return Err(invalid_at(
                    "refcount table",
                    i,
                    e,
                    "refcount block beyond end of file",
                ));
            }
            if fixed.contains(&(off >> g.cluster_bits)) {
                return Err(invalid_at(
                    "refcount table",
                    i,
                    e,
                    "refcount block overlaps header or tables",
                ));
            }
            self.meta_clusters.insert(off >> g.cluster_bits);
        }
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let off = l1_l2_offset(e, g).map_err(|b| crate::error::invalid(b.0))?;
            let Some(off) = off else { continue };
            if off.0 + g.cluster_size() > limit {
                return Err(invalid_at("L1 table", i, e, "L2 table beyond end of file"));
            }
            let c = off.0 >> g.cluster_bits;
            if fixed.contains(&c) || self.meta_clusters.contains(&c) {
                return Err(invalid_at(
                    "L1 table",
                    i,
                    e,
                    "L2 table overlaps other metadata",
                ));
            }
            self.meta_clusters.insert(c);
        }
        self.meta_clusters.extend(fixed);
        Ok(())
    }

    /// The end of the file rounded up to a cluster: where valid references must end.
    pub fn file_limit(&self) -> u64 {
        self.file_len.div_ceil(self.geo.cluster_size()) * self.geo.cluster_size()
    }

    /// Write `buf` at `off` in the image file, tracking the file length.
    pub fn write_raw(&mut self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        self.file
            .write_at(buf, off)
            .map_err(|e| Error::io(e, format!("writing {what}")))?;
        self.file_len = self.file_len.max(off + buf.len() as u64);
        Ok(())
    }

    /// Flush the image file.
    pub fn sync(&self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(e, "flushing the image file"))
    }

    /// Mark the image corrupt (in memory; and in the header when writable and v3) and return
    /// the error to report.
    pub fn corrupt(&mut self, msg: impl Into<String>) -> Error {
        let msg = msg.into();
        if self.writable && !self.corrupt {
            self.corrupt = true;
            if self.header.raw.version >= 3 {
                self.header.raw.incompatible_features |= INCOMPAT_CORRUPT;
                let mut buf = [0u8; 8];
                buf.copy_from_slice(&self.header.raw.incompatible_features.to_be_bytes());
                // Best effort: the request fails with the corruption error either way.
                let _ = self.file.write_at(&buf, 72).and_then(|_| self.file.flush());
            }
        }
        self.corrupt = true;
        Error::new(ErrorKind::Corrupt, msg)
    }

    /// Write the whole header (cluster 0) from `self.header` and flush.
    pub fn write_header(&mut self) -> Result<()> {
        let bytes = self.header.serialize()?;
        self.write_raw(&bytes, 0, "the image header")?;
        self.sync()
    }

    /// The L2 table offset for L1 index `i` (None when unallocated).
    pub fn l2_offset(&mut self, i: usize) -> Result<Option<u64>> {
        let Some(&e) = self.l1.get(i) else {
            return Ok(None);
        };
        match l1_l2_offset(e, self.geo) {
            Ok(o) => Ok(o.map(|h| h.0)),
            Err(b) => Err(self.corrupt(b.0)),
        }
    }

    /// Make room in the L2 cache, writing back a dirty victim (after refcounts are durable).
    fn make_l2_room(&mut self) -> Result<()> {
        while self.l2.is_full() {
            let Some((key, slot)) = self.l2.pop_lru() else {
                break;
            };
            if let Some((s, e)) = slot.dirty {
                let bytes = slot.into_bytes();
                let written = self
                    .flush_refcounts()
                    .and_then(|_| self.sync())
                    .and_then(|_| self.write_raw(&bytes[s..e], key + s as u64, "an L2 table"));
                if let Err(err) = written {
                    self.l2.insert(key, bytes, true);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// The cache key (host offset of the slice) and the index in that slice of entry `idx` of
    /// the L2 table at `off`.
    pub fn l2_slice_of(&self, off: u64, idx: usize) -> (u64, usize) {
        let per = self.l2_slice / 8;
        (off + (idx / per * self.l2_slice) as u64, idx % per)
    }

    /// Cache keys of the slices of the L2 table at `off`.
    fn l2_slice_keys(&self, off: u64) -> impl Iterator<Item = u64> {
        let step = self.l2_slice as u64;
        (0..self.geo.cluster_size() / step).map(move |k| off + k * step)
    }

    /// Ensure the L2 slice at `key` is cached.
    fn load_l2(&mut self, key: u64) -> Result<()> {
        if self.l2.contains(key) {
            return Ok(());
        }
        self.make_l2_room()?;
        let off = key;
        let mut data = vec![0u8; self.l2_slice];
        self.file.debug_event("l2_load");
        self.file
            .read_at(&mut data, off)
            .map_err(|e| Error::io(e, "reading an L2 table"))?;
        self.l2.insert(off, data, false);
        Ok(())
    }

    /// Whether the L2 table of `gc` belongs to the active layer alone (L1 COPIED set), so
    /// COPIED data entries in it may be written in place.
    pub fn l2_owned(&self, gc: GuestCluster) -> bool {
        self.header.raw.nb_snapshots == 0
            || self
                .l1
                .get(self.geo.l1_index(gc))
                .is_some_and(|e| e & COPIED != 0)
    }

    /// A copy of the L2 table at `off` (loading its slices into the cache).
    pub fn l2_table_copy(&mut self, off: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.geo.cluster_size() as usize);
        for key in self.l2_slice_keys(off).collect::<Vec<_>>() {
            self.load_l2(key)?;
            let slot = self
                .l2
                .get(key)
                .ok_or_else(|| Error::new(ErrorKind::Io, "L2 table vanished from the cache"))?;
            out.extend_from_slice(&slot.bytes());
        }
        Ok(out)
    }

    /// The L2 table at `off` as it is now, into `buf` (one cluster): the cached slices, the
    /// file for the rest; nothing is loaded into the cache.
    pub fn l2_table_peek(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let keys: Vec<u64> = self.l2_slice_keys(off).collect();
        if !keys.iter().all(|&k| self.l2.contains(k)) {
            self.file
                .read_at(buf, off)
                .map_err(|e| Error::io(e, "reading an L2 table"))?;
        }
        for key in keys {
            if let Some(slot) = self.l2.peek_mut(key) {
                let at = (key - off) as usize;
                buf[at..at + self.l2_slice].copy_from_slice(&slot.bytes());
            }
        }
        Ok(())
    }

    /// Put a new, dirty L2 table (one cluster of bytes) into the cache, slice by slice.
    pub fn insert_l2(&mut self, off: u64, data: Vec<u8>) -> Result<()> {
        for (key, chunk) in self
            .l2_slice_keys(off)
            .zip(data.chunks(self.l2_slice))
            .collect::<Vec<_>>()
        {
            self.make_l2_room()?;
            self.l2.insert(key, chunk.to_vec(), true);
        }
        Ok(())
    }

    /// The raw L2 entry of guest cluster `gc` (0 when its L2 table is unallocated).
    pub fn l2_raw(&mut self, gc: GuestCluster) -> Result<u64> {
        let Some(off) = self.l2_offset(self.geo.l1_index(gc))? else {
            return Ok(0);
        };
        let (key, idx) = self.l2_slice_of(off, self.geo.l2_index(gc));
        self.load_l2(key)?;
        match self.l2.get(key) {
            Some(slot) => Ok(slot.u64_at(idx)),
            None => Err(Error::new(
                ErrorKind::Io,
                "L2 table vanished from the cache",
            )),
        }
    }

    /// The decoded L2 entry of guest cluster `gc`; a malformed entry marks the image corrupt.
    pub fn l2_entry(&mut self, gc: GuestCluster) -> Result<L2Entry> {
        let raw = self.l2_raw(gc)?;
        let entry = match L2Entry::decode(raw, self.geo) {
            Ok(e) => e,
            Err(b) => return Err(self.corrupt(b.0)),
        };
        self.check_entry(gc, entry)?;
        Ok(entry)
    }

    /// Reject entries that point outside the file or into metadata.
    pub(crate) fn check_entry(&mut self, gc: GuestCluster, entry: L2Entry) -> Result<()> {
        let limit = self.file_limit();
        let (host, len) = match entry {
            L2Entry::Data { host, .. } => (host, self.geo.cluster_size()),
            L2Entry::Compressed { host, len } => (host, len),
            _ => return Ok(()),
        };
        let end = host.0.checked_add(len);
        if end.is_none_or(|e| e > limit) {
            return Err(self.corrupt(format!(
                "guest cluster {} maps to host offset {:#x}, beyond the end of the file",
                gc.0, host.0
            )));
        }
        if matches!(entry, L2Entry::Data { .. })
            && self
                .meta_clusters
                .contains(&(host.0 >> self.geo.cluster_bits))
        {
            return Err(self.corrupt(format!(
                "guest cluster {} maps to host offset {:#x}, which holds metadata",
                gc.0, host.0
            )));
        }
        Ok(())
    }

    /// Ensure guest cluster `gc` has an L2 table, allocating one; returns its offset.
    pub fn ensure_l2(&mut self, gc: GuestCluster) -> Result<u64> {
        let i = self.geo.l1_index(gc);
        if i >= self.l1.len() {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                "guest cluster beyond the L1 table",
            ));
        }
        if let Some(off) = self.l2_offset(i)? {
            if self.header.raw.nb_snapshots > 0 {
                return self.unshare_l2(i, off);
            }
            return Ok(off);
        }
        let c = self.alloc_clusters(1)?;
        let off = c << self.geo.cluster_bits;
        self.file.debug_event("l2_alloc_write");
        let cs = self.geo.cluster_size() as usize;
        if self.l2_slice == cs {
            self.make_l2_room()?;
            self.l2.insert(off, vec![0u8; cs], true);
        } else {
            // Slices: zero the whole table on disk now (the cluster is ours and nothing points
            // at it yet); its slices are loaded when used. Slices of an earlier table in this
            // cluster must not be written back over it.
            for key in self.l2_slice_keys(off).collect::<Vec<_>>() {
                self.l2.remove(key);
            }
            self.write_raw(&vec![0u8; cs], off, "a new L2 table")?;
        }
        self.meta_clusters.insert(c);
        self.l1[i] = off | COPIED;
        widen(&mut self.l1_dirty, i, i + 1);
        Ok(off)
    }

    /// Set the raw L2 entry of `gc` (its L2 table must exist, see [`Meta::ensure_l2`]).
    pub fn set_l2_raw(&mut self, gc: GuestCluster, raw: u64) -> Result<()> {
        let off = self.ensure_l2(gc)?;
        self.set_l2_table_entry(off, self.geo.l2_index(gc), raw)?;
        self.note_l2_entry(raw);
        Ok(())
    }

    /// Set raw entry `idx` of the L2 table at `off` in the cache (written back later).
    pub fn set_l2_table_entry(&mut self, off: u64, idx: usize, raw: u64) -> Result<()> {
        let (key, j) = self.l2_slice_of(off, idx);
        self.load_l2(key)?;
        let slot = self
            .l2
            .get(key)
            .ok_or_else(|| Error::new(ErrorKind::Io, "L2 table vanished from the cache"))?;
        slot.set_u64(j, raw);
        slot.mark_dirty(j * 8, j * 8 + 8);
        Ok(())
    }

    /// Write back dirty refcount blocks, then the refcount table, and flush.
    pub fn flush_refcounts(&mut self) -> Result<()> {
        let keys = self.rb.dirty_keys();
        if keys.is_empty() && self.rt_dirty.is_none() {
            return Ok(());
        }
        for key in keys {
            self.write_back(key, false)?;
        }
        if let Some((s, e)) = self.rt_dirty {
            self.sync()?;
            let bytes = encode_u64_table(&self.rt[s..e]);
            let off = self.header.raw.refcount_table_offset + s as u64 * 8;
            self.write_raw(&bytes, off, "the refcount table")?;
            self.rt_dirty = None;
        }
        self.sync()
    }

    /// Write back the dirty part of one cached table (`l2` selects the cache).
    fn write_back(&mut self, key: u64, l2: bool) -> Result<()> {
        let cache = if l2 { &mut self.l2 } else { &mut self.rb };
        let Some(slot) = cache.peek_mut(key) else {
            return Ok(());
        };
        let Some((s, e)) = slot.dirty else {
            return Ok(());
        };
        // Write whole 512-byte sectors.
        let (s, e) = (s & !511, e.div_ceil(512) * 512);
        let bytes = slot.bytes_range(s, e);
        let what = if l2 {
            "an L2 table"
        } else {
            "a refcount block"
        };
        self.file.debug_event(if l2 {
            "l2_update"
        } else {
            "refblock_update_part"
        });
        self.write_raw(&bytes, key + s as u64, what)?;
        let cache = if l2 { &mut self.l2 } else { &mut self.rb };
        if let Some(slot) = cache.peek_mut(key) {
            slot.dirty = None;
        }
        Ok(())
    }

    /// Write back refcounts, L2 tables and the L1 table, in that order. Afterwards the mappings
    /// on disk match memory, so the pending frees may be applied (after a storage flush).
    pub fn flush_mappings(&mut self) -> Result<()> {
        let keys = self.l2.dirty_keys();
        if keys.is_empty() && self.l1_dirty.is_none() {
            return self.flush_refcounts();
        }
        self.flush_refcounts()?;
        // Data written before the L2 entries were set must be durable before they are.
        self.sync()?;
        for key in keys {
            self.write_back(key, true)?;
        }
        if let Some((s, e)) = self.l1_dirty {
            self.sync()?;
            let bytes = encode_u64_table(&self.l1[s..e]);
            let off = self.header.raw.l1_table_offset + s as u64 * 8;
            self.file.debug_event("l1_update");
            self.write_raw(&bytes, off, "the L1 table")?;
            self.l1_dirty = None;
        }
        Ok(())
    }

    /// Grow the virtual size, moving the L1 table to a larger one if needed.
    pub fn grow(&mut self, new_size: u64) -> Result<()> {
        let g = self.geo;
        let need = g.l1_entries_for(new_size);
        if need * 8 > crate::header::MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "new size needs an L1 table beyond its maximum",
            ));
        }
        if need as usize <= self.l1.len() {
            let old = self.header.raw.size;
            self.header.raw.size = new_size;
            if let Err(e) = self.write_header() {
                self.header.raw.size = old;
                return Err(e);
            }
            return Ok(());
        }
        // The L2 tables the new L1 points at must be on disk before it is.
        self.flush_mappings()?;
        let n = g.clusters_for(need * 8);
        let c = self.alloc_clusters(n)?;
        let mut table = self.l1.clone();
        table.resize(need as usize, 0);
        let mut bytes = encode_u64_table(&table);
        bytes.resize((n * g.cluster_size()) as usize, 0);
        self.write_raw(&bytes, c << g.cluster_bits, "the new L1 table")?;
        self.flush_refcounts()?;
        self.sync()?;
        let old = self.header.raw;
        self.header.raw.size = new_size;
        self.header.raw.l1_size = need as u32;
        self.header.raw.l1_table_offset = c << g.cluster_bits;
        if let Err(e) = self.write_header() {
            self.header.raw = old;
            return Err(e);
        }
        let old_c = old.l1_table_offset >> g.cluster_bits;
        for k in 0..g.clusters_for(old.l1_size as u64 * 8) {
            self.meta_clusters.remove(&(old_c + k));
            self.decref(old_c + k)?;
        }
        for k in 0..n {
            self.meta_clusters.insert(c + k);
        }
        self.l1 = table;
        self.l1_dirty = None;
        self.flush_refcounts()
    }

    /// Drop the references of clusters whose unmapping is now durable.
    pub fn apply_frees(&mut self, clusters: Vec<u64>) -> Result<()> {
        for c in clusters {
            self.decref(c)?;
        }
        self.flush_refcounts()
    }
}

impl Meta {
    /// Cache L2 slices of `bytes` (a power of two from 512 to the cluster size) instead of
    /// the current size: mappings are written back and the L2 cache emptied first.
    pub fn set_l2_slice_size(&mut self, bytes: usize) -> Result<()> {
        let cs = self.geo.cluster_size() as usize;
        if !(512..=cs).contains(&bytes) || !bytes.is_power_of_two() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "L2 cache entry size must be a power of two between 512 and the cluster \
                     size ({cs})"
                ),
            ));
        }
        if bytes == self.l2_slice {
            return Ok(());
        }
        if self.writable {
            self.flush_mappings()?;
        }
        self.l2 = TableCache::new_l2(self.l2.capacity(), self.geo.cluster_bits);
        self.l2_slice = bytes;
        Ok(())
    }

    /// Set the cache capacities (in tables), writing back and evicting what no longer fits.
    pub fn set_cache_capacity(&mut self, l2_tables: usize, refblocks: usize) -> Result<()> {
        self.l2.set_capacity(l2_tables);
        self.rb.set_capacity(refblocks);
        while self.l2.over_capacity() {
            self.make_l2_room()?;
        }
        while self.rb.over_capacity() {
            self.make_rb_room()?;
        }
        Ok(())
    }
}

/// An `InvalidImage` error about table entry `i`.
fn invalid_at(table: &str, i: usize, raw: u64, why: &str) -> Error {
    crate::error::invalid(format!("{table} entry {i} ({raw:#018x}): {why}"))
}
