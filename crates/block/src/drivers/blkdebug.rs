//! The `blkdebug` filter: fault injection as QEMU's, for tests that must fail I/O on purpose.
//!
//! A blkdebug node passes every request to its `image` child. Events (named points of the
//! block layer and the format drivers, see [`crate::node::Node::debug_event`]) are delivered
//! to the node; rules bound to an event then either arm error injection (`inject-error`) or
//! change the node's state (`set-state`). Every request the node executes checks the armed
//! ("active") rules and fails with the first one that matches.
//!
//! The engine follows QEMU 10.0 exactly where a client can see it:
//! * the state starts at 1; a rule with `state` 0 applies in every state;
//! * when an event arms at least one inject rule, those rules *replace* the active set (in
//!   definition order); events that arm nothing leave it alone;
//! * of several matching set-state rules the first listed wins; the new state applies after
//!   all rules of the event were looked at;
//! * a request fails with the first active rule whose iotype and sector match; `errno` 0 or
//!   negative matches but does not fail; `once` removes the rule after it failed a request;
//! * event `none` is delivered once when the node opens.
//!
//! Limits: `align` pads reads and read-modify-writes unaligned writes (firing the
//! `pwritev_rmw_*` events), `max-transfer` splits requests, `opt-`/`max-write-zero` and
//! `opt-`/`max-discard` shape write-zeroes (unaligned parts become zero-data writes) and
//! discards (unaligned parts are dropped), as QEMU's block layer does around blkdebug.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::driver::{BlockStatus, Driver, ImageFacts};
use crate::node::NodeRef;

/// `BlkdebugIOType`: the kind of request a rule fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes of data.
    Write,
    /// Write-zeroes.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
    /// Block-status queries (only when named: not in the default set).
    BlockStatus,
}

/// An `inject-error` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectRule {
    /// Event that arms it (`BlkdebugEvent` wire name).
    pub event: String,
    /// Only in this state; 0 = any.
    pub state: i64,
    /// Only this request kind; `None` = all but block-status.
    pub iotype: Option<IoType>,
    /// Error returned; 0 or negative = matches without failing.
    pub errno: i64,
    /// Only requests containing byte `sector * 512`; -1 = any.
    pub sector: i64,
    /// Remove the rule after its first injected error.
    pub once: bool,
    /// Fail without yielding first (no other visible difference).
    pub immediately: bool,
}

/// A `set-state` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStateRule {
    /// Event that triggers it.
    pub event: String,
    /// Only in this state; 0 = any.
    pub state: i64,
    /// State after the event.
    pub new_state: i64,
}

/// Options of a blkdebug node (values already range-checked by the daemon; 0 = unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkdebugOptions {
    /// Error-injection rules, in definition order.
    pub inject: Vec<InjectRule>,
    /// State-transition rules, in definition order.
    pub set_state: Vec<SetStateRule>,
    /// Request alignment.
    pub align: u64,
    /// Largest request passed down.
    pub max_transfer: u64,
    /// Preferred write-zeroes alignment.
    pub opt_write_zero: u64,
    /// Largest write-zeroes request.
    pub max_write_zero: u64,
    /// Preferred discard alignment.
    pub opt_discard: u64,
    /// Largest discard request.
    pub max_discard: u64,
}

impl BlkdebugOptions {
    /// QEMU's open-time checks of the limits ("Cannot meet constraints with ...").
    /// `child_align` is the child's request alignment (1 for buffered host files).
    pub fn check(&self, child_align: u64) -> Result<(), String> {
        let bad = |what: &str, v: u64| Err(format!("Cannot meet constraints with {what} {v}"));
        const INT_MAX: u64 = i32::MAX as u64;
        if self.align != 0 && (self.align >= INT_MAX || !self.align.is_power_of_two()) {
            return bad("align", self.align);
        }
        let align = self.align.max(child_align).max(1);
        let multiple = |v: u64, of: u64| v != 0 && (v >= INT_MAX || !v.is_multiple_of(of));
        if multiple(self.max_transfer, align) {
            return bad("max-transfer", self.max_transfer);
        }
        if multiple(self.opt_write_zero, align) {
            return bad("opt-write-zero", self.opt_write_zero);
        }
        if multiple(self.max_write_zero, self.opt_write_zero.max(align)) {
            return bad("max-write-zero", self.max_write_zero);
        }
        // blockd's own bound: read-modify-write and zero fallbacks allocate buffers of these.
        for (what, v) in [
            ("align", self.align),
            ("opt-write-zero", self.opt_write_zero),
        ] {
            if v > MAX_BUFFERED_LIMIT {
                return Err(format!(
                    "blkdebug: {what} {v} is above blockd's limit of {MAX_BUFFERED_LIMIT}"
                ));
            }
        }
        if multiple(self.opt_discard, align) {
            return bad("opt-discard", self.opt_discard);
        }
        if multiple(self.max_discard, self.opt_discard.max(align)) {
            return bad("max-discard", self.max_discard);
        }
        Ok(())
    }
}

