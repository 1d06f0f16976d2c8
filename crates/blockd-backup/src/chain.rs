//! qcow2 chain files through our own format library (crates/qcow2): create an incremental
//! backed by its parent, write extents, open a whole chain to read a point in time, hash.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{CreateOptions, FileStorage, HostFn, ImageStorage, OpenOptions, Qcow2, Storage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The hash behind a manifest's checksums (its files and its content digest). Manifests that
/// name none are from before BLAKE3 and use SHA-256.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlgo {
    /// SHA-256 (manifest version 1).
    #[default]
    Sha256,
    /// BLAKE3, 256-bit output: several times less CPU than SHA-256 (SIMD), so the checksums
    /// cost a backup little next to the copy.
    Blake3,
}

impl HashAlgo {
    /// The algorithm new backups use.
    pub const NEW: HashAlgo = HashAlgo::Blake3;

    /// Hash of `b`.
    pub fn digest(self, b: &[u8]) -> [u8; 32] {
        match self {
            HashAlgo::Sha256 => Sha256::digest(b).into(),
            HashAlgo::Blake3 => blake3::hash(b).into(),
        }
    }

    /// A streaming hasher.
    pub fn hasher(self) -> Hasher {
        match self {
            HashAlgo::Sha256 => Hasher::Sha256(Sha256::new()),
            HashAlgo::Blake3 => Hasher::Blake3(Box::default()),
        }
    }
}

/// A streaming hasher of either algorithm.
pub enum Hasher {
    /// SHA-256.
    Sha256(Sha256),
    /// BLAKE3 (boxed: its state is large).
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// Feed bytes.
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Blake3(h) => {
                h.update(b);
            }
        }
    }

    /// The hash.
    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => h.finalize().into(),
            Hasher::Blake3(h) => h.finalize().into(),
        }
    }
}

/// Cluster size of the chain files (matches the default bitmap granularity).
pub const CLUSTER: u64 = 64 << 10;

/// When the files a run writes through the qcow2 library become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// At each of the library's flushes (a file handed to the user, e.g. a restore).
    Flushes,
    /// Only when the caller syncs the file itself (a repository file, fsynced once by
    /// `Store::commit_object` before a manifest names it; an orphan after a crash is removed by
    /// the next run), or never (a scratch image): the library's flushes, several per close,
    /// only order writes for a crash the file never needs to survive.
    Caller,
}

/// A file whose flushes are left to its caller (see [`Durability::Caller`]).
struct Unsynced(FileStorage);

