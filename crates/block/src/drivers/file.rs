//! The `file` protocol driver: a host file with positioned I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::lock::{lock_image, lock_perm, unlock_image};
use crate::driver::{BlockStatus, Driver, FormatSpecific, HostFn, ImageFacts, LockMode};
use crate::perm::Perm;

/// A host file.
pub struct FileDriver {
    file: File,
    filename: String,
    /// Whether fallocate punching/zeroing works here; cleared after the first EOPNOTSUPP.
    can_fallocate: AtomicBool,
    /// `locking=on`: take QEMU-compatible locks for what the users need.
    locking: AtomicBool,
    /// The lock mode currently held; guards relocking.
    mode: std::sync::Mutex<LockMode>,
    /// File length, kept here because the node asks for it on every request (a `statx` each
    /// time otherwise). Only our writes grow the file (raised to each write's end) and only
    /// `truncate` shrinks it; like QEMU, we do not notice other processes resizing it.
    len: AtomicU64,
}

impl FileDriver {
    /// Open `filename`, read-only or read-write.
    pub fn open(filename: &str, read_only: bool) -> io::Result<FileDriver> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(Path::new(filename))?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        Ok(FileDriver {
            len: AtomicU64::new(meta.len()),
            file,
            filename: filename.to_string(),
            can_fallocate: AtomicBool::new(true),
            locking: AtomicBool::new(false),
            mode: std::sync::Mutex::new(LockMode::Unused),
        })
    }

    /// Take QEMU-compatible image locks (`locking=on`, the default for us as for QEMU on Linux).
    pub fn enable_locking(&self) {
        self.locking.store(true, Ordering::Relaxed);
    }

    /// Create (or truncate) a file of `size` bytes, as blockdev-create's `file` driver does.
    pub fn create(filename: &str, size: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(filename)?;
        file.set_len(size)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        if !self.can_fallocate.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                self.can_fallocate.store(false, Ordering::Relaxed);
                Ok(false)
            }
            _ => Err(err),
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(offset + done, &chunk[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Write all of `data` at `offset`, keeping the cached length up to date.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let result = self.file.write_all_at(data, offset);
        match &result {
            Ok(()) => {
                let end = offset.saturating_add(data.len() as u64);
                self.len.fetch_max(end, Ordering::AcqRel);
            }
            // Part of it may have landed past the old end: ask the file.
            Err(_) => self.refresh_len(),
        }
        result
    }

    fn refresh_len(&self) {
        if let Ok(m) = self.file.metadata() {
            self.len.fetch_max(m.len(), Ordering::AcqRel);
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let off = i64::try_from(offset).ok()?;
        // SAFETY: lseek on a descriptor we own; SEEK_DATA/SEEK_HOLE do not change file contents.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        u64::try_from(rc).ok()
    }
}

impl Driver for FileDriver {
    fn name(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // Past the end of the file: reads as zeros.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(offset, data)
    }

    fn host_io(&self) -> bool {
        true
    }

    fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        // Past the end reads as zeros, which only a buffer gives.
        if offset.saturating_add(len) > self.size() {
            return Ok(false);
        }
        f(&self.file, offset, len).map(|()| true)
    }

    fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        let result = f(&self.file, offset, len);
        match &result {
            Ok(()) => {
                self.len
                    .fetch_max(offset.saturating_add(len), Ordering::AcqRel);
            }
            Err(_) => self.refresh_len(),
        }
        result.map(|()| true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        let end = offset.saturating_add(len);
        let size = self.size();
        if end <= size && self.fallocate(mode, offset, len)? {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.fallocate(mode, offset, len).map(|_| ())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        let end = offset + len;
        let Some(data) = self.seek(offset, libc::SEEK_DATA) else {
            // ENXIO: no data at or after offset, a trailing hole (as QEMU reads it). Without
            // SEEK_DATA support: treat as data when unsure.
            let trailing_hole = io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            let size = self.size();
            return Ok(if offset >= size || trailing_hole {
                (BlockStatus::Zero, len)
            } else {
                (BlockStatus::Data, len)
            });
        };
        if data > offset {
            return Ok((BlockStatus::Zero, (data - offset).min(len)));
        }
        let hole = self.seek(offset, libc::SEEK_HOLE).unwrap_or(end);
        Ok((BlockStatus::Data, hole.saturating_sub(offset).clamp(1, len)))
    }

    fn zero_is_fast(&self, offset: u64, len: u64) -> bool {
        // fallocate zeroes inside the file; past the end the file would be written.
        self.can_fallocate.load(Ordering::Relaxed)
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.size())
    }

    fn can_grow(&self) -> bool {
        true
    }

    fn status_is_cheap(&self) -> bool {
        false
    }

    fn set_read_only(&self, read_only: bool) -> io::Result<()> {
        if !read_only {
            // Reopening read-write needs a writable descriptor; ours was opened for the mode
            // given at open, so a read-only-opened file cannot switch.
            let flags = nix::fcntl::fcntl(self.file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
                .map_err(io::Error::from)?;
            if flags & libc::O_ACCMODE == libc::O_RDONLY {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
        }
        Ok(())
    }

    fn set_lock(&self, mode: LockMode) -> Result<(), String> {
        if !self.locking.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut held = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if *held == mode {
            return Ok(());
        }
        unlock_image(&self.file);
        let result = match mode {
            LockMode::Unused => Ok(()),
            LockMode::Read => lock_image(&self.file, true),
            LockMode::Write => lock_image(&self.file, false),
        };
        match result {
            Ok(()) => {
                *held = mode;
                Ok(())
            }
            Err(e) => {
                // Put back what we had; it did not conflict before.
                let _ = match *held {
                    LockMode::Unused => Ok(()),
                    LockMode::Read => lock_image(&self.file, true),
                    LockMode::Write => lock_image(&self.file, false),
                };
                Err(e)
            }
        }
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<(), String> {
        if !self.locking.load(Ordering::Relaxed) {
            return Ok(());
        }
        // One relock at a time; `mode` is kept coarse for `set_lock` callers.
        let mut held = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        lock_perm(&self.file, perm.bits().into(), shared.bits().into())?;
        *held = if perm.intersects(Perm::WRITE | Perm::RESIZE) {
            LockMode::Write
        } else if perm.is_empty() {
            LockMode::Unused
        } else {
            LockMode::Read
        };
        Ok(())
    }

    fn truncate(&self, size: u64) -> io::Result<()> {
        let result = self.file.set_len(size);
        // Store what the file now has, whether or not set_len worked.
        match self.file.metadata() {
            Ok(m) => self.len.store(m.len(), Ordering::Release),
            Err(_) if result.is_ok() => self.len.store(size, Ordering::Release),
            Err(_) => {}
        }
        result
    }

    fn close(&self) -> io::Result<()> {
        let r = self.file.sync_data();
        unlock_image(&self.file);
        r
    }

    fn facts(&self) -> ImageFacts {
        let meta = self.file.metadata().ok();
        ImageFacts {
            filename: self.filename.clone(),
            actual_size: meta.as_ref().map(|m| m.blocks() * 512),
            format_specific: Some(FormatSpecific::File),
            ..ImageFacts::default()
        }
    }
}
