//! Wire format of the NBD protocol: constants, header decoding and reply encoding.
//!
//! The protocol's numbers (magics, options, replies, flags, commands, errnos) are in
//! `proto/consts.rs`, re-exported here.
//!
//! Everything here is pure (no I/O) so it can be unit-tested byte for byte. All integers on the
//! wire are big-endian. Names follow the protocol document (`NBD_OPT_GO` becomes [`OPT_GO`]).

use std::io;

mod consts;
pub use consts::*;

// ---------------------------------------------------------------------------------------------
// Limits

/// Largest payload accepted or sent for one request (QEMU's `NBD_MAX_BUFFER_SIZE`, 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest string (export name, description, context query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Most extents in one block status chunk (1 MiB of 32-bit descriptors, as QEMU).
pub const MAX_EXTENTS: usize = 128 * 1024;

/// Which request and reply headers a connection uses, fixed when transmission starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HeaderMode {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// 32-byte requests and replies with 64-bit lengths (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl HeaderMode {
    /// Size of one request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Simple | HeaderMode::Structured => 28,
            HeaderMode::Extended => 32,
        }
    }
}

/// Map an I/O error from a backend to the NBD errno sent to the client. The one place where
/// this mapping happens: known errnos pass through, `EROFS` becomes `EPERM`, `EDQUOT`/`EFBIG`
/// become `ENOSPC`, anything else is `EIO`.
pub fn errno_for(err: &io::Error) -> u32 {
    if let Some(raw) = err.raw_os_error() {
        return match raw {
            libc::EPERM | libc::EROFS => EPERM,
            libc::EIO => EIO,
            libc::ENOMEM => ENOMEM,
            // EACCES: a snapshot-access read outside the view; ETIMEDOUT: cbw-timeout.
            libc::EINVAL | libc::EACCES | libc::ETIMEDOUT => EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => EPERM,
        io::ErrorKind::OutOfMemory => ENOMEM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => ENOSPC,
        io::ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// One decoded request header. In compact mode `length` is the 32-bit field widened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Effect length, or payload length (WRITE, or `CMD_FLAG_PAYLOAD_LEN`).
    pub length: u64,
}

/// A request header whose magic is wrong for the negotiated mode: the connection must be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

/// Decode a request header; `buf` holds exactly [`HeaderMode::request_len`] bytes.
pub fn decode_request(mode: HeaderMode, buf: &[u8]) -> Result<RequestHeader, BadMagic> {
    let magic = be32(buf, 0);
    let expected = match mode {
        HeaderMode::Extended => EXTENDED_REQUEST_MAGIC,
        _ => REQUEST_MAGIC,
    };
    if magic != expected || buf.len() != mode.request_len() {
        return Err(BadMagic(magic));
    }
    let length = match mode {
        HeaderMode::Extended => be64(buf, 24),
        _ => u64::from(be32(buf, 24)),
    };
    Ok(RequestHeader {
        flags: be16(buf, 4),
        command: be16(buf, 6),
        cookie: be64(buf, 8),
        offset: be64(buf, 16),
        length,
    })
}

/// Encode a request header (used by test clients).
pub fn encode_request(mode: HeaderMode, req: &RequestHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(mode.request_len());
    match mode {
        HeaderMode::Extended => out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes()),
        _ => out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes()),
    }
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.command.to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    match mode {
        HeaderMode::Extended => out.extend_from_slice(&req.length.to_be_bytes()),
        // Truncation is the caller's business: compact requests carry 32 bits.
        _ => out.extend_from_slice(&(req.length as u32).to_be_bytes()),
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Handshake messages

/// The 18-byte server greeting of fixed newstyle negotiation.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// A decoded option header: magic, option, data length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The magic the client sent (must be [`IHAVEOPT`]).
    pub magic: u64,
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Decode the 16-byte option header.
pub fn decode_option_header(buf: &[u8; 16]) -> OptionHeader {
    OptionHeader {
        magic: be64(buf, 0),
        option: be32(buf, 8),
        length: be32(buf, 12),
    }
}

/// Append one option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Option replies are built from bounded strings; never near 4 GiB.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Payload of `NBD_INFO_EXPORT`: type, size, transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// Payload of `NBD_INFO_BLOCK_SIZE`: type, minimum, preferred, maximum.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&min.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&max.to_be_bytes());
    out
}

/// Payload of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: type, then the string.
pub fn info_string(info: u16, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(text);
    out
}

/// Payload of `NBD_REP_SERVER`: name length, name, description.
pub fn rep_server(name: &[u8], description: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(description);
    out
}

/// Payload of `NBD_REP_META_CONTEXT`: context id, name.
pub fn rep_meta_context(id: u32, name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless `no_zeroes`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(134, 0);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Replies

/// Identifies the request a reply answers: its cookie and (for extended replies) its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// Header mode of the connection.
    pub mode: HeaderMode,
    /// Cookie of the request.
    pub cookie: u64,
    /// Offset of the request (echoed in extended reply headers).
    pub offset: u64,
}

impl ReplyTo {
    /// Append a chunk header for a payload of `payload_len` bytes (structured or extended).
    fn put_chunk_header(&self, out: &mut Vec<u8>, flags: u16, kind: u16, payload_len: u64) {
        match self.mode {
            HeaderMode::Extended => {
                out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&self.cookie.to_be_bytes());
                out.extend_from_slice(&self.offset.to_be_bytes());
                out.extend_from_slice(&payload_len.to_be_bytes());
            }
            HeaderMode::Simple | HeaderMode::Structured => {
                out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&self.cookie.to_be_bytes());
                // Chunk payloads are bounded by MAX_PAYLOAD plus a small fixed overhead.
                out.extend_from_slice(&(payload_len as u32).to_be_bytes());
            }
        }
    }

    /// Append a simple reply header (16 bytes); READ data, if any, follows it.
    pub fn put_simple(&self, out: &mut Vec<u8>, error: u32) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
    }

    /// Append a successful reply without payload: simple unless extended headers are in use.
    pub fn put_ok(&self, out: &mut Vec<u8>) {
        match self.mode {
            HeaderMode::Extended => self.put_none(out),
            _ => self.put_simple(out, 0),
        }
    }

    /// Append the final empty `NBD_REPLY_TYPE_NONE` chunk.
    pub fn put_none(&self, out: &mut Vec<u8>) {
        self.put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    }

    /// Append a failed reply: a simple reply in simple mode, else a final error chunk
    /// carrying `message` (cut at 4096 bytes).
    pub fn put_error(&self, out: &mut Vec<u8>, error: u32, message: &str) {
        if self.mode == HeaderMode::Simple {
            self.put_simple(out, error);
            return;
        }
        let msg = truncate_utf8(message, MAX_STRING);
        self.put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u64);
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg.as_bytes());
    }

    /// Append the header of an `OFFSET_DATA` chunk whose `data_len` bytes follow it.
    pub fn put_data_header(&self, out: &mut Vec<u8>, data_offset: u64, data_len: u64, done: bool) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.put_chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, 8 + data_len);
        out.extend_from_slice(&data_offset.to_be_bytes());
    }

    /// Append an `OFFSET_HOLE` chunk: `len` bytes at `hole_offset` read as zeros.
    pub fn put_hole(&self, out: &mut Vec<u8>, hole_offset: u64, len: u32, done: bool) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.put_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, 12);
        out.extend_from_slice(&hole_offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }

    /// Append one block status chunk for context `id`. In compact mode every extent length
    /// must fit in 32 bits (the caller clips to the request, which is at most 32 bits long).
    pub fn put_block_status(&self, out: &mut Vec<u8>, id: u32, extents: &[(u64, u32)], done: bool) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        match self.mode {
            HeaderMode::Extended => {
                let len = 8 + 16 * extents.len() as u64;
                self.put_chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS_EXT, len);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
                for &(length, status) in extents {
                    out.extend_from_slice(&length.to_be_bytes());
                    out.extend_from_slice(&u64::from(status).to_be_bytes());
                }
            }
            HeaderMode::Simple | HeaderMode::Structured => {
                let len = 4 + 8 * extents.len() as u64;
                self.put_chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS, len);
                out.extend_from_slice(&id.to_be_bytes());
                for &(length, status) in extents {
                    let length = u32::try_from(length).unwrap_or(u32::MAX);
                    out.extend_from_slice(&length.to_be_bytes());
                    out.extend_from_slice(&status.to_be_bytes());
                }
            }
        }
    }
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Byte helpers (callers guarantee the length; a short slice reads as zeros rather than panic)

