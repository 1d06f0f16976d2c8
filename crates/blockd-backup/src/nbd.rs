//! A small synchronous NBD client: fixed newstyle handshake, structured replies, meta
//! contexts, READ (data and hole chunks), BLOCK_STATUS, WRITE, WRITE_ZEROES, FLUSH.
//! Reads can be pipelined ([`NbdClient::read_many`]: several requests sent at once, replies
//! taken in whatever order the server sends them); everything else is one request at a time.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nbd::proto::*;

use crate::error::{Error, Kind, Result};

/// Largest request the client sends (QEMU's servers accept 32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option reply or chunk payload accepted from a server.
const MAX_PAYLOAD: u32 = MAX_REQUEST + 4096;

/// Where a read's data chunks go: the caller's buffer for the request at `offset`.
struct ReadInto<'a> {
    /// The buffer of the whole request.
    buf: &'a mut [u8],
    /// The request's offset on the export.
    offset: u64,
    /// Bytes of data received into it so far.
    got: u64,
}

/// An extent reported by block status: length and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Context-specific flags (dirty bit, hole/zero bits).
    pub flags: u32,
}

/// Reads of one [`NbdClient::read_many`] kept in flight at most (QEMU's servers work on 16
/// requests of a client at a time and stop reading more until one is answered).
pub const MAX_IN_FLIGHT: usize = 16;

/// Receive buffer of a connection: reply headers and small chunks come in one system call.
const RECV_BUF: usize = 64 << 10;

/// An open NBD connection in transmission phase.
pub struct NbdClient {
    /// The socket (the sending side).
    s: UnixStream,
    /// The receiving side of the socket, buffered.
    rd: BufReader<UnixStream>,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Selected meta contexts: (id, name).
    contexts: Vec<(u32, String)>,
    /// Next cookie.
    cookie: u64,
}

/// An NBD protocol or transport error.
fn perr(msg: impl Into<String>) -> Error {
    Error::new(Kind::Nbd, msg)
}

/// Map I/O errors on the socket.
fn ioerr(e: std::io::Error, what: &str) -> Error {
    Error::caused(Kind::Nbd, what.to_string(), e)
}

impl NbdClient {
    /// Connect to export `name` on the Unix socket `path`, selecting `contexts` (may be empty).
    pub fn connect(path: &Path, name: &str, contexts: &[&str]) -> Result<NbdClient> {
        Self::connect_with(path, name, contexts, None)
    }

    /// [`connect`](Self::connect), every read and write of the connection (the handshake
    /// too) failing after `timeout` without progress.
    pub fn connect_timeout(
        path: &Path,
        name: &str,
        contexts: &[&str],
        timeout: std::time::Duration,
    ) -> Result<NbdClient> {
        Self::connect_with(path, name, contexts, Some(timeout))
    }

    fn connect_with(
        path: &Path,
        name: &str,
        contexts: &[&str],
        timeout: Option<std::time::Duration>,
    ) -> Result<NbdClient> {
        let s = UnixStream::connect(path)
            .map_err(|e| ioerr(e, &format!("connecting to NBD socket {}", path.display())))?;
        s.set_read_timeout(timeout)
            .and_then(|_| s.set_write_timeout(timeout))
            .map_err(|e| ioerr(e, "setting the NBD socket's timeouts"))?;
        let rd = BufReader::with_capacity(
            RECV_BUF,
            s.try_clone()
                .map_err(|e| ioerr(e, "cloning the NBD socket"))?,
        );
        let mut c = NbdClient {
            s,
            rd,
            size: 0,
            flags: 0,
            contexts: Vec::new(),
            cookie: 1,
        };
        c.handshake(name, contexts)?;
        Ok(c)
    }

    /// Read exactly `n` bytes.
    fn read_n(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.rd
            .read_exact(&mut b)
            .map_err(|e| ioerr(e, "reading from NBD server"))?;
        Ok(b)
    }

    /// Read a big-endian u64/u32/u16.
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.rd
            .read_exact(&mut b)
            .map_err(|e| ioerr(e, "reading from NBD server"))?;
        Ok(u64::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.rd
            .read_exact(&mut b)
            .map_err(|e| ioerr(e, "reading from NBD server"))?;
        Ok(u32::from_be_bytes(b))
    }
    fn u16(&mut self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.rd
            .read_exact(&mut b)
            .map_err(|e| ioerr(e, "reading from NBD server"))?;
        Ok(u16::from_be_bytes(b))
    }

    /// Send all bytes.
    fn send(&mut self, b: &[u8]) -> Result<()> {
        self.s
            .write_all(b)
            .map_err(|e| ioerr(e, "writing to NBD server"))
    }

