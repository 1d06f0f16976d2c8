//! The pull copy loop: map what to read (dirty extents of the frozen bitmap, or for a full
//! every extent not known to read as zeros), split it into chunks and copy them over NBD into
//! the new qcow2 file. Each connection keeps up to [`MAX_IN_FLIGHT`] reads of at most
//! [`CHUNK`] bytes together in flight (an incremental's scattered 64 KiB extents go 16 at a
//! time); further connections are opened only for as much data as makes them worth their
//! setup ([`PER_CONNECTION`]). Per connection one thread reads while another hashes and
//! writes what was read before ([`BUFFERS`]), and the bytes written must add up to the bytes
//! mapped.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use qcow2::Qcow2;

use crate::chain::{HashAlgo, HASH_CHUNK};
use crate::error::{Error, Kind, Result};
use crate::nbd::{map_all, NbdClient, MAX_IN_FLIGHT};
use crate::progress::Progress;

/// Largest piece read in one request. 2 MiB, not more: QSD serving the fleecing export burnt
/// about twice the CPU on 4 MiB reads (2026-12-03, 2 GiB full pull, 4 connections: QSD
/// 1.85-2.57 CPU s at 4 MiB against 0.99-1.09 s at 2 MiB, 1.41-1.44 s at 1 MiB; blockd
/// 1.13-1.22 s against 1.10-1.12 s), about what it burns serving `qemu-img convert`.
const CHUNK: u64 = 2 << 20;
/// Buffers of [`CHUNK`] bytes per connection: one being read while the other is hashed and
/// written.
const BUFFERS: usize = 2;
/// Block status is asked for in pieces of this size.
const MAP_STEP: u32 = 1 << 30;
/// One connection per this many bytes to copy (up to the number asked for): a 1 %
/// incremental (~21 MB) goes over the one connection that mapped it.
const PER_CONNECTION: u64 = 64 << 20;

/// What to copy from one export.
#[derive(Debug, Clone)]
pub struct Job {
    /// NBD socket.
    pub socket: PathBuf,
    /// Export name.
    pub export: String,
    /// The dirty-bitmap context to follow (incremental / differential).
    pub context: Option<String>,
    /// Number of connections.
    pub connections: usize,
    /// The target is backed by an earlier point: zeros must be written as zero clusters.
    pub incremental: bool,
    /// Hash of the content chunks (see [`KnownHashes`]).
    pub algo: HashAlgo,
}

/// The ranges to read: dirty extents, or everything not a hole/zero for a full.
fn ranges(c: &mut NbdClient, job: &Job) -> Result<Vec<(u64, u64)>> {
    let out = match &job.context {
        Some(ctx) => map_all(c, ctx, MAP_STEP)?
            .into_iter()
            .filter(|e| e.flags & 1 != 0)
            .map(|e| (e.offset, e.len))
            .collect(),
        // Only what is known to read as zeros is skipped. A hole without the zero flag is
        // not: QEMU's snapshot-access reports the status of the disk's top image alone, so
        // what the backing file holds shows as such a hole (its zeros, if any, are read and
        // not written: the new file of a full has nothing below).
        None => map_all(c, "base:allocation", MAP_STEP)?
            .into_iter()
            .filter(|e| e.flags & 2 == 0)
            .map(|e| (e.offset, e.len))
            .collect(),
    };
    Ok(out)
}

/// The next reads for one connection: up to [`MAX_IN_FLIGHT`] chunks of `q` adding up to at
/// most [`CHUNK`] bytes (at least one chunk, if any is left).
fn batch(q: &mut VecDeque<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut bytes = 0;
    while out.len() < MAX_IN_FLIGHT {
        match q.front() {
            Some(&(off, len)) if out.is_empty() || bytes + len <= CHUNK => {
                q.pop_front();
                out.push((off, len));
                bytes += len;
            }
            _ => break,
        }
    }
    out
}

/// Connections to use for `bytes` to copy when `wanted` were asked for.
fn connections_for(bytes: u64, wanted: usize) -> usize {
    let worth = usize::try_from(bytes.div_ceil(PER_CONNECTION)).unwrap_or(usize::MAX);
    wanted.min(worth).max(1)
}

/// Split ranges into chunks of at most [`CHUNK`] bytes.
fn chunks(ranges: &[(u64, u64)]) -> VecDeque<(u64, u64)> {
    let mut q = VecDeque::new();
    for &(mut off, len) in ranges {
        let end = off + len;
        while off < end {
            let n = (end - off).min(CHUNK);
            q.push_back((off, n));
            off += n;
        }
    }
    q
}

