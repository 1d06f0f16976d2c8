//! Refcounts and cluster allocation.
//!
//! Refcounts are read and changed through the refcount block cache of [`Meta`]. Allocation scans
//! upwards from a hint for a run of clusters with refcount zero. A missing refcount block is
//! placed at the first cluster of the range it describes (so it describes itself); when the
//! refcount table itself is full, a larger one is written past the end of the image together
//! with the blocks needed to describe it, and the header is switched to it.

use crate::error::{Error, ErrorKind, Result};
use crate::mapping::MAX_HOST_OFFSET;
use crate::meta::{widen, Meta};
use crate::ondisk::encode_u64_table;

/// Refcount table entries: bits 9..=63 are the block offset.
const RT_OFFSET_MASK: u64 = !511;

/// Read refcount `i` of a block encoded with `order` (entry width `1 << order` bits).
pub fn get_entry(block: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=3 => {
            let bits = 1usize << order;
            let byte = block[i * bits / 8];
            let shift = (i * bits) % 8;
            ((byte >> shift) as u64) & ((1u64 << bits) - 1)
        }
        4 => u16::from_be_bytes([block[i * 2], block[i * 2 + 1]]) as u64,
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&block[i * 4..i * 4 + 4]);
            u32::from_be_bytes(b) as u64
        }
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&block[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        }
    }
}

