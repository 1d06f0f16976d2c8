//! The pull copy loop: map what to read (dirty extents of the frozen bitmap, or allocated
//! extents for a full), split it into chunks and copy them over several NBD connections
//! into the new qcow2 file.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use qcow2::Qcow2;

use crate::error::{Error, Kind, Result};
use crate::nbd::{map_all, NbdClient};
use crate::progress::Progress;

/// Largest piece read in one request.
const CHUNK: u64 = 4 << 20;
/// Block status is asked for in pieces of this size.
const MAP_STEP: u32 = 1 << 30;

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
}

/// The ranges to read: dirty extents, or everything not a hole/zero for a full.
fn ranges(c: &mut NbdClient, job: &Job) -> Result<Vec<(u64, u64)>> {
    let out = match &job.context {
        Some(ctx) => map_all(c, ctx, MAP_STEP)?
            .into_iter()
            .filter(|e| e.flags & 1 != 0)
            .map(|e| (e.offset, e.len))
            .collect(),
        None => map_all(c, "base:allocation", MAP_STEP)?
            .into_iter()
            .filter(|e| e.flags & 3 == 0)
            .map(|e| (e.offset, e.len))
            .collect(),
    };
    Ok(out)
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

/// Copy everything `job` selects into `img`. Returns the bytes read.
pub fn run(job: &Job, img: &Qcow2, progress: &Progress) -> Result<u64> {
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
    let queue = Mutex::new(todo);
    let failed = AtomicBool::new(false);
    let copied = AtomicU64::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let first = Mutex::new(Some(first));
    std::thread::scope(|s| {
        for _ in 0..job.connections {
            s.spawn(|| {
                let res = (|| -> Result<()> {
                    let reuse = first.lock().ok().and_then(|mut g| g.take());
                    let mut c = match reuse {
                        Some(c) => c,
                        None => NbdClient::connect(&job.socket, &job.export, &[])?,
                    };
                    let mut buf = vec![0u8; CHUNK as usize];
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                        let Some((off, len)) = next else { break };
                        let b = &mut buf[..len as usize];
                        c.read(off, b)?;
                        if b.iter().all(|&x| x == 0) {
                            if job.incremental {
                                img.write_zeroes(off, len, false)?;
                            }
                        } else {
                            img.write_at(b, off)?;
                        }
                        copied.fetch_add(len, Ordering::Relaxed);
                        crate::backup::die_at("copy");
                        progress.add(len);
                    }
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
    Ok(copied.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

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