/// Content hashes of the [`HASH_CHUNK`]s a copy read whole, by chunk index: the data flows
/// through the tool anyway, so hashing it here saves reading the point back afterwards.
pub type KnownHashes = Vec<Option<[u8; 32]>>;

/// Hashes of the hash chunks lying wholly inside the piece `b` read at `off` of a disk of
/// `size` bytes (the last chunk may be short).
fn whole_chunk_hashes(algo: HashAlgo, off: u64, b: &[u8], size: u64) -> Vec<(usize, [u8; 32])> {
    let end = off + b.len() as u64;
    let mut out = Vec::new();
    let mut i = off.div_ceil(HASH_CHUNK);
    while i * HASH_CHUNK < end {
        let start = i * HASH_CHUNK;
        let stop = (start + HASH_CHUNK).min(size);
        if stop > end {
            break;
        }
        let piece = &b[(start - off) as usize..(stop - off) as usize];
        out.push((i as usize, algo.digest(piece)));
        i += 1;
    }
    out
}

/// Sets the flag it holds if its thread unwinds: the other copy threads stop early.
struct FailOnPanic<'a>(&'a AtomicBool);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// One connection's copy: this thread takes batches from `next` (empty: done) and fills a
/// buffer with `read` while a writer thread hands the pieces of the batch read before to
/// `write`, in order; [`BUFFERS`] buffers go round between the two. Either side's error (or
/// `failed`, set by another connection) stops both; the error is returned and `failed` set.
fn pump(
    failed: &AtomicBool,
    next: &(dyn Fn() -> Vec<(u64, u64)> + Sync),
    mut read: impl FnMut(&mut [(u64, &mut [u8])]) -> Result<()>,
    write: &(dyn Fn(u64, &[u8]) -> Result<()> + Sync),
) -> Result<()> {
    let _guard = FailOnPanic(failed);
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<(u64, u64)>, Vec<u8>)>(BUFFERS);
    let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<()> {
            let _guard = FailOnPanic(failed);
            for (batch, buf) in full_rx {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let mut at = 0;
                for (off, len) in batch {
                    let end = at + len as usize;
                    let res = match buf.get(at..end) {
                        Some(b) => write(off, b),
                        None => Err(Error::new(Kind::Io, "copy batch larger than its buffer")),
                    };
                    if let Err(e) = res {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                    at = end;
                }
                // The reader may be done (and gone) while batches it read wait here.
                let _ = free_tx.send(buf);
            }
            Ok(())
        });
        let mut read_all = || -> Result<()> {
            let mut fresh = BUFFERS;
            while !failed.load(Ordering::Relaxed) {
                let batch = next();
                if batch.is_empty() {
                    break;
                }
                let mut buf = if fresh > 0 {
                    fresh -= 1;
                    vec![0u8; CHUNK as usize]
                } else {
                    match free_rx.recv() {
                        Ok(b) => b,
                        // The writer stopped: its error (or panic) is reported below.
                        Err(_) => break,
                    }
                };
                // Carve the batch's buffers out of `buf` (their sum is at most CHUNK).
                let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(batch.len());
                let mut rest = &mut buf[..];
                for &(off, len) in &batch {
                    let (b, r) = usize::try_from(len)
                        .ok()
                        .and_then(|n| rest.split_at_mut_checked(n))
                        .ok_or_else(|| Error::new(Kind::Io, "copy batch larger than its buffer"))?;
                    reqs.push((off, b));
                    rest = r;
                }
                read(&mut reqs)?;
                if full_tx.send((batch, buf)).is_err() {
                    break;
                }
            }
            Ok(())
        };
        let res = read_all();
        if res.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::new(Kind::Io, "a copy thread panicked")));
        res.and(written)
    })
}

