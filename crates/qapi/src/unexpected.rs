//! Which stray member QEMU names first when an object has several.
//!
//! QEMU reports only one "Parameter 'x' is unexpected". It is the first key left in a GLib
//! hash table (`GHashTable`, string keys) after the visitor removed every member it read;
//! the table was filled from the input `QDict`, itself a 512-bucket hash table. So the
//! choice depends on both hash layouts, not on the input order. This module replays both
//! (GLib 2.74's open addressing with quadratic probing, 11x multiplicative spreading, prime
//! moduli and its grow/shrink rules; QDict's bucket hash with newest-first buckets) so that
//! blockd names the same member as qemu-storage-daemon.

/// Number of QDict buckets.
const QDICT_BUCKETS: u32 = 512;

/// QDict's bucket hash of a key.
fn qdict_hash(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The order in which QEMU iterates a QDict built by inserting `keys` in order.
fn qdict_order<'a>(keys: &[&'a str]) -> Vec<&'a str> {
    let mut buckets: Vec<Vec<&str>> = vec![Vec::new(); QDICT_BUCKETS as usize];
    for k in keys {
        let b = &mut buckets[(qdict_hash(k) % QDICT_BUCKETS) as usize];
        if !b.contains(k) {
            b.insert(0, k);
        }
    }
    buckets.into_iter().flatten().collect()
}

/// GLib's `g_str_hash` (djb2 over signed chars).
fn g_str_hash(key: &str) -> u32 {
    key.bytes().fold(5381u32, |h, b| {
        (h << 5).wrapping_add(h).wrapping_add(b as i8 as i32 as u32)
    })
}

const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;
const MIN_SHIFT: u32 = 3;
const PRIME_MOD: [u32; 17] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
];

/// A string-keyed GHashTable reduced to what decides iteration order.
struct GHash<'a> {
    hashes: Vec<u32>,
    keys: Vec<Option<&'a str>>,
    modulus: u32,
    mask: u32,
    nnodes: usize,
    noccupied: usize,
}

impl<'a> GHash<'a> {
    fn new() -> Self {
        let mut h = GHash {
            hashes: Vec::new(),
            keys: Vec::new(),
            modulus: 0,
            mask: 0,
            nnodes: 0,
            noccupied: 0,
        };
        h.set_shift(MIN_SHIFT);
        h.hashes = vec![UNUSED; h.size()];
        h.keys = vec![None; h.size()];
        h
    }

    fn size(&self) -> usize {
        self.mask as usize + 1
    }

    fn set_shift(&mut self, shift: u32) {
        let shift = shift.min(PRIME_MOD.len() as u32 - 1);
        self.modulus = PRIME_MOD[shift as usize];
        self.mask = (1u32 << shift) - 1;
    }

    fn index(&self, hash: u32) -> u32 {
        hash.wrapping_mul(11) % self.modulus
    }

    fn real_hash(key: &str) -> u32 {
        let h = g_str_hash(key);
        if h < 2 {
            2
        } else {
            h
        }
    }

    /// The slot holding `key`, or where it would go.
    fn lookup(&self, key: &str, hash: u32) -> usize {
        let mut i = self.index(hash);
        let mut step = 0;
        let mut tombstone = None;
        loop {
            let h = self.hashes[i as usize];
            if h == UNUSED {
                return tombstone.unwrap_or(i as usize);
            }
            if h == hash && self.keys[i as usize] == Some(key) {
                return i as usize;
            }
            if h == TOMBSTONE && tombstone.is_none() {
                tombstone = Some(i as usize);
            }
            step += 1;
            i = (i + step) & self.mask;
        }
    }

    fn insert(&mut self, key: &'a str) {
        let hash = Self::real_hash(key);
        let i = self.lookup(key, hash);
        let old = self.hashes[i];
        if old >= 2 {
            return;
        }
        self.hashes[i] = hash;
        self.keys[i] = Some(key);
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    fn remove(&mut self, key: &str) {
        let hash = Self::real_hash(key);
        let i = self.lookup(key, hash);
        if self.hashes[i] < 2 {
            return;
        }
        self.hashes[i] = TOMBSTONE;
        self.keys[i] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    fn maybe_resize(&mut self) {
        let size = self.size();
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
            || size <= self.noccupied + self.noccupied / 16
        {
            self.resize();
        }
    }

    /// GLib's in-place rehash: every entry is moved to its new home, evicting whatever sits
    /// there, which is then placed in turn.
    fn resize(&mut self) {
        let old_size = self.size();
        let target = (self.nnodes as f64 * 1.333) as u32;
        let shift = (32 - target.leading_zeros()).max(MIN_SHIFT);
        self.set_shift(shift);
        let new_size = self.size();
        if new_size > old_size {
            self.hashes.resize(new_size, UNUSED);
            self.keys.resize(new_size, None);
        }
        let mut placed = vec![false; new_size.max(old_size)];
        for i in 0..old_size {
            let mut node_hash = self.hashes[i];
            if node_hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if placed[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            loop {
                let mut j = self.index(node_hash);
                let mut step = 0;
                while placed[j as usize] {
                    step += 1;
                    j = (j + step) & self.mask;
                }
                let j = j as usize;
                placed[j] = true;
                let replaced = self.hashes[j];
                self.hashes[j] = node_hash;
                let evicted = std::mem::replace(&mut self.keys[j], key);
                if replaced < 2 {
                    break;
                }
                node_hash = replaced;
                key = evicted;
            }
        }
        if new_size < old_size {
            self.hashes.truncate(new_size);
            self.keys.truncate(new_size);
        }
        self.noccupied = self.nnodes;
    }

    fn first(&self) -> Option<&'a str> {
        self.hashes
            .iter()
            .zip(&self.keys)
            .find(|(h, _)| **h >= 2)
            .and_then(|(_, k)| *k)
    }
}

/// The stray member QEMU reports: `input` are the object's keys in input order, `consumed`
/// the members the visitor read, in the order it read them.
pub(crate) fn first_unexpected<'a>(input: &[&'a str], consumed: &[&str]) -> Option<&'a str> {
    let mut table = GHash::new();
    for k in qdict_order(input) {
        table.insert(k);
    }
    for k in consumed {
        table.remove(k);
    }
    table.first()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_stray_member_is_reported() {
        assert_eq!(
            first_unexpected(&["node", "name", "x"], &["node", "name"]),
            Some("x")
        );
    }

    #[test]
    fn choice_does_not_depend_on_input_order() {
        // Recorded from qemu-storage-daemon 10.0.2 with block-dirty-bitmap-add.
        let consumed = ["node", "name"];
        assert_eq!(
            first_unexpected(&["node", "name", "b", "a"], &consumed),
            Some("b")
        );
        assert_eq!(
            first_unexpected(&["node", "name", "a", "b"], &consumed),
            Some("b")
        );
        assert_eq!(
            first_unexpected(&["node", "name", "zz", "yy", "xx"], &consumed),
            Some("yy")
        );
        assert_eq!(
            first_unexpected(&["node", "name", "xx", "yy", "zz"], &consumed),
            Some("yy")
        );
        let many = [
            "node", "name", "aaa", "b", "cc", "d", "eeee", "f", "g", "h", "i",
        ];
        assert_eq!(first_unexpected(&many, &consumed), Some("b"));
    }

    #[test]
    fn nothing_left_means_nothing_unexpected() {
        assert_eq!(first_unexpected(&["a"], &["a"]), None);
    }
}
