//! Reading and writing persistent bitmaps in the image: tables, data, and the directory
//! switch that makes a new set current (see the parent module for the crash rule).

use super::*;
use crate::error::{invalid, Error, ErrorKind, Result};
use crate::mapping::OFFSET_MASK;
use crate::meta::Meta;
use crate::ondisk::{decode_u64_table, encode_u64_table};
use crate::StoreBitmapRef;

impl Meta {
    /// Read and validate the bitmap directory named by the header (at open).
    pub fn load_directory(&mut self) -> Result<()> {
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        let limit = self.file_limit();
        if ext
            .directory_offset
            .checked_add(ext.directory_size)
            .is_none_or(|e| e > limit)
        {
            return Err(invalid("bitmap directory lies beyond the end of the file"));
        }
        let mut buf = vec![0u8; ext.directory_size as usize];
        self.file
            .read_at(&mut buf, ext.directory_offset)
            .map_err(|e| Error::io(e, "reading the bitmap directory"))?;
        let entries = parse_directory(&buf, ext.nb_bitmaps, self.geo, self.header.raw.size)?;
        for e in &entries {
            let bytes = e.table_size as u64 * 8;
            if e.table_offset + bytes > limit {
                return Err(invalid(format!(
                    "bitmap '{}': table lies beyond the end of the file",
                    e.name
                )));
            }
        }
        self.check_bitmap_layout(&ext, &entries)?;
        self.bitmaps = entries;
        Ok(())
    }