/// Copy everything `job` selects into `img`. Returns the bytes read and the hashes of the
/// content chunks read whole (see [`KnownHashes`]).
pub fn run(job: &Job, img: &Qcow2, progress: &Progress) -> Result<(u64, KnownHashes)> {
    let contexts: Vec<&str> = match &job.context {
        Some(c) => vec![c.as_str()],
        None => vec!["base:allocation"],
    };
    let mut first = NbdClient::connect(&job.socket, &job.export, &contexts)?;
    if first.size != img.virtual_size() {
        return Err(Error::new(
            Kind::Nbd,
            format!(
                "export size {} differs from the disk size {}",
                first.size,
                img.virtual_size()
            ),
        ));
    }
    let todo = chunks(&ranges(&mut first, job)?);
    let planned: u64 = todo.iter().map(|&(_, n)| n).sum();
    let conns = connections_for(planned, job.connections);
    crate::follow::debug(&format!(
        "copy of {planned} bytes from export {} over {conns} connection(s)",
        job.export
    ));
    let size = first.size;
    let known: Mutex<KnownHashes> = Mutex::new(vec![None; size.div_ceil(HASH_CHUNK) as usize]);
    let queue = Mutex::new(todo);
    let failed = AtomicBool::new(false);
    let copied = AtomicU64::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let first = Mutex::new(Some(first));
    // One thread writes at a time: the file system serialises writes to one file anyway (the
    // inode lock), and threads waiting for it there spin (`rwsem_spin_on_owner`: ~10 % of the
    // tool's CPU in a 2 GiB full pull with 4 connections), while here they sleep.
    let writing = Mutex::new(());
    // Hash and write one piece read at `off`: a full skips a piece of zeros (nothing below
    // it), an incremental writes it as zero clusters (the backing file may hold data there).
    let process = |off: u64, b: &[u8]| -> Result<()> {
        let len = b.len() as u64;
        let sums = whole_chunk_hashes(job.algo, off, b, size);
        if let Ok(mut k) = known.lock() {
            for (i, h) in sums {
                if let Some(slot) = k.get_mut(i) {
                    *slot = Some(h);
                }
            }
        }
        if b.iter().all(|&x| x == 0) {
            if job.incremental {
                let _w = writing.lock();
                img.write_zeroes(off, len, false)?;
            }
        } else {
            let _w = writing.lock();
            img.write_at(b, off)?;
        }
        copied.fetch_add(len, Ordering::Relaxed);
        crate::backup::die_if("copy");
        progress.add(len);
        Ok(())
    };
    let next = || queue.lock().map(|mut q| batch(&mut q)).unwrap_or_default();
    std::thread::scope(|s| {
        for _ in 0..conns {
            s.spawn(|| {
                let res = (|| -> Result<()> {
                    let reuse = first.lock().ok().and_then(|mut g| g.take());
                    let mut c = match reuse {
                        Some(c) => c,
                        None => NbdClient::connect(&job.socket, &job.export, &[])?,
                    };
                    pump(&failed, &next, |reqs| c.read_many(reqs), &process)?;
                    c.disconnect();
                    Ok(())
                })();
                if let Err(e) = res {
                    failed.store(true, Ordering::Relaxed);
                    if let Ok(mut g) = first_err.lock() {
                        g.get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    let known = known
        .into_inner()
        .map_err(|_| Error::new(Kind::Io, "a copy thread panicked"))?;
    // Every piece mapped must have been copied (written, or for a full skipped as zeros): a
    // copy that stopped early without an error must not pass for a backup.
    let copied = copied.load(Ordering::Relaxed);
    if copied != planned {
        return Err(Error::new(
            Kind::Io,
            format!("copied {copied} of the {planned} bytes to back up"),
        ));
    }
    Ok((copied, known))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `pump` over `pieces` (batched as the copy does) with a reader that fills each
    /// piece with bytes derived from its offset, failing at read number `read_fails` or at
    /// written piece number `write_fails`. Returns the result, the pieces written (offset,
    /// length, content as expected) in order and the flag.
    fn pumped(
        pieces: &[(u64, u64)],
        read_fails: Option<usize>,
        write_fails: Option<usize>,
    ) -> (Result<()>, Vec<(u64, usize, bool)>, bool) {
        let fill = |off: u64, b: &mut [u8]| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = ((off as usize + i) % 251) as u8 + 1;
            }
        };
        let queue = Mutex::new(chunks(pieces));
        let next = || queue.lock().map(|mut q| batch(&mut q)).unwrap_or_default();
        let failed = AtomicBool::new(false);
        let written = Mutex::new(Vec::new());
        let mut reads = 0;
        let write = |off: u64, b: &[u8]| -> Result<()> {
            let mut w = written.lock().unwrap();
            if Some(w.len()) == write_fails {
                return Err(Error::new(Kind::Io, "disk full"));
            }
            let mut want = vec![0u8; b.len()];
            fill(off, &mut want);
            w.push((off, b.len(), want == b));
            Ok(())
        };
        let res = pump(
            &failed,
            &next,
            |reqs| {
                reads += 1;
                if Some(reads) == read_fails {
                    return Err(Error::new(Kind::Nbd, "connection lost"));
                }
                for (off, b) in reqs.iter_mut() {
                    fill(*off, b);
                }
                Ok(())
            },
            &write,
        );
        let w = written.into_inner().unwrap();
        (res, w, failed.load(Ordering::Relaxed))
    }

    #[test]
    fn the_pump_writes_every_piece_once_in_order_with_its_own_bytes() {
        let k = 64 << 10;
        let cases: Vec<Vec<(u64, u64)>> = vec![
            vec![],
            vec![(0, CHUNK)],
            vec![(0, 3 * CHUNK)],
            // Scattered small extents: several batches of up to MAX_IN_FLIGHT pieces.
            (0..50).map(|i| (i * 3 * k, k)).collect(),
            vec![(0, k), (CHUNK, 5 * CHUNK + 7), (9 * CHUNK, 512)],
        ];
        for pieces in cases {
            let (res, w, failed) = pumped(&pieces, None, None);
            assert!(res.is_ok() && !failed, "{pieces:?}");
            let want: Vec<(u64, usize, bool)> = chunks(&pieces)
                .into_iter()
                .map(|(o, n)| (o, n as usize, true))
                .collect();
            assert_eq!(w, want, "{pieces:?}");
        }
    }

    #[test]
    fn an_error_on_either_side_of_the_pump_is_returned_and_stops_the_other() {
        let pieces = [(0, 8 * CHUNK)];
        let (res, w, failed) = pumped(&pieces, Some(3), None);
        assert!(failed);
        assert!(res.unwrap_err().to_string().contains("connection lost"));
        // The two batches read before the failure may be written, nothing after them.
        assert!(w.len() <= 2 && w.iter().all(|p| p.2));
        let (res, w, failed) = pumped(&pieces, None, Some(2));
        assert!(failed);
        assert!(res.unwrap_err().to_string().contains("disk full"));
        assert_eq!(w.len(), 2);
        // Another connection's failure stops this one at its next batch.
        let failed = AtomicBool::new(true);
        let res = pump(&failed, &|| vec![(0, CHUNK)], |_| Ok(()), &|_, _| Ok(()));
        assert!(res.is_ok());
    }

    #[test]
    fn only_whole_hash_chunks_are_hashed_while_copying() {
        let c = HASH_CHUNK as usize;
        let a = HashAlgo::Blake3;
        let data: Vec<u8> = (0..3 * c).map(|i| (i % 253) as u8).collect();
        // A piece from the middle of chunk 0 to the end of chunk 2: chunks 1 and 2 are whole.
        let got = whole_chunk_hashes(a, 512, &data[512..], 3 * c as u64);
        let want: Vec<(usize, [u8; 32])> = (1..3)
            .map(|i| (i, a.digest(&data[i * c..(i + 1) * c])))
            .collect();
        assert_eq!(got, want);
        // The disk's short last chunk counts as whole when the piece reaches the disk's end.
        let tail = &data[2 * c..2 * c + 100];
        let got = whole_chunk_hashes(a, 2 * c as u64, tail, 2 * c as u64 + 100);
        assert_eq!(got, vec![(2, a.digest(tail))]);
        assert!(whole_chunk_hashes(a, 0, &data[..100], 3 * c as u64).is_empty());
    }

    #[test]
    fn batches_hold_at_most_in_flight_reads_and_one_chunk_of_bytes() {
        let k = 64 << 10;
        let mut q: VecDeque<(u64, u64)> = (0..40).map(|i| (i * 2 * k, k)).collect();
        let b = batch(&mut q);
        assert_eq!(b.len(), MAX_IN_FLIGHT);
        assert_eq!(b[0], (0, k));
        assert_eq!(q.len(), 40 - MAX_IN_FLIGHT);
        // Whole chunks go one at a time, a big one after small ones waits for the next batch.
        let mut q: VecDeque<(u64, u64)> = [(0, k), (CHUNK, CHUNK), (2 * CHUNK, CHUNK)]
            .into_iter()
            .collect();
        assert_eq!(batch(&mut q), vec![(0, k)]);
        assert_eq!(batch(&mut q), vec![(CHUNK, CHUNK)]);
        assert_eq!(batch(&mut q), vec![(2 * CHUNK, CHUNK)]);
        assert!(batch(&mut q).is_empty());
    }

    #[test]
    fn small_copies_use_one_connection() {
        assert_eq!(connections_for(21 << 20, 4), 1);
        assert_eq!(connections_for(0, 4), 1);
        assert_eq!(connections_for(100 << 20, 4), 2);
        assert_eq!(connections_for(2 << 30, 4), 4);
        assert_eq!(connections_for(2 << 30, 1), 1);
    }

    #[test]
    fn chunks_split_long_ranges_and_keep_short_ones() {
        let q = chunks(&[(0, 65536), (CHUNK, 2 * CHUNK + 5)]);
        let v: Vec<_> = q.into_iter().collect();
        assert_eq!(
            v,
            vec![
                (0, 65536),
                (CHUNK, CHUNK),
                (2 * CHUNK, CHUNK),
                (3 * CHUNK, 5)
            ]
        );
    }
}
