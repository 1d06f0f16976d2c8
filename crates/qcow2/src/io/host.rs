//! Requests whose bytes the kernel moves (`splice`, `copy_file_range`) instead of a buffer:
//! the format maps guest ranges to host-file ranges and hands those to a callback, with the
//! same planning, allocation and publication as a buffered request.

use super::{gate_poisoned, Source};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::HostFn;
use crate::Qcow2;

impl Qcow2 {
    /// Whether the storage below lets the kernel copy its bytes.
    pub fn host_io(&self) -> bool {
        self.file.host_io()
    }

    /// Hand the host-file pieces holding guest `[offset, offset + len)` to `f`, in guest order.
    /// `Ok(false)` (and `f` not called) unless every byte is plain data in the image file
    /// (zero, unallocated and compressed clusters are read through a buffer instead).
    pub fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> Result<bool> {
        self.check_open()?;
        self.check_range(offset, len)?;
        let Ok(n) = usize::try_from(len) else {
            return Ok(false);
        };
        if n == 0 || !self.file.host_io() {
            return Ok(false);
        }
        let _shared = self.gate.read().map_err(|_| gate_poisoned())?;
        let pieces = {
            let mut m = self.lock()?;
            self.plan_read(&mut m, offset, n)?
        };
        if !pieces.iter().all(|p| matches!(p.src, Source::Host(_))) {
            return Ok(false);
        }
        self.file.debug_event("read_aio");
        for (i, p) in pieces.iter().enumerate() {
            let Source::Host(host) = p.src else {
                continue;
            };
            let done = self
                .file
                .read_host(host, p.len as u64, f)
                .map_err(|e| Error::io(e, format!("reading guest data at {:#x}", p.guest)))?;
            if !done {
                if i == 0 {
                    return Ok(false);
                }
                return Err(Error::new(
                    ErrorKind::Io,
                    "the image file refused a kernel copy in the middle of a request",
                ));
            }
        }
        Ok(true)
    }

    /// Write whole clusters `[offset, offset + len)` by letting `f` fill their host-file
    /// ranges (allocated as for [`Qcow2::write_at`]: contiguous runs get contiguous host
    /// clusters, one L2 update per run when the write completes). `Ok(false)` (nothing
    /// changed) unless the range is cluster-aligned and the storage takes kernel copies.
    pub fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> Result<bool> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.geo.cluster_size();
        let end = offset + len;
        if len == 0 || !offset.is_multiple_of(cs) || !end.is_multiple_of(cs) || !self.file.host_io()
        {
            return Ok(false);
        }
        self.claim_bitmaps()?;
        self.log_modification(offset, len)?;
        let flush = {
            let _shared = self.gate.read().map_err(|_| gate_poisoned())?;
            self.write_planned(offset, end, |plan| {
                // Guest order, merging pieces contiguous in both guest and host.
                let mut pieces: Vec<(u64, u64, u64)> = plan
                    .inplace
                    .iter()
                    .map(|&(g, l, h)| (g, h, l as u64))
                    .chain(
                        plan.allocs
                            .iter()
                            .map(|r| (r.first * cs, r.host * cs, r.old.len() as u64 * cs)),
                    )
                    .collect();
                pieces.sort_unstable_by_key(|p| p.0);
                let mut merged: Vec<(u64, u64, u64)> = Vec::with_capacity(pieces.len());
                for p in pieces {
                    match merged.last_mut() {
                        Some(last) if last.0 + last.2 == p.0 && last.1 + last.2 == p.1 => {
                            last.2 += p.2
                        }
                        _ => merged.push(p),
                    }
                }
                self.file.debug_event("write_aio");
                for (guest, host, n) in merged {
                    let done = self
                        .file
                        .write_host(host, n, f)
                        .map_err(|e| Error::io(e, format!("writing guest data at {guest:#x}")))?;
                    if !done {
                        return Err(Error::new(
                            ErrorKind::Io,
                            "the image file refused a kernel copy in the middle of a request",
                        ));
                    }
                }
                Ok(())
            })?
        };
        if flush {
            self.flush_inner()?;
        }
        Ok(true)
    }
}