/// Largest `align` / `opt-write-zero` blockd accepts (their buffers are allocated per request).
pub const MAX_BUFFERED_LIMIT: u64 = 64 << 20;

/// The rule engine's state.
#[derive(Debug)]
struct Engine {
    state: i64,
    /// Inject rules by definition index; `None` once removed (`once`).
    inject: Vec<Option<InjectRule>>,
    set_state: Vec<SetStateRule>,
    /// Armed inject rules (indices into `inject`), in definition order.
    active: Vec<usize>,
}

impl Engine {
    fn new(opts: &BlkdebugOptions) -> Engine {
        Engine {
            state: 1,
            inject: opts.inject.iter().cloned().map(Some).collect(),
            set_state: opts.set_state.clone(),
            active: Vec::new(),
        }
    }

    fn applies(&self, rule_state: i64) -> bool {
        rule_state == 0 || rule_state == self.state
    }

    fn event(&mut self, event: &str) {
        let armed: Vec<usize> = (0..self.inject.len())
            .filter(|&i| {
                self.inject[i]
                    .as_ref()
                    .is_some_and(|r| r.event == event && self.applies(r.state))
            })
            .collect();
        if !armed.is_empty() {
            self.active = armed;
        }
        let new_state = self
            .set_state
            .iter()
            .find(|r| r.event == event && self.applies(r.state))
            .map(|r| r.new_state);
        if let Some(s) = new_state {
            self.state = s;
        }
    }

    /// The error for a request of `iotype` over `[offset, offset+len)`, if an active rule
    /// fails it. Returns (errno, immediately).
    fn check(&mut self, offset: u64, len: u64, iotype: IoType) -> Option<(i32, bool)> {
        let pos = self.active.iter().position(|&i| {
            self.inject[i].as_ref().is_some_and(|r| {
                let kind = match r.iotype {
                    Some(t) => t == iotype,
                    None => iotype != IoType::BlockStatus,
                };
                let place = r.sector == -1
                    || (len > 0
                        && r.sector >= 0
                        && r.sector.checked_mul(512).is_some_and(|b| {
                            let b = b as u64;
                            b >= offset && b - offset < len
                        }));
                kind && place
            })
        })?;
        let idx = self.active[pos];
        let rule = self.inject[idx].clone()?;
        if rule.errno == 0 {
            return None;
        }
        if rule.once {
            self.active.remove(pos);
            self.inject[idx] = None;
        }
        // A negative errno "fails" with a positive return value, which callers take as success.
        let errno = i32::try_from(rule.errno).ok().filter(|e| *e > 0)?;
        Some((errno, rule.immediately))
    }
}

/// A blkdebug node's driver.
pub struct BlkdebugDriver {
    child: NodeRef,
    opts: BlkdebugOptions,
    engine: Mutex<Engine>,
    /// Written (or tried to) since the last flush: a flush with nothing written is skipped
    /// entirely, as QEMU's block layer does.
    written: AtomicBool,
}

impl BlkdebugDriver {
    /// A blkdebug node over `child`; checks the limits and delivers event `none`.
    pub fn new(child: NodeRef, opts: BlkdebugOptions) -> Result<BlkdebugDriver, String> {
        opts.check(1)?;
        let d = BlkdebugDriver {
            child,
            engine: Mutex::new(Engine::new(&opts)),
            opts,
            written: AtomicBool::new(false),
        };
        d.event("none");
        Ok(d)
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self, event: &str) {
        self.engine().event(event);
    }

