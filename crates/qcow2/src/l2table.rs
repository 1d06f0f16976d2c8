//! Compact in-memory form of a cached L2 table (or slice of one).
//!
//! An L2 entry of a standard cluster is a host cluster index plus two flags (COPIED, ZERO), so
//! it usually fits 32 bits: "narrow" entries keep the index in bits 0..=29 with COPIED in bit 31
//! and ZERO in bit 30. Any entry that does not fit exactly (compressed, reserved bits set, an
//! unaligned offset, a host cluster index of 2^30 or more) makes the table "wide": raw u64
//! entries. Independently a table is either dense (one value per entry) or sparse (the sorted
//! indexes of its non-zero entries, u16, beside their values). Of the four shapes the table takes
//! whichever is smallest, so it never holds more bytes than its on-disk size (8 per entry):
//!
//! | shape         | bytes           |
//! |---------------|-----------------|
//! | sparse narrow | 6 per non-zero  |
//! | sparse wide   | 10 per non-zero |
//! | dense narrow  | 4 per entry     |
//! | dense wide    | 8 per entry     |
//!
//! Vectors are kept at exact capacity (no growth slack), so these counts are the heap bytes.
//! Every entry reads back exactly as it was set or loaded, so write-back writes the exact
//! on-disk bytes.

use crate::mapping::{COPIED, OFFSET_MASK, ZERO};
use crate::ondisk::{be64_at, put_be64_at};

/// Narrow entry bit: COPIED.
const N_COPIED: u32 = 1 << 31;
/// Narrow entry bit: ZERO.
const N_ZERO: u32 = 1 << 30;
/// Narrow entry bits: host cluster index.
const N_INDEX: u32 = N_ZERO - 1;
/// Largest table kept sparsely (its indexes must fit u16).
const MAX_SPARSE_ENTRIES: usize = 1 << 16;

/// The values of a table: narrow or wide.
#[derive(Debug, Clone)]
enum Vals {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl Vals {
    fn len(&self) -> usize {
        match self {
            Vals::Narrow(v) => v.len(),
            Vals::Wide(v) => v.len(),
        }
    }

    fn entry_bytes(&self) -> usize {
        match self {
            Vals::Narrow(_) => 4,
            Vals::Wide(_) => 8,
        }
    }
}

/// A cached L2 table or slice of `n` u64 entries.
#[derive(Debug, Clone)]
pub struct L2Table {
    /// Number of entries.
    n: usize,
    /// Cluster bits of the image (to expand narrow entries).
    cluster_bits: u32,
    /// Sparse: sorted indexes of the non-zero entries (`vals` holds their values in the same
    /// order). Dense (`None`): `vals` holds all `n` entries.
    idx: Option<Vec<u16>>,
    /// The values.
    vals: Vals,
}

/// The narrow form of raw entry `raw`, if it has one.
fn narrow(raw: u64, cluster_bits: u32) -> Option<u32> {
    if raw & !(COPIED | OFFSET_MASK | ZERO) != 0 {
        return None;
    }
    let off = raw & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return None;
    }
    let c = off >> cluster_bits;
    if c > N_INDEX as u64 {
        return None;
    }
    let mut n = c as u32;
    if raw & COPIED != 0 {
        n |= N_COPIED;
    }
    if raw & ZERO != 0 {
        n |= N_ZERO;
    }
    Some(n)
}

/// The raw entry of narrow entry `n`.
fn widen(n: u32, cluster_bits: u32) -> u64 {
    let mut raw = ((n & N_INDEX) as u64) << cluster_bits;
    if n & N_COPIED != 0 {
        raw |= COPIED;
    }
    if n & N_ZERO != 0 {
        raw |= ZERO;
    }
    raw
}

/// Insert `v` at `k` growing the vector by exactly one element.
fn insert_exact<T>(v: &mut Vec<T>, k: usize, x: T) {
    v.reserve_exact(1);
    v.insert(k, x);
}

/// Remove element `k`, giving back the freed capacity.
fn remove_exact<T>(v: &mut Vec<T>, k: usize) {
    v.remove(k);
    v.shrink_to_fit();
}

