//! The request paths: read, write (with allocation and copy-on-write), write zeroes, discard,
//! block status.
//!
//! Each request is planned under the metadata lock (mappings looked up, clusters allocated and
//! marked in flight), executed without it (data I/O), then published under it again.

mod batch;
mod host;
mod map;

pub use map::{AllocKind, AllocatedRange};

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::inflate::inflate;
use crate::mapping::{L2Entry, COPIED, ZERO};
use crate::meta::Meta;
use crate::types::{GuestCluster, GuestOffset};
use crate::{gate_poisoned, BlockStatus, Qcow2};

/// Unmapped clusters waiting for a flush before a flush is forced.
const PENDING_LIMIT: usize = 8192;
/// Largest zero buffer used when zeroes must be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// Where the bytes of one piece of a read come from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Host bytes at this offset.
    Host(u64),
    /// Zeros.
    Zero,
    /// The backing image at the same guest offset.
    Backing,
    /// A compressed cluster; `skip` bytes into its decompressed content.
    Compressed {
        /// Host offset of the stream.
        host: u64,
        /// Stream length.
        len: u64,
        /// Offset inside the cluster.
        skip: u64,
    },
}

/// A contiguous piece of a read.
#[derive(Debug)]
struct Piece {
    /// Guest offset of the first byte.
    guest: u64,
    /// Length in bytes.
    len: usize,
    /// Where the bytes come from.
    src: Source,
}

/// A run of guest clusters getting freshly allocated, contiguous host clusters.
#[derive(Debug)]
struct AllocRun {
    /// First guest cluster.
    first: u64,
    /// First host cluster.
    host: u64,
    /// Previous entries, one per cluster (COW source, references to drop).
    old: Vec<L2Entry>,
}

/// What a write does.
#[derive(Debug, Default)]
struct WritePlan {
    /// In-place writes: (guest offset, length, host offset).
    inplace: Vec<(u64, usize, u64)>,
    /// Allocating runs.
    allocs: Vec<AllocRun>,
}

