//! One hashing pass over a backup's new file: its [`filesum::FileHash::Blake3Blocks`] checksum and the
//! point's content chunk hashes share the hashes of the file's 64 KiB data clusters.
//!
//! A chain file's clusters are 64 KiB ([`chain::CLUSTER`]), the same as the content digest's
//! chunks ([`HASH_CHUNK`]) and the file checksum's blocks ([`FILE_BLOCK`]). A data cluster at
//! host offset `H` (a multiple of 64 KiB) holding guest chunk `i` is therefore file block
//! `H / 64 KiB`, and that block's BLAKE3 is chunk `i`'s content hash. So:
//! - the guest chunks the new file holds as plain data are mapped to their host blocks (the
//!   file's own L2 tables, through [`Qcow2::read_host`]);
//! - pull: the copy hashed the chunks as they arrived (`known`), so those blocks are not read
//!   again: only the file's other blocks (header, L1/L2 tables, refcounts, bitmap directory and
//!   data) are hashed from the file;
//! - push: the data never passed through the tool; the blocks [`crate::follow`] hashed while the
//!   job ran count where the final mapping agrees (`followed`), every other block of the file
//!   is hashed once, on all cores, and the chunks' content hashes are
//!   taken from it;
//! - chunks the file does not hold as plain data (zero clusters, partial, the short last
//!   chunk of a disk) are read through the chain as before.
//!
//! `verify` recomputes the block list from the file alone, so a block recorded from the copy's
//! hash that the file does not hold (damage, or a bad write) shows as a checksum mismatch.

use std::path::{Path, PathBuf};

use qcow2::{AllocKind, Qcow2};

use crate::chain::{self, HashAlgo, HASH_CHUNK};
use crate::error::{Error, Result};
use crate::filesum::{self, FILE_BLOCK};
use crate::follow::Followed;

/// What one pass over a backup's new file yields.
#[derive(Debug)]
pub struct NewFileSums {
    /// The file's [`filesum::FileHash::NEW`] checksum (hex).
    pub checksum: String,
    /// The file's length.
    pub len: u64,
    /// The content hash of every [`HASH_CHUNK`] of the point (its chain's top is the file).
    pub chunks: Vec<[u8; 32]>,
}

/// Hash the new file `path` (the last of `chain_paths`, written by this run, which holds the
/// repository lock) and the point it tops. `prev`: the previous point's chunk hashes (only
/// chunks the new file allocates are rehashed); `known`: content hashes of chunks the copy read
/// whole, by chunk index. The chain below the file is opened only if some chunk has to be read
/// through it.
pub fn hash_new_file(
    path: &Path,
    chain_paths: &[PathBuf],
    prev: Option<Vec<[u8; 32]>>,
    known: Option<&[Option<[u8; 32]>]>,
    followed: Option<&Followed>,
) -> Result<NewFileSums> {
    let algo = HashAlgo::NEW;
    // File blocks are hashed with BLAKE3, so a chunk's content hash can only be taken from its
    // block while the content digest is BLAKE3 too.
    const { assert!(matches!(HashAlgo::NEW, HashAlgo::Blake3)) };
    let own = OwnChunks::of(&*chain::open_image(path, None)?)?;
    let size = own.size;
    let n = size.div_ceil(HASH_CHUNK) as usize;
    let (mut chunks, all) = match prev {
        Some(p) if p.len() == n => (p, false),
        _ => (vec![[0u8; 32]; n], true),
    };
    let known_at = |i: usize| known.and_then(|k| k.get(i).copied().flatten());

    // The file's blocks: those holding a chunk the copy hashed are known, the rest hashed.
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(e, format!("reading {}", path.display())))?
        .len();
    let nb = len.div_ceil(FILE_BLOCK) as usize;
    let mut have: Vec<Option<[u8; 32]>> = vec![None; nb];
    for &(i, c) in &own.chunks {
        if let Own::Block(b) = c {
            // A followed hash counts only for the block the final mapping names.
            let h = known_at(i).or_else(|| followed.and_then(|f| f.at(i, b)));
            if let (Some(h), Some(slot)) = (h, have.get_mut(b)) {
                *slot = Some(h);
            }
        }
    }
    let read =
        |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| filesum::read_range(&f, off, n, feed);
    let blocks = filesum::block_hashes(len, &have, &read)
        .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;

    // The point's chunks: from the file's blocks, the copy, zeros, or read through the chain.
    let zero = |i: usize| {
        let l = (size - i as u64 * HASH_CHUNK).min(HASH_CHUNK) as usize;
        algo.digest(&vec![0u8; l])
    };
    let full_zero = zero(0);
    // A whole chunk of zeros has one hash, computed once (a sparse disk has many).
    let zero_at = |i: usize| {
        if (i as u64 + 1) * HASH_CHUNK <= size {
            full_zero
        } else {
            zero(i)
        }
    };
    let resolve = |i: usize, c: Option<Own>| match c {
        // Not in the file (a first point only): zeros, unless a backing file is below.
        None if chain_paths.len() <= 1 => Some(zero_at(i)),
        None => None,
        Some(Own::Block(b)) => blocks.get(b).copied().or(known_at(i)),
        Some(Own::Zero) => Some(zero_at(i)),
        Some(Own::Other) => known_at(i),
    };
    let mut todo = Vec::new();
    if all {
        let mut own_iter = own.chunks.iter().peekable();
        for (i, slot) in chunks.iter_mut().enumerate() {
            let c = own_iter.next_if(|c| c.0 == i).map(|c| c.1);
            match resolve(i, c) {
                Some(h) => *slot = h,
                None => todo.push(i),
            }
        }
    } else {
        // The chunks the file does not allocate keep the previous point's hashes.
        for &(i, c) in &own.chunks {
            match (resolve(i, Some(c)), chunks.get_mut(i)) {
                (Some(h), Some(slot)) => *slot = h,
                _ => todo.push(i),
            }
        }
    }
    if !todo.is_empty() {
        let top = chain::open_chain(chain_paths)?;
        for (&i, h) in todo.iter().zip(chain::chunk_hashes(&top, algo, &todo)?) {
            chunks[i] = h;
        }
    }
    Ok(NewFileSums {
        checksum: filesum::blocks_checksum(&blocks),
        len,
        chunks,
    })
}

