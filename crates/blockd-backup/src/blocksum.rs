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
//! - push: the data never passed through the tool; every block of the file is hashed once, on
//!   all cores, from a read-only mapping, and the chunks' content hashes are taken from it;
//! - chunks the file does not hold as plain data (zero clusters, partial, the short last
//!   chunk of a disk) are read through the chain as before.
//!
//! `verify` recomputes the block list from the file alone, so a block recorded from the copy's
//! hash that the file does not hold (damage, or a bad write) shows as a checksum mismatch.

use std::path::{Path, PathBuf};

use qcow2::Qcow2;

use crate::chain::{self, HashAlgo, HASH_CHUNK};
use crate::error::{Error, Kind, Result};
use crate::filesum::{self, Mapped, FILE_BLOCK};

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
/// whole, by chunk index.
pub fn hash_new_file(
    path: &Path,
    chain_paths: &[PathBuf],
    prev: Option<Vec<[u8; 32]>>,
    known: Option<&[Option<[u8; 32]>]>,
) -> Result<NewFileSums> {
    let algo = HashAlgo::NEW;
    // File blocks are hashed with BLAKE3, so a chunk's content hash can only be taken from its
    // block while the content digest is BLAKE3 too.
    const { assert!(matches!(HashAlgo::NEW, HashAlgo::Blake3)) };
    let top = chain::open_chain(chain_paths)?;
    let size = top.virtual_size();
    let n = size.div_ceil(HASH_CHUNK) as usize;
    let (mut chunks, touched) = match prev {
        Some(p) if p.len() == n => (p, chain::touched_chunks(&top, n)?),
        _ => (vec![[0u8; 32]; n], vec![true; n]),
    };
    let host = host_blocks(&top, &touched)?;
    let known_at = |i: usize| known.and_then(|k| k.get(i).copied().flatten());

    // The file's blocks: those holding a chunk the copy hashed are known, the rest hashed.
    let map = Mapped::file(path)?;
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let len = match &map {
        Some(m) => m.bytes().len() as u64,
        None => f
            .metadata()
            .map_err(|e| Error::io(e, format!("reading {}", path.display())))?
            .len(),
    };
    let nb = len.div_ceil(FILE_BLOCK) as usize;
    let mut have: Vec<Option<[u8; 32]>> = vec![None; nb];
    for (i, b) in host.iter().enumerate() {
        if let (Some(b), Some(h)) = (*b, known_at(i)) {
            if let Some(slot) = have.get_mut(b) {
                *slot = Some(h);
            }
        }
    }
    let blocks = match &map {
        Some(m) => {
            // The pages fault in as BLAKE3 reads them (the kernel maps a fault's neighbours with
            // it). Populating each run first (MADV_POPULATE_READ) measured slower: it takes
            // every page one by one, marking each accessed under the LRU lock both threads
            // contend for (~0.1 CPU s and ~0.2 s wall more per 2 GiB on /dev/shm).
            let read = |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| {
                filesum::read_mapped(m.bytes(), off, n, feed)
            };
            filesum::block_hashes(len, &have, &read)
        }
        None => {
            let read = |off: u64, n: u64, feed: &mut dyn FnMut(&[u8])| {
                filesum::read_range(&f, off, n, feed)
            };
            filesum::block_hashes(len, &have, &read)
        }
    }
    .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;

    // The point's chunks: from the file's blocks, the copy, or read through the chain.
    let mut todo = Vec::new();
    for i in (0..n).filter(|&i| touched[i]) {
        match host[i].and_then(|b| blocks.get(b)).copied().or(known_at(i)) {
            Some(h) => chunks[i] = h,
            None => todo.push(i),
        }
    }
    for (&i, h) in todo.iter().zip(chain::chunk_hashes(&top, algo, &todo)?) {
        chunks[i] = h;
    }
    Ok(NewFileSums {
        checksum: filesum::blocks_checksum(&blocks),
        len,
        chunks,
    })
}

/// Chunks looked up in one [`Qcow2::read_host`] call by [`host_blocks`] (4 MiB).
const MAP_RUN: usize = 64;

