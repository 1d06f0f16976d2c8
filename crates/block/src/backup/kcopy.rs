//! Copies the kernel does between two host files, without the data passing through our
//! memory: `splice` through a per-thread pipe (one page copy into the target, never shared
//! extents), or `copy_file_range` when the job asks for copy offloading
//! (`x-perf.use-copy-range`, which may share extents or copy on a server), falling back to
//! `splice` where the file systems refuse it.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// Pipe capacity asked for (the kernel may give less; the loop follows what it gets).
const PIPE_SIZE: usize = 1 << 20;

/// A copy failure and its side.
#[derive(Debug)]
pub(crate) struct KernelCopyError {
    /// The source side failed (else the target).
    pub is_read: bool,
    pub err: io::Error,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on our pipe; the result is the capacity granted.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as i32) };
        let size = usize::try_from(got)
            .ok()
            .filter(|&s| s > 0)
            .unwrap_or(64 << 10);
        Ok(Pipe { read, write, size })
    }
}

thread_local! {
    /// One pipe per worker thread, kept empty between copies (dropped after a failure, which
    /// may leave bytes in it).
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// Copy `len` bytes from `src` at `soff` to `dst` at `doff` in the kernel.
pub(crate) fn copy(
    src: &File,
    soff: u64,
    dst: &File,
    doff: u64,
    len: u64,
    offload: bool,
) -> Result<(), KernelCopyError> {
    let mut done = 0;
    if offload {
        done = copy_range(src, soff, dst, doff, len);
    }
    if done < len {
        splice_copy(src, soff + done, dst, doff + done, len - done)?;
    }
    Ok(())
}

/// `copy_file_range` as far as it goes; returns the bytes copied (the rest is left to
/// `splice`, which also reports any real I/O error with its side).
fn copy_range(src: &File, soff: u64, dst: &File, doff: u64, len: u64) -> u64 {
    let mut done = 0u64;
    while done < len {
        let (Ok(mut so), Ok(mut d)) = (i64::try_from(soff + done), i64::try_from(doff + done))
        else {
            break;
        };
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both descriptors are open files; the offsets are our own variables.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, want, 0)
        };
        match n {
            n if n > 0 => done += n as u64,
            0 => break,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    done
}

fn splice_copy(
    src: &File,
    soff: u64,
    dst: &File,
    doff: u64,
    len: u64,
) -> Result<(), KernelCopyError> {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Pipe::new().map_err(|err| KernelCopyError { is_read: true, err })?);
        }
        let Some(pipe) = slot.as_ref() else {
            return Err(KernelCopyError {
                is_read: true,
                err: io::Error::other("no pipe"),
            });
        };
        let r = splice_through(pipe, src, soff, dst, doff, len);
        if r.is_err() {
            // The pipe may hold bytes that were never written out.
            *slot = None;
        }
        r
    })
}

fn splice_through(
    pipe: &Pipe,
    src: &File,
    soff: u64,
    dst: &File,
    doff: u64,
    len: u64,
) -> Result<(), KernelCopyError> {
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(pipe.size);
        let n = splice_in(pipe, src, soff + done, want)?;
        // The pipe now holds `n` bytes: write them all out before reading more.
        splice_out(pipe, dst, doff + done, n)?;
        done += n as u64;
    }
    Ok(())
}

/// Gathers scattered source ranges into one contiguous target range through the worker's
/// pipe: source pieces are spliced in until the pipe is full, then the pipe goes out to the
/// target in one `splice` (one target inode-lock round per pipe, not per piece).
pub(crate) struct Funnel<'a> {
    dst: &'a File,
    /// Target offset of the next byte to leave the pipe.
    doff: u64,
    /// Bytes in the pipe.
    pending: usize,
}

impl<'a> Funnel<'a> {
    pub(crate) fn new(dst: &'a File, doff: u64) -> Funnel<'a> {
        Funnel {
            dst,
            doff,
            pending: 0,
        }
    }

    /// Queue `len` source bytes at `soff` (written out as the pipe fills).
    pub(crate) fn push(&mut self, src: &File, soff: u64, len: u64) -> Result<(), KernelCopyError> {
        with_pipe(|pipe| {
            let mut done = 0u64;
            while done < len {
                if self.pending >= pipe.size {
                    self.drain(pipe)?;
                }
                let want = usize::try_from(len - done)
                    .unwrap_or(usize::MAX)
                    .min(pipe.size - self.pending);
                let n = splice_in(pipe, src, soff + done, want)?;
                self.pending += n;
                done += n as u64;
            }
            Ok(())
        })
    }

    /// Write `data` (bytes not in a plain source file) at the current target position.
    pub(crate) fn push_bytes(&mut self, data: &[u8]) -> Result<(), KernelCopyError> {
        self.finish()?;
        self.dst
            .write_all_at(data, self.doff)
            .map_err(|err| KernelCopyError {
                is_read: false,
                err,
            })?;
        self.doff += data.len() as u64;
        Ok(())
    }

    /// Write out what is still in the pipe.
    pub(crate) fn finish(&mut self) -> Result<(), KernelCopyError> {
        if self.pending == 0 {
            return Ok(());
        }
        with_pipe(|pipe| self.drain(pipe))
    }

    fn drain(&mut self, pipe: &Pipe) -> Result<(), KernelCopyError> {
        let n = self.pending;
        splice_out(pipe, self.dst, self.doff, n)?;
        self.doff += n as u64;
        self.pending = 0;
        Ok(())
    }
}

/// Run `f` with this thread's pipe (created on first use; dropped after a failure, which may
/// leave bytes in it).
fn with_pipe<T>(f: impl FnOnce(&Pipe) -> Result<T, KernelCopyError>) -> Result<T, KernelCopyError> {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Pipe::new().map_err(|err| KernelCopyError { is_read: true, err })?);
        }
        let Some(pipe) = slot.as_ref() else {
            return Err(KernelCopyError {
                is_read: true,
                err: io::Error::other("no pipe"),
            });
        };
        let r = f(pipe);
        if r.is_err() {
            *slot = None;
        }
        r
    })
}