/// What an image's own file holds for one guest chunk it allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Own {
    /// The whole chunk as plain data in this file block (a multiple of [`FILE_BLOCK`]).
    Block(usize),
    /// Zeros (zero clusters) over the whole chunk.
    Zero,
    /// Anything else (compressed, partly allocated, the disk's short last chunk as data):
    /// read through the chain.
    Other,
}

/// The guest chunks an image's own file allocates (what changed since its backing file's
/// point), from its allocation map: one walk over its L2 tables.
struct OwnChunks {
    /// The virtual size.
    size: u64,
    /// (chunk index, what the file holds), ascending, only allocated chunks.
    chunks: Vec<(usize, Own)>,
}

impl OwnChunks {
    /// The allocated chunks of `img`.
    fn of(img: &Qcow2) -> Result<OwnChunks> {
        let size = img.virtual_size();
        let mut chunks: Vec<(usize, Own)> = Vec::new();
        for r in img.allocated_ranges(0, size)? {
            let first = (r.offset / HASH_CHUNK) as usize;
            let last = ((r.end() - 1) / HASH_CHUNK) as usize;
            for i in first..=last {
                let start = i as u64 * HASH_CHUNK;
                let end = (start + HASH_CHUNK).min(size);
                let whole = r.offset <= start && end <= r.end();
                let c = match r.kind {
                    AllocKind::Data { host } if whole && end - start == HASH_CHUNK => {
                        let at = host + (start - r.offset);
                        if at.is_multiple_of(FILE_BLOCK) {
                            Own::Block((at / FILE_BLOCK) as usize)
                        } else {
                            Own::Other
                        }
                    }
                    AllocKind::Zero if whole => Own::Zero,
                    _ => Own::Other,
                };
                match chunks.last_mut() {
                    // A chunk shared by two ranges is not wholly one thing.
                    Some(l) if l.0 == i => l.1 = Own::Other,
                    _ => chunks.push((i, c)),
                }
            }
        }
        Ok(OwnChunks { size, chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Durability, HashAlgo};
    use crate::filesum::{file_checksum, FileHash};

    const C: usize = HASH_CHUNK as usize;
    /// Chunks in 4 MiB (a hashing work item).
    const MAP_RUN: usize = 64;

    /// A scratch folder removed on drop.
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("bb-blocks-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// Write `writes` (guest offset, bytes) into a new chain file `p` of `size` bytes backed by
    /// `backing` (an empty slice: a zero cluster there, over a preallocated host cluster), and
    /// close it.
    fn image(p: &Path, size: u64, backing: Option<&Path>, writes: &[(usize, &[u8])]) {
        let img = chain::create(p, size, backing, Durability::Caller).unwrap();
        for &(at, b) in writes {
            if b.is_empty() {
                // Data first: zeroes over nothing (no backing) would allocate nothing.
                img.write_at(&[5u8; C], at as u64).unwrap();
                img.write_zeroes(at as u64, HASH_CHUNK, false).unwrap();
            } else {
                img.write_at(b, at as u64).unwrap();
            }
        }
        img.flush().unwrap();
        img.close().unwrap();
    }

    /// The block list of a file computed the slow way: each 64 KiB of its bytes.
    fn direct_blocks(p: &Path) -> String {
        let bytes = std::fs::read(p).unwrap();
        let list: Vec<[u8; 32]> = bytes
            .chunks(C)
            .map(|b| *blake3::hash(b).as_bytes())
            .collect();
        filesum::blocks_checksum(&list)
    }

    fn content(b: &[u8]) -> Vec<[u8; 32]> {
        b.chunks(C).map(|x| HashAlgo::Blake3.digest(x)).collect()
    }

    #[test]
    fn one_pass_gives_the_file_checksum_verify_recomputes_and_the_point_hashes() {
        let d = dir("full");
        let p = d.0.join("a.qcow2");
        // 4 MiB + 3 chunks of data, a zero-written chunk, an unwritten chunk, a chunk written
        // in part (one piece, so not read whole by a copy), and a short last chunk.
        let size = (MAP_RUN + 8) * C + 4096;
        let mut want = vec![0u8; size];
        for (i, b) in want.iter_mut().enumerate().take((MAP_RUN + 3) * C) {
            *b = (i % 251) as u8 + 1;
        }
        let part = (MAP_RUN + 6) * C + 100;
        want[part..part + 1000].fill(3);
        want[size - 100..].fill(9);
        image(
            &p,
            size as u64,
            None,
            &[
                (0, &want[..(MAP_RUN + 3) * C]),
                ((MAP_RUN + 4) * C, &[]),
                (part, &want[part..part + 1000]),
                (size - 4096, &want[size - 4096..]),
            ],
        );
        let paths = vec![p.clone()];
        let (sum, len) = file_checksum(&p, FileHash::Blake3Blocks).unwrap();
        assert_eq!(sum, direct_blocks(&p));
        assert_eq!(len, std::fs::metadata(&p).unwrap().len());
        // Push: nothing known.
        let s = hash_new_file(&p, &paths, None, None, None).unwrap();
        assert_eq!((s.checksum.as_str(), s.len), (sum.as_str(), len));
        assert_eq!(s.chunks, content(&want));
        // Pull: every chunk known from the copy gives the same.
        let known: Vec<Option<[u8; 32]>> = content(&want).into_iter().map(Some).collect();
        let s = hash_new_file(&p, &paths, None, Some(&known), None).unwrap();
        assert_eq!((s.checksum.as_str(), s.len), (sum.as_str(), len));
        assert_eq!(s.chunks, content(&want));
        // The data chunks' blocks were really taken from the copy's hashes (not read): a
        // wrong known hash of a data chunk changes the checksum, so verify would catch it.
        let top = chain::open_chain(&paths).unwrap();
        let own = OwnChunks::of(&top).unwrap();
        let at = |i: usize| own.chunks.iter().find(|c| c.0 == i).map(|c| c.1);
        assert!((0..MAP_RUN + 3).all(|i| matches!(at(i), Some(Own::Block(_)))));
        assert_eq!(at(MAP_RUN + 4), Some(Own::Zero), "zero cluster");
        assert_eq!(at(MAP_RUN + 5), None, "unallocated");
        assert_eq!(at(MAP_RUN + 8), Some(Own::Other), "short last chunk");
        for i in [0, MAP_RUN + 1] {
            let mut wrong = known.clone();
            wrong[i] = Some([7u8; 32]);
            let s = hash_new_file(&p, &paths, None, Some(&wrong), None).unwrap();
            assert_ne!(s.checksum, sum, "chunk {i}");
        }
    }

    #[test]
    fn an_incremental_rehashes_only_its_own_chunks_and_a_flipped_byte_anywhere_shows() {
        let d = dir("inc");
        let base = d.0.join("base.qcow2");
        let top = d.0.join("top.qcow2");
        let size = 16 * C;
        let mut want: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
        image(&base, size as u64, None, &[(0, &want)]);
        let base_hashes = content(&want);
        want[3 * C..4 * C].fill(0x42);
        want[9 * C + 10..9 * C + 20].fill(0x43);
        want[12 * C..13 * C].fill(0);
        image(
            &top,
            size as u64,
            Some(&base),
            &[
                (3 * C, &want[3 * C..4 * C]),
                (9 * C + 10, &want[9 * C + 10..9 * C + 20]),
                (12 * C, &[]),
            ],
        );
        let paths = vec![base.clone(), top.clone()];
        // Zeros over the backing's data: a zero cluster, hashed without a read.
        let own = OwnChunks::of(&chain::open_image(&top, None).unwrap()).unwrap();
        let kinds: Vec<(usize, bool)> = own
            .chunks
            .iter()
            .map(|&(i, c)| (i, matches!(c, Own::Block(_))))
            .collect();
        assert_eq!(kinds, vec![(3, true), (9, true), (12, false)]);
        assert_eq!(own.chunks[2].1, Own::Zero);
        // A wrong previous hash of an untouched chunk stays (only touched chunks rehashed).
        let mut prev = base_hashes.clone();
        prev[0] = [1u8; 32];
        let s = hash_new_file(&top, &paths, Some(prev), None, None).unwrap();
        let mut expect = content(&want);
        expect[0] = [1u8; 32];
        assert_eq!(s.chunks, expect);
        let s = hash_new_file(&top, &paths, Some(base_hashes), None, None).unwrap();
        assert_eq!(s.chunks, content(&want));
        let (sum, len) = file_checksum(&top, FileHash::Blake3Blocks).unwrap();
        assert_eq!((s.checksum.as_str(), s.len), (sum.as_str(), len));
        assert_eq!(sum, direct_blocks(&top));
        // Flip one byte in the header, the L1 table, an L2 table, a data cluster and the
        // last byte: each changes the checksum verify recomputes.
        let bytes = std::fs::read(&top).unwrap();
        let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let l1 = be64(40);
        let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
        let data = be64(l2 + 3 * 8) & 0x00ff_ffff_ffff_fe00;
        assert!(l1 > 0 && l2 > 0 && data > 0, "{l1} {l2} {data}");
        for at in [5, l1 + 1, l2 + 3 * 8 + 7, data + 1234, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            std::fs::write(&top, &bad).unwrap();
            let (got, n) = file_checksum(&top, FileHash::Blake3Blocks).unwrap();
            assert_eq!(n, len);
            assert_ne!(got, sum, "byte {at}");
        }
        std::fs::write(&top, &bytes).unwrap();
        assert_eq!(file_checksum(&top, FileHash::Blake3Blocks).unwrap().0, sum);
    }

    #[test]
    fn block_lists_of_odd_lengths_and_partly_known_blocks() {
        let data: Vec<u8> = (0..5 * C + 777).map(|i| (i * 7 % 256) as u8).collect();
        let read = |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| {
            filesum::read_slice(&data, off, n, feed)
        };
        for len in [0, 1, C - 1, C, C + 1, 5 * C, data.len()] {
            let want: Vec<[u8; 32]> = data[..len]
                .chunks(C)
                .map(|b| *blake3::hash(b).as_bytes())
                .collect();
            let n = len.div_ceil(C);
            let got = filesum::block_hashes(len as u64, &vec![None; n], &read).unwrap();
            assert_eq!(got, want, "len {len}");
            let have: Vec<_> = want
                .iter()
                .enumerate()
                .map(|(k, h)| (k % 2 == 0).then_some(*h))
                .collect();
            assert_eq!(
                filesum::block_hashes(len as u64, &have, &read).unwrap(),
                want
            );
        }
        // A list of the wrong length, or a file shorter than its length, is an error.
        assert!(filesum::block_hashes(C as u64, &[], &read).is_err());
        assert!(
            filesum::block_hashes(data.len() as u64 + C as u64, &vec![None; 7], &read).is_err()
        );
    }
}
