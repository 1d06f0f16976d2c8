//! Shared test fixtures: an in-memory backend, a server in a temp dir, and a raw protocol client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nbd::proto::{self, HeaderMode, RequestHeader};
use nbd::{ExportBackend, ExportConfig, NbdServer, ServerOptions};

#[path = "../../../../tests/oracles.rs"]
pub mod oracles;
mod raw_client;
#[allow(unused_imports)]
pub use raw_client::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Allocation and bitmap granularity of the memory backend.
pub const CLUSTER: u64 = 64 * 1024;

/// Contexts offered by [`MemBackend`].
pub const CONTEXTS: [&str; 3] = [
    "base:allocation",
    "qemu:allocation-depth",
    "qemu:dirty-bitmap:b0",
];

#[derive(Default)]
struct MemState {
    data: Vec<u8>,
    allocated: Vec<bool>,
    dirty: Vec<bool>,
}

/// A disk in memory with a per-cluster allocation map and one dirty bitmap.
pub struct MemBackend {
    state: Mutex<MemState>,
    /// Reads starting below this offset sleep for `delay` first.
    pub slow_below: u64,
    /// How long slow operations take.
    pub delay: Duration,
    /// Every write sleeps for `delay` as well.
    pub slow_writes: bool,
    /// Backend calls running right now, and the most seen at once.
    running: AtomicUsize,
    pub max_running: AtomicUsize,
    pub flushes: AtomicUsize,
    /// While true, writes wait (counted in `waiting`).
    hold: Mutex<bool>,
    released: Condvar,
    waiting: AtomicUsize,
}

struct Running<'a>(&'a MemBackend);

