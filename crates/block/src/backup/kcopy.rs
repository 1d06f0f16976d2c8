//! Copies the kernel does between two host files, without the data passing through our
//! memory: `splice` through the thread's pipes (one page copy into the target, never shared
//! extents), or `copy_file_range` when the job asks for copy offloading
//! (`x-perf.use-copy-range`, which may share extents or copy on a server), falling back to
//! `splice` where the file systems refuse it.
//!
//! The writers of one target take turns ([`WriteTurn`]), a few pipe-fulls per turn
//! ([`PIPES`]); the reads from the source stay parallel.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

/// Pipe capacity asked for (the kernel may give less; the loops follow what it gets; 1 MiB
/// is the most an unprivileged process may ask by default).
const PIPE_SIZE: usize = 1 << 20;

/// Pipes per thread, filled from the source before a turn and written out in it: the bytes a
/// writer moves per turn. Each turn costs a hand-over (the next writer wakes up, a few tens
/// of microseconds during which nobody writes); at 1 MiB per turn that was ~7 % of a full
/// backup's wall time on tmpfs, at 4 MiB it is lost in the noise.
const PIPES: usize = 4;

/// A copy failure and its side.
#[derive(Debug)]
pub(crate) struct KernelCopyError {
    /// The source side failed (else the target).
    pub is_read: bool,
    pub err: io::Error,
}

/// The writers of one target file take turns here: one writer in the file at a time.
///
/// Linux runs buffered writes to one file one at a time anyway: each holds the file's inode
/// lock (`i_rwsem`) while it copies its pages in (tmpfs and ext4 alike). A writer that finds
/// the lock taken by a running owner does not sleep but spins in the kernel
/// (`rwsem_spin_on_owner`) for as long as the owner copies, a whole pipe-full: with two copy
/// workers splicing into one qcow2 target this was a third of a full backup's CPU. Taking
/// turns here first costs no parallelism the kernel would have given, and a waiter sleeps on
/// a futex instead. Only the writes into the target are in turn: the splices from the source
/// into each worker's pipes (page references, no copy) run beside them, so the next writer's
/// pipes are full when its turn comes.
///
/// Nothing else is locked while a turn is held (only write syscalls into the target run in
/// it), so it cannot take part in a deadlock.
#[derive(Default)]
pub(crate) struct WriteTurn(Mutex<()>);

impl WriteTurn {
    fn take(&self) -> MutexGuard<'_, ()> {
        // Nothing the guard protects can be left half-changed by a panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A target file and the turn its writers take.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub file: &'a File,
    /// `None`: write without waiting for a turn (the copy-before-write hook, with a guest
    /// write waiting: it copies a few clusters and must not wait behind a worker's turn of
    /// several MiB; its rare writes may meet the kernel's lock as before).
    pub turn: Option<&'a WriteTurn>,
}

impl Target<'_> {
    fn take(&self) -> Option<MutexGuard<'_, ()>> {
        self.turn.map(WriteTurn::take)
    }

    /// `file.write_all_at(data, off)` in turn.
    pub(crate) fn write_all_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        let _turn = self.take();
        self.file.write_all_at(data, off)
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Buffers it holds: a spliced file piece takes one per page it touches, so a piece that
    /// does not start on a page boundary takes one more than its bytes fill (a splice into a
    /// pipe with no free buffer would wait for a reader, which is this thread: never).
    slots: usize,
    page: usize,
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
        // SAFETY: sysconf only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let slots = slots_after_request(&write, PIPE_SIZE as i32, page)?;
        Ok(Pipe {
            read,
            write,
            slots,
            page,
        })
    }

    /// Bytes of a piece starting at file offset `soff` that surely fit into the free buffers
    /// of a pipe holding `fill`.
    fn room(&self, fill: Fill, soff: u64) -> usize {
        let head = (soff % self.page as u64) as usize;
        ((self.slots - fill.slots) * self.page).saturating_sub(head)
    }

    /// Buffers a spliced piece of `n` bytes at file offset `soff` takes (at most).
    fn slots_for(&self, soff: u64, n: usize) -> usize {
        let head = (soff % self.page as u64) as usize;
        (head + n).div_ceil(self.page)
    }
}

