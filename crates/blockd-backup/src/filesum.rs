//! Checksums of whole repository files, in the three formats manifests record
//! ([`FileHash`]): the block list (BLAKE3 over the BLAKE3 hashes of the file's 64 KiB blocks,
//! manifest version 3), whose block hashes are shared with the point's content hashes
//! (see `blocksum`); flat BLAKE3 (version 2) computed as its tree splits (subtrees on all cores,
//! merged: the same hash as one sequential pass); SHA-256 (version 1) in one pass.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chain::{hash_threads, hex, HashAlgo};
use crate::error::{Error, Result};

/// How a file's checksum in a manifest is computed (its `hash` field).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileHash {
    /// SHA-256 of the file's bytes (manifest version 1; the field was absent).
    #[default]
    Sha256,
    /// BLAKE3 of the file's bytes (manifest version 2).
    Blake3,
    /// BLAKE3 of the block list (manifest version 3): the file is cut into blocks of
    /// [`FILE_BLOCK`] bytes from offset 0 (the last one shorter if the length is not a
    /// multiple; an empty file has none), each block is hashed with BLAKE3, and the checksum is
    /// the BLAKE3 hash of those 32-byte hashes concatenated in file order. The file's length is
    /// recorded beside it and checked too. A qcow2 data cluster of 64 KiB is one block, so its
    /// hash is the content hash of the guest chunk it holds: a backup hashes each byte once.
    Blake3Blocks,
}

impl FileHash {
    /// The format new files are recorded with.
    pub const NEW: FileHash = FileHash::Blake3Blocks;
}

/// Block size of [`FileHash::Blake3Blocks`] (the chain files' cluster size and the content
/// digest's chunk size, so a data cluster's block hash is its chunk's content hash).
pub const FILE_BLOCK: u64 = 64 << 10;
const _: () =
    assert!(FILE_BLOCK == crate::chain::HASH_CHUNK && FILE_BLOCK == crate::chain::CLUSTER);

/// The [`FileHash::Blake3Blocks`] checksum (hex) of a file given its block hashes in order.
pub fn blocks_checksum(blocks: &[[u8; 32]]) -> String {
    // One update: the same hash as 32 bytes at a time, with BLAKE3's SIMD across its chunks.
    hex(blake3::hash(blocks.as_flattened()).as_bytes())
}

/// Checksum (`algo`) and length of a file's bytes. Both BLAKE3 formats hash on all cores (the
/// flat one cut along the BLAKE3 tree's own subtree boundaries, which gives exactly the hash
/// of one sequential pass).
pub fn file_checksum(path: &Path, algo: FileHash) -> Result<(String, u64)> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(e, format!("reading {}", path.display())))?
        .len();
    let read = |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| read_range(&f, off, n, feed);
    let hash = match algo {
        FileHash::Blake3 => blake3_tree(len, TREE_LEAF, hash_threads(), &read),
        FileHash::Sha256 => {
            let mut h = HashAlgo::Sha256.hasher();
            read(0, len, &mut |b| h.update(b)).map(|()| h.finalize())
        }
        FileHash::Blake3Blocks => {
            let have = vec![None; len.div_ceil(FILE_BLOCK) as usize];
            let blocks = block_hashes(len, &have, &read)
                .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
            return Ok((blocks_checksum(&blocks), len));
        }
    }
    .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
    Ok((hex(&hash), len))
}

/// Blocks hashed per work item in [`block_hashes`] (4 MiB).
const BLOCK_RUN: u64 = 64;

