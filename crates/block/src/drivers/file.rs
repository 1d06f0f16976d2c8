//! The `file` protocol driver: a host file with positioned I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::lock::{self, lock_image, lock_perm, unlock_image};
use crate::driver::{
    AfterSwitch, BlockStatus, Driver, FormatSpecific, HostFn, ImageFacts, LockMode, StagedSwitch,
};
use crate::perm::Perm;

/// A descriptor open for writing, prepared for a switch to read-write, with the lock bytes
/// it took over (or, swapped in early, the descriptor it replaced: see `swap_switch`).
struct FileSwitch {
    file: Arc<File>,
    bytes: (u32, u32),
}

/// A host file.
pub struct FileDriver {
    /// The descriptor; replaced by one open for writing when a read-only node goes read-write
    /// (blockdev-reopen). Requests take a handle and drop the guard at once.
    file: RwLock<Arc<File>>,
    filename: String,
    /// Whether fallocate punching/zeroing works here; cleared after the first EOPNOTSUPP.
    can_fallocate: AtomicBool,
    /// `locking=on`: take QEMU-compatible locks for what the users need.
    locking: AtomicBool,
    /// The lock mode currently held; guards relocking.
    mode: std::sync::Mutex<LockMode>,
    /// The lock bytes held (QEMU's perm and shared bits), for a new descriptor to take over.
    bytes: std::sync::Mutex<(u32, u32)>,
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
            file: RwLock::new(Arc::new(file)),
            filename: filename.to_string(),
            can_fallocate: AtomicBool::new(true),
            locking: AtomicBool::new(false),
            mode: std::sync::Mutex::new(LockMode::Unused),
            bytes: std::sync::Mutex::new(lock::NO_LOCKS),
        })
    }

    /// The current descriptor.
    fn fd(&self) -> Arc<File> {
        self.file.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the descriptor was opened read-only.
    fn fd_read_only(&self) -> io::Result<bool> {
        let flags = nix::fcntl::fcntl(self.fd().as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(io::Error::from)?;
        Ok(flags & libc::O_ACCMODE == libc::O_RDONLY)
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
        let rc = unsafe { libc::fallocate(self.fd().as_raw_fd(), mode, off, l) };
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
        let result = self.fd().write_all_at(data, offset);
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
        if let Ok(m) = self.fd().metadata() {
            self.len.fetch_max(m.len(), Ordering::AcqRel);
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let off = i64::try_from(offset).ok()?;
        // SAFETY: lseek on a descriptor we own; SEEK_DATA/SEEK_HOLE do not change file contents.
        let rc = unsafe { libc::lseek(self.fd().as_raw_fd(), off, whence) };
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
            match self.fd().read_at(&mut buf[done..], offset + done as u64) {
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
        f(&self.fd(), offset, len).map(|()| true)
    }

    fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> io::Result<bool> {
        let result = f(&self.fd(), offset, len);
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
        self.fd().sync_data()
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

    fn prepare_switch(&self, read_only: bool) -> crate::Result<Option<StagedSwitch>> {
        let reopen_err = |e: &io::Error| crate::Error::io("Could not reopen", e);
        if read_only || !self.fd_read_only().map_err(|e| reopen_err(&e))? {
            return Ok(None);
        }
        // A descriptor open for writing, on the same file (the name may lead elsewhere now).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(Path::new(&self.filename))
            .map_err(|e| reopen_err(&e))?;
        let (old, new) = (
            self.fd().metadata().map_err(|e| reopen_err(&e))?,
            file.metadata().map_err(|e| reopen_err(&e))?,
        );
        if (old.dev(), old.ino()) != (new.dev(), new.ino()) {
            return Err(crate::Error::generic(format!(
                "Could not reopen: '{}' is no longer the file that was opened",
                self.filename
            )));
        }
        // It takes over the lock bytes held now (shared locks: both hold them meanwhile).
        let bytes = *self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        if self.locking.load(Ordering::Relaxed) {
            lock::hold_bits(&file, bytes.0, bytes.1)
                .map_err(|e| crate::Error::generic(format!("Could not reopen: {e}")))?;
        }
        Ok(Some(StagedSwitch(Box::new(FileSwitch {
            file: Arc::new(file),
            bytes,
        }))))
    }

    fn commit_switch(&self, staged: StagedSwitch) -> Option<AfterSwitch> {
        match self.swap_switch(staged) {
            // Closing the old descriptor drops its locks; the new one holds the same.
            Ok(old) => Some(Box::new(move || drop(old))),
            Err(_) => {
                tracing::warn!("a reopen committed a switch this driver did not prepare");
                None
            }
        }
    }

    fn swap_switch(&self, staged: StagedSwitch) -> Result<StagedSwitch, StagedSwitch> {
        let staged = staged.0.downcast::<FileSwitch>().map_err(StagedSwitch)?;
        let FileSwitch { file, bytes } = *staged;
        // One relock at a time (`set_perm` relocks the current descriptor under it).
        let _held = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        // Relocked since the prepare (another node's permissions changed): follow.
        let now = *self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        if now != bytes && self.locking.load(Ordering::Relaxed) {
            if let Err(e) = lock::hold_bits(&file, now.0, now.1) {
                tracing::warn!(error = %e, "lock bytes on the reopened descriptor");
            }
        }
        let old = std::mem::replace(
            &mut *self.file.write().unwrap_or_else(|p| p.into_inner()),
            file,
        );
        Ok(StagedSwitch(Box::new(FileSwitch {
            file: old,
            bytes: now,
        })))
    }

    fn set_read_only(&self, read_only: bool) -> io::Result<()> {
        // Going read-write in place needs a writable descriptor (a reopen opens one: see
        // `prepare_switch`).
        if !read_only && self.fd_read_only()? {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
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
        unlock_image(&self.fd());
        let result = match mode {
            LockMode::Unused => Ok(()),
            LockMode::Read => lock_image(&self.fd(), true),
            LockMode::Write => lock_image(&self.fd(), false),
        };
        match result {
            Ok(()) => {
                *held = mode;
                *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) = match mode {
                    LockMode::Unused => lock::NO_LOCKS,
                    LockMode::Read => lock::image_bits(true),
                    LockMode::Write => lock::image_bits(false),
                };
                Ok(())
            }
            Err(e) => {
                // Put back what we had; it did not conflict before.
                let _ = match *held {
                    LockMode::Unused => Ok(()),
                    LockMode::Read => lock_image(&self.fd(), true),
                    LockMode::Write => lock_image(&self.fd(), false),
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
        let (p, sh) = (perm.bits().into(), shared.bits().into());
        lock_perm(&self.fd(), p, sh)?;
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) = (p, sh);
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
        let result = self.fd().set_len(size);
        // Store what the file now has, whether or not set_len worked.
        match self.fd().metadata() {
            Ok(m) => self.len.store(m.len(), Ordering::Release),
            Err(_) if result.is_ok() => self.len.store(size, Ordering::Release),
            Err(_) => {}
        }
        result
    }

    fn close(&self) -> io::Result<()> {
        let r = self.fd().sync_data();
        unlock_image(&self.fd());
        r
    }

    fn facts(&self) -> ImageFacts {
        let meta = self.fd().metadata().ok();
        ImageFacts {
            filename: self.filename.clone(),
            actual_size: meta.as_ref().map(|m| m.blocks() * 512),
            format_specific: Some(FormatSpecific::File),
            ..ImageFacts::default()
        }
    }
}