/// Ask for a pipe of `want` bytes and return the buffers it really holds. The kernel may refuse
/// the size (a user over `/proc/sys/fs/pipe-user-pages-soft` gets EPERM, and then pipes of 2
/// buffers), so the capacity is always read back: a pipe believed larger than it is would
/// block its own thread in `splice` for good.
fn slots_after_request(write: &OwnedFd, want: i32, page: usize) -> io::Result<usize> {
    // SAFETY: F_SETPIPE_SZ on our own pipe; a refusal leaves its size as it was.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    // SAFETY: F_GETPIPE_SZ only reads our own pipe's capacity.
    let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
    match usize::try_from(size) {
        Ok(s) if s >= page => Ok(s / page),
        _ => Err(io::Error::last_os_error()),
    }
}

/// What one pipe holds.
#[derive(Clone, Copy, Default)]
struct Fill {
    bytes: usize,
    slots: usize,
}

thread_local! {
    /// The pipes of a copying thread, kept empty between copies (dropped after a failure,
    /// which may leave bytes in them).
    static PIPES_OF_THREAD: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's pipes: [`PIPES`] of them, or as many as there are descriptors
/// for, at least one (created on first use; all dropped after a failure, which may leave
/// bytes in them).
fn with_pipes<T>(
    f: impl FnOnce(&[Pipe]) -> Result<T, KernelCopyError>,
) -> Result<T, KernelCopyError> {
    PIPES_OF_THREAD.with(|cell| {
        let mut pipes = cell.borrow_mut();
        while pipes.len() < PIPES {
            match Pipe::new() {
                // A pipe refused its full size (the user's pipe budget is spent): copy with
                // what there is rather than take more of the budget.
                Ok(p) if !pipes.is_empty() && p.slots * p.page < PIPE_SIZE => break,
                Ok(p) => pipes.push(p),
                Err(_) if !pipes.is_empty() => break,
                Err(err) => return Err(KernelCopyError { is_read: true, err }),
            }
        }
        let r = f(&pipes);
        if r.is_err() {
            pipes.clear();
        }
        r
    })
}

/// Copy `len` bytes from `src` at `soff` to `dst` at `doff` in the kernel.
#[cfg(test)]
pub(crate) fn copy(
    src: &File,
    soff: u64,
    dst: Target<'_>,
    doff: u64,
    len: u64,
    offload: bool,
) -> Result<(), KernelCopyError> {
    let mut f = Funnel::new(dst, doff);
    f.copy(src, soff, len, offload)?;
    f.finish()
}

/// `copy_file_range` as far as it goes; returns the bytes copied (the rest is left to
/// `splice`, which also reports any real I/O error with its side). Not in turn: an offloaded
/// copy may share extents or run on a server, where copies side by side do not contend as
/// page copies do (and it is off unless the job asks for it).
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

/// Fills one contiguous target range from source pieces (one range, or an incremental's
/// scattered clusters) through the thread's pipes: pieces are spliced into the pipes until
/// all are full, then the pipes go out to the target back to back in one turn (a few target
/// inode-lock rounds per turn, not one per piece).
pub(crate) struct Funnel<'a> {
    dst: Target<'a>,
    /// Target offset of the next byte to leave the pipes.
    doff: u64,
    /// What each pipe holds, filled in order.
    fill: [Fill; PIPES],
    /// The pipe being filled.
    cur: usize,
}

