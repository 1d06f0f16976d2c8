//! The image's own allocation map: which guest ranges its file allocates, and where, found by
//! walking L2 tables (one lookup per table, not per cluster).

use crate::error::{Error, ErrorKind, Result};
use crate::mapping::L2Entry;
use crate::types::GuestCluster;
use crate::Qcow2;

/// How a run of guest clusters is allocated in the image's own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocKind {
    /// Plain data: the run's bytes are the file's bytes from this host offset on, in one
    /// contiguous piece.
    Data {
        /// Host offset of the run's first byte.
        host: u64,
    },
    /// Reads as zeros (zero clusters, with or without a preallocated host cluster).
    Zero,
    /// Compressed clusters (their bytes must be decompressed; no plain host range).
    Compressed,
}

/// A run of guest bytes allocated in the image's own file (see [`Qcow2::allocated_ranges`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatedRange {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the file holds for it.
    pub kind: AllocKind,
}

impl AllocatedRange {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

impl Qcow2 {
    /// The ranges of `[offset, offset + len)` (clipped to the virtual size) that this image's
    /// own file allocates, in guest order; what it leaves unallocated (reads fall through to
    /// the backing image, or zeros) is the gaps between them. Adjacent clusters of one kind
    /// form one range (data only while their host clusters are contiguous too); the first and
    /// last range are clipped to the request. The mappings are the published ones, as
    /// [`Qcow2::block_status`] sees them. Each L2 table is read once (from the cache, else from
    /// the file without filling the cache) under the metadata lock, which is released between
    /// tables. The result holds at most one range per allocated cluster of the request.
    pub fn allocated_ranges(&self, offset: u64, len: u64) -> Result<Vec<AllocatedRange>> {
        self.check_open()?;
        let size = self.virtual_size();
        let end = offset.saturating_add(len).min(size);
        let mut out: Vec<AllocatedRange> = Vec::new();
        if offset >= end {
            return Ok(out);
        }
        let cs = self.geo.cluster_size();
        let per_table = self.geo.l2_entries();
        let span = self.geo.l2_coverage();
        let mut table = vec![0u8; cs as usize];
        let mut at = offset;
        while at < end {
            let gc = GuestCluster(at / cs);
            let table_end = ((at / span + 1) * span).min(end);
            let first = self.geo.l2_index(gc);
            let count = (table_end.div_ceil(cs) - gc.0) as usize;
            let mut entries = Vec::with_capacity(count.min(per_table as usize));
            {
                let mut m = self.lock()?;
                if let Some(l2) = m.l2_offset(self.geo.l1_index(gc))? {
                    m.l2_table_peek(l2, &mut table)?;
                    for k in 0..count {
                        let i = first + k;
                        let raw = u64::from_be_bytes(
                            table[i * 8..i * 8 + 8]
                                .try_into()
                                .map_err(|_| Error::new(ErrorKind::Io, "short L2 table"))?,
                        );
                        let c = GuestCluster(gc.0 + k as u64);
                        let entry = match L2Entry::decode(raw, self.geo) {
                            Ok(e) => e,
                            Err(b) => return Err(m.corrupt(b.0)),
                        };
                        m.check_entry(c, entry)?;
                        entries.push(entry);
                    }
                }
            }
            for (k, entry) in entries.into_iter().enumerate() {
                let c_start = (gc.0 + k as u64) * cs;
                let from = c_start.max(at);
                let to = (c_start + cs).min(table_end);
                let kind = match entry {
                    L2Entry::Unallocated => continue,
                    L2Entry::Zero { .. } => AllocKind::Zero,
                    L2Entry::Compressed { .. } => AllocKind::Compressed,
                    L2Entry::Data { host, .. } => AllocKind::Data {
                        host: host.0 + (from - c_start),
                    },
                };
                push_range(&mut out, from, to - from, kind);
            }
            at = table_end;
        }
        Ok(out)
    }
}

/// Append a range, merging it into the last one when it continues it.
fn push_range(out: &mut Vec<AllocatedRange>, offset: u64, len: u64, kind: AllocKind) {
    if let Some(last) = out.last_mut() {
        if last.end() == offset {
            let continues = match (last.kind, kind) {
                (AllocKind::Data { host: a }, AllocKind::Data { host: b }) => a + last.len == b,
                (a, b) => a == b,
            };
            if continues {
                last.len += len;
                return;
            }
        }
    }
    out.push(AllocatedRange { offset, len, kind });
}
