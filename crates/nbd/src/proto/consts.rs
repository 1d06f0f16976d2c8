//! The NBD protocol's numbers, named as in the protocol document without the `NBD_` prefix.

// ---------------------------------------------------------------------------------------------
// Magics

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting magic, and the magic in front of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Handshake flags

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Options

/// `NBD_OPT_EXPORT_NAME`
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// `NBD_REP_ACK`
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// `NBD_REP_ERR_POLICY`: known but forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// `NBD_REP_ERR_PLATFORM`
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// `NBD_REP_ERR_TLS_REQD`
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// `NBD_REP_ERR_SHUTDOWN`
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
/// `NBD_REP_ERR_TOO_BIG`
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// `NBD_INFO_EXPORT`
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission flags

/// `NBD_FLAG_HAS_FLAGS`
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Commands and command flags

/// `NBD_CMD_READ`
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_CMD_FLAG_FUA`
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers only)
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Reply chunks

/// `NBD_REPLY_FLAG_DONE`
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit extents)
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit extents, extended headers only)
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// `NBD_REPLY_TYPE_ERROR`
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// ---------------------------------------------------------------------------------------------
// Errors

/// `NBD_EPERM`
pub const EPERM: u32 = 1;
/// `NBD_EIO`
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`
pub const ESHUTDOWN: u32 = 108;