    /// Read one bitmap's table, validating its entries.
    pub(crate) fn read_bitmap_table(&mut self, e: &BitmapEntry) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; e.table_size as usize * 8];
        self.file
            .read_at(&mut buf, e.table_offset)
            .map_err(|err| Error::io(err, format!("reading the table of bitmap '{}'", e.name)))?;
        let table = decode_u64_table(&buf);
        let limit = self.file_limit();
        for (i, &t) in table.iter().enumerate() {
            let off = t & OFFSET_MASK;
            let bad = t & TABLE_RESERVED != 0
                || !self.geo.is_aligned(off)
                || (off != 0 && t & 1 != 0)
                || off + self.geo.cluster_size() > limit.max(self.geo.cluster_size()) && off != 0;
            if bad {
                return Err(invalid(format!(
                    "bitmap '{}': bad table entry {i} ({t:#018x})",
                    e.name
                )));
            }
        }
        Ok(table)
    }

    /// Read the data of one bitmap (`data_len` bytes, bits past the disk cleared).
    pub fn read_bitmap_data(&mut self, e: &BitmapEntry) -> Result<Vec<u8>> {
        let table = self.read_bitmap_table(e)?;
        let cs = self.geo.cluster_size() as usize;
        let len = data_len(self.header.raw.size, e.granularity_bits as u32) as usize;
        let mut data = vec![0u8; len];
        for (k, chunk) in data.chunks_mut(cs).enumerate() {
            let t = table.get(k).copied().unwrap_or(0);
            let off = t & OFFSET_MASK;
            if off != 0 {
                self.file.read_at(chunk, off).map_err(|err| {
                    Error::io(err, format!("reading data of bitmap '{}'", e.name))
                })?;
            } else if t & 1 != 0 {
                chunk.fill(0xff);
            }
        }
        mask_tail(&mut data, self.header.raw.size, e.granularity_bits as u32);
        Ok(data)
    }

    /// Host clusters owned by a bitmap (table and data), for freeing.
    fn bitmap_clusters(&mut self, e: &BitmapEntry) -> Result<Vec<u64>> {
        let g = self.geo;
        let mut out: Vec<u64> = (0..g.clusters_for(e.table_size as u64 * 8))
            .map(|k| (e.table_offset >> g.cluster_bits) + k)
            .collect();
        for t in self.read_bitmap_table(e)? {
            let off = t & OFFSET_MASK;
            if off != 0 {
                out.push(off >> g.cluster_bits);
            }
        }
        Ok(out)
    }

    /// Write one bitmap's data clusters (non-zero ones only) and table; returns the new entry.
    fn write_bitmap(
        &mut self,
        b: &StoreBitmapRef<'_>,
        gbits: u8,
        flags: u32,
        new: &mut Vec<u64>,
        buf: &mut [u8],
    ) -> Result<BitmapEntry> {
        let g = self.geo;
        let cs = g.cluster_size() as usize;
        let len = data_len(self.header.raw.size, gbits as u32) as usize;
        // The bits are read one cluster at a time into `buf` (no copy of the whole bitmap):
        // zero clusters are skipped unread, the bits past the disk cleared in the last one.
        let table_size = len.div_ceil(cs).max(1);
        let mut table = vec![0u64; table_size];
        for (k, slot) in table.iter_mut().enumerate().take(len.div_ceil(cs)) {
            let start = k * cs;
            let n = cs.min(len - start);
            if b.data.is_zero(start as u64, n as u64) {
                continue;
            }
            buf.fill(0);
            b.data.read(start as u64, &mut buf[..n]);
            if start + n == len {
                mask_tail(&mut buf[..n], self.header.raw.size, gbits as u32);
            }
            if buf[..n].iter().all(|&x| x == 0) {
                continue;
            }
            let c = self.alloc_clusters(1)?;
            new.push(c);
            self.write_raw(buf, c << g.cluster_bits, "bitmap data")?;
            *slot = c << g.cluster_bits;
        }
        let tclusters = g.clusters_for(table_size as u64 * 8);
        let tc = self.alloc_clusters(tclusters)?;
        new.extend(tc..tc + tclusters);
        let mut tbytes = encode_u64_table(&table);
        tbytes.resize((tclusters * g.cluster_size()) as usize, 0);
        self.write_raw(&tbytes, tc << g.cluster_bits, "a bitmap table")?;
        Ok(BitmapEntry {
            name: b.name.to_string(),
            table_offset: tc << g.cluster_bits,
            table_size: table_size as u32,
            flags,
            granularity_bits: gbits,
        })
    }

    /// Make `entries` the bitmap set of the file: write a new directory, switch the header,
    /// then free `old_clusters`. `new` lists clusters allocated for this change (freed on error).
    fn commit_directory(
        &mut self,
        entries: Vec<BitmapEntry>,
        old_clusters: Vec<u64>,
        mut new: Vec<u64>,
    ) -> Result<()> {
        let result = self.switch_directory(&entries, &mut new);
        if let Err(err) = result {
            for c in new {
                let _ = self.decref(c);
            }
            return Err(err);
        }
        for &c in &new {
            self.meta_clusters.insert(c);
        }
        for c in old_clusters {
            self.meta_clusters.remove(&c);
            self.decref(c)?;
        }
        self.bitmaps = entries;
        self.flush_refcounts()
    }

    /// Write the directory for `entries` and point the header at it (durably).
    fn switch_directory(&mut self, entries: &[BitmapEntry], new: &mut Vec<u64>) -> Result<()> {
        let g = self.geo;
        let dir = serialize_directory(entries);
        if dir.len() as u64 > MAX_DIRECTORY_BYTES {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "bitmap directory would be too large",
            ));
        }
        let ext = if entries.is_empty() {
            None
        } else {
            let n = g.clusters_for(dir.len() as u64);
            let c = self.alloc_clusters(n)?;
            new.extend(c..c + n);
            let mut buf = dir.clone();
            buf.resize((n * g.cluster_size()) as usize, 0);
            self.write_raw(&buf, c << g.cluster_bits, "the bitmap directory")?;
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                reserved: 0,
                directory_size: dir.len() as u64,
                directory_offset: c << g.cluster_bits,
            })
        };
        self.flush_refcounts()?;
        self.sync()?;
        let (old_ext, old_auto) = (self.header.bitmaps, self.header.raw.autoclear_features);
        self.header.bitmaps = ext;
        if ext.is_some() {
            self.header.raw.autoclear_features |= AUTOCLEAR_BITMAPS;
        } else {
            self.header.raw.autoclear_features &= !AUTOCLEAR_BITMAPS;
        }
        if let Err(err) = self.write_header() {
            self.header.bitmaps = old_ext;
            self.header.raw.autoclear_features = old_auto;
            return Err(err);
        }
        Ok(())
    }

    /// Clusters of the current directory.
    fn directory_clusters(&self) -> Vec<u64> {
        let g = self.geo;
        match self.header.bitmaps {
            Some(ext) => (0..g.clusters_for(ext.directory_size))
                .map(|k| (ext.directory_offset >> g.cluster_bits) + k)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Change only the entries' flags, in place as QEMU does: nothing is allocated or freed.
    /// Unlike QEMU, the bitmaps autoclear bit is left set: each entry's 4-byte flags word lies
    /// inside one 512-byte sector, so a torn write leaves every entry with either its old or
    /// its new flags, both valid (a claim is synced before the first write it announces).
    /// Clearing the bit for the rewrite, as QEMU does, would make a crash inside the window
    /// lose every bitmap of the image, which the dirty-region log exists to prevent.
    pub fn rewrite_flags(&mut self, entries: Vec<BitmapEntry>) -> Result<()> {
        let Some(ext) = self.header.bitmaps else {
            return Err(Error::new(ErrorKind::Io, "no bitmap directory to update"));
        };
        let same_layout = entries.len() == self.bitmaps.len()
            && entries.iter().zip(&self.bitmaps).all(|(a, b)| {
                a.name == b.name
                    && a.table_offset == b.table_offset
                    && a.table_size == b.table_size
                    && a.granularity_bits == b.granularity_bits
            });
        let dir = serialize_directory(&entries);
        if !same_layout || dir.len() as u64 != ext.directory_size {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "an in-place bitmap directory update may change flags only",
            ));
        }
        // The directory's clusters were checked against all metadata at open: they are ours.
        self.write_raw(&dir, ext.directory_offset, "the bitmap directory")?;
        self.bitmaps = entries;
        Ok(())
    }

    /// Replace the whole bitmap set (see [`crate::Qcow2::store_bitmaps`]).
    pub fn store(&mut self, list: &[StoreBitmapRef<'_>], in_use: bool) -> Result<()> {
        if self.header.raw.version < 3 {
            return Err(Error::plain(
                ErrorKind::Unsupported,
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        if list.len() > MAX_BITMAPS as usize {
            return Err(Error::new(ErrorKind::InvalidArgument, "too many bitmaps"));
        }
        let mut gbits = Vec::with_capacity(list.len());
        for (i, b) in list.iter().enumerate() {
            gbits.push(check_new(b.name, b.granularity)?);
            if list[..i].iter().any(|o| o.name == b.name) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("bitmap '{}' given twice", b.name),
                ));
            }
        }
        let old_entries = self.bitmaps.clone();
        let mut old_clusters = self.directory_clusters();
        let mut new = Vec::new();
        let mut entries = Vec::with_capacity(list.len());
        let mut kept = Vec::new();
        // One cluster buffer for the data of every bitmap.
        let mut buf = vec![0u8; self.geo.cluster_size() as usize];
        for (b, &gb) in list.iter().zip(&gbits) {
            let keep = old_entries
                .iter()
                .find(|o| o.name == b.name && b.inconsistent_keep_in_use);
            if let Some(o) = keep {
                let mut e = o.clone();
                e.flags |= FLAG_IN_USE;
                kept.push(o.name.clone());
                entries.push(e);
                continue;
            }
            let flags = if in_use || b.inconsistent_keep_in_use {
                FLAG_IN_USE
            } else {
                0
            } | if b.auto { FLAG_AUTO } else { 0 };
            match self.write_bitmap(b, gb, flags, &mut new, &mut buf) {
                Ok(e) => entries.push(e),
                Err(err) => {
                    for c in new {
                        let _ = self.decref(c);
                    }
                    return Err(err);
                }
            }
        }
        for o in &old_entries {
            if !kept.contains(&o.name) {
                old_clusters.extend(self.bitmap_clusters(o)?);
            }
        }
        self.commit_directory(entries, old_clusters, new)
    }

    /// Delete one bitmap from the file.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let Some(pos) = self.bitmaps.iter().position(|b| b.name == name) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("bitmap '{name}' not found in the image"),
            ));
        };
        let mut entries = self.bitmaps.clone();
        let gone = entries.remove(pos);
        let mut old = self.directory_clusters();
        old.extend(self.bitmap_clusters(&gone)?);
        self.commit_directory(entries, old, Vec::new())
    }

    /// Check that a new bitmap could be stored (see [`crate::Qcow2::can_store_bitmap`]).
    pub fn can_store(&self, name: &str, granularity: u64) -> Result<()> {
        if self.header.raw.version < 3 {
            return Err(Error::plain(
                ErrorKind::Unsupported,
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        let gbits = check_new(name, granularity)?;
        if self.bitmaps.iter().any(|b| b.name == name) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("bitmap '{name}' already exists in the image"),
            ));
        }
        if self.bitmaps.len() >= MAX_BITMAPS as usize {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the image already has the maximum number of bitmaps",
            ));
        }
        let table = data_len(self.header.raw.size, gbits as u32).div_ceil(self.geo.cluster_size());
        if table > MAX_TABLE_ENTRIES || table * self.geo.cluster_size() > MAX_PHYS_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "bitmap would be too large for the image; use a larger granularity",
            ));
        }
        let dir: usize = self.bitmaps.iter().map(|b| b.encoded_len()).sum::<usize>()
            + (DirEntryHead::SIZE + name.len()).div_ceil(8) * 8;
        if dir as u64 > MAX_DIRECTORY_BYTES {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "bitmap directory would be too large",
            ));
        }
        Ok(())
    }
}

/// Clear the bits of the last byte that lie past the end of the disk.
pub(super) fn mask_tail(data: &mut [u8], size: u64, gbits: u32) {
    let bits = size.div_ceil(1u64 << gbits);
    let rem = (bits % 8) as u32;
    if rem != 0 {
        if let Some(last) = data.last_mut() {
            *last &= (1u8 << rem) - 1;
        }
    }
}
