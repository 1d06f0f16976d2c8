//! qcow2 chain files through our own format library (crates/qcow2): create an incremental
//! backed by its parent, write extents, open a whole chain to read a point in time, hash.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{CreateOptions, FileStorage, ImageStorage, OpenOptions, Qcow2};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Cluster size of the chain files (matches the default bitmap granularity).
pub const CLUSTER: u64 = 64 << 10;

/// Create an empty qcow2 at `path` of `size` bytes, backed by `backing` (a file name in the
/// same folder, recorded relative so the repository can move) and open it for writing with
/// that backing attached (partial clusters copy from it).
pub fn create(path: &Path, size: u64, backing: Option<&Path>) -> Result<Arc<Qcow2>> {
    let st = FileStorage::create(path)
        .map_err(|e| Error::io(e, format!("creating {}", path.display())))?;
    let rel = backing.map(|b| {
        b.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let opts = CreateOptions {
        size,
        cluster_size: CLUSTER,
        backing_file: rel.clone(),
        backing_fmt: rel.as_ref().map(|_| "qcow2".to_string()),
        ..CreateOptions::default()
    };
    Qcow2::create(&st, &opts)?;
    let img = Qcow2::open(Arc::new(st), OpenOptions::default())?;
    if let Some(b) = backing {
        let parent = open_image(b, None)?;
        img.set_backing(Some(Arc::new(ImageStorage(parent))));
    }
    Ok(Arc::new(img))
}

/// Open one image read-only with an optional (already opened) backing image.
fn open_image(path: &Path, backing: Option<Arc<Qcow2>>) -> Result<Arc<Qcow2>> {
    let st = FileStorage::open(path, false)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let img = Qcow2::open(Arc::new(st), OpenOptions { read_only: true })
        .map_err(|e| Error::from(e).context(format!("opening {}", path.display())))?;
    if let Some(b) = backing {
        img.set_backing(Some(Arc::new(ImageStorage(b))));
    }
    Ok(Arc::new(img))
}

/// Open a chain (base first) read-only; the returned image reads the last point.
pub fn open_chain(files: &[PathBuf]) -> Result<Arc<Qcow2>> {
    let mut top: Option<Arc<Qcow2>> = None;
    for f in files {
        top = Some(open_image(f, top.take())?);
    }
    top.ok_or_else(|| Error::new(crate::error::Kind::Repository, "empty chain"))
}

/// Read the whole guest view of `img` in order, calling `f` with each piece.
pub fn read_all(img: &Qcow2, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], off)?;
        f(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Bytes of guest data covered by one chunk hash of the content digest: the copy granularity,
/// so an incremental rehashes exactly the clusters it wrote. The hashes cost 32 bytes per
/// 64 KiB (0.05 % of the disk) per backup.
pub const HASH_CHUNK: u64 = 64 << 10;

/// The content digest of a point: SHA-256 over the SHA-256 of each [`HASH_CHUNK`] of the
/// guest view, in order. Per-chunk hashes let an incremental backup rehash only the chunks it
/// changed; restore and verify recompute it while streaming the whole disk.
#[derive(Default)]
pub struct ContentHasher {
    /// Hash of the chunk being filled.
    cur: Sha256,
    /// Bytes in the current chunk.
    filled: u64,
    /// Finished chunk hashes.
    hashes: Vec<[u8; 32]>,
}

impl ContentHasher {
    /// Feed the next bytes of the guest view.
    pub fn update(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            let n = ((HASH_CHUNK - self.filled) as usize).min(b.len());
            self.cur.update(&b[..n]);
            self.filled += n as u64;
            b = &b[n..];
            if self.filled == HASH_CHUNK {
                self.hashes
                    .push(std::mem::take(&mut self.cur).finalize().into());
                self.filled = 0;
            }
        }
    }

    /// The digest (hex) and the chunk hashes.
    pub fn finish(mut self) -> (String, Vec<[u8; 32]>) {
        if self.filled > 0 {
            self.hashes.push(self.cur.finalize().into());
        }
        (digest(&self.hashes), self.hashes)
    }
}

/// The digest of a list of chunk hashes.
pub fn digest(hashes: &[[u8; 32]]) -> String {
    let mut h = Sha256::new();
    for c in hashes {
        h.update(c);
    }
    hex(&h.finalize())
}

/// Hash of one chunk `i` of `img`, read back (an all-zero chunk skips the hashing).
fn chunk_hash(
    img: &Qcow2,
    i: usize,
    buf: &mut [u8],
    zero: &mut Option<[u8; 32]>,
) -> Result<[u8; 32]> {
    let size = img.virtual_size();
    let start = i as u64 * HASH_CHUNK;
    let end = (start + HASH_CHUNK).min(size);
    let b = &mut buf[..(end - start) as usize];
    img.read_at(b, start)?;
    if end - start == HASH_CHUNK && b.iter().all(|&x| x == 0) {
        return Ok(*zero.get_or_insert_with(|| Sha256::digest(&*b).into()));
    }
    Ok(Sha256::digest(&*b).into())
}

/// Chunk hashes of the point `img` (a chain's top). With the previous point's hashes `prev`,
/// only chunks that `img`'s own file allocates (what this backup wrote) are rehashed. `known`
/// has the hashes of chunks the copy read whole (the content of the point there); the other
/// chunks needed are read back through the chain.
pub fn point_hashes(
    img: &Qcow2,
    prev: Option<Vec<[u8; 32]>>,
    known: Option<&[Option<[u8; 32]>]>,
) -> Result<Vec<[u8; 32]>> {
    let size = img.virtual_size();
    let n = size.div_ceil(HASH_CHUNK) as usize;
    let known_at = |i: usize| known.and_then(|k| k.get(i).copied().flatten());
    let mut buf = vec![0u8; HASH_CHUNK as usize];
    let mut zero = None;
    let mut hashes = match prev {
        Some(p) if p.len() == n => p,
        _ if known.is_some() => {
            return (0..n)
                .map(|i| match known_at(i) {
                    Some(h) => Ok(h),
                    None => chunk_hash(img, i, &mut buf, &mut zero),
                })
                .collect();
        }
        _ => {
            let mut h = ContentHasher::default();
            read_all(img, |_, b| {
                h.update(b);
                Ok(())
            })?;
            return Ok(h.finish().1);
        }
    };
    // The chunks this image's own file allocates (data or zero clusters) changed.
    let mut touched = vec![false; n];
    let mut off = 0u64;
    while off < size {
        let (st, len) = img.block_status(off, size - off)?;
        let len = len.max(1);
        if st != qcow2::BlockStatus::Unallocated {
            let first = (off / HASH_CHUNK) as usize;
            let last = ((off + len - 1) / HASH_CHUNK) as usize;
            for t in touched.iter_mut().take(last.min(n - 1) + 1).skip(first) {
                *t = true;
            }
        }
        off += len;
    }
    for (i, slot) in hashes.iter_mut().enumerate().filter(|(i, _)| touched[*i]) {
        *slot = match known_at(i) {
            Some(h) => h,
            None => chunk_hash(img, i, &mut buf, &mut zero)?,
        };
    }
    Ok(hashes)
}

/// SHA-256 and length of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&h.finalize()), total))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_digest_does_not_depend_on_how_the_bytes_are_fed() {
        let data: Vec<u8> = (0..HASH_CHUNK as usize + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut a = ContentHasher::default();
        for piece in data.chunks(1_000_003) {
            a.update(piece);
        }
        let (d, hashes) = a.finish();
        let c = HASH_CHUNK as usize;
        let want: Vec<[u8; 32]> = vec![
            Sha256::digest(&data[..c]).into(),
            Sha256::digest(&data[c..]).into(),
        ];
        assert_eq!(hashes, want);
        assert_eq!(d, digest(&want));
    }
}
