//! Rebuilding refcounts of an image left with the dirty bit (lazy refcounts, not closed).
//!
//! Every reference is counted from the metadata (header, L1, L2 tables and what they map,
//! bitmap directory, tables and data); then a fresh refcount table and blocks describing
//! exactly those references (and themselves) are written past the end of the file, the header
//! is switched to them and the dirty bit cleared. The old refcount structures become free
//! space. Images with internal snapshots are not rebuilt (refused at open).

use std::collections::HashSet;

use crate::bitmaps::data_len;
use crate::error::{Error, ErrorKind, Result};
use crate::header::INCOMPAT_DIRTY;
use crate::mapping::{l1_l2_offset, L2Entry, OFFSET_MASK};
use crate::meta::Meta;
use crate::ondisk::{decode_u64_table, encode_u64_table};
use crate::refcount::set_entry;

/// Reference counts per host cluster (index < `limit`), growing as needed.
struct Counts {
    /// The counts.
    v: Vec<u32>,
    /// First cluster past the end of the file: references there are corruption.
    limit: u64,
}

impl Counts {
    /// Count one reference to cluster `c`.
    fn add(&mut self, c: u64) -> Result<()> {
        if c >= self.limit {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("metadata references cluster {c} beyond the end of the file; cannot rebuild refcounts"),
            ));
        }
        let i = c as usize;
        if i >= self.v.len() {
            self.v.resize(i + 1, 0);
        }
        self.v[i] = self.v[i].saturating_add(1);
        Ok(())
    }
}

impl Meta {
    /// Recount all references and write new refcount structures (see the module docs).
    pub fn rebuild_refcounts(&mut self) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let mut counts = Counts {
            v: Vec::new(),
            limit: (self.file_limit() / cs).max(1),
        };
        counts.add(0)?;
        let r = self.header.raw;
        for k in 0..g.clusters_for(r.l1_size as u64 * 8) {
            counts.add((r.l1_table_offset / cs) + k)?;
        }
        let l1 = self.l1.clone();
        let mut table = vec![0u8; cs as usize];
        for e in l1 {
            let Some(l2) = l1_l2_offset(e, g).map_err(|b| self.corrupt(b.0))? else {
                continue;
            };
            counts.add(l2.0 / cs)?;
            self.file
                .read_at(&mut table, l2.0)
                .map_err(|e| Error::io(e, "reading an L2 table"))?;
            for raw in decode_u64_table(&table) {
                let entry = L2Entry::decode(raw, g).map_err(|b| self.corrupt(b.0))?;
                for c in entry.referenced_clusters(g) {
                    counts.add(c)?;
                }
            }
        }
        if let Some(ext) = self.header.bitmaps {
            for k in 0..g.clusters_for(ext.directory_size) {
                counts.add(ext.directory_offset / cs + k)?;
            }
            for b in self.bitmaps.clone() {
                let bytes = b.table_size as u64 * 8;
                for k in 0..g.clusters_for(bytes) {
                    counts.add(b.table_offset / cs + k)?;
                }
                let mut buf = vec![0u8; bytes as usize];
                self.file
                    .read_at(&mut buf, b.table_offset)
                    .map_err(|e| Error::io(e, "reading a bitmap table"))?;
                let used = data_len(r.size, b.granularity_bits as u32).div_ceil(cs);
                for t in decode_u64_table(&buf)
                    .into_iter()
                    .take(used.max(1) as usize)
                {
                    if t & OFFSET_MASK != 0 {
                        counts.add((t & OFFSET_MASK) / cs)?;
                    }
                }
            }
        }
        self.write_new_refcounts(counts.v)
    }

    /// Lay out and write refcount structures for `counts`, then switch the header.
    fn write_new_refcounts(&mut self, mut counts: Vec<u32>) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let epb = g.refblock_entries();
        let e = (counts.len() as u64).max(self.file_limit() / cs);
        let (mut nb, mut nt) = (0u64, 1u64);
        loop {
            let total = e + nb + nt;
            let need_nb = total.div_ceil(epb);
            let need_nt = g.clusters_for(need_nb * 8).max(1);
            if (need_nb, need_nt) == (nb, nt) {
                break;
            }
            (nb, nt) = (need_nb.max(nb), need_nt.max(nt));
        }
        if nt * cs > crate::header::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "rebuilt refcount table would be too large",
            ));
        }
        counts.resize((e + nb + nt) as usize, 0);
        for c in e..e + nb + nt {
            counts[c as usize] = 1;
        }
        let max = g.max_refcount();
        let mut blocks = vec![0u8; (nb * cs) as usize];
        for (c, &n) in counts.iter().enumerate() {
            if n as u64 > max {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("cluster {c} has more references than refcount_bits allow"),
                ));
            }
            let (b, i) = (c / epb as usize, c % epb as usize);
            set_entry(
                &mut blocks[b * cs as usize..(b + 1) * cs as usize],
                i,
                g.refcount_order,
                n as u64,
            );
        }
        let mut rt: Vec<u64> = (0..nb).map(|k| (e + k) * cs).collect();
        rt.resize((nt * cs / 8) as usize, 0);
        self.write_raw(&blocks, e * cs, "rebuilt refcount blocks")?;
        self.write_raw(
            &encode_u64_table(&rt),
            (e + nb) * cs,
            "the rebuilt refcount table",
        )?;
        self.sync()?;
        let old = self.header.raw;
        self.header.raw.refcount_table_offset = (e + nb) * cs;
        self.header.raw.refcount_table_clusters = nt as u32;
        self.header.raw.incompatible_features &= !INCOMPAT_DIRTY;
        if let Err(err) = self.write_header() {
            self.header.raw = old;
            return Err(err);
        }
        // Forget the old structures: their clusters are free space now.
        let old_meta: HashSet<u64> = self
            .rt
            .iter()
            .filter(|&&o| o != 0)
            .map(|o| (o & !(cs - 1)) / cs)
            .chain(
                (0..old.refcount_table_clusters as u64).map(|k| old.refcount_table_offset / cs + k),
            )
            .collect();
        for c in old_meta {
            self.meta_clusters.remove(&c);
        }
        self.rb = crate::cache::TableCache::new(self.rb.capacity());
        self.rt = rt;
        self.rt_dirty = None;
        for c in e..e + nb + nt {
            self.meta_clusters.insert(c);
        }
        self.free_hint = 0;
        self.end_cluster = e + nb + nt;
        Ok(())
    }
}
