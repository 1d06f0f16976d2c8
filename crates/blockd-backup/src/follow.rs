//! Hashing a push's new file while the daemon still writes it.
//!
//! After a push, every block of the new file had to be hashed once the job was done: about
//! 0.8 CPU s per 2 GiB that the hand-run QMP sequence does not spend, added to the wall time
//! after the job. The job leaves part of the second core idle, so the follower hashes what is
//! already final while the job runs:
//!
//! - the target's file node is opened with `cache.no-flush` (the tool fsyncs the file itself
//!   before recording it), and the target is exported read-only over the daemon's NBD server;
//! - every [`INTERVAL`] the follower sends an NBD flush: a qcow2 driver then writes the L2
//!   tables it caches into the file. A qcow2 driver points an L2 entry at a freshly allocated
//!   cluster only after that cluster's data is written (QEMU and blockd alike; otherwise a
//!   crash after a flush would expose stale host data), and a backup job writes each chunk of
//!   the point once, into a fresh cluster of this new file;
//! - so each plain data cluster the file's L2 tables name is final: the follower reads and
//!   hashes it, by guest chunk, with the host block it read.
//!
//! Nothing here is trusted blindly: after the target is closed, [`crate::blocksum`] maps the
//! file again from its final L2 tables and takes a followed hash only for the very block the
//! final mapping names for that chunk; every other block is hashed from the file as before.
//! And `verify` recomputes everything from the file alone. A follower that fails (no NBD
//! server, a refused export, a read error) only leaves more to hash at the end.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::chain::{HashAlgo, HASH_CHUNK};
use crate::error::{Error, Kind, Result};
use crate::filesum::FILE_BLOCK;
use crate::nbd::NbdClient;

/// Time between two flushes.
pub const INTERVAL: Duration = Duration::from_millis(50);
/// A disk is followed only when the push copies at least this much (below it the export and
/// the connection cost more than the hashing they would hide).
pub const MIN_BYTES: u64 = 256 << 20;
/// Largest read of contiguous data clusters: small enough for the CPU caches to hold the
/// piece between the read and the hashing (see `filesum::read_range`).
const READ_MAX: usize = 128 << 10;
/// The only cluster size followed: the chain files' (one cluster = one chunk = one block).
const CLUSTER_BITS: u32 = 16;
/// L2 entry bits.
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What the follower hashed of one file: by guest chunk, the file block it read and its hash.
#[derive(Debug, Default)]
pub struct Followed {
    by_chunk: Vec<Option<(usize, [u8; 32])>>,
    /// Bytes hashed.
    pub bytes: u64,
}

impl Followed {
    /// The hash of `block` if the follower read chunk `chunk` from that very block.
    pub fn at(&self, chunk: usize, block: usize) -> Option<[u8; 32]> {
        match self.by_chunk.get(chunk) {
            Some(Some((b, h))) if *b == block => Some(*h),
            _ => None,
        }
    }
}

/// What makes the daemon write its cached metadata into the file.
pub trait Flusher: Send {
    /// Flush; returns once the daemon has written it.
    fn flush(&mut self) -> Result<()>;
}

/// Flushes over a connection to the target's read-only export, made in a thread of its own
/// from the moment the flusher is made (before the jobs start, when the daemon answers at
/// once: a daemon busy with a job took up to 0.4 s to accept), every read and write failing
/// after [`NBD_TIMEOUT`]: a daemon that does not answer only stops the following.
pub struct NbdFlusher {
    client: Option<NbdClient>,
    connecting: Option<std::thread::JoinHandle<Result<NbdClient>>>,
}

/// How long one NBD exchange of the follower may wait.
pub const NBD_TIMEOUT: Duration = Duration::from_secs(5);

impl NbdFlusher {
    /// A flusher of export `export` on `socket`, connecting from now on.
    pub fn new(socket: &std::path::Path, export: &str) -> NbdFlusher {
        let (socket, export) = (socket.to_path_buf(), export.to_string());
        let connecting = std::thread::Builder::new()
            .name("follow-connect".into())
            .spawn(move || NbdClient::connect_timeout(&socket, &export, &[], NBD_TIMEOUT))
            .ok();
        NbdFlusher {
            client: None,
            connecting,
        }
    }
}

