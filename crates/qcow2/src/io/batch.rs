//! Batched writes of scattered whole clusters (a backup's dirty clusters): every cluster of
//! the batch gets its place in ONE contiguous host allocation, the data goes out in one write,
//! and the L2 entries are published together, instead of an allocation, a write and an L2
//! update per cluster.

use super::{gate_poisoned, AllocRun, WritePlan};
use crate::error::{Error, ErrorKind, Result};
use crate::mapping::L2Entry;
use crate::meta::Meta;
use crate::storage::HostFn;
use crate::types::GuestCluster;
use crate::Qcow2;

impl Qcow2 {
    /// Write the guest runs `runs` (offset, length; whole clusters, ascending, not
    /// overlapping) by letting `f` fill their host-file range: one contiguous range holding
    /// the runs back to back, in order. `Ok(false)`, nothing changed and `f` not called: the
    /// storage takes no kernel copies, or the batch does not fit one fresh allocation
    /// (unaligned, or some cluster is already allocated and owned, so it would be written in
    /// place); write the runs one by one.
    pub fn write_batch_host(&self, runs: &[(u64, u64)], f: &mut HostFn<'_>) -> Result<bool> {
        self.check_writable()?;
        if !self.file.host_io() {
            return Ok(false);
        }
        let cs = self.geo.cluster_size();
        let mut total = 0u64;
        let mut prev_end = 0u64;
        for &(off, len) in runs {
            self.check_range(off, len)?;
            if len == 0 || !off.is_multiple_of(cs) || !len.is_multiple_of(cs) || off < prev_end {
                return Ok(false);
            }
            prev_end = off + len;
            total += len;
        }
        if runs.is_empty() {
            return Ok(false);
        }
        self.claim_bitmaps()?;
        for &(off, len) in runs {
            self.log_modification(off, len)?;
        }
        let flush = {
            let _shared = self.gate.read().map_err(|_| gate_poisoned())?;
            let plan = {
                let mut m = self.lock()?;
                let busy = |m: &Meta| {
                    runs.iter()
                        .any(|&(o, l)| (o / cs..(o + l) / cs).any(|c| m.inflight.contains(&c)))
                };
                while busy(&m) {
                    m = self.alloc_done.wait(m).map_err(|_| gate_poisoned())?;
                }
                match self.plan_batch(&mut m, runs, total / cs)? {
                    Some(plan) => plan,
                    None => return Ok(false),
                }
            };
            self.file.debug_event("write_aio");
            let host = plan.allocs.first().map_or(0, |r| r.host) * cs;
            let io = match self.file.write_host(host, total, f) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Error::new(
                    ErrorKind::Io,
                    "the image file refused a kernel copy in the middle of a request",
                )),
                Err(e) => Err(Error::io(
                    e,
                    format!("writing guest data at {:#x}", runs[0].0),
                )),
            };
            self.finish_plan(&plan, io)?
        };
        if flush {
            self.flush_inner()?;
        }
        Ok(true)
    }

    /// Under the lock: `None` if a cluster is owned data (written in place); else one host
    /// allocation of `n` clusters shared out to the runs in order, marked in flight.
    fn plan_batch(&self, m: &mut Meta, runs: &[(u64, u64)], n: u64) -> Result<Option<WritePlan>> {
        let cs = self.geo.cluster_size();
        let mut olds: Vec<Vec<L2Entry>> = Vec::with_capacity(runs.len());
        for &(off, len) in runs {
            let mut old = Vec::with_capacity((len / cs) as usize);
            for gc in off / cs..(off + len) / cs {
                let e = m.l2_entry(GuestCluster(gc))?;
                if matches!(e, L2Entry::Data { copied: true, .. }) && m.l2_owned(GuestCluster(gc)) {
                    return Ok(None);
                }
                old.push(e);
            }
            olds.push(old);
        }
        for &(off, len) in runs {
            for gc in off / cs..(off + len) / cs {
                m.ensure_l2(GuestCluster(gc))?;
            }
        }
        self.file.debug_event("cluster_alloc");
        let mut host = m.alloc_clusters(n)?;
        let mut plan = WritePlan::default();
        for (&(off, _), old) in runs.iter().zip(olds) {
            let k = old.len() as u64;
            for c in 0..k {
                m.inflight.insert(off / cs + c);
            }
            plan.allocs.push(AllocRun {
                first: off / cs,
                host,
                old,
            });
            host += k;
        }
        Ok(Some(plan))
    }
}
