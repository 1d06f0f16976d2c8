//! A driver for tests (this crate's and other crates'): an in-memory disk whose requests can
//! be held, delayed and failed, and which logs what reached it.
//!
//! ```ignore
//! let (node, ctl) = TestDriver::node("t", 1 << 20);
//! graph.add_node_ref(node.clone())?;
//! ctl.fail(Op::Write, libc::EIO, 1);   // the next write fails with EIO
//! ctl.hold(Op::Read);                   // reads wait in the driver ...
//! ctl.release(Op::Read);                // ... until released
//! ```

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::driver::{BlockStatus, Driver, ImageFacts};
use crate::node::{Node, NodeFlags, NodeRef};

/// Kinds of request, for the controls and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// read
    Read,
    /// write
    Write,
    /// write_zeroes (flag: may unmap)
    WriteZeroes,
    /// discard
    Discard,
    /// flush
    Flush,
    /// close (the node's last call; holding it keeps a close in progress)
    Close,
    /// facts (what the queries read: a file's size; holding it is a hung `fstat`)
    Facts,
}

#[derive(Default)]
struct Ctl {
    held: Vec<Op>,
    waiting: usize,
    fail: Vec<(Op, i32, usize)>,
    delay: Option<Duration>,
    log: Vec<(Op, u64, u64)>,
}

/// Controls of one [`TestDriver`].
#[derive(Default)]
pub struct Controls {
    ctl: Mutex<Ctl>,
    changed: Condvar,
}

impl Controls {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests of kind `op` wait in the driver until [`Controls::release`].
    pub fn hold(&self, op: Op) {
        self.lock().held.push(op);
    }

    /// Let held requests of kind `op` go on.
    pub fn release(&self, op: Op) {
        self.lock().held.retain(|o| *o != op);
        self.changed.notify_all();
    }

    /// Requests waiting in the driver because they are held.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Wait until at least `n` requests are held in the driver.
    pub fn wait_for_waiting(&self, n: usize) {
        let mut c = self.lock();
        while c.waiting < n {
            c = self.changed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next `count` requests of kind `op` fail with `errno` (after reaching the driver).
    pub fn fail(&self, op: Op, errno: i32, count: usize) {
        self.lock().fail.push((op, errno, count));
    }

    /// Every request sleeps this long first (None: no delay).
    pub fn delay(&self, d: Option<Duration>) {
        self.lock().delay = d;
    }

    /// Requests that reached the driver: (kind, offset, len), oldest first.
    pub fn log(&self) -> Vec<(Op, u64, u64)> {
        self.lock().log.clone()
    }

    fn enter(&self, op: Op, offset: u64, len: u64) -> io::Result<()> {
        let delay = {
            let mut c = self.lock();
            c.log.push((op, offset, len));
            c.delay
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let mut c = self.lock();
        if c.held.contains(&op) {
            c.waiting += 1;
            self.changed.notify_all();
            while c.held.contains(&op) {
                c = self.changed.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            c.waiting -= 1;
        }
        if let Some(i) = c.fail.iter().position(|(o, _, n)| *o == op && *n > 0) {
            let errno = c.fail[i].1;
            c.fail[i].2 -= 1;
            if c.fail[i].2 == 0 {
                c.fail.remove(i);
            }
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(())
    }
}

/// An in-memory disk with [`Controls`].
pub struct TestDriver {
    data: Mutex<Vec<u8>>,
    ctl: Arc<Controls>,
}

impl TestDriver {
    /// A driver of `size` zero bytes (bounded by the caller: tests only).
    pub fn new(size: usize) -> (TestDriver, Arc<Controls>) {
        let ctl = Arc::new(Controls::default());
        (
            TestDriver {
                data: Mutex::new(vec![0; size]),
                ctl: ctl.clone(),
            },
            ctl,
        )
    }

    /// A read-write node `name` over a new test driver.
    pub fn node(name: &str, size: usize) -> (NodeRef, Arc<Controls>) {
        TestDriver::node_with(name, size, NodeFlags::default())
    }

    /// [`TestDriver::node`] with node options.
    pub fn node_with(name: &str, size: usize, flags: NodeFlags) -> (NodeRef, Arc<Controls>) {
        let (d, ctl) = TestDriver::new(size);
        let node = Node::new(
            name.to_string(),
            false,
            Box::new(d),
            Vec::new(),
            false,
            flags,
        );
        (Arc::new(node), ctl)
    }

    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.bytes().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl Driver for TestDriver {
    fn name(&self) -> &'static str {
        "test"
    }
    fn size(&self) -> u64 {
        self.bytes().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.ctl.enter(Op::Read, offset, buf.len() as u64)?;
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.bytes()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.ctl.enter(Op::Write, offset, data.len() as u64)?;
        let r = self.range(offset, data.len() as u64)?;
        self.bytes()[r].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.ctl.enter(Op::WriteZeroes, offset, len)?;
        let r = self.range(offset, len)?;
        self.bytes()[r].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ctl.enter(Op::Discard, offset, len)?;
        let r = self.range(offset, len)?;
        self.bytes()[r].fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.ctl.enter(Op::Flush, 0, 0)
    }
    fn block_status(&self, _offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Data, len))
    }
    fn facts(&self) -> ImageFacts {
        // Only a hold matters here: facts cannot fail.
        let _ = self.ctl.enter(Op::Facts, 0, 0);
        ImageFacts::default()
    }
    fn close(&self) -> io::Result<()> {
        self.ctl.enter(Op::Close, 0, 0)
    }
}