    /// Fail the request if an active rule says so.
    fn check(&self, offset: u64, len: u64, iotype: IoType) -> io::Result<()> {
        let failure = self.engine().check(offset, len, iotype);
        match failure {
            None => Ok(()),
            Some((errno, immediately)) => {
                if !immediately {
                    std::thread::yield_now();
                }
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }

    fn align(&self) -> u64 {
        self.opts.align.max(1)
    }

    /// Pieces of `[offset, offset+len)` no longer than `max` (0 = unlimited).
    fn chunks(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let step = if max == 0 { len.max(1) } else { max };
        (0..len.div_ceil(step)).map(move |i| {
            let o = offset + i * step;
            (o, step.min(offset + len - o))
        })
    }

    /// Aligned read: rule check and child read per transfer-sized piece.
    fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (o, n) in Self::chunks(offset, buf.len() as u64, self.opts.max_transfer) {
            self.check(o, n, IoType::Read)?;
            let s = (o - offset) as usize;
            self.child.read(o, &mut buf[s..s + n as usize])?;
        }
        Ok(())
    }

    fn write_aligned(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        for (o, n) in Self::chunks(offset, data.len() as u64, self.opts.max_transfer) {
            self.check(o, n, IoType::Write)?;
            let s = (o - offset) as usize;
            self.child.write(o, &data[s..s + n as usize])?;
        }
        Ok(())
    }

    /// The aligned block range around `[offset, end)` (end clamped to the child's size).
    fn widen(&self, offset: u64, end: u64) -> (u64, u64) {
        let a = self.align();
        let start = offset / a * a;
        let wide_end = end.div_ceil(a).saturating_mul(a);
        (start, wide_end.min(self.size().max(end)))
    }
}

impl Driver for BlkdebugDriver {
    fn name(&self) -> &'static str {
        "blkdebug"
    }
    fn size(&self) -> u64 {
        self.child.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let (start, wend) = self.widen(offset, end);
        if start == offset && wend == end {
            return self.read_aligned(offset, buf);
        }
        let mut tmp = vec![0u8; (wend - start) as usize];
        self.read_aligned(start, &mut tmp)?;
        let s = (offset - start) as usize;
        buf.copy_from_slice(&tmp[s..s + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.written.store(true, Ordering::Release);
        let end = offset + data.len() as u64;
        let (start, wend) = self.widen(offset, end);
        if start == offset && wend == end {
            return self.write_aligned(offset, data);
        }
        // Read-modify-write of the partial blocks at either end, as QEMU's block layer does.
        let a = self.align();
        let mut tmp = vec![0u8; (wend - start) as usize];
        if start < offset {
            self.event("pwritev_rmw_head");
            let n = a.min(wend - start) as usize;
            self.read_aligned(start, &mut tmp[..n])?;
            self.event("pwritev_rmw_after_head");
        }
        let tail_block = (wend - 1) / a * a;
        if end < wend && (tail_block >= start + a || start == offset) {
            self.event("pwritev_rmw_tail");
            let s = (tail_block - start) as usize;
            self.read_aligned(tail_block, &mut tmp[s..])?;
            self.event("pwritev_rmw_after_tail");
        }
        let s = (offset - start) as usize;
        tmp[s..s + data.len()].copy_from_slice(data);
        self.write_aligned(start, &tmp)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.written.store(true, Ordering::Release);
        let a = self.align().max(self.opts.opt_write_zero);
        let end = offset + len;
        let mid_start = offset.next_multiple_of(a).min(end);
        let mid_end = (end / a * a).max(mid_start);
        // Parts smaller than the write-zeroes alignment: the driver refuses them (ENOTSUP)
        // and the block layer writes a buffer of zeros instead.
        for (o, n) in [(offset, mid_start - offset), (mid_end, end - mid_end)] {
            if n > 0 {
                self.write(o, &vec![0u8; n as usize])?;
            }
        }
        for (o, n) in Self::chunks(mid_start, mid_end - mid_start, self.opts.max_write_zero) {
            if n == 0 {
                continue;
            }
            self.check(o, n, IoType::WriteZeroes)?;
            self.child.write_zeroes(o, n, may_unmap)?;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.written.store(true, Ordering::Release);
        let a = self.align().max(self.opts.opt_discard);
        let end = offset + len;
        let mid_start = offset.next_multiple_of(a).min(end);
        let mid_end = (end / a * a).max(mid_start);
        for (o, n) in Self::chunks(mid_start, mid_end - mid_start, self.opts.max_discard) {
            if n == 0 {
                continue;
            }
            self.check(o, n, IoType::Discard)?;
            self.child.discard(o, n)?;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        if !self.written.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        if let Err(e) = self.check(0, 0, IoType::Flush) {
            self.written.store(true, Ordering::Release);
            return Err(e);
        }
        self.child.flush()
    }
    fn close(&self) -> io::Result<()> {
        // Closing must not be failed by injected errors; the child flushes on its own close.
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.check(offset, len, IoType::BlockStatus)?;
        self.child.block_status(offset, len)
    }
    fn status_is_cheap(&self) -> bool {
        self.child.driver().status_is_cheap()
    }
    fn can_grow(&self) -> bool {
        self.child.driver().can_grow()
    }
    fn truncate(&self, size: u64) -> io::Result<()> {
        self.child.truncate(size)
    }
    fn facts(&self) -> ImageFacts {
        let child = self.child.facts();
        ImageFacts {
            filename: child.filename,
            actual_size: child.actual_size,
            ..ImageFacts::default()
        }
    }
    fn debug_event(&self, event: &str) {
        self.event(event);
    }
}

#[cfg(test)]
#[path = "blkdebug_tests.rs"]
mod tests;
