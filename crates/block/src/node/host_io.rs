//! Kernel-side copies through a node: the node hands host-file ranges to a callback
//! (`splice` / `copy_file_range` run there) with the same checks, hooks, request tracking
//! and bitmap marking as a buffered read or write.

use std::io;

use super::Node;
use crate::driver::HostFn;

impl Node {
    /// Whether this node's bytes can be moved by the kernel ([`Node::read_host`],
    /// [`Node::write_host`]): the driver maps them to a plain file, and `detect-zeroes` (which
    /// must see the data) is off.
    pub fn host_io(&self) -> bool {
        !matches!(self.flags.detect_zeroes.as_str(), "on" | "unmap") && self.driver.host_io()
    }

    /// Hand the host-file pieces of `[offset, offset+len)` to `f` in order. `Ok(false)` (and
    /// `f` not called): these bytes are not plain file data here; read them with [`Node::read`].
    pub fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        self.check_range(offset, len)?;
        if len == 0 || !self.driver.host_io() {
            return Ok(false);
        }
        let _t = self.tracker.begin(offset, len, false, false);
        self.driver.read_host(offset, len, f)
    }

    /// Let `f` write the host-file pieces of `[offset, offset+len)` in order, then mark the
    /// recording bitmaps as [`Node::write`] does. `Ok(false)` (nothing changed, `f` not
    /// called): not possible here; write through a buffer instead.
    pub fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        self.check_write(offset, len)?;
        if len == 0 || !self.host_io() {
            return Ok(false);
        }
        let _gate = self.gate();
        self.run_hooks(offset, len)?;
        self.driver.debug_event("pwritev");
        let _t = self.tracker.begin(offset, len, true, false);
        let result = self.driver.write_host(offset, len, f);
        if !matches!(result, Ok(false)) {
            // Mark even on failure: part of the range may have changed.
            self.mark_dirty(offset, len);
            self.observe(offset, len, &result.as_ref().map(|_| ()).map_err(clone_err));
        }
        self.driver.debug_event("pwritev_done");
        result
    }
}

impl Node {
    /// Let `f` fill the runs `runs` (offset, length; ascending, not overlapping) as one driver
    /// request ([`Driver::write_batch_host`]: host-file pieces holding the runs back to back),
    /// with the checks, hooks, request tracking and bitmap marking of a [`Node::write_host`]
    /// per run. `Ok(false)` (nothing changed, `f` not called): not possible here; write the
    /// runs one by one.
    ///
    /// [`Driver::write_batch_host`]: crate::driver::Driver::write_batch_host
    pub fn write_batch_host(&self, runs: &[(u64, u64)], f: &mut HostFn<'_>) -> io::Result<bool> {
        for &(offset, len) in runs {
            self.check_write(offset, len)?;
        }
        if runs.is_empty() || !self.host_io() {
            return Ok(false);
        }
        let _gate = self.gate();
        for &(offset, len) in runs {
            self.run_hooks(offset, len)?;
        }
        self.driver.debug_event("pwritev");
        let _t: Vec<_> = runs
            .iter()
            .map(|&(offset, len)| self.tracker.begin(offset, len, true, false))
            .collect();
        let result = self.driver.write_batch_host(runs, f);
        if !matches!(result, Ok(false)) {
            for &(offset, len) in runs {
                // Mark even on failure: part of the range may have changed.
                self.mark_dirty(offset, len);
                self.observe(offset, len, &result.as_ref().map(|_| ()).map_err(clone_err));
            }
        }
        self.driver.debug_event("pwritev_done");
        result
    }
}

fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}
