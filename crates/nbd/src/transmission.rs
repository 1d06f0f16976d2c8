//! The transmission phase of one connection.
//!
//! ```text
//!   socket ──> reader (this task) ──spawn_blocking──> request (backend call, reply built)
//!                 │  waits for budget                      │
//!                 │  before reading a payload              └──> reply (+ budget permits) ──┐
//!                 │                                                                        v
//!                 └── immediate error replies ────────────────────────────────────> writer task ──> socket
//! ```
//!
//! Requests run concurrently and replies go out in completion order. Memory per connection is
//! bounded by a budget of [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] of payload:
//! the reader takes the permits a request needs before reading its payload (so a full budget
//! stops reading from the socket), and the permits travel with the reply until the writer has
//! written it.

use std::io::{self, IoSlice};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::ExportBackend;
use crate::handshake::{drain, Session};
use crate::pool::{Buf, Pool};
use crate::proto::{self, HeaderMode, ReplyTo, RequestHeader};

/// Most requests of one connection being processed or awaiting their reply (QEMU: 16).
pub(crate) const MAX_IN_FLIGHT: usize = 16;
/// Most payload bytes (write data, read buffers, extent lists) held for one connection.
pub(crate) const MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// Payload size from which the next request header is read on its own (see `read_loop`).
const EXACT_HEADER_AFTER: u64 = 64 * 1024;

/// One reply on its way to the socket: header bytes, then bulk data, and the budget it holds.
struct Outgoing {
    head: Vec<u8>,
    data: Buf,
    _permits: Option<Permits>,
}

/// Budget held by one request until its reply is written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// State shared by the reader and the request tasks of one connection.
struct Conn {
    /// What the handshake agreed on; holds the export lease.
    session: Session,
    /// Replies to the writer task. Dropped with the last request task, which ends the writer.
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Request budget.
    slots: Arc<Semaphore>,
    /// Byte budget.
    bytes: Arc<Semaphore>,
    /// Payload buffers, shared with the writer task which gives them back.
    pool: Arc<Pool>,
}

impl Conn {
    fn backend(&self) -> Arc<dyn ExportBackend> {
        self.session.export().cfg.backend.clone()
    }

    fn send(&self, head: Vec<u8>, data: Buf, permits: Option<Permits>) {
        // The writer is gone only when the connection is closing; the reply has nowhere to go.
        let _ = self.tx.send(Outgoing {
            head,
            data,
            _permits: permits,
        });
    }

    async fn acquire(&self, bytes: usize) -> io::Result<Permits> {
        let closed = |_| io::Error::other("connection budget closed");
        let slot = self.slots.clone().acquire_owned().await.map_err(closed)?;
        let bytes = bytes.min(MAX_IN_FLIGHT_BYTES);
        let bytes = if bytes == 0 {
            None
        } else {
            let n = u32::try_from(bytes).unwrap_or(u32::MAX);
            Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(closed)?,
            )
        };
        Ok(Permits {
            _slot: slot,
            _bytes: bytes,
        })
    }
}

/// Serve requests until the client disconnects, misbehaves, or `stop`/`kill` fire.
pub(crate) async fn run<R, W>(
    session: Session,
    mut reader: BufReader<R>,
    writer: W,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let kill = session.export().kill.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let broken = CancellationToken::new();
    let pool = Arc::new(Pool::default());
    let mut writer_task = tracker.spawn(write_loop(writer, rx, broken.clone(), pool.clone()));
    let conn = Arc::new(Conn {
        session,
        tx,
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
        pool,
    });
    let ended = tokio::select! {
        res = read_loop(&mut reader, &conn, tracker) => Some(res),
        _ = stop.cancelled() => None,
        _ = kill.cancelled() => None,
        _ = broken.cancelled() => None,
    };
    drop(conn);
    match ended {
        Some(res) => {
            if let Err(e) = res {
                tracing::debug!("nbd: closing connection: {e}");
            }
            // Let in-flight requests finish and their replies go out, unless told to stop.
            tokio::select! {
                _ = &mut writer_task => {}
                _ = stop.cancelled() => writer_task.abort(),
                _ = kill.cancelled() => writer_task.abort(),
            }
        }
        None => writer_task.abort(),
    }
}

