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
    let fail = |e: Error| {
        failed.store(true, Ordering::Relaxed);
        if let Ok(mut g) = first_err.lock() {
            g.get_or_insert(e);
        }
    };
    // Hash and write one piece read at `off`.
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
    let (first, failed, queue, process, fail) = (&first, &failed, &queue, &process, &fail);
    std::thread::scope(|s| {
        for _ in 0..conns {
            // Per connection a reader and a writer thread pass [`BUFFERS`] buffers round:
            // the next reads are on the wire while the last ones are hashed and written.
            let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<(u64, u64)>, Vec<u8>)>(BUFFERS);
            let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
            s.spawn(move || {
                for (batch, buf) in full_rx {
                    let mut at = 0;
                    for (off, len) in batch {
                        let end = at + len as usize;
                        let res = match buf.get(at..end) {
                            Some(b) => process(off, b),
                            None => Err(Error::new(Kind::Io, "copy batch larger than its buffer")),
                        };
                        if let Err(e) = res {
                            fail(e);
                            return;
                        }
                        at = end;
                    }
                    // The reader may be done (and gone) while reads it sent wait here.
                    let _ = free_tx.send(buf);
                }
            });
            s.spawn(move || {
                let res = (|| -> Result<()> {
                    let reuse = first.lock().ok().and_then(|mut g| g.take());
                    let mut c = match reuse {
                        Some(c) => c,
                        None => NbdClient::connect(&job.socket, &job.export, &[])?,
                    };
                    let mut fresh = BUFFERS;
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let next = queue.lock().map(|mut q| batch(&mut q)).unwrap_or_default();
                        if next.is_empty() {
                            break;
                        }
                        let mut buf = if fresh > 0 {
                            fresh -= 1;
                            vec![0u8; CHUNK as usize]
                        } else {
                            match free_rx.recv() {
                                Ok(b) => b,
                                // The writer stopped on an error it recorded.
                                Err(_) => break,
                            }
                        };
                        // Carve the batch's buffers out of `buf` (their sum is at most CHUNK).
                        let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(next.len());
                        let mut rest = &mut buf[..];
                        for &(off, len) in &next {
                            let (b, r) = rest.split_at_mut(len as usize);
                            reqs.push((off, b));
                            rest = r;
                        }
                        c.read_many(&mut reqs)?;
                        if full_tx.send((next, buf)).is_err() {
                            break;
                        }
                    }
                    c.disconnect();
                    Ok(())
                })();
                if let Err(e) = res {
                    fail(e);
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
    // Every piece mapped must have been written: a copy that stopped early without an error
    // must not pass for a backup.
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
