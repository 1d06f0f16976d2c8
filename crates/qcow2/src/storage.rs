//! The storage layer below the format: a positioned, thread-safe, blocking byte store.
//!
//! `Storage` is what the format driver reads and writes its image through. The block core
//! implements it over its `file` node; this module provides [`FileStorage`] (a plain file) and
//! [`MemStorage`] (memory, with fault and delay injection for race and error tests).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// A consumer of host-file pieces for a copy done by the kernel (`splice`, `copy_file_range`):
/// called with the file, the offset in it and the length, piece after piece in guest order.
pub type HostFn<'a> = dyn FnMut(&File, u64, u64) -> io::Result<()> + 'a;

/// Positioned, thread-safe, blocking I/O on the layer below (the graph's `file` node, or memory).
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`. Bytes past the end of the storage read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`, extending the storage as needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Set the size (shrinking or growing with zeros).
    fn truncate(&self, size: u64) -> io::Result<()>;
    /// Make all completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Hint that a byte range is no longer needed (its content becomes unspecified).
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// A debug event (QEMU's `BlkdebugEvent` name, e.g. "l2_load") fired on the storage, for
    /// fault injection below the format. Default: ignored.
    fn debug_event(&self, _event: &'static str) {}
    /// Whether [`Storage::read_host`] and [`Storage::write_host`] work here (a plain file
    /// whose bytes the kernel may copy). Default: no.
    fn host_io(&self) -> bool {
        false
    }
    /// Hand `[offset, offset + len)` of the host file to `f` for reading (bytes past the end
    /// are not allowed). `Ok(false)`: not possible here, `f` was not called.
    fn read_host(&self, _offset: u64, _len: u64, _f: &mut HostFn<'_>) -> io::Result<bool> {
        Ok(false)
    }
    /// Let `f` write `[offset, offset + len)` of the host file (it may grow the file), with the
    /// bookkeeping of a write. `Ok(false)`: not possible here, `f` was not called.
    fn write_host(&self, _offset: u64, _len: u64, _f: &mut HostFn<'_>) -> io::Result<bool> {
        Ok(false)
    }
}

/// A [`Storage`] over a `std::fs::File`, using `pread`/`pwrite`.
#[derive(Debug)]
pub struct FileStorage {
    /// The open file; positioned I/O needs no lock.
    file: File,
}

impl FileStorage {
    /// Wrap an open file.
    pub fn new(file: File) -> FileStorage {
        FileStorage { file }
    }

    /// Open an existing file, read-only or read-write.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<FileStorage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        Ok(FileStorage { file })
    }

    /// Create (or truncate) a file for writing.
    pub fn create(path: impl AsRef<Path>) -> io::Result<FileStorage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(FileStorage { file })
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn truncate(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn host_io(&self) -> bool {
        true
    }

    fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        if offset.saturating_add(len) > self.size()? {
            return Ok(false);
        }
        f(&self.file, offset, len).map(|()| true)
    }

    fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        f(&self.file, offset, len).map(|()| true)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        // Discard is advisory: a file system without hole punching just keeps the data.
        let _ = rc;
        Ok(())
    }
}

/// Which faults a [`MemStorage`] injects; changed through its setters.
#[derive(Debug, Default, Clone)]
struct Faults {
    /// Fail every read with EIO.
    fail_reads: bool,
    /// Fail every write with EIO.
    fail_writes: bool,
    /// Fail flushes with EIO.
    fail_flush: bool,
    /// Sleep this long before each write (to widen race windows).
    write_delay: Option<Duration>,
    /// Sleep this long before each read.
    read_delay: Option<Duration>,
}

/// In-memory [`Storage`] for tests, which can fail or delay I/O on demand.
#[derive(Debug)]
pub struct MemStorage {
    /// The bytes; reads take the lock shared, writes exclusive, so each call is atomic.
    data: RwLock<Vec<u8>>,
    /// Writes past this size fail with ENOSPC (protects tests from absurd allocations).
    limit: u64,
    /// Injected faults.
    faults: Mutex<Faults>,
}

impl Default for MemStorage {
    fn default() -> Self {
        MemStorage::new()
    }
}

impl MemStorage {
    /// Default size limit: 1 GiB.
    pub const DEFAULT_LIMIT: u64 = 1 << 30;

    /// An empty storage.
    pub fn new() -> MemStorage {
        MemStorage::from_bytes(Vec::new())
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            data: RwLock::new(bytes),
            limit: MemStorage::DEFAULT_LIMIT,
            faults: Mutex::new(Faults::default()),
        }
    }

    /// Set the size limit (writes or truncates beyond it fail with ENOSPC).
    pub fn with_limit(mut self, limit: u64) -> MemStorage {
        self.limit = limit;
        self
    }

    /// A copy of the current content.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Make every read fail (or stop failing).
    pub fn set_fail_reads(&self, fail: bool) {
        self.with_faults(|f| f.fail_reads = fail);
    }

    /// Make every write fail (or stop failing).
    pub fn set_fail_writes(&self, fail: bool) {
        self.with_faults(|f| f.fail_writes = fail);
    }

    /// Make every flush fail (or stop failing).
    pub fn set_fail_flush(&self, fail: bool) {
        self.with_faults(|f| f.fail_flush = fail);
    }

    /// Delay each write by `delay` (None: no delay).
    pub fn set_write_delay(&self, delay: Option<Duration>) {
        self.with_faults(|f| f.write_delay = delay);
    }

    /// Delay each read by `delay` (None: no delay).
    pub fn set_read_delay(&self, delay: Option<Duration>) {
        self.with_faults(|f| f.read_delay = delay);
    }

    /// Apply `change` to the fault settings.
    fn with_faults(&self, change: impl FnOnce(&mut Faults)) {
        if let Ok(mut f) = self.faults.lock() {
            change(&mut f);
        }
    }

    /// A snapshot of the fault settings.
    fn faults(&self) -> Faults {
        self.faults.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// The error returned for an injected fault.
fn injected() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// The error returned when the lock of a [`MemStorage`] is poisoned.
fn poisoned() -> io::Error {
    io::Error::other("memory storage lock poisoned")
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let faults = self.faults();
        if let Some(d) = faults.read_delay {
            std::thread::sleep(d);
        }
        if faults.fail_reads {
            return Err(injected());
        }
        let data = self.data.read().map_err(|_| poisoned())?;
        let len = data.len() as u64;
        let avail = if offset >= len {
            0
        } else {
            (len - offset).min(buf.len() as u64) as usize
        };
        if avail > 0 {
            let start = offset as usize;
            buf[..avail].copy_from_slice(&data[start..start + avail]);
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let faults = self.faults();
        if let Some(d) = faults.write_delay {
            std::thread::sleep(d);
        }
        if faults.fail_writes {
            return Err(injected());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.limit)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        let mut data = self.data.write().map_err(|_| poisoned())?;
        if (data.len() as u64) < end {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.data.read().map_err(|_| poisoned())?.len() as u64)
    }

    fn truncate(&self, size: u64) -> io::Result<()> {
        if size > self.limit {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.data
            .write()
            .map_err(|_| poisoned())?
            .resize(size as usize, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.faults().fail_flush {
            return Err(injected());
        }
        Ok(())
    }
}