/// Read `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first byte.
async fn read_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    Ok(true)
}

/// Fill `buf` from the stream: what the reader has buffered, then the rest straight from the
/// socket into `buf` (a `BufReader` would copy most of a large payload through its buffer).
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    buf: &mut [u8],
) -> io::Result<()> {
    let buffered = r.buffer();
    let n = buffered.len().min(buf.len());
    buf[..n].copy_from_slice(&buffered[..n]);
    Pin::new(&mut *r).consume(n);
    if n < buf.len() {
        // The buffer is empty now, so the socket holds the next bytes of the stream.
        r.get_mut().read_exact(&mut buf[n..]).await?;
    }
    Ok(())
}

/// Bytes of payload that follow a request header.
fn payload_len(mode: HeaderMode, req: &RequestHeader) -> u64 {
    let flagged = mode == HeaderMode::Extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0;
    if req.command == proto::CMD_WRITE || flagged {
        req.length
    } else {
        0
    }
}

/// Budget bytes a request will hold (payload in, or reply data out).
fn cost(conn: &Conn, req: &RequestHeader, payload: u64) -> usize {
    let len = usize::try_from(req.length).unwrap_or(usize::MAX);
    match req.command {
        proto::CMD_WRITE => usize::try_from(payload).unwrap_or(usize::MAX),
        proto::CMD_READ if req.length <= u64::from(proto::MAX_PAYLOAD) => len,
        proto::CMD_BLOCK_STATUS => {
            let per_ctx = if req.flags & proto::CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                proto::MAX_EXTENTS
            };
            conn.session
                .contexts
                .len()
                .saturating_mul(per_ctx)
                .saturating_mul(16)
        }
        _ => 0,
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    conn: &Arc<Conn>,
    tracker: &TaskTracker,
) -> io::Result<()> {
    let mode = conn.session.mode;
    let mut hdr = [0u8; 32];
    let hdr = &mut hdr[..mode.request_len()];
    // After a large write, expect another: read its header alone, so the buffered reader does
    // not pull (and later copy) up to 64 KiB of the payload that follows. Small requests keep
    // going through the buffer, many headers per read.
    let mut exact_header = false;
    loop {
        let more = if exact_header && r.buffer().is_empty() {
            read_or_eof(r.get_mut(), hdr).await?
        } else {
            read_or_eof(r, hdr).await?
        };
        if !more {
            return Ok(());
        }
        let req = proto::decode_request(mode, hdr).map_err(|m| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad request magic {:#x}", m.0),
            )
        })?;
        if req.command == proto::CMD_DISC {
            return Ok(());
        }
        let reply_to = ReplyTo {
            mode,
            cookie: req.cookie,
            offset: req.offset,
        };
        let payload = payload_len(mode, &req);
        if payload > u64::from(proto::MAX_PAYLOAD) {
            // Keeping the stream in sync would mean swallowing up to 4 GiB (or 2^64 bytes):
            // answer, then hang up, as QEMU does.
            let mut head = Vec::new();
            reply_to.put_error(&mut head, proto::EINVAL, &too_long(payload));
            conn.send(head, Buf::default(), None);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                too_long(payload),
            ));
        }
        exact_header = payload >= EXACT_HEADER_AFTER;
        let permits = conn.acquire(cost(conn, &req, payload)).await?;
        let data = if req.command == proto::CMD_WRITE {
            // A reused buffer: no zero-fill or fresh pages for bytes about to be overwritten.
            // payload <= MAX_PAYLOAD (checked above), so it fits in usize.
            let mut data = conn.pool.take(payload as usize);
            read_payload(r, &mut data).await?;
            data
        } else {
            // Payloads on other commands are not supported: swallow, then fail the request.
            drain(r, payload).await?;
            Buf::default()
        };
        match validate(&conn.session, &req, payload) {
            Err((errno, msg)) => {
                let mut head = Vec::new();
                reply_to.put_error(&mut head, errno, &msg);
                conn.pool.put(data);
                conn.send(head, Buf::default(), Some(permits));
            }
            Ok(cmd) => {
                let conn = conn.clone();
                // The request runs on the blocking pool and hands its reply to the writer task
                // from there: no hop back through an async task, whose wake-up waits for a
                // runtime worker (those also copy every reply into the socket, so under load
                // that hop added about as much latency per read as the read itself).
                tracker.spawn_blocking(move || {
                    let backend = conn.backend();
                    let run = || {
                        execute(
                            &*backend,
                            reply_to,
                            cmd,
                            &data,
                            &conn.session.contexts,
                            &conn.pool,
                        )
                    };
                    let (head, out) = match std::panic::catch_unwind(AssertUnwindSafe(run)) {
                        Ok(reply) => reply,
                        Err(_) => {
                            tracing::warn!("nbd: request handler panicked");
                            let mut head = Vec::new();
                            reply_to.put_error(&mut head, proto::EIO, "internal error");
                            (head, Buf::default())
                        }
                    };
                    conn.pool.put(data);
                    conn.send(head, out, Some(permits));
                });
            }
        }
    }
}