impl Flusher for NbdFlusher {
    fn flush(&mut self) -> Result<()> {
        let c = match &mut self.client {
            Some(c) => c,
            None => {
                let got = match self.connecting.take() {
                    Some(h) => h.join().unwrap_or_else(|_| {
                        Err(Error::new(
                            Kind::Io,
                            "the thread connecting to the export panicked",
                        ))
                    }),
                    None => Err(Error::new(
                        Kind::Io,
                        "could not start connecting to the export",
                    )),
                };
                self.client.insert(got?)
            }
        };
        c.flush()
    }
}

/// One file to follow.
pub struct Target {
    /// The new file.
    pub path: PathBuf,
    /// Flushes the node writing it: a connection to its read-only export.
    pub flusher: Box<dyn Flusher>,
    /// The disk's size.
    pub size: u64,
}

/// Test hooks: `BLOCKD_BACKUP_FOLLOW_MIN` (bytes) replaces [`MIN_BYTES`];
/// `BLOCKD_BACKUP_FOLLOW_LAST` makes the follower take two last rounds once the jobs are done
/// (so what it hashed no longer depends on timing).
pub fn min_bytes() -> u64 {
    std::env::var("BLOCKD_BACKUP_FOLLOW_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MIN_BYTES)
}

/// The state of one followed file.
struct Watched {
    file: File,
    flusher: Box<dyn Flusher>,
    size: u64,
    l1_offset: u64,
    l1_entries: usize,
    /// L2 tables (by L1 index) whose chunks are all hashed.
    complete: Vec<bool>,
    /// The L1 entries read in the previous round (see [`l1_trusted`]).
    l1_seen: Vec<u64>,
    out: Followed,
    /// Rounds taken, and the time their flushes took in all and at most (for the debug line).
    rounds: u32,
    flush_total: Duration,
    flush_max: Duration,
}

/// Follow `targets` until `stop` is set; per target what was hashed (None if it could not be
/// followed at all).
pub fn follow(targets: Vec<Target>, stop: &AtomicBool) -> Vec<Option<Followed>> {
    let mut files: Vec<Option<Watched>> = targets
        .into_iter()
        .map(|t| match Watched::open(t) {
            Ok(f) => Some(f),
            Err(e) => {
                debug(&format!("not following a push target: {e}"));
                None
            }
        })
        .collect();
    let mut failed = vec![false; files.len()];
    let mut buf = vec![0u8; READ_MAX];
    // Returns the time spent reading L1/L2 tables (not flushing, not hashing).
    let mut round = |stop: &AtomicBool| {
        let mut meta = Duration::ZERO;
        for (f, failed) in files.iter_mut().zip(failed.iter_mut()) {
            if let (Some(f), false) = (f.as_mut(), *failed) {
                match f.step(&mut buf, stop) {
                    Ok(m) => meta += m,
                    Err(e) => {
                        debug(&format!("stopped following a push target: {e}"));
                        *failed = true;
                    }
                }
            }
        }
        meta
    };
    while !stop.load(Ordering::Acquire) {
        let t0 = Instant::now();
        let meta = round(stop);
        // A round starts at most every INTERVAL, and no more than a fifth of the time goes
        // to mapping (a big sparse disk has many L2 tables to read each round); hashing takes
        // as long as there is data. The flush is not counted: it is mostly waiting for a busy
        // daemon (QSD took 0.1-0.4 s per flush during its job, and pauses of five times that
        // left a 1.5 s job followed in one round or none).
        let pause = INTERVAL.max(meta * 5);
        // Sleep in slices so that a stop is seen soon.
        while t0.elapsed() < pause && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if std::env::var_os("BLOCKD_BACKUP_FOLLOW_LAST").is_some() {
        // Two, as a test hook wants everything followed whatever the timing.
        round(&AtomicBool::new(false));
        round(&AtomicBool::new(false));
    }
    files
        .into_iter()
        .map(|f| {
            f.map(|f| {
                debug(&format!(
                    "followed in {} rounds, flushes {:.1} ms in all, {:.1} ms at most",
                    f.rounds,
                    f.flush_total.as_secs_f64() * 1e3,
                    f.flush_max.as_secs_f64() * 1e3
                ));
                f.out
            })
        })
        .collect()
}

/// A line on stderr with `BLOCKD_BACKUP_DEBUG` set: the tool's debug output (phases, the
/// pull's connections, what was followed and why not).
pub fn debug(msg: &str) {
    if std::env::var_os("BLOCKD_BACKUP_DEBUG").is_some() {
        eprintln!("blockd-backup: {msg}");
    }
}

/// Whether an L1 entry read as `now` may be used: it is what the previous round read
/// (`before`), or it changed and a read after one more flush (`after_flush`) agrees. An entry
/// the daemon was writing during the first read (torn) has its final value in the second.
fn l1_trusted(before: u64, now: u64, after_flush: Option<u64>) -> bool {
    before == now || after_flush == Some(now)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn bad(what: &str) -> Error {
    Error::new(Kind::Io, format!("push target: {what}"))
}

impl Watched {
    /// Open the file and check that its header is one the follower understands.
    fn open(t: Target) -> Result<Watched> {
        let file = File::open(&t.path)
            .map_err(|e| Error::io(e, format!("opening {}", t.path.display())))?;
        let mut h = [0u8; 48];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io(e, format!("reading {}", t.path.display())))?;
        if &h[0..4] != b"QFI\xfb" || be32(&h, 4) < 2 {
            return Err(bad("not a qcow2 file"));
        }
        if be32(&h, 20) != CLUSTER_BITS || 1u64 << CLUSTER_BITS != HASH_CHUNK {
            return Err(bad("cluster size is not 64 KiB"));
        }
        if be64(&h, 24) != t.size {
            return Err(bad("size differs from the disk's"));
        }
        let per_table = HASH_CHUNK / 8;
        let needed = t.size.div_ceil(HASH_CHUNK).div_ceil(per_table);
        let l1_entries = u64::from(be32(&h, 36));
        let l1_offset = be64(&h, 40);
        // The tool created the file for this size: its L1 table is as long as needed, no more.
        if l1_entries < needed || l1_entries > needed + 1 || !l1_offset.is_multiple_of(HASH_CHUNK) {
            return Err(bad("unexpected L1 table"));
        }
        let n = t.size.div_ceil(HASH_CHUNK) as usize;
        Ok(Watched {
            file,
            flusher: t.flusher,
            size: t.size,
            l1_offset,
            l1_entries: needed as usize,
            complete: vec![false; needed as usize],
            l1_seen: vec![0; needed as usize],
            out: Followed {
                by_chunk: vec![None; n],
                bytes: 0,
            },
            rounds: 0,
            flush_total: Duration::ZERO,
            flush_max: Duration::ZERO,
        })
    }

    fn read(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, at)
            .map_err(|e| Error::io(e, "reading the push target"))
    }

    /// Flush, timed for the debug line.
    fn flush(&mut self) -> Result<()> {
        let t0 = Instant::now();
        self.flusher.flush()?;
        let f = t0.elapsed();
        self.flush_total += f;
        self.flush_max = self.flush_max.max(f);
        Ok(())
    }

    /// One round: flush, map what is new, hash it (stopping early when told). Returns the
    /// time the mapping took (the flush is the daemon's work, waited for, not ours).
    fn step(&mut self, buf: &mut [u8], stop: &AtomicBool) -> Result<Duration> {
        self.flush()?;
        self.rounds += 1;
        let t1 = Instant::now();
        let mut l1 = vec![0u8; self.l1_entries * 8];
        self.read(&mut l1, self.l1_offset)?;
        let entry = |l1: &[u8], k: usize| be64(l1, k * 8) & OFFSET_MASK;
        // An entry that changed since the last round may have been read while the daemon
        // wrote it (torn). Both daemons write an L1 entry under the lock their flush takes,
        // so after one more flush that write is done: the entry is read again then, and
        // trusted only if both reads agree (see `l1_trusted`).
        let mut again = None;
        // Waiting for the daemon is not mapping work.
        let mut waited = Duration::ZERO;
        if (0..self.l1_entries).any(|k| entry(&l1, k) != self.l1_seen[k]) {
            let t = Instant::now();
            self.flush()?;
            waited = t.elapsed();
            let mut b = vec![0u8; l1.len()];
            self.read(&mut b, self.l1_offset)?;
            again = Some(b);
        }
        let per_table = (HASH_CHUNK / 8) as usize;
        // Whole chunks only: a disk's short last chunk is left to the end.
        let whole = (self.size / HASH_CHUNK) as usize;
        let mut l2 = vec![0u8; HASH_CHUNK as usize];
        let mut todo: Vec<(u64, usize)> = Vec::new();
        for k in 0..self.l1_entries {
            let l2_offset = entry(&l1, k);
            let before = std::mem::replace(&mut self.l1_seen[k], l2_offset);
            let stable = l1_trusted(before, l2_offset, again.as_deref().map(|b| entry(b, k)));
            if self.complete[k]
                || !stable
                || l2_offset == 0
                || !l2_offset.is_multiple_of(HASH_CHUNK)
            {
                continue;
            }
            self.read(&mut l2, l2_offset)?;
            let first = k * per_table;
            let last = (first + per_table).min(whole);
            let mut all = true;
            for i in first..last {
                if self.out.by_chunk[i].is_some() {
                    continue;
                }
                let e = be64(&l2, (i - first) * 8);
                let host = e & OFFSET_MASK;
                if e & COMPRESSED != 0 || e & ZERO != 0 || host == 0 {
                    all = false;
                    continue;
                }
                if !host.is_multiple_of(FILE_BLOCK) {
                    all = false;
                    continue;
                }
                todo.push((host, i));
            }
            // Complete once every whole chunk it covers is hashed (those found now will be).
            self.complete[k] = all && last == first + per_table;
        }
        todo.sort_unstable();
        let meta = t1.elapsed().saturating_sub(waited);
        let mut at = 0;
        while at < todo.len() {
            if stop.load(Ordering::Acquire) {
                // The rest is hashed after the job; mark its tables incomplete again.
                for &(_, i) in &todo[at..] {
                    self.complete[i / per_table] = false;
                }
                break;
            }
            // A run of contiguous host clusters, at most READ_MAX bytes.
            let start = todo[at].0;
            let mut end = at + 1;
            while end < todo.len()
                && todo[end].0 == start + (end - at) as u64 * HASH_CHUNK
                && (end - at + 1) * HASH_CHUNK as usize <= buf.len()
            {
                end += 1;
            }
            let len = (end - at) * HASH_CHUNK as usize;
            self.read(&mut buf[..len], start)?;
            for (j, &(host, i)) in todo[at..end].iter().enumerate() {
                let c = j * HASH_CHUNK as usize;
                let h = HashAlgo::NEW.digest(&buf[c..c + HASH_CHUNK as usize]);
                self.out.by_chunk[i] = Some(((host / FILE_BLOCK) as usize, h));
                self.out.bytes += HASH_CHUNK;
            }
            at = end;
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::blocksum::hash_new_file;
    use crate::chain::{self, Durability};

    const C: u64 = HASH_CHUNK;

    /// Stands in for the daemon: flushing the image writes its cached L2 tables.
    struct ImageFlush(Arc<qcow2::Qcow2>);
    impl Flusher for ImageFlush {
        fn flush(&mut self) -> Result<()> {
            self.0
                .flush()
                .map_err(|e| Error::new(Kind::Io, format!("flush: {e}")))
        }
    }

    fn chunk(i: u64) -> Vec<u8> {
        (0..C)
            .map(|j| ((i * 131 + j * 7) % 251) as u8 + 1)
            .collect()
    }

    /// A "job" writes chunks out of order into a new chain file while the follower takes
    /// rounds; the hashes it gathered give exactly the sums of a pass over the closed file,
    /// and a followed hash whose block the final mapping does not name is ignored.
    #[test]
    fn followed_hashes_give_the_same_sums_as_hashing_the_closed_file() {
        let dir = std::env::temp_dir().join(format!("bb-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("new.qcow2");
        let n = 40u64;
        let size = n * C + 4096; // a short last chunk, never followed
        let img = chain::create(&p, size, None, Durability::Caller).unwrap();
        let mut w = Watched::open(Target {
            path: p.clone(),
            flusher: Box::new(ImageFlush(img.clone())),
            size,
        })
        .unwrap();
        let never = AtomicBool::new(false);
        let mut buf = vec![0u8; READ_MAX];
        // Nothing written yet: nothing followed.
        w.step(&mut buf, &never).unwrap();
        assert_eq!(w.out.bytes, 0);
        let order: Vec<u64> = (0..n).map(|k| (k * 17) % n).collect();
        for &i in &order[..n as usize / 2] {
            img.write_at(&chunk(i), i * C).unwrap();
        }
        w.step(&mut buf, &never).unwrap();
        assert_eq!(
            w.out.bytes,
            n / 2 * C,
            "the first half, once flushed (a new L2 table read after a second read of its L1 entry)"
        );
        w.step(&mut buf, &never).unwrap();
        assert_eq!(w.out.bytes, n / 2 * C, "nothing twice");
        for &i in &order[n as usize / 2..] {
            if i % 5 == 0 {
                img.write_zeroes(i * C, C, false).unwrap();
            } else {
                img.write_at(&chunk(i), i * C).unwrap();
            }
        }
        img.write_at(&[9u8; 4096], n * C).unwrap();
        w.step(&mut buf, &never).unwrap();
        img.flush().unwrap();
        img.close().unwrap();
        let zeros = order[n as usize / 2..]
            .iter()
            .filter(|&&i| i % 5 == 0)
            .count() as u64;
        assert_eq!(w.out.bytes, (n - zeros) * C, "every whole data chunk");
        let paths = vec![p.clone()];
        let plain = hash_new_file(&p, &paths, None, None, None).unwrap();
        let followed = hash_new_file(&p, &paths, None, None, Some(&w.out)).unwrap();
        assert_eq!(followed.checksum, plain.checksum);
        assert_eq!(followed.chunks, plain.chunks);
        // The followed hashes were really used: a wrong hash for the right block shows.
        let (i, (b, _)) = w
            .out
            .by_chunk
            .iter()
            .enumerate()
            .find_map(|(i, e)| e.map(|e| (i, e)))
            .unwrap();
        let mut wrong = Followed {
            by_chunk: w.out.by_chunk.clone(),
            bytes: 0,
        };
        wrong.by_chunk[i] = Some((b, [7u8; 32]));
        let s = hash_new_file(&p, &paths, None, None, Some(&wrong)).unwrap();
        assert_ne!(s.checksum, plain.checksum);
        // ... while a hash recorded for another block than the final mapping's is ignored.
        wrong.by_chunk[i] = Some((b + 1, [7u8; 32]));
        let s = hash_new_file(&p, &paths, None, None, Some(&wrong)).unwrap();
        assert_eq!((s.checksum, s.chunks), (plain.checksum, plain.chunks));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_it_does_not_understand_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("bb-follow-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("new.qcow2");
        let img = chain::create(&p, 8 * C, None, Durability::Caller).unwrap();
        let target = |size| Target {
            path: p.clone(),
            flusher: Box::new(ImageFlush(img.clone())),
            size,
        };
        assert!(Watched::open(target(8 * C)).is_ok());
        assert!(Watched::open(target(16 * C)).is_err(), "another size");
        let raw = dir.join("raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let t = Target {
            path: raw,
            flusher: Box::new(ImageFlush(img.clone())),
            size: 8 * C,
        };
        assert!(Watched::open(t).is_err(), "not qcow2");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Plays a daemon whose L1 entry write is caught half done: after the round's flush the
    /// file holds `torn`, after the next flush the real entry.
    struct TornL1 {
        file: File,
        at: u64,
        torn: u64,
        real: u64,
        flushes: u32,
    }
    impl Flusher for TornL1 {
        fn flush(&mut self) -> Result<()> {
            use std::os::unix::fs::FileExt;
            self.flushes += 1;
            let v = if self.flushes == 1 {
                self.torn
            } else {
                self.real
            };
            self.file
                .write_all_at(&v.to_be_bytes(), self.at)
                .map_err(|e| Error::io(e, "test write"))
        }
    }

    #[test]
    fn a_torn_l1_entry_is_not_used_until_a_read_after_a_flush_agrees() {
        assert!(l1_trusted(5, 5, None));
        assert!(l1_trusted(0, 5, Some(5)));
        assert!(!l1_trusted(0, 5, None));
        assert!(!l1_trusted(0, 5, Some(6)));
        let dir = std::env::temp_dir().join(format!("bb-follow-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("new.qcow2");
        let n = 8u64;
        let img = chain::create(&p, n * C, None, Durability::Caller).unwrap();
        for i in 0..n {
            img.write_at(&chunk(i), i * C).unwrap();
        }
        img.flush().unwrap();
        let mut h = [0u8; 48];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.read_exact_at(&mut h, 0).unwrap();
        let l1_offset = be64(&h, 40);
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, l1_offset).unwrap();
        let real = u64::from_be_bytes(e);
        assert_ne!(real & OFFSET_MASK, 0);
        // Half written: the entry names another cluster (here the L1 table itself).
        let torn = l1_offset;
        let mut w = Watched::open(Target {
            path: p.clone(),
            flusher: Box::new(TornL1 {
                file: f,
                at: l1_offset,
                torn,
                real,
                flushes: 0,
            }),
            size: n * C,
        })
        .unwrap();
        let never = AtomicBool::new(false);
        let mut buf = vec![0u8; READ_MAX];
        w.step(&mut buf, &never).unwrap();
        assert_eq!(w.out.bytes, 0, "a torn entry is not read as an L2 table");
        w.step(&mut buf, &never).unwrap();
        assert_eq!(
            w.out.bytes,
            n * C,
            "the whole table once the entry is confirmed"
        );
        img.close().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