impl L2Table {
    /// The table of the big-endian u64 entries in `data`, in its smallest shape.
    pub fn from_bytes(data: &[u8], cluster_bits: u32) -> L2Table {
        let n = data.len() / 8;
        let mut nonzero = 0usize;
        let mut all_narrow = true;
        for i in 0..n {
            let raw = be64_at(data, i);
            if raw != 0 {
                nonzero += 1;
                all_narrow &= narrow(raw, cluster_bits).is_some();
            }
        }
        let per = if all_narrow { 4 } else { 8 };
        let sparse = n <= MAX_SPARSE_ENTRIES && nonzero * (per + 2) < n * per;
        let raws = (0..n).map(|i| (i, be64_at(data, i)));
        let (idx, vals) = match (sparse, all_narrow) {
            (true, narrow_vals) => {
                let mut idx = Vec::with_capacity(nonzero);
                let mut nv = Vec::new();
                let mut wv = Vec::new();
                if narrow_vals {
                    nv.reserve_exact(nonzero);
                } else {
                    wv.reserve_exact(nonzero);
                }
                for (i, raw) in raws.filter(|&(_, r)| r != 0) {
                    idx.push(i as u16);
                    match narrow(raw, cluster_bits).filter(|_| narrow_vals) {
                        Some(x) => nv.push(x),
                        None => wv.push(raw),
                    }
                }
                let vals = if narrow_vals {
                    Vals::Narrow(nv)
                } else {
                    Vals::Wide(wv)
                };
                (Some(idx), vals)
            }
            (false, true) => (
                None,
                Vals::Narrow(
                    raws.map(|(_, r)| narrow(r, cluster_bits).unwrap_or(0))
                        .collect(),
                ),
            ),
            (false, false) => (None, Vals::Wide(raws.map(|(_, r)| r).collect())),
        };
        L2Table {
            n,
            cluster_bits,
            idx,
            vals,
        }
    }

    /// An all-zero table of `n` entries.
    #[cfg(test)]
    pub fn zeroed(n: usize, cluster_bits: u32) -> L2Table {
        L2Table::from_bytes(&vec![0u8; n * 8], cluster_bits)
    }

    /// Number of entries.
    pub fn entries(&self) -> usize {
        self.n
    }

    /// The value at position `k` of `vals`.
    fn val(&self, k: usize) -> u64 {
        match &self.vals {
            Vals::Narrow(v) => widen(v[k], self.cluster_bits),
            Vals::Wide(v) => v[k],
        }
    }

    /// Raw entry `i` (0 beyond the table).
    pub fn get(&self, i: usize) -> u64 {
        if i >= self.n {
            return 0;
        }
        match &self.idx {
            None => self.val(i),
            Some(idx) => idx.binary_search(&(i as u16)).map_or(0, |k| self.val(k)),
        }
    }

    /// Make the values wide (a value that has no narrow form is about to be stored).
    fn make_wide(&mut self) {
        if let Vals::Narrow(v) = &self.vals {
            let mut w = Vec::new();
            w.reserve_exact(v.len());
            w.extend(v.iter().map(|&x| widen(x, self.cluster_bits)));
            self.vals = Vals::Wide(w);
        }
    }

    /// Make the table dense.
    fn make_dense(&mut self) {
        let Some(idx) = self.idx.take() else { return };
        self.vals = match &self.vals {
            Vals::Narrow(v) => {
                let mut d = vec![0u32; self.n];
                for (&i, &x) in idx.iter().zip(v) {
                    d[i as usize] = x;
                }
                Vals::Narrow(d)
            }
            Vals::Wide(v) => {
                let mut d = vec![0u64; self.n];
                for (&i, &x) in idx.iter().zip(v) {
                    d[i as usize] = x;
                }
                Vals::Wide(d)
            }
        };
    }

    /// Set raw entry `i` (ignored beyond the table).
    pub fn set(&mut self, i: usize, raw: u64) {
        if i >= self.n {
            return;
        }
        let nv = narrow(raw, self.cluster_bits);
        if nv.is_none() {
            self.make_wide();
        }
        match &mut self.idx {
            None => match &mut self.vals {
                Vals::Narrow(v) => v[i] = nv.unwrap_or(0),
                Vals::Wide(v) => v[i] = raw,
            },
            Some(idx) => {
                let at = idx.binary_search(&(i as u16));
                match (at, raw) {
                    (Err(_), 0) => {}
                    (Ok(k), 0) => {
                        remove_exact(idx, k);
                        match &mut self.vals {
                            Vals::Narrow(v) => remove_exact(v, k),
                            Vals::Wide(v) => remove_exact(v, k),
                        }
                    }
                    (Ok(k), _) => match &mut self.vals {
                        Vals::Narrow(v) => v[k] = nv.unwrap_or(0),
                        Vals::Wide(v) => v[k] = raw,
                    },
                    (Err(k), _) => {
                        insert_exact(idx, k, i as u16);
                        match &mut self.vals {
                            Vals::Narrow(v) => insert_exact(v, k, nv.unwrap_or(0)),
                            Vals::Wide(v) => insert_exact(v, k, raw),
                        }
                    }
                }
                let per = self.vals.entry_bytes();
                if self.vals.len() * (per + 2) >= self.n * per {
                    self.make_dense();
                }
            }
        }
    }

    /// The big-endian bytes of entries `[first, end)`.
    pub fn bytes_of(&self, first: usize, end: usize) -> Vec<u8> {
        let end = end.min(self.n);
        let first = first.min(end);
        let mut out = vec![0u8; (end - first) * 8];
        match &self.idx {
            None => {
                for i in first..end {
                    put_be64_at(&mut out, i - first, self.val(i));
                }
            }
            Some(idx) => {
                let from = idx.partition_point(|&x| (x as usize) < first);
                for (k, &i) in idx.iter().enumerate().skip(from) {
                    if i as usize >= end {
                        break;
                    }
                    put_be64_at(&mut out, i as usize - first, self.val(k));
                }
            }
        }
        out
    }