/// For each of the `touched` guest chunks of `img` that `img`'s own file holds as plain data
/// in one piece at a multiple of [`FILE_BLOCK`], the index of that file block. The disk's short
/// last chunk is never mapped (its block holds more than the chunk).
fn host_blocks(img: &Qcow2, touched: &[bool]) -> Result<Vec<Option<usize>>> {
    let size = img.virtual_size();
    let whole = (size / HASH_CHUNK) as usize;
    let mut out = vec![None; touched.len()];
    let mut i = 0;
    while i < whole {
        if !touched[i] {
            i += 1;
            continue;
        }
        let run = touched[i..whole]
            .iter()
            .take(MAP_RUN)
            .take_while(|&&t| t)
            .count();
        if !map_run(img, i, run, &mut out)? && run > 1 {
            // Some chunk of the run is not plain data: look them up one by one.
            for k in i..i + run {
                map_run(img, k, 1, &mut out)?;
            }
        }
        i += run;
    }
    Ok(out)
}

/// Map the `run` chunks from `first` (see [`host_blocks`]); `false`: not all plain data.
fn map_run(img: &Qcow2, first: usize, run: usize, out: &mut [Option<usize>]) -> Result<bool> {
    let start = first as u64 * HASH_CHUNK;
    let mut guest = start;
    let mut found: Vec<(usize, usize)> = Vec::new();
    let mut feed = |_: &std::fs::File, h: u64, n: u64| -> std::io::Result<()> {
        // A piece covers guest [guest, guest + n) at host [h, h + n): every chunk wholly in it
        // at a block-aligned host offset is that block.
        let end = guest + n;
        let mut c = guest.div_ceil(HASH_CHUNK) * HASH_CHUNK;
        while c + HASH_CHUNK <= end {
            let at = h + (c - guest);
            if at.is_multiple_of(FILE_BLOCK) {
                found.push(((c / HASH_CHUNK) as usize, (at / FILE_BLOCK) as usize));
            }
            c += HASH_CHUNK;
        }
        guest = end;
        Ok(())
    };
    if !img.read_host(start, run as u64 * HASH_CHUNK, &mut feed)? {
        return Ok(false);
    }
    if guest != start + run as u64 * HASH_CHUNK {
        return Err(Error::new(Kind::Io, "the image mapped a range short"));
    }
    for (c, b) in found {
        if let Some(slot) = out.get_mut(c) {
            *slot = Some(b);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Durability, HashAlgo};
    use crate::filesum::{file_checksum, FileHash};

    const C: usize = HASH_CHUNK as usize;

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
    /// `backing` (an empty slice: a zero cluster there), and close it.
    fn image(p: &Path, size: u64, backing: Option<&Path>, writes: &[(usize, &[u8])]) {
        let img = chain::create(p, size, backing, Durability::Caller).unwrap();
        for &(at, b) in writes {
            if b.is_empty() {
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
        let s = hash_new_file(&p, &paths, None, None).unwrap();
        assert_eq!((s.checksum.as_str(), s.len), (sum.as_str(), len));
        assert_eq!(s.chunks, content(&want));
        // Pull: every chunk known from the copy gives the same.
        let known: Vec<Option<[u8; 32]>> = content(&want).into_iter().map(Some).collect();
        let s = hash_new_file(&p, &paths, None, Some(&known)).unwrap();
        assert_eq!((s.checksum.as_str(), s.len), (sum.as_str(), len));
        assert_eq!(s.chunks, content(&want));
        // The data chunks' blocks were really taken from the copy's hashes (not read): a
        // wrong known hash of a data chunk changes the checksum, so verify would catch it.
        let top = chain::open_chain(&paths).unwrap();
        let host = host_blocks(&top, &vec![true; known.len()]).unwrap();
        assert!(host[..MAP_RUN + 3].iter().all(Option::is_some));
        assert_eq!(host[MAP_RUN + 4], None, "zero cluster");
        assert_eq!(host[MAP_RUN + 5], None, "unallocated");
        assert_eq!(*host.last().unwrap(), None, "short last chunk");
        for i in [0, MAP_RUN + 1] {
            let mut wrong = known.clone();
            wrong[i] = Some([7u8; 32]);
            let s = hash_new_file(&p, &paths, None, Some(&wrong)).unwrap();
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
        image(
            &top,
            size as u64,
            Some(&base),
            &[
                (3 * C, &want[3 * C..4 * C]),
                (9 * C + 10, &want[9 * C + 10..9 * C + 20]),
            ],
        );
        let paths = vec![base.clone(), top.clone()];
        // A wrong previous hash of an untouched chunk stays (only touched chunks rehashed).
        let mut prev = base_hashes.clone();
        prev[0] = [1u8; 32];
        let s = hash_new_file(&top, &paths, Some(prev), None).unwrap();
        let mut expect = content(&want);
        expect[0] = [1u8; 32];
        assert_eq!(s.chunks, expect);
        let s = hash_new_file(&top, &paths, Some(base_hashes), None).unwrap();
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
            filesum::read_mapped(&data, off, n, feed)
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
