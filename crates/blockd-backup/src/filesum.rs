//! Checksums of whole repository files: BLAKE3 computed as its tree splits (subtrees on all
//! cores, merged: the same hash as one sequential pass), from `pread` copies or, for a file
//! this run wrote, a read-only mapping; SHA-256 (version-1 files) in one pass.

use std::path::Path;

use crate::chain::{hash_threads, hex, HashAlgo};
use crate::error::{Error, Result};

/// Checksum (`algo`) and length of a file's bytes. BLAKE3 is a tree hash: the file is cut
/// along the tree's own subtree boundaries and the pieces hashed on all cores, which gives
/// exactly the hash of one sequential pass.
pub fn file_checksum(path: &Path, algo: HashAlgo) -> Result<(String, u64)> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(e, format!("reading {}", path.display())))?
        .len();
    let read = |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| read_range(&f, off, n, feed);
    let hash = match algo {
        HashAlgo::Blake3 => blake3_tree(len, TREE_LEAF, hash_threads(), &read),
        HashAlgo::Sha256 => {
            let mut h = algo.hasher();
            read(0, len, &mut |b| h.update(b)).map(|()| h.finalize())
        }
    }
    .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
    Ok((hex(&hash), len))
}

/// [`file_checksum`] of a file this run wrote and holds the repository lock for, `map` being
/// its mapping ([`Mapped::file`]): BLAKE3 is hashed from the mapping, so the bytes are not
/// copied once more.
pub fn own_file_checksum(
    path: &Path,
    algo: HashAlgo,
    map: Option<&Mapped>,
) -> Result<(String, u64)> {
    let Some(map) = map.filter(|_| algo == HashAlgo::Blake3) else {
        return file_checksum(path, algo);
    };
    let bytes = map.bytes();
    let read = |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| {
        let piece = usize::try_from(off)
            .ok()
            .zip(usize::try_from(off + n).ok())
            .and_then(|(a, b)| bytes.get(a..b))
            .ok_or_else(|| std::io::Error::other("range outside the mapped file"))?;
        for b in piece.chunks(1 << 20) {
            feed(b);
        }
        Ok(())
    };
    let len = bytes.len() as u64;
    let hash = blake3_tree(len, TREE_LEAF, hash_threads(), &read)
        .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
    Ok((hex(&hash), len))
}

/// A read-only shared mapping of a whole file, unmapped on drop. Only for files this run wrote
/// and holds the repository lock for: a mapped file cut short under us would fault, which only
/// a writer ignoring the lock can cause.
pub struct Mapped {
    /// Start of the mapping.
    ptr: *mut libc::c_void,
    /// Its length in bytes.
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; `&Mapped` only hands out `&[u8]`.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Map the whole file at `path` (None if it is empty or cannot be mapped: read it instead).
    pub fn file(path: &Path) -> Result<Option<Mapped>> {
        let f = std::fs::File::open(path)
            .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
        let len = f
            .metadata()
            .map_err(|e| Error::io(e, format!("reading {}", path.display())))?
            .len();
        Ok(Mapped::new(&f, len))
    }