    /// Send an option with its data.
    fn send_opt(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m)
    }

    /// Read one option reply: (type, data).
    fn opt_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let magic = self.u64()?;
        let o = self.u32()?;
        let ty = self.u32()?;
        let len = self.u32()?;
        if magic != OPTION_REPLY_MAGIC || o != opt || len > MAX_PAYLOAD {
            return Err(perr("malformed option reply from NBD server"));
        }
        let data = self.read_n(len as usize)?;
        if ty & (1 << 31) != 0 {
            let msg = String::from_utf8_lossy(&data).into_owned();
            return Err(perr(format!(
                "NBD server refused option {opt} (reply {ty:#x}): {msg}"
            )));
        }
        Ok((ty, data))
    }

    /// Export name + queries, as SET_META_CONTEXT and GO data begin.
    fn name_block(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d
    }

    /// The fixed newstyle handshake ending in GO.
    fn handshake(&mut self, name: &str, contexts: &[&str]) -> Result<()> {
        if self.u64()? != NBDMAGIC || self.u64()? != IHAVEOPT {
            return Err(perr("not an NBD newstyle server"));
        }
        let hflags = self.u16()?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(perr("NBD server lacks fixed newstyle"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.send(&cflags.to_be_bytes())?;
        self.send_opt(OPT_STRUCTURED_REPLY, &[])?;
        let (ty, _) = self.opt_reply(OPT_STRUCTURED_REPLY)?;
        if ty != REP_ACK {
            return Err(perr("NBD server did not acknowledge structured replies"));
        }
        if !contexts.is_empty() {
            let mut d = Self::name_block(name);
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.send_opt(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (ty, data) = self.opt_reply(OPT_SET_META_CONTEXT)?;
                if ty == REP_ACK {
                    break;
                }
                if ty == REP_META_CONTEXT && data.len() >= 4 {
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    self.contexts
                        .push((id, String::from_utf8_lossy(&data[4..]).into_owned()));
                }
            }
            for q in contexts {
                if !self.contexts.iter().any(|(_, n)| n == q) {
                    return Err(perr(format!(
                        "NBD export '{name}' has no meta context '{q}'"
                    )));
                }
            }
        }
        let mut d = Self::name_block(name);
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_opt(OPT_GO, &d)?;
        loop {
            let (ty, data) = self.opt_reply(OPT_GO)?;
            if ty == REP_ACK {
                break;
            }
            if ty == REP_INFO
                && data.len() >= 12
                && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT
            {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                self.size = u64::from_be_bytes(b);
                self.flags = u16::from_be_bytes([data[10], data[11]]);
            }
        }
        Ok(())
    }

    /// Send a request header (and payload).
    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64> {
        let mut m = Vec::with_capacity(28 + payload.len());
        let cookie = self.header(&mut m, cmd, flags, offset, len);
        m.extend_from_slice(payload);
        self.send(&m)?;
        Ok(cookie)
    }

    /// Append a request header to `m`; returns its cookie.
    fn header(&mut self, m: &mut Vec<u8>, cmd: u16, flags: u16, offset: u64, len: u32) -> u64 {
        let cookie = self.cookie;
        self.cookie += 1;
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        cookie
    }

    /// Read replies to `cookie` until done; `on_chunk(type, payload)` sees structured chunks.
    fn replies(
        &mut self,
        cookie: u64,
        mut on_chunk: impl FnMut(u16, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.replies_into(cookie, 1, &mut [], |_, ty, d| on_chunk(ty, d))
    }

    /// Read the replies to the `count` requests with cookies `first..first + count` until each
    /// is done, in the order the server sends them. The data chunks of reads go straight into
    /// `dest[i]` (no copy through a buffer of their own) when `dest` is not empty;
    /// `on_chunk(i, type, payload)` sees the other structured chunks of request `i`.
    fn replies_into(
        &mut self,
        first: u64,
        count: usize,
        dest: &mut [ReadInto<'_>],
        mut on_chunk: impl FnMut(usize, u16, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut done = vec![false; count];
        let mut left = count;
        // The request a reply names, if it is one of ours still waiting.
        let index = |c: u64, done: &[bool]| -> Result<usize> {
            c.checked_sub(first)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| done.get(i) == Some(&false))
                .ok_or_else(|| perr("NBD reply for an unknown request"))
        };
        while left > 0 {
            let magic = self.u32()?;
            if magic == SIMPLE_REPLY_MAGIC {
                let err = self.u32()?;
                let i = index(self.u64()?, &done)?;
                if err != 0 {
                    return Err(perr(format!("NBD request failed with error {err}")));
                }
                done[i] = true;
                left -= 1;
                continue;
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(perr(format!("bad NBD reply magic {magic:#x}")));
            }
            let flags = self.u16()?;
            let ty = self.u16()?;
            let i = index(self.u64()?, &done)?;
            let len = self.u32()?;
            if len > MAX_PAYLOAD {
                return Err(perr("malformed NBD structured reply"));
            }
            if let (REPLY_TYPE_OFFSET_DATA, Some(d)) = (ty, dest.get_mut(i)) {
                let n = len.checked_sub(8).ok_or_else(|| perr("short chunk"))? as usize;
                let at = self.u64()?;
                let dst = at
                    .checked_sub(d.offset)
                    .and_then(|s| usize::try_from(s).ok())
                    .and_then(|s| d.buf.get_mut(s..s.checked_add(n)?))
                    .ok_or_else(|| perr("chunk outside request"))?;
                self.rd
                    .read_exact(dst)
                    .map_err(|e| ioerr(e, "reading from NBD server"))?;
                d.got += n as u64;
            } else {
                let data = self.read_n(len as usize)?;
                if ty & (1 << 15) != 0 {
                    let code = data
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    let mlen = data
                        .get(4..6)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                        .unwrap_or(0);
                    let msg = data
                        .get(6..6 + mlen)
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .unwrap_or_default();
                    return Err(perr(format!("NBD request failed with error {code}: {msg}")));
                }
                on_chunk(i, ty, &data)?;
            }
            if flags & REPLY_FLAG_DONE != 0 {
                done[i] = true;
                left -= 1;
            }
        }
        Ok(())
    }

    /// Several reads at once: every `(offset, buf)` of `reqs` (at most [`MAX_IN_FLIGHT`]) is
    /// sent in one go and filled as the replies come (holes read as zeros), so the server
    /// works on them together instead of one round trip each.
    pub fn read_many(&mut self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        if reqs.len() > MAX_IN_FLIGHT {
            return Err(perr("too many NBD reads at once"));
        }
        let mut m = Vec::with_capacity(28 * reqs.len());
        let first = self.cookie;
        for (offset, buf) in reqs.iter() {
            let len = u32::try_from(buf.len())
                .ok()
                .filter(|&l| l <= MAX_REQUEST)
                .ok_or_else(|| perr("read too large"))?;
            self.header(&mut m, CMD_READ, 0, *offset, len);
        }
        self.send(&m)?;
        let offsets: Vec<u64> = reqs.iter().map(|(o, _)| *o).collect();
        let mut into: Vec<ReadInto<'_>> = reqs
            .iter_mut()
            .map(|(offset, buf)| ReadInto {
                buf,
                offset: *offset,
                got: 0,
            })
            .collect();
        let mut holes: Vec<(usize, usize, usize)> = Vec::new();
        let count = into.len();
        self.replies_into(first, count, &mut into, |i, ty, d| {
            if ty == REPLY_TYPE_OFFSET_HOLE {
                let offset = offsets.get(i).copied().unwrap_or(0);
                let s = d
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .and_then(|o| o.checked_sub(offset))
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| perr("hole outside request"))?;
                let n = d
                    .get(8..12)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0) as usize;
                holes.push((i, s, n));
            }
            Ok(())
        })?;
        for (i, s, n) in holes {
            let d = &mut into[i];
            d.buf
                .get_mut(s..s.saturating_add(n))
                .ok_or_else(|| perr("hole outside request"))?
                .fill(0);
            d.got += n as u64;
        }
        for d in &into {
            if d.got != d.buf.len() as u64 {
                return Err(perr(format!(
                    "NBD read at {} returned {} of {} bytes",
                    d.offset,
                    d.got,
                    d.buf.len()
                )));
            }
        }
        Ok(())
    }

    /// Block status of `[offset, offset+len)` for context `ctx`: contiguous extents from `offset`.
    pub fn block_status(&mut self, ctx: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        let id = self
            .contexts
            .iter()
            .find(|(_, n)| n == ctx)
            .map(|(i, _)| *i)
            .ok_or_else(|| perr(format!("meta context '{ctx}' not selected")))?;
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut out = Vec::new();
        self.replies(cookie, |ty, d| {
            if ty != REPLY_TYPE_BLOCK_STATUS
                || d.len() < 4
                || u32::from_be_bytes([d[0], d[1], d[2], d[3]]) != id
            {
                return Ok(());
            }
            let mut at = offset;
            for e in d[4..].chunks_exact(8) {
                let l = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) as u64;
                let f = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                if l == 0 {
                    return Err(perr("empty extent from NBD server"));
                }
                out.push(Extent {
                    offset: at,
                    len: l,
                    flags: f,
                });
                at += l;
            }
            Ok(())
        })?;
        if out.is_empty() {
            return Err(perr("NBD block status returned no extents"));
        }
        Ok(out)
    }

    /// Write `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| perr("write too large"))?;
        let cookie = self.request(CMD_WRITE, 0, offset, len, data)?;
        self.replies(cookie, |_, _| Ok(()))
    }

    /// Write zeros over `[offset, offset+len)`.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<()> {
        let cookie = self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])?;
        self.replies(cookie, |_, _| Ok(()))
    }

    /// Flush.
    pub fn flush(&mut self) -> Result<()> {
        let cookie = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.replies(cookie, |_, _| Ok(()))
    }

    /// Disconnect politely.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}

/// Every extent of the whole export for `ctx`, asking in pieces of at most `step` bytes.
pub fn map_all(c: &mut NbdClient, ctx: &str, step: u32) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut off = 0u64;
    while off < c.size {
        let want = (c.size - off).min(u64::from(step)) as u32;
        for mut e in c.block_status(ctx, off, want)? {
            let end = (e.offset + e.len).min(c.size);
            if e.offset >= end {
                break;
            }
            e.len = end - e.offset;
            match out.last_mut() {
                Some(l) if l.flags == e.flags && l.offset + l.len == e.offset => l.len += e.len,
                _ => out.push(e),
            }
            off = end;
        }
    }
    Ok(out)
}