/// The BLAKE3 hashes of the [`FILE_BLOCK`]s of a file of `len` bytes given by `read`:
/// `have[k]` where it is known (not read), the others read and hashed on all cores.
pub fn block_hashes(
    len: u64,
    have: &[Option<[u8; 32]>],
    read: &ReadRange<'_>,
) -> std::io::Result<Vec<[u8; 32]>> {
    let n = len.div_ceil(FILE_BLOCK) as usize;
    if have.len() != n {
        return Err(std::io::Error::other("block list of the wrong length"));
    }
    // Work items: runs of consecutive blocks still to hash, at most BLOCK_RUN long.
    let mut items: Vec<(usize, usize)> = Vec::new();
    for (k, h) in have.iter().enumerate() {
        if h.is_some() {
            continue;
        }
        match items.last_mut() {
            Some((a, b)) if *a + *b == k && *b < BLOCK_RUN as usize => *b += 1,
            _ => items.push((k, 1)),
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let parts = std::thread::scope(|s| {
        let workers: Vec<_> = (0..hash_threads().min(items.len()))
            .map(|_| {
                s.spawn(|| -> std::io::Result<Vec<(usize, Vec<[u8; 32]>)>> {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(first, count)) = items.get(i) else {
                            return Ok(out);
                        };
                        let off = first as u64 * FILE_BLOCK;
                        let end = ((first + count) as u64 * FILE_BLOCK).min(len);
                        let mut hashes = Vec::with_capacity(count);
                        let mut cur = blake3::Hasher::new();
                        let mut filled = 0u64;
                        read(off, end - off, &mut |mut b| {
                            while !b.is_empty() {
                                let k = ((FILE_BLOCK - filled) as usize).min(b.len());
                                cur.update(&b[..k]);
                                filled += k as u64;
                                b = &b[k..];
                                if filled == FILE_BLOCK {
                                    hashes.push(*cur.finalize().as_bytes());
                                    cur.reset();
                                    filled = 0;
                                }
                            }
                        })?;
                        if filled > 0 {
                            hashes.push(*cur.finalize().as_bytes());
                        }
                        if hashes.len() != count {
                            return Err(std::io::Error::other("a block run read short"));
                        }
                        out.push((first, hashes));
                    }
                })
            })
            .collect::<Vec<_>>();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))
            })
            .collect::<Vec<_>>()
    });
    let mut out: Vec<Option<[u8; 32]>> = have.to_vec();
    for part in parts {
        for (first, hashes) in part? {
            for (k, h) in hashes.into_iter().enumerate() {
                out[first + k] = Some(h);
            }
        }
    }
    out.into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| std::io::Error::other("a block of the file was not hashed"))
}

/// Feed bytes `off..off + n` of `bytes` to `feed` in 1 MiB pieces (a range outside them is an
/// error): a [`ReadRange`] over bytes in memory.
#[cfg(test)]
pub fn read_slice(
    bytes: &[u8],
    off: u64,
    n: u64,
    feed: &mut dyn FnMut(&[u8]),
) -> std::io::Result<()> {
    let piece = usize::try_from(off)
        .ok()
        .zip(off.checked_add(n).and_then(|e| usize::try_from(e).ok()))
        .and_then(|(a, b)| bytes.get(a..b))
        .ok_or_else(|| std::io::Error::other("range outside the bytes"))?;
    for b in piece.chunks(1 << 20) {
        feed(b);
    }
    Ok(())
}

/// Largest piece of a file one thread hashes at a time in [`blake3_tree`].
const TREE_LEAF: u64 = 64 << 20;

/// The piece [`read_range`] reads at a time.
const READ_PIECE: u64 = 128 << 10;

/// Feed bytes `off..off + len` of `f` to `feed` in pieces of [`READ_PIECE`] (a file that
/// ends early is an error). Each thread reads into one buffer it keeps: fresh memory is slow
/// to fault in on some hosts, and a read into a buffer the caches hold costs no more than a
/// mapping's page faults plus its unmapping (2 GiB on 2 threads: pread 0.33-0.35 s wall with
/// 128 KiB pieces, 0.43-0.46 s with 1 MiB; mmap 0.31 s + 0.05-0.13 s munmap; a 1 % push's
/// 10 MB hashed in 2.9-3.9 ms against 4.3-7.3 ms with 1 MiB pieces).
pub(crate) fn read_range(
    f: &std::fs::File,
    off: u64,
    len: u64,
    feed: &mut dyn FnMut(&[u8]),
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| {
        // A `feed` that reads again on this thread gets a buffer of its own.
        let mut own = Vec::new();
        let mut guard = cell.try_borrow_mut();
        let buf = match guard.as_deref_mut() {
            Ok(b) => b,
            Err(_) => &mut own,
        };
        buf.resize(READ_PIECE.min(len.max(1)).max(buf.len() as u64) as usize, 0);
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], at)?;
            feed(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    })
}

/// Reads bytes `off..off + len` of the input, feeding them in order.
pub type ReadRange<'a> = dyn Fn(u64, u64, &mut dyn FnMut(&[u8])) -> std::io::Result<()> + Sync + 'a;

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
            let (sum, n) = file_checksum(&p, FileHash::Blake3).unwrap();
            assert_eq!((sum, n), (hex(&want), len as u64));
            let got = blake3_tree(len as u64, 1 << 20, 2, &|o, n, f: &mut dyn FnMut(&[u8])| {
                read_slice(&data[..len], o, n, f)
            })
            .unwrap();
            assert_eq!(got, want);
        }
        // One flipped byte in any piece changes the checksum (what `verify` relies on).
        let (good, _) = file_checksum(&p, FileHash::Blake3).unwrap();
        for at in [0, 1 << 20, (4 << 20) + 5, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x01;
            std::fs::write(&p, &bad).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let got = tree_of(&f, bad.len() as u64, 1 << 20, 2).unwrap();
            assert_ne!(hex(&got), good, "byte {at}");
        }
        // A file shorter than the length asked for is an error, not a hash of less.
        std::fs::write(&p, &data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert!(tree_of(&f, data.len() as u64 + 1, 1 << 20, 2).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