    /// Map `len` bytes of `f` (None if empty or the mapping fails: read it instead).
    fn new(f: &std::fs::File, len: u64) -> Option<Mapped> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        // SAFETY: a fresh read-only mapping of an open file descriptor; the kernel picks the
        // address, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                f.as_raw_fd(),
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Mapped { ptr, len })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`, once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Largest piece of a file one thread hashes at a time in [`blake3_tree`].
const TREE_LEAF: u64 = 64 << 20;

/// Feed bytes `off..off + len` of `f` to `feed` in 1 MiB pieces (a file that ends early is
/// an error).
fn read_range(
    f: &std::fs::File,
    off: u64,
    len: u64,
    feed: &mut dyn FnMut(&[u8]),
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (1u64 << 20).min(len.max(1)) as usize];
    let mut at = off;
    while at < off + len {
        let n = (off + len - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        feed(&buf[..n]);
        at += n as u64;
    }
    Ok(())
}

/// Reads bytes `off..off + len` of the input, feeding them in order.
type ReadRange<'a> = dyn Fn(u64, u64, &mut dyn FnMut(&[u8])) -> std::io::Result<()> + Sync + 'a;

/// BLAKE3 of `len` bytes given by `read`: subtrees of at most `leaf` bytes are hashed on
/// `threads` threads and merged as the BLAKE3 tree does (the same hash as one pass).
fn blake3_tree(
    len: u64,
    leaf: u64,
    threads: usize,
    read: &ReadRange<'_>,
) -> std::io::Result<[u8; 32]> {
    use blake3::hazmat::{
        left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode,
    };
    let leaf = leaf.max(blake3::CHUNK_LEN as u64);
    if len <= leaf || threads <= 1 {
        let mut h = blake3::Hasher::new();
        read(0, len, &mut |b| {
            h.update(b);
        })?;
        return Ok(*h.finalize().as_bytes());
    }
    // The leaves in order: subtrees split at the tree's own boundaries down to `leaf` bytes.
    fn leaves(off: u64, len: u64, leaf: u64, out: &mut Vec<(u64, u64)>) {
        if len <= leaf {
            out.push((off, len));
        } else {
            let l = left_subtree_len(len);
            leaves(off, l, leaf, out);
            leaves(off + l, len - l, leaf, out);
        }
    }
    let l = left_subtree_len(len);
    let mut list = Vec::new();
    leaves(0, l, leaf, &mut list);
    leaves(l, len - l, leaf, &mut list);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let cvs: Vec<std::sync::Mutex<Option<[u8; 32]>>> =
        list.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| -> std::io::Result<()> {
        let workers: Vec<_> = (0..threads.min(list.len()))
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(off, n)) = list.get(i) else {
                            return Ok(());
                        };
                        let mut h = blake3::Hasher::new();
                        h.set_input_offset(off);
                        read(off, n, &mut |b| {
                            h.update(b);
                        })?;
                        if let Ok(mut slot) = cvs[i].lock() {
                            *slot = Some(h.finalize_non_root());
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))?;
        }
        Ok(())
    })?;
    let mut cvs = cvs
        .into_iter()
        .map(|m| m.into_inner().ok().flatten())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| std::io::Error::other("a piece of the file was not hashed"))?
        .into_iter();
    // Merge along the same splits.
    fn merge(len: u64, leaf: u64, cvs: &mut impl Iterator<Item = [u8; 32]>) -> Option<[u8; 32]> {
        if len <= leaf {
            return cvs.next();
        }
        let l = left_subtree_len(len);
        let a = merge(l, leaf, cvs)?;
        let b = merge(len - l, leaf, cvs)?;
        Some(merge_subtrees_non_root(&a, &b, Mode::Hash))
    }
    let a = merge(l, leaf, &mut cvs);
    let b = merge(len - l, leaf, &mut cvs);
    match (a, b) {
        (Some(a), Some(b)) => Ok(*merge_subtrees_root(&a, &b, Mode::Hash).as_bytes()),
        _ => Err(std::io::Error::other("a piece of the file was not hashed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAKE3 of the first `len` bytes of `f` through [`blake3_tree`].
    fn tree_of(
        f: &std::fs::File,
        len: u64,
        leaf: u64,
        threads: usize,
    ) -> std::io::Result<[u8; 32]> {
        let read = |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| read_range(f, off, n, feed);
        blake3_tree(len, leaf, threads, &read)
    }

    #[test]
    fn parallel_file_checksum_equals_one_sequential_blake3() {
        let dir = std::env::temp_dir().join(format!("bb-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        let data: Vec<u8> = (0..(5u64 << 20) + 12_345)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [0usize, 1, 1024, 1025, 4096, 3 << 20, data.len()] {
            std::fs::write(&p, &data[..len]).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let want = *blake3::hash(&data[..len]).as_bytes();
            for (leaf, threads) in [(1024, 3), (64 << 10, 2), (1 << 20, 4), (TREE_LEAF, 2)] {
                assert_eq!(
                    tree_of(&f, len as u64, leaf, threads).unwrap(),
                    want,
                    "len {len} leaf {leaf} threads {threads}"
                );
            }
            let (sum, n) = file_checksum(&p, HashAlgo::Blake3).unwrap();
            assert_eq!((sum, n), (hex(&want), len as u64));
            let (sum, n) =
                own_file_checksum(&p, HashAlgo::Blake3, Mapped::file(&p).unwrap().as_ref())
                    .unwrap();
            assert_eq!((sum, n), (hex(&want), len as u64));
        }
        // One flipped byte in any piece changes the checksum (what `verify` relies on).
        let (good, _) = file_checksum(&p, HashAlgo::Blake3).unwrap();
        for at in [0, 1 << 20, (4 << 20) + 5, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x01;
            std::fs::write(&p, &bad).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let got = tree_of(&f, bad.len() as u64, 1 << 20, 2).unwrap();
            assert_ne!(hex(&got), good, "byte {at}");
            assert_ne!(
                own_file_checksum(&p, HashAlgo::Blake3, Mapped::file(&p).unwrap().as_ref())
                    .unwrap()
                    .0,
                good,
                "byte {at}"
            );
        }
        // A file shorter than the length asked for is an error, not a hash of less.
        std::fs::write(&p, &data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert!(tree_of(&f, data.len() as u64 + 1, 1 << 20, 2).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