impl<'a> Funnel<'a> {
    pub(crate) fn new(dst: Target<'a>, doff: u64) -> Funnel<'a> {
        Funnel {
            dst,
            doff,
            fill: [Fill::default(); PIPES],
            cur: 0,
        }
    }

    /// Queue `len` source bytes at `soff` (written out as the pipes fill).
    pub(crate) fn push(&mut self, src: &File, soff: u64, len: u64) -> Result<(), KernelCopyError> {
        if len == 0 {
            return Ok(());
        }
        with_pipes(|pipes| {
            let mut done = 0u64;
            while done < len {
                let at = soff + done;
                let mut room = pipes[self.cur].room(self.fill[self.cur], at);
                if room == 0 {
                    if self.cur + 1 < pipes.len() {
                        self.cur += 1;
                    } else {
                        self.drain(pipes)?;
                    }
                    // An empty pipe takes at least a page.
                    room = pipes[self.cur].room(self.fill[self.cur], at);
                }
                let want = usize::try_from(len - done).unwrap_or(usize::MAX).min(room);
                let pipe = &pipes[self.cur];
                let n = splice_in(pipe, src, at, want)?;
                let fill = &mut self.fill[self.cur];
                fill.bytes += n;
                fill.slots += pipe.slots_for(at, n);
                done += n as u64;
            }
            Ok(())
        })
    }

    /// Queue `len` source bytes at `soff` as [`Funnel::push`]; with `offload`, first let
    /// `copy_file_range` copy what it can straight into the target.
    pub(crate) fn copy(
        &mut self,
        src: &File,
        soff: u64,
        len: u64,
        offload: bool,
    ) -> Result<(), KernelCopyError> {
        let mut done = 0;
        if offload {
            self.finish()?;
            done = copy_range(src, soff, self.dst.file, self.doff, len);
            self.doff += done;
        }
        self.push(src, soff + done, len - done)
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

    /// Write out what is still in the pipes.
    pub(crate) fn finish(&mut self) -> Result<(), KernelCopyError> {
        if self.fill.iter().all(|f| f.bytes == 0) {
            return Ok(());
        }
        with_pipes(|pipes| self.drain(pipes))
    }

    /// Write the pipes out in order, in one turn.
    fn drain(&mut self, pipes: &[Pipe]) -> Result<(), KernelCopyError> {
        let _turn = self.dst.take();
        for (pipe, fill) in pipes.iter().zip(self.fill.iter_mut()) {
            if fill.bytes > 0 {
                splice_out(pipe, self.dst.file, self.doff, fill.bytes)?;
                self.doff += fill.bytes as u64;
            }
            *fill = Fill::default();
        }
        self.cur = 0;
        Ok(())
    }
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

impl Drop for Funnel<'_> {
    /// A funnel given up before [`Funnel::finish`] (the source failed between pieces) leaves
    /// bytes in the thread's pipes that belong nowhere else: drop the pipes, or the thread's
    /// next copy would write them out first.
    fn drop(&mut self) {
        if self.fill.iter().any(|f| f.bytes > 0) {
            PIPES_OF_THREAD.with(|cell| {
                if let Ok(mut pipes) = cell.try_borrow_mut() {
                    pipes.clear();
                }
            });
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

/// Splice exactly `len` bytes out of the pipe into `dst` at `doff` (the caller holds the
/// target's turn).
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
            let turn = WriteTurn::default();
            let tgt = Target {
                file: &dst,
                turn: Some(&turn),
            };
            copy(&src, 12345, tgt, 65536, 2_500_000, offload).unwrap();
            let mut back = vec![0u8; 2_500_000];
            dst.read_exact_at(&mut back, 65536).unwrap();
            assert_eq!(back, data[12345..12345 + 2_500_000]);
            // Reading past the source's end is a read error, not silent zeros.
            let e = copy(&src, 2_999_000, tgt, 0, 10_000, offload).unwrap_err();
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
        let turn = WriteTurn::default();
        let tgt = Target {
            file: &dst,
            turn: Some(&turn),
        };
        // More than one pipe-full in total, pieces of several sizes, bytes from memory between.
        let pieces = [
            (0u64, 65536u64),
            (3_000_000, 700_000),
            (123, 4096),
            (1_000_000, 900_000),
        ];
        let mut want = Vec::new();
        let mut f = Funnel::new(tgt, 4096);
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
        let mut f = Funnel::new(tgt, 0);
        let e = f.push(&src, 3_999_000, 10_000).unwrap_err();
        assert!(e.is_read);
    }

    fn open_rw(path: &std::path::Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn many_writers_taking_turns_land_every_byte() {
        // 16 threads copy interleaved stripes of one source into one target at once, with
        // pieces of odd sizes at odd offsets, through their own pipes and one turn.
        let dir = tempfile::tempdir().unwrap();
        let src = open_rw(&dir.path().join("s"));
        let size = 24 << 20;
        let data: Vec<u8> = (0..size as u32).map(|i| (i * 31 % 253) as u8).collect();
        src.write_all_at(&data, 0).unwrap();
        let dst = open_rw(&dir.path().join("d"));
        let turn = WriteTurn::default();
        let threads = 16;
        let stripe = 3 << 20 | 777;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (src, dst, turn) = (&src, &dst, &turn);
                s.spawn(move || {
                    let tgt = Target {
                        file: dst,
                        turn: Some(turn),
                    };
                    let mut at = t * stripe;
                    while at < size {
                        let n = stripe.min(size - at);
                        // Half of the stripes as one funnel of uneven pieces, half as copies.
                        if (at / stripe) % 2 == 0 {
                            let mut f = Funnel::new(tgt, at as u64);
                            let mut p = 0;
                            while p < n {
                                let k = (4099 * (p / 4099 + 1)).min(n - p).max(1);
                                let k = k.min(n - p);
                                f.push(src, (at + p) as u64, k as u64).unwrap();
                                p += k;
                            }
                            f.finish().unwrap();
                        } else {
                            copy(src, at as u64, tgt, at as u64, n as u64, false).unwrap();
                        }
                        at += threads * stripe;
                    }
                });
            }
        });
        let mut back = vec![0u8; size];
        dst.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data, "the target differs from the source");
    }