/// One `splice(2)` of up to `len` bytes from `fd_in` to `fd_out`, retried on EINTR; an offset
/// is given for the file side (the pipe side has none). Returns the bytes moved (0: end of file).
fn splice_once(
    fd_in: &impl AsRawFd,
    off_in: Option<&mut i64>,
    fd_out: &impl AsRawFd,
    off_out: Option<&mut i64>,
    len: usize,
) -> io::Result<usize> {
    let off_in = off_in.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    let off_out = off_out.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    loop {
        // SAFETY: the descriptors are open for the call; each offset is null or points at a
        // variable the caller lends us for the call; no user memory is passed.
        let n = unsafe {
            libc::splice(
                fd_in.as_raw_fd(),
                off_in,
                fd_out.as_raw_fd(),
                off_out,
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Splice up to `want` bytes of `src` at `soff` into the pipe; returns the bytes moved.
fn splice_in(pipe: &Pipe, src: &File, soff: u64, want: usize) -> Result<usize, KernelCopyError> {
    let rd = |err| KernelCopyError { is_read: true, err };
    let mut so = i64::try_from(soff).map_err(|_| rd(io::Error::from_raw_os_error(libc::EINVAL)))?;
    match splice_once(src, Some(&mut so), &pipe.write, None, want).map_err(rd)? {
        // The file ended early (someone shrank it).
        0 => Err(rd(io::Error::from_raw_os_error(libc::EIO))),
        n => Ok(n),
    }
}

/// Splice exactly `len` bytes out of the pipe into `dst` at `doff`.
fn splice_out(pipe: &Pipe, dst: &File, doff: u64, len: usize) -> Result<(), KernelCopyError> {
    let wr = |err| KernelCopyError {
        is_read: false,
        err,
    };
    let mut left = len;
    let mut at = doff;
    while left > 0 {
        let mut d =
            i64::try_from(at).map_err(|_| wr(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let m = splice_once(&pipe.read, None, dst, Some(&mut d), left).map_err(wr)?;
        if m == 0 {
            return Err(wr(io::Error::from_raw_os_error(libc::EIO)));
        }
        left -= m;
        at += m as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_and_offload_copy_exact_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let src = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("s"))
            .unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        src.write_all_at(&data, 0).unwrap();
        for offload in [false, true] {
            let dst = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("d"))
                .unwrap();
            copy(&src, 12345, &dst, 65536, 2_500_000, offload).unwrap();
            let mut back = vec![0u8; 2_500_000];
            dst.read_exact_at(&mut back, 65536).unwrap();
            assert_eq!(back, data[12345..12345 + 2_500_000]);
            // Reading past the source's end is a read error, not silent zeros.
            let e = copy(&src, 2_999_000, &dst, 0, 10_000, offload).unwrap_err();
            assert!(e.is_read);
        }
    }

    #[test]
    fn funnel_gathers_scattered_pieces_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let open = |n: &str| {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(n))
                .unwrap()
        };
        let src = open("s");
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
        src.write_all_at(&data, 0).unwrap();
        let dst = open("d");
        // More than one pipe-full in total, pieces of several sizes, bytes from memory between.
        let pieces = [
            (0u64, 65536u64),
            (3_000_000, 700_000),
            (123, 4096),
            (1_000_000, 900_000),
        ];
        let mut want = Vec::new();
        let mut f = Funnel::new(&dst, 4096);
        for (i, &(o, l)) in pieces.iter().enumerate() {
            f.push(&src, o, l).unwrap();
            want.extend_from_slice(&data[o as usize..(o + l) as usize]);
            if i == 1 {
                f.push_bytes(&[9u8; 5000]).unwrap();
                want.extend_from_slice(&[9u8; 5000]);
            }
        }
        f.finish().unwrap();
        let mut back = vec![0u8; want.len()];
        dst.read_exact_at(&mut back, 4096).unwrap();
        assert!(back == want, "funnel output differs");
        assert_eq!(dst.metadata().unwrap().len(), 4096 + want.len() as u64);
        // A piece past the source's end is a read error.
        let mut f = Funnel::new(&dst, 0);
        let e = f.push(&src, 3_999_000, 10_000).unwrap_err();
        assert!(e.is_read);
    }
}