/// The command names QEMU uses in its error messages.
fn command_name(command: u16) -> &'static str {
    match command {
        proto::CMD_READ => "read",
        proto::CMD_WRITE => "write",
        proto::CMD_DISC => "disconnect",
        proto::CMD_FLUSH => "flush",
        proto::CMD_TRIM => "trim",
        proto::CMD_CACHE => "cache",
        proto::CMD_WRITE_ZEROES => "write zeroes",
        proto::CMD_BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

fn too_long(len: u64) -> String {
    format!(
        "len ({len}) is larger than max len ({})",
        proto::MAX_PAYLOAD
    )
}

/// A request that passed validation.
#[derive(Clone, Copy, Debug)]
struct Cmd {
    command: u16,
    flags: u16,
    offset: u64,
    /// Effect length (for WRITE, the payload length).
    len: u64,
}

/// Check a request against the session, in QEMU's order: size limit, read-only, bounds, flags.
fn validate(s: &Session, req: &RequestHeader, payload: u64) -> Result<Cmd, (u32, String)> {
    let mut valid_flags = proto::CMD_FLAG_FUA;
    let (mut check_len, mut writes) = (false, false);
    match req.command {
        proto::CMD_READ => {
            if s.mode >= HeaderMode::Structured {
                valid_flags |= proto::CMD_FLAG_DF;
            }
            check_len = true;
        }
        proto::CMD_WRITE => {
            if s.mode == HeaderMode::Extended {
                valid_flags |= proto::CMD_FLAG_PAYLOAD_LEN;
            }
            check_len = true;
            writes = true;
        }
        proto::CMD_FLUSH => {}
        proto::CMD_TRIM => writes = true,
        proto::CMD_CACHE => check_len = true,
        proto::CMD_WRITE_ZEROES => {
            valid_flags |= proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO;
            writes = true;
        }
        proto::CMD_BLOCK_STATUS => valid_flags |= proto::CMD_FLAG_REQ_ONE,
        other => {
            return Err((
                proto::EINVAL,
                format!("invalid request type ({other}) received"),
            ));
        }
    }
    let len = if req.command == proto::CMD_WRITE {
        payload
    } else if payload > 0 {
        0
    } else {
        req.length
    };
    if check_len && len > u64::from(proto::MAX_PAYLOAD) {
        return Err((proto::EINVAL, too_long(len)));
    }
    if writes && !s.export().cfg.writable {
        return Err((proto::EPERM, "Export is read-only".into()));
    }
    if req.offset > s.size || len > s.size - req.offset {
        let errno = match req.command {
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => proto::ENOSPC,
            _ => proto::EINVAL,
        };
        let msg = format!(
            "operation past EOF; From: {}, Len: {}, Size: {}",
            req.offset, len, s.size
        );
        return Err((errno, msg));
    }
    if req.flags & !valid_flags != 0 {
        return Err((
            proto::EINVAL,
            format!(
                "unsupported flags for command {} (got {:#x})",
                command_name(req.command),
                req.flags
            ),
        ));
    }
    if req.command == proto::CMD_BLOCK_STATUS {
        if len == 0 {
            return Err((proto::EINVAL, "need non-zero length".into()));
        }
        if s.contexts.is_empty() {
            return Err((proto::EINVAL, "CMD_BLOCK_STATUS not negotiated".into()));
        }
    }
    Ok(Cmd {
        command: req.command,
        flags: req.flags,
        offset: req.offset,
        len,
    })
}

/// Run one validated command against the backend (blocking) and build its reply.
fn execute(
    backend: &dyn ExportBackend,
    to: ReplyTo,
    cmd: Cmd,
    data: &[u8],
    contexts: &[usize],
    pool: &Pool,
) -> (Vec<u8>, Buf) {
    let mut head = Vec::with_capacity(64);
    let fua = cmd.flags & proto::CMD_FLAG_FUA != 0;
    let fail = |head: &mut Vec<u8>, what: &str, e: io::Error| {
        to.put_error(head, proto::errno_for(&e), &format!("{what} failed: {e}"));
    };
    let flush_if = |fua: bool| if fua { backend.flush() } else { Ok(()) };
    match cmd.command {
        proto::CMD_READ => return read(backend, to, cmd, fua, pool),
        proto::CMD_WRITE => {
            let res = if data.is_empty() {
                flush_if(fua)
            } else {
                backend.write(cmd.offset, data, fua)
            };
            match res {
                Ok(()) => to.put_ok(&mut head),
                Err(e) => fail(&mut head, "writing to file", e),
            }
        }
        proto::CMD_WRITE_ZEROES => {
            let may_unmap = cmd.flags & proto::CMD_FLAG_NO_HOLE == 0;
            let fast_only = cmd.flags & proto::CMD_FLAG_FAST_ZERO != 0;
            let res = if cmd.len == 0 {
                Ok(())
            } else {
                backend
                    .write_zeroes(cmd.offset, cmd.len, may_unmap, fast_only)
                    .and_then(|()| flush_if(fua))
            };
            match res {
                Ok(()) => to.put_ok(&mut head),
                Err(e) => fail(&mut head, "writing zeroes", e),
            }
        }
        proto::CMD_TRIM => {
            let res = if cmd.len == 0 {
                Ok(())
            } else {
                backend
                    .trim(cmd.offset, cmd.len)
                    .and_then(|()| flush_if(fua))
            };
            match res {
                Ok(()) => to.put_ok(&mut head),
                Err(e) => fail(&mut head, "discard", e),
            }
        }
        proto::CMD_FLUSH => match backend.flush() {
            Ok(()) => to.put_ok(&mut head),
            Err(e) => fail(&mut head, "flush", e),
        },
        // Validated and accepted; there is no cache to warm.
        proto::CMD_CACHE => to.put_ok(&mut head),
        proto::CMD_BLOCK_STATUS => return block_status(backend, to, cmd, contexts),
        _ => to.put_error(&mut head, proto::EINVAL, "invalid request type"),
    }
    (head, Buf::default())
}

fn read(
    backend: &dyn ExportBackend,
    to: ReplyTo,
    cmd: Cmd,
    fua: bool,
    pool: &Pool,
) -> (Vec<u8>, Buf) {
    let mut head = Vec::with_capacity(64);
    if fua {
        if let Err(e) = backend.flush() {
            to.put_error(
                &mut head,
                proto::errno_for(&e),
                &format!("flush failed: {e}"),
            );
            return (head, Buf::default());
        }
    }
    let structured = to.mode >= HeaderMode::Structured;
    if cmd.len == 0 {
        if structured {
            to.put_none(&mut head);
        } else {
            to.put_simple(&mut head, 0);
        }
        return (head, Buf::default());
    }
    // len <= MAX_PAYLOAD was checked, so it fits in u32 and usize.
    let len32 = u32::try_from(cmd.len).unwrap_or(proto::MAX_PAYLOAD);
    let dont_fragment = cmd.flags & proto::CMD_FLAG_DF != 0;
    if structured && !dont_fragment && backend.reads_as_zero(cmd.offset, cmd.len) {
        to.put_hole(&mut head, cmd.offset, len32, true);
        return (head, Buf::default());
    }
    // The backend fills all of it, so old contents of a reused buffer never go out.
    let mut data = pool.take(len32 as usize);
    match backend.read(cmd.offset, &mut data) {
        Ok(()) => {
            if structured {
                to.put_data_header(&mut head, cmd.offset, cmd.len, true);
            } else {
                to.put_simple(&mut head, 0);
            }
            (head, data)
        }
        Err(e) => {
            let msg = format!("reading from file failed: {e}");
            to.put_error(&mut head, proto::errno_for(&e), &msg);
            pool.put(data);
            (head, Buf::default())
        }
    }
}

fn block_status(
    backend: &dyn ExportBackend,
    to: ReplyTo,
    cmd: Cmd,
    contexts: &[usize],
) -> (Vec<u8>, Buf) {
    let req_one = cmd.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let max_extents = if req_one { 1 } else { proto::MAX_EXTENTS };
    let mut head = Vec::new();
    for (i, &ctx) in contexts.iter().enumerate() {
        let extents = backend
            .block_status(ctx, cmd.offset, cmd.len, max_extents)
            .map(|raw| normalize_extents(raw, cmd.len, max_extents));
        match extents {
            Ok(extents) if !extents.is_empty() => {
                // Context ids are indices into meta_contexts(), which fit in u32 in practice.
                let id = u32::try_from(ctx).unwrap_or(u32::MAX);
                to.put_block_status(&mut head, id, &extents, i + 1 == contexts.len());
            }
            Ok(_) => {
                head.clear();
                to.put_error(&mut head, proto::EIO, "can't get block status: no extents");
                break;
            }
            Err(e) => {
                head.clear();
                let msg = format!("can't get block status: {e}");
                to.put_error(&mut head, proto::errno_for(&e), &msg);
                break;
            }
        }
    }
    (head, Buf::default())
}

/// Make backend extents fit the wire rules: drop empty ones, merge neighbours with equal flags,
/// keep at most `max` extents and never describe more than `len` bytes (so every extent of a
/// compact reply fits in 32 bits, and a REQ_ONE extent does not exceed the request).
fn normalize_extents(raw: Vec<(u64, u32)>, len: u64, max: usize) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::with_capacity(raw.len().min(max));
    let mut covered = 0u64;
    for (ext_len, flags) in raw {
        if covered >= len {
            break;
        }
        let ext_len = ext_len.min(len - covered);
        if ext_len == 0 {
            continue;
        }
        covered += ext_len;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += ext_len,
            _ => {
                if out.len() == max {
                    break;
                }
                out.push((ext_len, flags));
            }
        }
    }
    out
}

/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 64;

/// Send replies as they come, every reply waiting at that moment in one vectored write: the
/// payload goes from its buffer straight to the socket, with no copy through a `BufWriter`.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    broken: CancellationToken,
    pool: Arc<Pool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let res = write_batch(&mut w, &batch).await;
        // Permits go with the messages: only now is the budget free again.
        for msg in batch.drain(..) {
            pool.put(msg.data);
        }
        if let Err(e) = res {
            tracing::debug!("nbd: write to client failed: {e}");
            broken.cancel();
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Outgoing]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch
        .iter()
        .flat_map(|m| [IoSlice::new(&m.head), IoSlice::new(&m.data)])
        .filter(|s| !s.is_empty())
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await
}

#[cfg(test)]
mod tests;