    #[test]
    fn a_pipe_refused_its_size_counts_the_buffers_it_really_has() {
        let p = Pipe::new().unwrap();
        let page = p.page;
        // Shrunk to two buffers (what an unprivileged user over its pipe budget gets), then
        // a size the kernel refuses (over 2 GiB: EINVAL): the count must stay the real two,
        // not a guess (16 buffers were assumed before, and the funnel then spliced into a
        // full pipe whose only reader is its own thread).
        assert_eq!(
            slots_after_request(&p.write, 2 * page as i32, page).unwrap(),
            2
        );
        assert_eq!(slots_after_request(&p.write, -1, page).unwrap(), 2);
        assert_eq!(
            slots_after_request(&p.write, PIPE_SIZE as i32, page).unwrap(),
            PIPE_SIZE / page
        );
    }

    #[test]
    fn pieces_off_page_boundaries_never_overfill_a_pipe() {
        // A piece that does not start on a page takes one pipe buffer more than its bytes
        // fill; a funnel that counted bytes only would splice into a pipe with no free
        // buffer and wait for itself forever. Every byte must land, promptly.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            let src = open_rw(&dir.path().join("s"));
            let data: Vec<u8> = (0..16_000_000u32).map(|i| (i * 7 % 249) as u8).collect();
            src.write_all_at(&data, 0).unwrap();
            let dst = open_rw(&dir.path().join("d"));
            let turn = WriteTurn::default();
            let mut f = Funnel::new(
                Target {
                    file: &dst,
                    turn: Some(&turn),
                },
                0,
            );
            let mut want = Vec::new();
            // One page's bytes over two pages, then pieces whose byte counts exactly fill what
            // a byte count would call the rest of a pipe, then more.
            let mut pieces = vec![(100u64, 4096u64)];
            for i in 0..(PIPES as u64 * 3) {
                pieces.push((4096 * (i + 1), (1 << 20) - 4096));
                pieces.push((8_000_001 + i * 1000, 4096));
            }
            for (o, l) in pieces {
                f.push(&src, o, l).unwrap();
                want.extend_from_slice(&data[o as usize..(o + l) as usize]);
            }
            f.finish().unwrap();
            let mut back = vec![0u8; want.len()];
            dst.read_exact_at(&mut back, 0).unwrap();
            tx.send(back == want).unwrap();
        });
        let same = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the funnel hung on a full pipe");
        assert!(same, "the target differs from the pieces");
    }

    #[test]
    fn a_funnel_given_up_leaves_nothing_for_the_next_copy() {
        let dir = tempfile::tempdir().unwrap();
        let src = open_rw(&dir.path().join("s"));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 5 % 241) as u8).collect();
        src.write_all_at(&data, 0).unwrap();
        let dst = open_rw(&dir.path().join("d"));
        let turn = WriteTurn::default();
        let tgt = Target {
            file: &dst,
            turn: Some(&turn),
        };
        // Pieces queued, then the copy fails elsewhere and the funnel is dropped unfinished.
        let mut f = Funnel::new(tgt, 0);
        f.push(&src, 0, 300_000).unwrap();
        drop(f);
        assert_eq!(dst.metadata().unwrap().len(), 0, "nothing was written");
        // The thread's next copy writes its own bytes only.
        copy(&src, 500_000, tgt, 4096, 400_000, false).unwrap();
        let mut back = vec![0u8; 400_000];
        dst.read_exact_at(&mut back, 4096).unwrap();
        assert!(
            back == data[500_000..900_000],
            "stale pipe bytes were written"
        );
        assert_eq!(dst.metadata().unwrap().len(), 4096 + 400_000);
    }
}