impl Storage for Unsynced {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
    fn truncate(&self, size: u64) -> std::io::Result<()> {
        self.0.truncate(size)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
    fn host_io(&self) -> bool {
        self.0.host_io()
    }
    fn read_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> std::io::Result<bool> {
        self.0.read_host(offset, len, f)
    }
    fn write_host(&self, offset: u64, len: u64, f: &mut HostFn<'_>) -> std::io::Result<bool> {
        self.0.write_host(offset, len, f)
    }
}

/// Create an empty qcow2 at `path` of `size` bytes, backed by `backing` (a file name in the
/// same folder, recorded relative so the repository can move) and open it for writing with
/// that backing attached (partial clusters copy from it).
pub fn create(
    path: &Path,
    size: u64,
    backing: Option<&Path>,
    durability: Durability,
) -> Result<Arc<Qcow2>> {
    let st = create_file(path, size, backing, durability)?;
    let img = Qcow2::open(st, OpenOptions::default())?;
    if let Some(b) = backing {
        let parent = open_image(b, None)?;
        img.set_backing(Some(Arc::new(ImageStorage(parent))));
    }
    Ok(Arc::new(img))
}

/// Write an empty qcow2 at `path` as [`create`] does, without opening it (a push target or a
/// scratch image, which the daemon opens); returns its file.
pub fn create_file(
    path: &Path,
    size: u64,
    backing: Option<&Path>,
    durability: Durability,
) -> Result<Arc<dyn Storage>> {
    let file = FileStorage::create(path)
        .map_err(|e| Error::io(e, format!("creating {}", path.display())))?;
    let st: Arc<dyn Storage> = match durability {
        Durability::Flushes => Arc::new(file),
        Durability::Caller => Arc::new(Unsynced(file)),
    };
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
    Qcow2::create(st.as_ref(), &opts)?;
    Ok(st)
}

/// Open one image read-only with an optional (already opened) backing image.
pub(crate) fn open_image(path: &Path, backing: Option<Arc<Qcow2>>) -> Result<Arc<Qcow2>> {
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

/// The content digest of a point: the hash over the hashes of each [`HASH_CHUNK`] of the
/// guest view, in order (one [`HashAlgo`] for both). Per-chunk hashes let an incremental backup
/// rehash only the chunks it changed; restore and verify recompute it while streaming the disk.
pub struct ContentHasher {
    /// The algorithm.
    algo: HashAlgo,
    /// Hash of the chunk being filled.
    cur: Hasher,
    /// Bytes in the current chunk.
    filled: u64,
    /// Finished chunk hashes.
    hashes: Vec<[u8; 32]>,
}

impl ContentHasher {
    /// A hasher for a point recorded with `algo`.
    pub fn new(algo: HashAlgo) -> ContentHasher {
        ContentHasher {
            algo,
            cur: algo.hasher(),
            filled: 0,
            hashes: Vec::new(),
        }
    }

    /// Feed the next bytes of the guest view.
    pub fn update(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            let n = ((HASH_CHUNK - self.filled) as usize).min(b.len());
            self.cur.update(&b[..n]);
            self.filled += n as u64;
            b = &b[n..];
            if self.filled == HASH_CHUNK {
                let done = std::mem::replace(&mut self.cur, self.algo.hasher());
                self.hashes.push(done.finalize());
                self.filled = 0;
            }
        }
    }

    /// The digest (hex) and the chunk hashes.
    pub fn finish(mut self) -> (String, Vec<[u8; 32]>) {
        if self.filled > 0 {
            self.hashes.push(self.cur.finalize());
        }
        (digest(self.algo, &self.hashes), self.hashes)
    }
}

/// The digest of a list of chunk hashes.
pub fn digest(algo: HashAlgo, hashes: &[[u8; 32]]) -> String {
    // One update over the whole list: the same hash as 32 bytes at a time, but BLAKE3 hashes
    // its 1 KiB chunks side by side (SIMD) only when it is given many at once.
    let mut h = algo.hasher();
    h.update(hashes.as_flattened());
    hex(&h.finalize())
}

/// Threads for hashing passes after the copy (the daemon is idle by then).
pub(crate) fn hash_threads() -> usize {
    // Asked once: the standard library reads the cgroup's CPU quota files at every call.
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
}

/// Hashes of the chunks `idx` (ascending) of `img`, read back through the chain on all
/// cores; runs of consecutive chunks are read [`READ_RUN`] chunks at a time, and an all-zero
/// chunk reuses the zero chunk's hash.
pub(crate) fn chunk_hashes(img: &Qcow2, algo: HashAlgo, idx: &[usize]) -> Result<Vec<[u8; 32]>> {
    let size = img.virtual_size();
    let zero = algo.digest(&vec![0u8; HASH_CHUNK as usize]);
    let per = idx.len().div_ceil(hash_threads()).max(1);
    let parts: Vec<Result<Vec<[u8; 32]>>> = std::thread::scope(|s| {
        let handles: Vec<_> = idx
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<Vec<[u8; 32]>> {
                    let mut out = Vec::with_capacity(part.len());
                    let mut buf = vec![0u8; (READ_RUN * HASH_CHUNK) as usize];
                    let mut rest = part;
                    while let Some(&first) = rest.first() {
                        let run = rest
                            .iter()
                            .enumerate()
                            .take(READ_RUN as usize)
                            .take_while(|&(k, &i)| i == first + k)
                            .count();
                        let start = first as u64 * HASH_CHUNK;
                        let end = ((first + run) as u64 * HASH_CHUNK).min(size);
                        let b = &mut buf[..(end - start) as usize];
                        img.read_at(b, start)?;
                        for c in b.chunks(HASH_CHUNK as usize) {
                            let all_zero =
                                c.len() as u64 == HASH_CHUNK && c.iter().all(|&x| x == 0);
                            out.push(if all_zero { zero } else { algo.digest(c) });
                        }
                        rest = &rest[run..];
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::new(
                        crate::error::Kind::Io,
                        "a hashing thread panicked",
                    ))
                })
            })
            .collect()
    });
    let mut out = Vec::with_capacity(idx.len());
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Chunks read back in one request by [`chunk_hashes`] (4 MiB).
const READ_RUN: u64 = 64;

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
        for algo in [HashAlgo::Sha256, HashAlgo::Blake3] {
            let mut a = ContentHasher::new(algo);
            for piece in data.chunks(1_000_003) {
                a.update(piece);
            }
            let (d, hashes) = a.finish();
            let c = HASH_CHUNK as usize;
            let want: Vec<[u8; 32]> = vec![algo.digest(&data[..c]), algo.digest(&data[c..])];
            assert_eq!(hashes, want);
            assert_eq!(d, digest(algo, &want));
        }
        // The two algorithms are really used: SHA-256's and BLAKE3's known empty-input hashes.
        assert_eq!(
            hex(&HashAlgo::Sha256.digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&HashAlgo::Blake3.digest(b"")),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn digest_is_the_hash_of_the_list_fed_one_hash_at_a_time() {
        // Repositories recorded before the list was hashed in one update keep verifying.
        let list: Vec<[u8; 32]> = (0..3000u32)
            .map(|i| HashAlgo::Blake3.digest(&i.to_le_bytes()))
            .collect();
        for algo in [HashAlgo::Sha256, HashAlgo::Blake3] {
            let mut h = algo.hasher();
            for c in &list {
                h.update(c);
            }
            assert_eq!(digest(algo, &list), hex(&h.finalize()));
        }
        let mut h = blake3::Hasher::new();
        for c in &list {
            h.update(c);
        }
        assert_eq!(
            crate::filesum::blocks_checksum(&list),
            hex(h.finalize().as_bytes())
        );
    }

    #[test]
    fn manifests_without_an_algorithm_are_sha256() {
        #[derive(Deserialize)]
        struct M {
            #[serde(default)]
            hash: HashAlgo,
        }
        let old: M = serde_json::from_str("{}").unwrap_or(M {
            hash: HashAlgo::Blake3,
        });
        assert_eq!(old.hash, HashAlgo::Sha256);
        let new: M = serde_json::from_str(r#"{"hash":"blake3"}"#).unwrap_or(M {
            hash: HashAlgo::Sha256,
        });
        assert_eq!(new.hash, HashAlgo::Blake3);
    }
}