impl Qcow2 {
    /// Read `buf.len()` bytes of guest data at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _shared = self.gate.read().map_err(|_| gate_poisoned())?;
        let pieces = {
            let mut m = self.lock()?;
            self.plan_read(&mut m, offset, buf.len())?
        };
        let mut pos = 0;
        for p in pieces {
            let dst = &mut buf[pos..pos + p.len];
            match p.src {
                Source::Host(h) => {
                    self.file.debug_event("read_aio");
                    self.file.read_at(dst, h).map_err(|e| {
                        Error::io(e, format!("reading guest data at {:#x}", p.guest))
                    })?
                }
                Source::Zero => dst.fill(0),
                Source::Backing => {
                    self.file.debug_event("read_backing_aio");
                    self.read_backing(dst, p.guest)?
                }
                Source::Compressed { host, len, skip } => {
                    let data = self.decompress(host, len)?;
                    dst.copy_from_slice(&data[skip as usize..skip as usize + p.len]);
                }
            }
            pos += p.len;
        }
        Ok(())
    }

    /// Look up the sources of `[offset, offset + len)`, merging contiguous pieces.
    fn plan_read(&self, m: &mut Meta, offset: u64, len: usize) -> Result<Vec<Piece>> {
        let cs = self.geo.cluster_size();
        let end = offset + len as u64;
        let mut out: Vec<Piece> = Vec::new();
        let mut off = offset;
        while off < end {
            let gc = self.geo.guest_cluster(GuestOffset(off));
            let skip = off & (cs - 1);
            let n = (cs - skip).min(end - off) as usize;
            let src = match m.l2_entry(gc)? {
                L2Entry::Unallocated => Source::Backing,
                L2Entry::Zero { .. } => Source::Zero,
                L2Entry::Data { host, .. } => Source::Host(host.0 + skip),
                L2Entry::Compressed { host, len } => Source::Compressed {
                    host: host.0,
                    len,
                    skip,
                },
            };
            if let Some(last) = out.last_mut() {
                let merge = match (last.src, src) {
                    (Source::Host(a), Source::Host(b)) => a + last.len as u64 == b,
                    (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                    _ => false,
                };
                if merge {
                    last.len += n;
                    off += n as u64;
                    continue;
                }
            }
            out.push(Piece {
                guest: off,
                len: n,
                src,
            });
            off += n as u64;
        }
        Ok(out)
    }

    /// Read guest bytes from the backing image (zeros without one or past its end).
    fn read_backing(&self, dst: &mut [u8], guest: u64) -> Result<()> {
        let backing = self.backing.read().map_err(|_| gate_poisoned())?.clone();
        let Some(b) = backing else {
            dst.fill(0);
            return Ok(());
        };
        let bsize = b
            .size()
            .map_err(|e| Error::io(e, "getting the backing image size"))?;
        let avail = bsize.saturating_sub(guest).min(dst.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut dst[..avail], guest)
                .map_err(|e| Error::io(e, format!("reading the backing image at {guest:#x}")))?;
        }
        dst[avail..].fill(0);
        Ok(())
    }

    /// The decompressed content of the compressed cluster at `host`.
    fn decompress(&self, host: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        if let Ok(z) = self.zcache.lock() {
            if let Some((h, data)) = z.as_ref() {
                if *h == host {
                    return Ok(data.clone());
                }
            }
        }
        let mut input = vec![0u8; len as usize];
        self.file.debug_event("read_compressed");
        self.file
            .read_at(&mut input, host)
            .map_err(|e| Error::io(e, format!("reading compressed cluster at {host:#x}")))?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        inflate(&input, &mut out).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("compressed cluster at {host:#x} cannot be decompressed: {e}"),
            )
        })?;
        let out = Arc::new(out);
        if let Ok(mut z) = self.zcache.lock() {
            *z = Some((host, out.clone()));
        }
        Ok(out)
    }

    /// The current content of a guest range from its old mapping (for copy-on-write).
    fn read_old(&self, entry: L2Entry, guest: u64, dst: &mut [u8]) -> Result<()> {
        let skip = guest & (self.geo.cluster_size() - 1);
        match entry {
            L2Entry::Unallocated => self.read_backing(dst, guest),
            L2Entry::Zero { .. } => {
                dst.fill(0);
                Ok(())
            }
            L2Entry::Data { host, .. } => self
                .file
                .read_at(dst, host.0 + skip)
                .map_err(|e| Error::io(e, "reading data for copy-on-write")),
            L2Entry::Compressed { host, len } => {
                let data = self.decompress(host.0, len)?;
                dst.copy_from_slice(&data[skip as usize..skip as usize + dst.len()]);
                Ok(())
            }
        }
    }

    /// Write `buf` at guest `offset`, allocating clusters as needed.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.claim_bitmaps()?;
        self.log_modification(offset, buf.len() as u64)?;
        let flush = {
            let _shared = self.gate.read().map_err(|_| gate_poisoned())?;
            self.write_inner(buf, offset)?
        };
        if flush {
            self.flush_inner()?;
        }
        Ok(())
    }

    /// Write with the gate held shared; returns whether enough clusters await freeing that a
    /// flush should run.
    fn write_inner(&self, buf: &[u8], offset: u64) -> Result<bool> {
        let end = offset + buf.len() as u64;
        self.write_planned(offset, end, |plan| {
            self.execute_write(plan, buf, offset, end)
        })
    }

    /// Plan `[offset, end)` (allocating), run `exec` on the plan without the lock, then
    /// publish it (or give the allocations back when `exec` failed).
    fn write_planned(
        &self,
        offset: u64,
        end: u64,
        exec: impl FnOnce(&WritePlan) -> Result<()>,
    ) -> Result<bool> {
        let cs = self.geo.cluster_size();
        let (first, last) = (offset / cs, (end - 1) / cs);
        let plan = {
            let mut m = self.lock()?;
            while (first..=last).any(|c| m.inflight.contains(&c)) {
                m = self.alloc_done.wait(m).map_err(|_| gate_poisoned())?;
            }
            self.plan_write(&mut m, offset, end)?
        };
        let io = exec(&plan);
        self.finish_plan(&plan, io)
    }

    /// Publish an executed plan (or give its allocations back when `io` failed) and take its
    /// clusters out of flight; returns whether a flush should run.
    fn finish_plan(&self, plan: &WritePlan, io: Result<()>) -> Result<bool> {
        let mut m = self.lock()?;
        let result = match io {
            Ok(()) => self.publish(&mut m, plan),
            Err(e) => {
                for run in &plan.allocs {
                    for k in 0..run.old.len() as u64 {
                        let _ = m.decref(run.host + k);
                    }
                }
                Err(e)
            }
        };
        for run in &plan.allocs {
            for k in 0..run.old.len() as u64 {
                m.inflight.remove(&(run.first + k));
            }
        }
        self.alloc_done.notify_all();
        result?;
        Ok(m.pending_free.len() > PENDING_LIMIT)
    }

    /// Under the lock: classify the clusters of `[offset, end)`, allocate what is needed and
    /// mark those guest clusters in flight.
    fn plan_write(&self, m: &mut Meta, offset: u64, end: u64) -> Result<WritePlan> {
        let cs = self.geo.cluster_size();
        let mut plan = WritePlan::default();
        let mut pending: Vec<(u64, L2Entry)> = Vec::new();
        let mut off = offset;
        while off < end {
            let gc = off / cs;
            let n = (cs - (off & (cs - 1))).min(end - off);
            match m.l2_entry(GuestCluster(gc))? {
                L2Entry::Data { host, copied: true } if m.l2_owned(GuestCluster(gc)) => {
                    let h = host.0 + (off & (cs - 1));
                    match plan.inplace.last_mut() {
                        Some((_, len, hh)) if *hh + *len as u64 == h => *len += n as usize,
                        _ => plan.inplace.push((off, n as usize, h)),
                    }
                }
                old => pending.push((gc, old)),
            }
            off += n;
        }
        for &(gc, _) in &pending {
            m.ensure_l2(GuestCluster(gc))?;
        }
        let mut i = 0;
        while i < pending.len() {
            let mut j = i + 1;
            while j < pending.len() && pending[j].0 == pending[j - 1].0 + 1 {
                j += 1;
            }
            let n = (j - i) as u64;
            self.file.debug_event("cluster_alloc");
            match m.alloc_clusters(n) {
                Ok(host) => plan.allocs.push(AllocRun {
                    first: pending[i].0,
                    host,
                    old: pending[i..j].iter().map(|p| p.1).collect(),
                }),
                Err(e) => {
                    for run in &plan.allocs {
                        for k in 0..run.old.len() as u64 {
                            let _ = m.decref(run.host + k);
                        }
                    }
                    return Err(e);
                }
            }
            i = j;
        }
        for run in &plan.allocs {
            for k in 0..run.old.len() as u64 {
                m.inflight.insert(run.first + k);
            }
        }
        Ok(plan)
    }

    /// Without the lock: write the data (with copy-on-write for partial clusters).
    fn execute_write(&self, plan: &WritePlan, buf: &[u8], offset: u64, end: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.file.debug_event("write_aio");
        for &(guest, len, host) in &plan.inplace {
            let start = (guest - offset) as usize;
            self.file
                .write_at(&buf[start..start + len], host)
                .map_err(|e| Error::io(e, format!("writing guest data at {guest:#x}")))?;
        }
        for run in &plan.allocs {
            let n = run.old.len() as u64;
            let (rs, re) = (run.first * cs, (run.first + n) * cs);
            let (ws, we) = (offset.max(rs), end.min(re));
            let host = run.host * cs;
            let data = &buf[(ws - offset) as usize..(we - offset) as usize];
            let io = |e| Error::io(e, format!("writing guest data at {ws:#x}"));
            if ws == rs && we == re {
                self.file.write_at(data, host).map_err(io)?;
                continue;
            }
            let mut tmp = vec![0u8; (re - rs) as usize];
            self.file.debug_event("cow_read");
            if ws > rs {
                self.read_old(run.old[0], rs, &mut tmp[..(ws - rs) as usize])?;
            }
            if we < re {
                let last = run.old[run.old.len() - 1];
                self.read_old(last, we, &mut tmp[(we - rs) as usize..])?;
            }
            tmp[(ws - rs) as usize..(we - rs) as usize].copy_from_slice(data);
            self.file.debug_event("cow_write");
            self.file.write_at(&tmp, host).map_err(io)?;
        }
        Ok(())
    }

    /// Under the lock: point the L2 entries at the newly written clusters.
    fn publish(&self, m: &mut Meta, plan: &WritePlan) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut first_err = None;
        for run in &plan.allocs {
            m.file_len = m.file_len.max((run.host + run.old.len() as u64) * cs);
            for (k, old) in run.old.iter().enumerate() {
                let gc = GuestCluster(run.first + k as u64);
                let raw = ((run.host + k as u64) * cs) | COPIED;
                match m.set_l2_raw(gc, raw) {
                    Ok(()) => m.pending_free.extend(old.referenced_clusters(self.geo)),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Make `[offset, offset + len)` read as zeros. On v3 images whole clusters become zero
    /// clusters (their host clusters freed when `may_unmap`, else kept preallocated);
    /// partial clusters (and v2 images) get zeros written.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.claim_bitmaps()?;
        self.log_modification(offset, len)?;
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let a = offset.next_multiple_of(cs).min(end);
        let b = (end / cs * cs).max(a);
        if a > offset {
            self.write_zero_bytes(offset, a - offset)?;
        }
        if b > a {
            if self.version >= 3 {
                self.unmap_clusters(a / cs, b / cs, Unmap::Zero { may_unmap })?;
            } else {
                self.zero_v2(a / cs, b / cs)?;
            }
        }
        if end > b {
            self.write_zero_bytes(b, end - b)?;
        }
        Ok(())
    }

    /// Discard whole clusters in `[offset, offset + len)`: their host clusters are freed and
    /// they read as zeros (v3 with a backing file) or fall through to the backing file.
    /// Partial clusters are left alone (discard is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let a = offset.next_multiple_of(cs);
        let b = end / cs * cs;
        // The caller marks its bitmaps for the whole request, so the log covers it all too.
        self.claim_bitmaps()?;
        self.log_modification(offset, len)?;
        if b <= a {
            return Ok(());
        }
        self.unmap_clusters(a / cs, b / cs, Unmap::Discard)
    }

    /// Write literal zeros over `[offset, offset + len)`.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(ZERO_CHUNK) as usize;
            self.write_at(&zeros[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }

    /// Whether unallocated clusters may read other than zeros: a backing file named in the
    /// header, or a backing image attached at open (`backing` given by node, e.g. a fleecing
    /// overlay whose header names none).
    fn may_read_backing(&self) -> bool {
        self.backing_file.is_some() || self.backing.read().map_or(true, |b| b.is_some())
    }

    /// Zero whole clusters `[c0, c1)` of a v2 image (no zero flag): write zeros except where
    /// the cluster already reads as zero (unallocated without a backing file).
    fn zero_v2(&self, c0: u64, c1: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let has_backing = self.may_read_backing();
        let mut c = c0;
        while c < c1 {
            let skip = {
                let mut m = self.lock()?;
                !has_backing && m.l2_entry(GuestCluster(c))? == L2Entry::Unallocated
            };
            if !skip {
                self.write_zero_bytes(c * cs, cs)?;
            }
            c += 1;
        }
        Ok(())
    }

    /// Change whole clusters `[c0, c1)` to zero / unallocated, one L2 table at a time.
    fn unmap_clusters(&self, c0: u64, c1: u64, mode: Unmap) -> Result<()> {
        let per = self.geo.l2_entries();
        let mut c = c0;
        let mut flush = false;
        while c < c1 {
            let batch_end = ((c / per + 1) * per).min(c1);
            let mut m = self.lock()?;
            while (c..batch_end).any(|x| m.inflight.contains(&x)) {
                m = self.alloc_done.wait(m).map_err(|_| gate_poisoned())?;
            }
            for gc in c..batch_end {
                self.unmap_one(&mut m, GuestCluster(gc), mode)?;
            }
            flush |= m.pending_free.len() > PENDING_LIMIT;
            c = batch_end;
        }
        if flush {
            self.flush_inner()?;
        }
        Ok(())
    }

    /// Under the lock: zero or discard one guest cluster.
    fn unmap_one(&self, m: &mut Meta, gc: GuestCluster, mode: Unmap) -> Result<()> {
        let entry = m.l2_entry(gc)?;
        let has_backing = self.may_read_backing();
        let zero_flag = self.version >= 3;
        let (raw, free) = match (mode, entry) {
            (_, L2Entry::Unallocated) if !has_backing => return Ok(()),
            (_, L2Entry::Zero { prealloc: None }) => return Ok(()),
            (Unmap::Zero { .. }, L2Entry::Zero { .. }) => return Ok(()),
            (Unmap::Zero { may_unmap: false }, L2Entry::Data { host, copied: true }) => {
                (host.0 | ZERO | COPIED, false)
            }
            (Unmap::Zero { .. }, _) => (ZERO, true),
            (Unmap::Discard, L2Entry::Unallocated) => return Ok(()),
            (Unmap::Discard, _) if has_backing && zero_flag => (ZERO, true),
            (Unmap::Discard, _) => (0, true),
        };
        m.set_l2_raw(gc, raw)?;
        if free {
            m.pending_free.extend(entry.referenced_clusters(self.geo));
        }
        Ok(())
    }

    /// Allocation status of `[offset, offset + len)`: the status of the first byte and how many
    /// bytes from `offset` share it.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.check_open()?;
        let size = self.virtual_size();
        if offset >= size {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("offset {offset:#x} beyond the virtual size"),
            ));
        }
        let end = offset.saturating_add(len).min(size);
        let cs = self.geo.cluster_size();
        let mut m = self.lock()?;
        let mut status = None;
        let mut off = offset;
        while off < end {
            let gc = GuestCluster(off / cs);
            let next = ((gc.0 + 1) * cs).min(end);
            let l2_missing = m.l2_offset(self.geo.l1_index(gc))?.is_none();
            let (s, next) = if l2_missing {
                let span = self.geo.l2_coverage();
                (BlockStatus::Unallocated, ((off / span + 1) * span).min(end))
            } else {
                let s = match m.l2_entry(gc)? {
                    L2Entry::Unallocated => BlockStatus::Unallocated,
                    L2Entry::Zero { .. } => BlockStatus::Zero,
                    L2Entry::Data { .. } | L2Entry::Compressed { .. } => BlockStatus::Data,
                };
                (s, next)
            };
            match status {
                None => status = Some(s),
                Some(prev) if prev != s => break,
                _ => {}
            }
            off = next;
        }
        Ok((status.unwrap_or(BlockStatus::Unallocated), off - offset))
    }
}

/// What [`Qcow2::unmap_clusters`] does to each cluster.
#[derive(Debug, Clone, Copy)]
enum Unmap {
    /// Make it read as zeros; `may_unmap` allows freeing its host cluster.
    Zero {
        /// Free the host cluster (else keep it as a preallocated zero cluster).
        may_unmap: bool,
    },
    /// Discard it.
    Discard,
}