impl<'a> Running<'a> {
    fn enter(b: &'a MemBackend) -> Self {
        let now = b.running.fetch_add(1, Ordering::SeqCst) + 1;
        b.max_running.fetch_max(now, Ordering::SeqCst);
        Running(b)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemBackend {
    pub fn new(size: u64) -> Self {
        let clusters = size.div_ceil(CLUSTER) as usize;
        MemBackend {
            state: Mutex::new(MemState {
                data: vec![0; size as usize],
                allocated: vec![false; clusters],
                dirty: vec![false; clusters],
            }),
            slow_below: 0,
            delay: Duration::ZERO,
            slow_writes: false,
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            hold: Mutex::new(false),
            released: Condvar::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Put `data` at `offset` directly (allocating and dirtying the clusters).
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        Self::store(&mut st, offset, data);
    }

    /// Make writes wait (true) or release them (false).
    pub fn hold_writes(&self, hold: bool) {
        *self.hold.lock().unwrap() = hold;
        self.released.notify_all();
    }

    /// Writes currently waiting on the hold.
    pub fn waiting_writes(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// A copy of the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().unwrap().data.clone()
    }

    /// Clear the dirty bitmap.
    pub fn clear_dirty(&self) {
        let mut st = self.state.lock().unwrap();
        st.dirty.iter_mut().for_each(|d| *d = false);
    }

    fn clusters(offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        (offset / CLUSTER) as usize..(offset + len).div_ceil(CLUSTER) as usize
    }

    fn store(st: &mut MemState, offset: u64, data: &[u8]) {
        let o = offset as usize;
        st.data[o..o + data.len()].copy_from_slice(data);
        for c in Self::clusters(offset, data.len() as u64) {
            st.allocated[c] = true;
            st.dirty[c] = true;
        }
    }

    /// Deallocate (and zero) the whole clusters inside the range; mark the range dirty.
    fn punch(st: &mut MemState, offset: u64, len: u64) {
        let first = offset.div_ceil(CLUSTER);
        let end = (offset + len) / CLUSTER;
        for c in first..end {
            let o = (c * CLUSTER) as usize;
            let e = (o + CLUSTER as usize).min(st.data.len());
            st.data[o..e].fill(0);
            st.allocated[c as usize] = false;
        }
        for c in Self::clusters(offset, len) {
            st.dirty[c] = true;
        }
    }

    fn flags(st: &MemState, ctx: usize, cluster: usize) -> u32 {
        let allocated = st.allocated[cluster];
        match ctx {
            0 => {
                if allocated {
                    0
                } else {
                    3
                }
            }
            1 => u32::from(allocated),
            _ => u32::from(st.dirty[cluster]),
        }
    }
}

impl ExportBackend for MemBackend {
    fn size(&self) -> u64 {
        self.state.lock().unwrap().data.len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _r = Running::enter(self);
        if offset < self.slow_below {
            std::thread::sleep(self.delay);
        }
        let st = self.state.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&st.data[o..o + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let _r = Running::enter(self);
        if self.slow_writes {
            std::thread::sleep(self.delay);
        }
        {
            let mut held = self.hold.lock().unwrap();
            if *held {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                while *held {
                    held = self.released.wait(held).unwrap();
                }
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let mut st = self.state.lock().unwrap();
        Self::store(&mut st, offset, data);
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        let _r = Running::enter(self);
        let mut st = self.state.lock().unwrap();
        if fast_only && !may_unmap {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        if may_unmap {
            Self::punch(&mut st, offset, len);
        }
        let o = offset as usize;
        st.data[o..o + len as usize].fill(0);
        if !may_unmap {
            for c in Self::clusters(offset, len) {
                st.allocated[c] = true;
                st.dirty[c] = true;
            }
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _r = Running::enter(self);
        let mut st = self.state.lock().unwrap();
        Self::punch(&mut st, offset, len);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        CONTEXTS.iter().map(|s| s.to_string()).collect()
    }

    fn block_status(
        &self,
        ctx: usize,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<(u64, u32)>> {
        let st = self.state.lock().unwrap();
        let size = st.data.len() as u64;
        let end = (offset + len).min(size);
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let c = (pos / CLUSTER) as usize;
            let next = ((c as u64 + 1) * CLUSTER).min(end);
            let f = Self::flags(&st, ctx, c);
            match out.last_mut() {
                Some(last) if last.1 == f => last.0 += next - pos,
                _ => {
                    if out.len() == max_extents {
                        break;
                    }
                    out.push((next - pos, f));
                }
            }
            pos = next;
        }
        Ok(out)
    }

    fn reads_as_zero(&self, offset: u64, len: u64) -> bool {
        let st = self.state.lock().unwrap();
        Self::clusters(offset, len).all(|c| !st.allocated[c])
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("nbd-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server with one export "disk" (writable) and one "ro" (read-only) over the same
/// in-memory backend, listening on `sock`.
pub struct TestServer {
    pub server: NbdServer,
    pub backend: Arc<MemBackend>,
    pub sock: PathBuf,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start(size: u64) -> TestServer {
        Self::start_with(MemBackend::new(size), ServerOptions::default()).await
    }

    pub async fn start_with(backend: MemBackend, options: ServerOptions) -> TestServer {
        let dir = TempDir::new();
        let sock = dir.path("nbd.sock");
        let server = NbdServer::with_options(options);
        server.listen_unix(&sock).await.unwrap();
        let backend = Arc::new(backend);
        let mut disk = ExportConfig::new("disk", true, backend.clone());
        disk.description = Some("a writable test disk".into());
        server.add_export(disk).unwrap();
        server
            .add_export(ExportConfig::new("ro", false, backend.clone()))
            .unwrap();
        TestServer {
            server,
            backend,
            sock,
            dir,
        }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

/// Output of a finished subprocess.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Run a program to completion without blocking the runtime.
pub async fn run(program: &str, args: &[&str]) -> Run {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Whether a program is installed (for optional clients such as nbdinfo).
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// A deterministic, non-repeating test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// A huge export that is all hole except its first `data_len` bytes (which read as 0xab).
/// Counts block status calls. Holds no memory for the disk.
pub struct SparseBackend {
    pub size: u64,
    pub data_len: u64,
    pub status_calls: AtomicUsize,
}

impl SparseBackend {
    pub fn new(size: u64, data_len: u64) -> Self {
        SparseBackend {
            size,
            data_len,
            status_calls: AtomicUsize::new(0),
        }
    }
}

impl ExportBackend for SparseBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = if offset + (i as u64) < self.data_len {
                0xab
            } else {
                0
            };
        }
        Ok(())
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec!["base:allocation".into()]
    }

    fn block_status(
        &self,
        _ctx: usize,
        offset: u64,
        len: u64,
        max: usize,
    ) -> io::Result<Vec<(u64, u32)>> {
        self.status_calls.fetch_add(1, Ordering::SeqCst);
        let end = offset + len;
        let mut out = Vec::new();
        if offset < self.data_len {
            out.push((self.data_len.min(end) - offset, 0));
        }
        let hole_start = offset.max(self.data_len);
        if hole_start < end && out.len() < max {
            out.push((end - hole_start, 3));
        }
        Ok(out)
    }

    fn reads_as_zero(&self, offset: u64, _len: u64) -> bool {
        offset >= self.data_len
    }
}