fn be16(buf: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    if let Some(s) = buf.get(at..at + 2) {
        b.copy_from_slice(s);
    }
    u16::from_be_bytes(b)
}

fn be32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = buf.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_be_bytes(b)
}

fn be64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = buf.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

/// A cursor over option data that refuses to read past the end.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// Start reading `buf` from the beginning.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    /// Take the next `n` bytes, or `None` if fewer remain.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// Take a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| be16(s, 0))
    }

    /// Take a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| be32(s, 0))
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(mode: HeaderMode) -> ReplyTo {
        ReplyTo {
            mode,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
        }
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn compact_request_round_trips() {
        let req = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 42,
            offset: 1 << 40,
            length: 65536,
        };
        let bytes = encode_request(HeaderMode::Structured, &req);
        assert_eq!(bytes.len(), 28);
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(decode_request(HeaderMode::Structured, &bytes), Ok(req));
    }

    #[test]
    fn extended_request_carries_64_bit_length() {
        let req = RequestHeader {
            flags: 0,
            command: CMD_BLOCK_STATUS,
            cookie: 7,
            offset: 0,
            length: 5 << 40,
        };
        let bytes = encode_request(HeaderMode::Extended, &req);
        assert_eq!(bytes.len(), 32);
        assert_eq!(decode_request(HeaderMode::Extended, &bytes), Ok(req));
    }

    #[test]
    fn request_with_wrong_magic_for_mode_is_rejected() {
        let req = RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        let compact = encode_request(HeaderMode::Simple, &req);
        let mut bad = compact.clone();
        bad[0] ^= 0xff;
        assert!(decode_request(HeaderMode::Simple, &bad).is_err());
        let extended = encode_request(HeaderMode::Extended, &req);
        assert_eq!(
            decode_request(HeaderMode::Simple, &extended[..28]),
            Err(BadMagic(EXTENDED_REQUEST_MAGIC))
        );
    }

    #[test]
    fn simple_reply_is_magic_error_cookie() {
        let mut out = Vec::new();
        to(HeaderMode::Simple).put_error(&mut out, EINVAL, "ignored in simple mode");
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn structured_error_chunk_has_errno_and_message() {
        let mut out = Vec::new();
        to(HeaderMode::Structured).put_error(&mut out, ENOSPC, "full");
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(be16(&out, 4), REPLY_FLAG_DONE);
        assert_eq!(be16(&out, 6), REPLY_TYPE_ERROR);
        assert_eq!(be64(&out, 8), 0x0102_0304_0506_0708);
        assert_eq!(be32(&out, 16), 10);
        assert_eq!(be32(&out, 20), ENOSPC);
        assert_eq!(be16(&out, 24), 4);
        assert_eq!(&out[26..], b"full");
    }

    #[test]
    fn extended_ok_is_a_none_chunk_echoing_offset() {
        let mut out = Vec::new();
        to(HeaderMode::Extended).put_ok(&mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(be32(&out, 0), EXTENDED_REPLY_MAGIC);
        assert_eq!(be16(&out, 4), REPLY_FLAG_DONE);
        assert_eq!(be16(&out, 6), REPLY_TYPE_NONE);
        assert_eq!(be64(&out, 16), 0x1000);
        assert_eq!(be64(&out, 24), 0);
    }

    #[test]
    fn structured_ok_is_a_simple_reply() {
        let mut out = Vec::new();
        to(HeaderMode::Structured).put_ok(&mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(be32(&out, 0), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&out, 4), 0);
    }

    #[test]
    fn data_chunk_length_counts_offset_field() {
        let mut out = Vec::new();
        to(HeaderMode::Structured).put_data_header(&mut out, 0x2000, 512, true);
        assert_eq!(out.len(), 28);
        assert_eq!(be16(&out, 6), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be32(&out, 16), 520);
        assert_eq!(be64(&out, 20), 0x2000);
    }

    #[test]
    fn hole_chunk_is_offset_and_32_bit_length_in_both_modes() {
        for mode in [HeaderMode::Structured, HeaderMode::Extended] {
            let mut out = Vec::new();
            to(mode).put_hole(&mut out, 0x3000, 4096, false);
            let hdr = if mode == HeaderMode::Extended { 32 } else { 20 };
            assert_eq!(out.len(), hdr + 12);
            assert_eq!(be16(&out, 4), 0);
            assert_eq!(be16(&out, 6), REPLY_TYPE_OFFSET_HOLE);
            assert_eq!(be64(&out, hdr), 0x3000);
            assert_eq!(be32(&out, hdr + 8), 4096);
        }
    }

    #[test]
    fn compact_block_status_uses_32_bit_descriptors() {
        let mut out = Vec::new();
        to(HeaderMode::Structured).put_block_status(&mut out, 2, &[(65536, 3), (4096, 0)], true);
        assert_eq!(be16(&out, 6), REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be32(&out, 16), 4 + 16);
        assert_eq!(be32(&out, 20), 2);
        assert_eq!(be32(&out, 24), 65536);
        assert_eq!(be32(&out, 28), 3);
        assert_eq!(be32(&out, 32), 4096);
        assert_eq!(be32(&out, 36), 0);
    }

    #[test]
    fn extended_block_status_has_count_and_64_bit_descriptors() {
        let mut out = Vec::new();
        to(HeaderMode::Extended).put_block_status(&mut out, 1, &[(1 << 35, 1)], false);
        assert_eq!(be16(&out, 4), 0);
        assert_eq!(be16(&out, 6), REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(be64(&out, 24), 8 + 16);
        assert_eq!(be32(&out, 32), 1);
        assert_eq!(be32(&out, 36), 1);
        assert_eq!(be64(&out, 40), 1 << 35);
        assert_eq!(be64(&out, 48), 1);
    }

    #[test]
    fn option_reply_layout() {
        let mut out = Vec::new();
        put_option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, b"nope");
        assert_eq!(be64(&out, 0), OPTION_REPLY_MAGIC);
        assert_eq!(be32(&out, 8), OPT_GO);
        assert_eq!(be32(&out, 12), 0x8000_0006);
        assert_eq!(be32(&out, 16), 4);
        assert_eq!(&out[20..], b"nope");
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        assert_eq!(export_name_reply(1 << 20, 0x1ed, false).len(), 134);
        let short = export_name_reply(1 << 20, 0x1ed, true);
        assert_eq!(short.len(), 10);
        assert_eq!(be64(&short, 0), 1 << 20);
        assert_eq!(be16(&short, 8), 0x1ed);
    }

    #[test]
    fn errno_mapping_passes_known_values_and_defaults_to_eio() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(errno_for(&os(libc::EPERM)), EPERM);
        assert_eq!(errno_for(&os(libc::EROFS)), EPERM);
        assert_eq!(errno_for(&os(libc::ENOSPC)), ENOSPC);
        assert_eq!(errno_for(&os(libc::EDQUOT)), ENOSPC);
        assert_eq!(errno_for(&os(libc::ENOTSUP)), ENOTSUP);
        assert_eq!(errno_for(&os(libc::EOVERFLOW)), EOVERFLOW);
        assert_eq!(errno_for(&os(libc::ESHUTDOWN)), ESHUTDOWN);
        assert_eq!(errno_for(&os(libc::ENOMEM)), ENOMEM);
        assert_eq!(errno_for(&os(libc::EINVAL)), EINVAL);
        assert_eq!(errno_for(&os(libc::EACCES)), EINVAL);
        assert_eq!(errno_for(&os(libc::ETIMEDOUT)), EINVAL);
        assert_eq!(errno_for(&os(libc::EBADF)), EIO);
        assert_eq!(errno_for(&io::Error::other("x")), EIO);
        assert_eq!(
            errno_for(&io::Error::from(io::ErrorKind::Unsupported)),
            ENOTSUP
        );
    }

    #[test]
    fn long_error_message_is_cut_on_a_char_boundary() {
        let msg = "é".repeat(3000);
        let mut out = Vec::new();
        to(HeaderMode::Structured).put_error(&mut out, EIO, &msg);
        let len = be16(&out, 24) as usize;
        assert!(len <= MAX_STRING);
        assert!(std::str::from_utf8(&out[26..26 + len]).is_ok());
    }

    #[test]
    fn cursor_refuses_to_read_past_end() {
        let mut c = Cursor::new(&[0, 0, 0, 5, 1]);
        assert_eq!(c.u32(), Some(5));
        assert_eq!(c.u16(), None);
        assert_eq!(c.remaining(), 1);
        assert_eq!(c.take(1), Some(&[1u8][..]));
    }
}