    /// Heap bytes the table holds.
    pub fn heap_bytes(&self) -> usize {
        let idx = self.idx.as_ref().map_or(0, |v| v.capacity() * 2);
        let vals = match &self.vals {
            Vals::Narrow(v) => v.capacity() * 4,
            Vals::Wide(v) => v.capacity() * 8,
        };
        idx + vals
    }

    /// The shape, for tests: (sparse, narrow).
    #[cfg(test)]
    pub fn shape(&self) -> (bool, bool) {
        (self.idx.is_some(), matches!(self.vals, Vals::Narrow(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::COMPRESSED;

    const CB: u32 = 16;

    fn bytes(entries: &[(usize, u64)], n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n * 8];
        for &(i, v) in entries {
            put_be64_at(&mut d, i, v);
        }
        d
    }

    #[test]
    fn memory_per_table_shape_for_512_entries() {
        // A 64 KiB-cluster table has 8192 entries; 512 of them mapped (1/16, the 64 GiB-on-1 TiB
        // shape). On disk the table is 64 KiB.
        let n = 8192;
        let mapped: Vec<(usize, u64)> = (0..512)
            .map(|k| (k * 16, COPIED | ((1000 + k as u64) << CB)))
            .collect();
        let t = L2Table::from_bytes(&bytes(&mapped, n), CB);
        assert_eq!(t.shape(), (true, true));
        assert_eq!(t.heap_bytes(), 512 * 6, "sparse narrow");
        // Built up entry by entry: the same bytes (exact capacity).
        let mut b = L2Table::zeroed(n, CB);
        assert_eq!(b.heap_bytes(), 0);
        for &(i, v) in &mapped {
            b.set(i, v);
        }
        assert_eq!(b.heap_bytes(), 512 * 6);
        assert_eq!(b.bytes_of(0, n), bytes(&mapped, n));
        // One compressed entry: sparse wide.
        b.set(1, COMPRESSED | 0x12345);
        assert_eq!(b.shape(), (true, false));
        assert_eq!(b.heap_bytes(), 513 * 10);
        // Full tables: dense narrow 4 bytes per entry, dense wide 8.
        let full: Vec<(usize, u64)> = (0..n).map(|i| (i, (i as u64 + 1) << CB)).collect();
        let d = L2Table::from_bytes(&bytes(&full, n), CB);
        assert_eq!((d.shape(), d.heap_bytes()), ((false, true), n * 4));
        let mut w = d.clone();
        w.set(5, COMPRESSED | 7);
        assert_eq!((w.shape(), w.heap_bytes()), ((false, false), n * 8));
    }

    #[test]
    fn every_kind_of_entry_round_trips_exactly() {
        let n = 512;
        let odd = [
            (0, ZERO),                             // zero, no preallocation
            (1, ZERO | COPIED | (7 << CB)),        // zero, preallocated
            (2, COPIED),                           // flag only
            (3, COMPRESSED | (3 << 54) | 0x12345), // compressed
            (4, (9 << CB) | 0x200),                // unaligned (corrupt): kept as is
            (5, (1 << 55) | COPIED),               // host cluster beyond 2^30
            (6, 1 << 60),                          // reserved bit
            (7, COPIED | (5 << CB)),               // plain data
        ];
        let t = L2Table::from_bytes(&bytes(&odd, n), CB);
        for &(i, v) in &odd {
            assert_eq!(t.get(i), v, "entry {i}");
        }
        assert_eq!(t.bytes_of(0, n), bytes(&odd, n));
        assert_eq!(t.bytes_of(2, 6), bytes(&odd, n)[16..48].to_vec());
        // Set one by one into a narrow table: it widens when needed, nothing changes.
        let mut b = L2Table::zeroed(n, CB);
        for &(i, v) in &odd {
            b.set(i, v);
        }
        assert_eq!(b.bytes_of(0, n), bytes(&odd, n));
        // Clearing entries gives memory back.
        for &(i, _) in &odd {
            b.set(i, 0);
        }
        assert_eq!((b.heap_bytes(), b.get(3)), (0, 0));
    }

    #[test]
    fn a_filling_table_turns_dense_when_that_is_smaller_and_stays_exact() {
        let n = 512;
        let mut t = L2Table::zeroed(n, CB);
        let mut want = Vec::new();
        for i in 0..n {
            let v = COPIED | ((i as u64 * 3 + 1) << CB);
            t.set(i, v);
            want.push((i, v));
            assert!(t.heap_bytes() <= n * 4, "never above dense narrow");
        }
        assert_eq!(t.shape(), (false, true));
        assert_eq!(t.bytes_of(0, n), bytes(&want, n));
        assert_eq!(t.get(n), 0, "beyond the table");
    }
}