/// Write refcount `i` of a block; returns the byte range touched.
pub fn set_entry(block: &mut [u8], i: usize, order: u32, v: u64) -> (usize, usize) {
    match order {
        0..=3 => {
            let bits = 1usize << order;
            let byte = i * bits / 8;
            let shift = (i * bits) % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[byte] = (block[byte] & !mask) | (((v as u8) << shift) & mask);
            (byte, byte + 1)
        }
        4 => {
            block[i * 2..i * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes());
            (i * 2, i * 2 + 2)
        }
        5 => {
            block[i * 4..i * 4 + 4].copy_from_slice(&(v as u32).to_be_bytes());
            (i * 4, i * 4 + 4)
        }
        _ => {
            block[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
            (i * 8, i * 8 + 8)
        }
    }
}

impl Meta {
    /// The refcount block offset for table index `ti` (0: none).
    fn refblock_at(&self, ti: u64) -> u64 {
        self.rt.get(ti as usize).map_or(0, |e| e & RT_OFFSET_MASK)
    }

    /// Make room in the refcount block cache (refcount blocks may be written at any time).
    pub(crate) fn make_rb_room(&mut self) -> Result<()> {
        while self.rb.is_full() {
            let Some((key, slot)) = self.rb.pop_lru() else {
                break;
            };
            if let Some((s, e)) = slot.dirty {
                let bytes = slot.into_bytes();
                if let Err(err) = self.write_raw(&bytes[s..e], key + s as u64, "a refcount block") {
                    self.rb.insert(key, bytes, true);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Ensure the refcount block at `off` is cached.
    fn load_refblock(&mut self, off: u64) -> Result<()> {
        if self.rb.contains(off) {
            return Ok(());
        }
        self.make_rb_room()?;
        let mut data = vec![0u8; self.geo.cluster_size() as usize];
        self.file.debug_event("refblock_load");
        self.file
            .read_at(&mut data, off)
            .map_err(|e| Error::io(e, "reading a refcount block"))?;
        self.rb.insert(off, data, false);
        Ok(())
    }

    /// The refcount of host cluster `c`.
    pub fn refcount(&mut self, c: u64) -> Result<u64> {
        let epb = self.geo.refblock_entries();
        let off = self.refblock_at(c / epb);
        if off == 0 {
            return Ok(0);
        }
        self.load_refblock(off)?;
        let order = self.geo.refcount_order;
        match self.rb.get(off) {
            Some(slot) => Ok(get_entry(&slot.bytes(), (c % epb) as usize, order)),
            None => Err(Error::new(
                ErrorKind::Io,
                "refcount block vanished from the cache",
            )),
        }
    }

    /// Set the refcount of host cluster `c`, creating its refcount block if needed.
    pub fn set_refcount(&mut self, c: u64, v: u64) -> Result<()> {
        if v > self.geo.max_refcount() {
            return Err(self.corrupt(format!("refcount of cluster {c} would overflow")));
        }
        let epb = self.geo.refblock_entries();
        let off = self.ensure_refblock(c / epb)?;
        self.load_refblock(off)?;
        let order = self.geo.refcount_order;
        let slot = self
            .rb
            .get(off)
            .ok_or_else(|| Error::new(ErrorKind::Io, "refcount block vanished from the cache"))?;
        let (s, e) = set_entry(slot.bytes_mut(), (c % epb) as usize, order, v);
        slot.mark_dirty(s, e);
        Ok(())
    }

    /// Drop one reference on host cluster `c`; at zero it becomes free.
    pub fn decref(&mut self, c: u64) -> Result<()> {
        let rc = self.refcount(c)?;
        if rc == 0 {
            return Err(self.corrupt(format!(
                "refcount of host cluster {c} would drop below zero"
            )));
        }
        self.set_refcount(c, rc - 1)?;
        if rc == 1 {
            // Never pack a later compressed stream into a cluster that is free (and may be
            // handed out for anything) from now on.
            if self.compressed_tail >> self.geo.cluster_bits == c {
                self.compressed_tail = 0;
            }
            self.forget_guest_ref(c);
            self.file.debug_event("cluster_free");
            self.free_hint = self.free_hint.min(c);
            let cs = self.geo.cluster_size();
            let _ = self.file.discard(c * cs, cs);
        }
        Ok(())
    }

    /// Ensure refcount table entry `ti` points at a block; returns the block's offset.
    fn ensure_refblock(&mut self, ti: u64) -> Result<u64> {
        let off = self.refblock_at(ti);
        if off != 0 {
            return Ok(off);
        }
        if ti as usize >= self.rt.len() {
            self.grow_reftable(ti + 1)?;
            let off = self.refblock_at(ti);
            if off != 0 {
                return Ok(off);
            }
        }
        // No block: nothing in its range is in use, so it can describe itself from its
        // first cluster.
        let epb = self.geo.refblock_entries();
        let c0 = ti * epb;
        if self.meta_clusters.contains(&c0) || c0 == 0 {
            return Err(self.corrupt(format!("cluster {c0} is in use but has no refcount block")));
        }
        let cs = self.geo.cluster_size();
        if (c0 + 1) * cs > MAX_HOST_OFFSET {
            return Err(Error::new(ErrorKind::NoSpace, "host offset limit reached"));
        }
        let mut block = vec![0u8; cs as usize];
        self.file.debug_event("refblock_alloc");
        set_entry(&mut block, 0, self.geo.refcount_order, 1);
        self.make_rb_room()?;
        let off = c0 * cs;
        self.rb.insert(off, block, true);
        self.rt[ti as usize] = off;
        widen(&mut self.rt_dirty, ti as usize, ti as usize + 1);
        self.meta_clusters.insert(c0);
        self.end_cluster = self.end_cluster.max(c0 + 1);
        Ok(off)
    }

    /// Allocate `n` contiguous free host clusters with refcount 1; returns the first index.
    ///
    /// Free space below the high-water mark is reused first (only inside ranges that have a
    /// refcount block); otherwise the clusters are taken at the end of the image, preceded by
    /// any refcount blocks needed to describe them.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "allocating zero clusters",
            ));
        }
        if let Some(start) = self.find_free_run(n)? {
            for k in 0..n {
                self.set_refcount(start + k, 1)?;
            }
            self.end_cluster = self.end_cluster.max(start + n);
            return Ok(start);
        }
        self.alloc_at_end(n)
    }

    /// Look for `n` free clusters starting below the high-water mark, in ranges with blocks.
    fn find_free_run(&mut self, n: u64) -> Result<Option<u64>> {
        let epb = self.geo.refblock_entries();
        let mut start = self.free_hint;
        let mut c = start;
        let mut first_free = None;
        while start < self.end_cluster {
            if c == start + n {
                self.free_hint = match first_free {
                    Some(f) if f < start => f,
                    _ => start + n,
                };
                return Ok(Some(start));
            }
            if self.refblock_at(c / epb) == 0 {
                // No block: skip the whole range (space there is handed out at the end).
                c = (c / epb + 1) * epb;
                start = c;
                continue;
            }
            if self.refcount(c)? == 0 && !self.meta_clusters.contains(&c) {
                if self.guest_maps(c)? {
                    return Err(self.corrupt(format!(
                        "host cluster {c} ({:#x}) is mapped by the guest but its refcount is 0; \
                         refusing to reuse it (repair with 'qemu-img check -r all')",
                        c << self.geo.cluster_bits
                    )));
                }
                first_free.get_or_insert(c);
            } else {
                start = c + 1;
            }
            c += 1;
        }
        self.free_hint = first_free.unwrap_or(self.end_cluster);
        Ok(None)
    }

    /// Allocate `n` clusters past the end of everything in use, with the refcount blocks
    /// they need placed just before them.
    fn alloc_at_end(&mut self, n: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let epb = self.geo.refblock_entries();
        loop {
            let e = self.end_cluster.max(self.file_len.div_ceil(cs));
            let mut nb = 0u64;
            let missing = loop {
                let end = e + nb + n;
                let missing: Vec<u64> = (e / epb..=(end - 1) / epb)
                    .filter(|&r| self.refblock_at(r) == 0)
                    .collect();
                if missing.len() as u64 == nb {
                    break missing;
                }
                nb = missing.len() as u64;
            };
            if (e + nb + n) * cs > MAX_HOST_OFFSET {
                return Err(Error::new(ErrorKind::NoSpace, "host offset limit reached"));
            }
            if let Some(&last) = missing.last() {
                if last as usize >= self.rt.len() {
                    self.grow_reftable(last + 1)?;
                    continue;
                }
            }
            let mut busy = None;
            for c in e..e + nb + n {
                if !missing.contains(&(c / epb)) && self.refcount(c)? != 0 {
                    busy = Some(c);
                }
            }
            if let Some(c) = busy {
                self.end_cluster = c + 1;
                continue;
            }
            for (k, &r) in missing.iter().enumerate() {
                let off = (e + k as u64) * cs;
                self.make_rb_room()?;
                self.rb.insert(off, vec![0u8; cs as usize], true);
                self.rt[r as usize] = off;
                widen(&mut self.rt_dirty, r as usize, r as usize + 1);
                self.meta_clusters.insert(e + k as u64);
            }
            for c in e..e + nb + n {
                self.set_refcount(c, 1)?;
            }
            self.end_cluster = e + nb + n;
            return Ok(e + nb);
        }
    }

    /// Replace the refcount table by one with at least `min_entries` entries.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let epb = self.geo.refblock_entries();
        let old_len = self.rt.len() as u64;
        let mut want = min_entries.max(old_len + old_len / 2 + 1);
        let mut e = self.end_cluster.max(self.file_len.div_ceil(cs));
        let (t, missing) = 'search: loop {
            let t = (want * 8).div_ceil(cs);
            if t * cs > crate::header::MAX_REFTABLE_BYTES {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "refcount table would exceed its maximum size",
                ));
            }
            want = t * cs / 8;
            let mut nb = 0u64;
            let missing = loop {
                let end = e + nb + t;
                let missing: Vec<u64> = (e / epb..=(end - 1) / epb)
                    .filter(|&r| self.refblock_at(r) == 0)
                    .collect();
                if missing.len() as u64 == nb {
                    break missing;
                }
                nb = missing.len() as u64;
            };
            if let Some(&last) = missing.last() {
                if last >= want {
                    want = last + 1;
                    continue;
                }
            }
            let area = e..e + nb + t;
            for c in area {
                if !missing.contains(&(c / epb)) && self.refcount(c)? != 0 {
                    e = c + 1;
                    continue 'search;
                }
            }
            break (t, missing);
        };
        let nb = missing.len() as u64;
        if (e + nb + t) * cs > MAX_HOST_OFFSET {
            return Err(Error::new(ErrorKind::NoSpace, "host offset limit reached"));
        }
        let order = self.geo.refcount_order;
        let mut blocks: Vec<Vec<u8>> = vec![vec![0u8; cs as usize]; missing.len()];
        for c in e..e + nb + t {
            let r = c / epb;
            if let Some(k) = missing.iter().position(|&m| m == r) {
                set_entry(&mut blocks[k], (c % epb) as usize, order, 1);
            } else {
                self.set_refcount(c, 1)?;
            }
        }
        let mut new_rt = self.rt.clone();
        new_rt.resize(want as usize, 0);
        for (k, &r) in missing.iter().enumerate() {
            let off = (e + k as u64) * cs;
            self.write_raw(&blocks[k], off, "a refcount block")?;
            new_rt[r as usize] = off;
        }
        self.flush_refcounts()?;
        let table_off = (e + nb) * cs;
        self.write_raw(&encode_u64_table(&new_rt), table_off, "the refcount table")?;
        self.sync()?;
        let old_off = self.header.raw.refcount_table_offset;
        let old_clusters = self.header.raw.refcount_table_clusters as u64;
        self.header.raw.refcount_table_offset = table_off;
        self.header.raw.refcount_table_clusters = t as u32;
        if let Err(err) = self.write_header() {
            self.header.raw.refcount_table_offset = old_off;
            self.header.raw.refcount_table_clusters = old_clusters as u32;
            return Err(err);
        }
        self.rt = new_rt;
        self.rt_dirty = None;
        for k in 0..nb + t {
            self.meta_clusters.insert(e + k);
        }
        self.end_cluster = self.end_cluster.max(e + nb + t);
        let old_c = old_off / cs;
        for k in 0..old_clusters {
            self.meta_clusters.remove(&(old_c + k));
            self.decref(old_c + k)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_byte_refcounts_pack_from_the_least_significant_bit() {
        let mut b = vec![0u8; 4];
        set_entry(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b0000_1100);
        assert_eq!(get_entry(&b, 1, 1), 3);
    }

    #[test]
    fn every_refcount_width_round_trips() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1u32 << order)) - 1
            };
            set_entry(&mut b, 3, order, max);
            set_entry(&mut b, 2, order, 0);
            assert_eq!(get_entry(&b, 3, order), max, "order {order}");
            assert_eq!(get_entry(&b, 2, order), 0, "order {order}");
        }
    }
}
