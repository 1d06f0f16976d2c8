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

// ---------------------------------------------------------------------------------------------
// Raw protocol client

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

/// One complete reply to a request.
#[derive(Debug, Default)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success.
    pub error: u32,
    /// Read data reassembled (holes as zeros), for READ.
    pub data: Vec<u8>,
    /// (context id, extents) per block status chunk.
    pub extents: Vec<(u32, Vec<(u64, u64)>)>,
    /// Chunk types received, in order.
    pub chunk_types: Vec<u16>,
}

/// A hand-rolled NBD client for protocol edge cases.
pub struct RawClient {
    pub s: UnixStream,
    pub mode: HeaderMode,
    /// Lengths of READs awaiting a simple reply, by cookie.
    reads: HashMap<u64, (u64, u64)>,
}

impl RawClient {
    /// Connect and read the greeting; sends client flags (fixed newstyle, no zeroes).
    pub async fn connect(path: &Path) -> RawClient {
        let mut c = Self::connect_raw(path).await;
        let mut greet = [0u8; 18];
        c.s.read_exact(&mut greet).await.unwrap();
        assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
        c.s.write_all(&3u32.to_be_bytes()).await.unwrap();
        c
    }

    /// Connect without any handshake traffic.
    pub async fn connect_raw(path: &Path) -> RawClient {
        RawClient {
            s: UnixStream::connect(path).await.unwrap(),
            mode: HeaderMode::Simple,
            reads: HashMap::new(),
        }
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.s.write_all(&out).await.unwrap();
    }

    pub async fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let mut hdr = [0u8; 20];
        self.s.read_exact(&mut hdr).await?;
        assert_eq!(
            u64::from_be_bytes(hdr[..8].try_into().unwrap()),
            proto::OPTION_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await?;
        Ok(OptReply {
            option: u32::from_be_bytes(hdr[8..12].try_into().unwrap()),
            reply: u32::from_be_bytes(hdr[12..16].try_into().unwrap()),
            data,
        })
    }

    /// Send an option and collect replies up to the final ACK or error.
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply().await.unwrap();
            let last = r.reply == proto::REP_ACK || r.reply & 0x8000_0000 != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub async fn structured(&mut self) {
        let r = self.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r[0].reply, proto::REP_ACK);
        self.mode = HeaderMode::Structured;
    }

    pub async fn extended(&mut self) {
        let r = self.option(proto::OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(r[0].reply, proto::REP_ACK);
        self.mode = HeaderMode::Extended;
    }

    /// LIST/SET_META_CONTEXT data.
    pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// SET_META_CONTEXT; returns (id, name) pairs.
    pub async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let replies = self
            .option(
                proto::OPT_SET_META_CONTEXT,
                &Self::meta_data(export, queries),
            )
            .await;
        assert_eq!(replies.last().unwrap().reply, proto::REP_ACK);
        replies
            .iter()
            .filter(|r| r.reply == proto::REP_META_CONTEXT)
            .map(|r| {
                let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
                (id, String::from_utf8(r.data[4..].to_vec()).unwrap())
            })
            .collect()
    }

    /// INFO/GO data.
    pub fn info_data(export: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// GO; returns (size, transmission flags). Panics unless it succeeds.
    pub async fn go(&mut self, export: &str) -> (u64, u16) {
        let replies = self
            .option(
                proto::OPT_GO,
                &Self::info_data(export, &[proto::INFO_BLOCK_SIZE]),
            )
            .await;
        assert_eq!(replies.last().unwrap().reply, proto::REP_ACK, "{replies:?}");
        let info = replies
            .iter()
            .find(|r| r.reply == proto::REP_INFO && r.data[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
        (size, flags)
    }

    /// Full setup: connect, structured replies, select all contexts, GO.
    pub async fn open(path: &Path, export: &str) -> RawClient {
        let mut c = Self::connect(path).await;
        c.structured().await;
        c.set_meta(export, &CONTEXTS).await;
        c.go(export).await;
        c
    }

    pub async fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let req = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        if command == proto::CMD_READ {
            self.reads.insert(cookie, (offset, length));
        }
        let mut out = proto::encode_request(self.mode, &req);
        out.extend_from_slice(payload);
        self.s.write_all(&out).await.unwrap();
    }

    /// Read one complete reply (all chunks up to DONE; assumes the server does not interleave).
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        let mut reply = Reply::default();
        loop {
            let magic = self.s.read_u32().await?;
            match magic {
                proto::SIMPLE_REPLY_MAGIC => {
                    reply.error = self.s.read_u32().await?;
                    reply.cookie = self.s.read_u64().await?;
                    if let Some((_, len)) = self.reads.remove(&reply.cookie) {
                        if reply.error == 0 {
                            reply.data = vec![0; len as usize];
                            self.s.read_exact(&mut reply.data).await?;
                        }
                    }
                    return Ok(reply);
                }
                proto::STRUCTURED_REPLY_MAGIC | proto::EXTENDED_REPLY_MAGIC => {
                    let flags = self.s.read_u16().await?;
                    let kind = self.s.read_u16().await?;
                    reply.cookie = self.s.read_u64().await?;
                    let len = if magic == proto::EXTENDED_REPLY_MAGIC {
                        let _offset = self.s.read_u64().await?;
                        self.s.read_u64().await?
                    } else {
                        u64::from(self.s.read_u32().await?)
                    };
                    let mut payload = vec![0u8; len as usize];
                    self.s.read_exact(&mut payload).await?;
                    reply.chunk_types.push(kind);
                    self.chunk(&mut reply, kind, &payload);
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        self.reads.remove(&reply.cookie);
                        return Ok(reply);
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }

    fn chunk(&self, reply: &mut Reply, kind: u16, p: &[u8]) {
        let be32 = |at: usize| u32::from_be_bytes(p[at..at + 4].try_into().unwrap());
        let be64 = |at: usize| u64::from_be_bytes(p[at..at + 8].try_into().unwrap());
        let (base, len) = self.reads.get(&reply.cookie).copied().unwrap_or((0, 0));
        if reply.data.len() as u64 != len {
            reply.data = vec![0; len as usize];
        }
        match kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                let at = (be64(0) - base) as usize;
                reply.data[at..at + p.len() - 8].copy_from_slice(&p[8..]);
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let at = (be64(0) - base) as usize;
                reply.data[at..at + be32(8) as usize].fill(0);
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                let ext = p[4..]
                    .chunks(8)
                    .map(|c| {
                        let l = u32::from_be_bytes(c[..4].try_into().unwrap());
                        let f = u32::from_be_bytes(c[4..].try_into().unwrap());
                        (u64::from(l), u64::from(f))
                    })
                    .collect();
                reply.extents.push((be32(0), ext));
            }
            proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
                let count = be32(4) as usize;
                let ext: Vec<(u64, u64)> = p[8..]
                    .chunks(16)
                    .map(|c| {
                        (
                            u64::from_be_bytes(c[..8].try_into().unwrap()),
                            u64::from_be_bytes(c[8..].try_into().unwrap()),
                        )
                    })
                    .collect();
                assert_eq!(ext.len(), count);
                reply.extents.push((be32(0), ext));
            }
            proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => reply.error = be32(0),
            proto::REPLY_TYPE_NONE => {}
            other => panic!("unexpected chunk type {other}"),
        }
    }

    /// Send one request and wait for its reply.
    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Reply {
        self.send_request(command, flags, 1, offset, length, payload)
            .await;
        self.read_reply().await.unwrap()
    }

    /// Whether the server has closed the connection (EOF or reset within `wait`).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, self.s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
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
