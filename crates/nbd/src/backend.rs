//! What an export is served from: the [`ExportBackend`] trait the block core implements, and the
//! [`ExportConfig`] that names it.

use std::io;
use std::sync::Arc;

/// One export's backing storage.
///
/// The data methods (`read`, `write`, `write_zeroes`, `trim`, `flush`, `block_status`,
/// `reads_as_zero`) are BLOCKING: the server calls them on tokio's blocking pool
/// (`spawn_blocking`), never on the reactor, and may call them concurrently from several
/// connections and requests. `size` and `meta_contexts` are called during the handshake on
/// the reactor and must be cheap (no I/O); both must stay the same for the life of the export.
pub trait ExportBackend: Send + Sync + 'static {
    /// Size of the export in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. The range lies inside the export.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset`; with `fua` it must be durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Make `[offset, offset+len)` read as zeros. `may_unmap`: the range may become a hole.
    /// `fast_only`: if this cannot be done faster than writing zeros, fail quickly with
    /// `ENOTSUP` without changing anything.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> io::Result<()>;
    /// Discard `[offset, offset+len)` (a hint; contents afterwards are unspecified).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Names of the metadata contexts this export offers, e.g. `["base:allocation",
    /// "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]`. The index of a name is its context id
    /// on the wire.
    fn meta_contexts(&self) -> Vec<String>;
    /// Status extents for context `ctx` (index into [`meta_contexts`](Self::meta_contexts))
    /// starting exactly at `offset`, contiguous, covering up to `len` bytes (may stop earlier,
    /// must cover at least one byte), at most `max_extents` entries; each `(length, flags)`.
    /// `base:allocation` flags: bit0 HOLE, bit1 ZERO; dirty bitmap: bit0 dirty;
    /// allocation depth: the depth value.
    fn block_status(
        &self,
        ctx: usize,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<(u64, u32)>>;
    /// For structured READ replies: is `[offset, offset+len)` known to read as zeros (so the
    /// server sends an `OFFSET_HOLE` chunk instead of data)? Default: never.
    fn reads_as_zero(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

/// One export: its name on the wire and what serves it.
#[derive(Clone)]
pub struct ExportConfig {
    /// Export name clients ask for (at most 4096 bytes).
    pub name: String,
    /// Optional description shown by `NBD_OPT_LIST` / `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Whether clients may write; read-only exports fail writes with `EPERM`.
    pub writable: bool,
    /// The storage.
    pub backend: Arc<dyn ExportBackend>,
    /// Minimum block size (power of two, 1..=65536) advertised to clients that ask for block
    /// sizes; others are told 1 (as QEMU does). Usually 1.
    pub min_block: u32,
}

impl ExportConfig {
    /// A config with no description and `min_block` 1.
    pub fn new(name: impl Into<String>, writable: bool, backend: Arc<dyn ExportBackend>) -> Self {
        ExportConfig {
            name: name.into(),
            description: None,
            writable,
            backend,
            min_block: 1,
        }
    }
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("writable", &self.writable)
            .field("min_block", &self.min_block)
            .finish_non_exhaustive()
    }
}
