//! A small LRU cache of cluster-sized metadata tables (L2 tables, refcount blocks).
//!
//! Tables are kept as their on-disk bytes, keyed by host offset. Each slot remembers which byte
//! range was modified since it was last written, so write-back stores only the changed part.
//! The cache does no I/O itself: the owner loads tables, writes back dirty ones in the order
//! the format requires, and decides what to do with a dirty victim on eviction.

use std::collections::{BTreeMap, HashMap};

/// One cached table.
#[derive(Debug)]
pub struct Slot {
    /// The table's bytes, exactly one cluster.
    pub data: Vec<u8>,
    /// Byte range `[start, end)` modified since the last write-back, if any.
    pub dirty: Option<(usize, usize)>,
    /// LRU tick of the last use.
    tick: u64,
}

impl Slot {
    /// Record that bytes `[start, end)` were modified.
    pub fn mark_dirty(&mut self, start: usize, end: usize) {
        self.dirty = Some(match self.dirty {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
    }
}

/// An LRU cache of tables keyed by host offset.
#[derive(Debug)]
pub struct TableCache {
    /// Maximum number of tables kept.
    capacity: usize,
    /// The tables.
    slots: HashMap<u64, Slot>,
    /// Tick -> key, oldest first.
    lru: BTreeMap<u64, u64>,
    /// Monotonic use counter.
    tick: u64,
    /// The counter at the last `clean_unused`: slots not used since then are idle.
    clean_mark: u64,
}

impl TableCache {
    /// An empty cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> TableCache {
        TableCache {
            capacity: capacity.max(2),
            slots: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            clean_mark: 0,
        }
    }

    /// Change the capacity (at least 2). The owner then makes room, which writes back and
    /// evicts the least recently used tables beyond it.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(2);
    }

    /// The capacity in tables.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of tables held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether more tables are held than the capacity allows.
    pub fn over_capacity(&self) -> bool {
        self.slots.len() > self.capacity
    }

    /// Drop the clean tables not used since the previous call (QEMU's cache-clean-interval);
    /// dirty ones stay until written back. Returns how many were dropped.
    pub fn clean_unused(&mut self) -> usize {
        let mark = self.clean_mark;
        let idle: Vec<(u64, u64)> = self
            .lru
            .range(..=mark)
            .map(|(&t, &k)| (t, k))
            .filter(|(_, k)| self.slots.get(k).is_some_and(|s| s.dirty.is_none()))
            .collect();
        for (t, k) in &idle {
            self.lru.remove(t);
            self.slots.remove(k);
        }
        self.clean_mark = self.tick;
        idle.len()
    }

    /// The table at `key`, marking it recently used.
    pub fn get(&mut self, key: u64) -> Option<&mut Slot> {
        let slot = self.slots.get_mut(&key)?;
        self.lru.remove(&slot.tick);
        self.tick += 1;
        slot.tick = self.tick;
        self.lru.insert(self.tick, key);
        Some(slot)
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.slots.contains_key(&key)
    }

    /// Whether inserting one more table requires an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// Remove and return the least recently used table, with its key.
    pub fn pop_lru(&mut self) -> Option<(u64, Slot)> {
        let (&tick, &key) = self.lru.iter().next()?;
        self.lru.remove(&tick);
        self.slots.remove(&key).map(|s| (key, s))
    }

    /// Insert a table (the caller has made room). `dirty` marks the whole table modified.
    pub fn insert(&mut self, key: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        let len = data.len();
        let slot = Slot {
            data,
            dirty: dirty.then_some((0, len)),
            tick: self.tick,
        };
        if let Some(old) = self.slots.insert(key, slot) {
            self.lru.remove(&old.tick);
        }
        self.lru.insert(self.tick, key);
    }

    /// Keys of all dirty tables, in ascending host order.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty.is_some())
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The slot at `key` without touching the LRU order.
    pub fn peek_mut(&mut self, key: u64) -> Option<&mut Slot> {
        self.slots.get_mut(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_table_is_evicted_first() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![0; 8], false);
        c.insert(2, vec![0; 8], false);
        c.get(1);
        assert_eq!(c.pop_lru().map(|(k, _)| k), Some(2));
    }

    #[test]
    fn cleaning_drops_only_clean_tables_idle_since_the_last_cleaning() {
        let mut c = TableCache::new(8);
        c.insert(1, vec![0; 8], false);
        c.insert(2, vec![0; 8], true);
        c.insert(3, vec![0; 8], false);
        assert_eq!(
            c.clean_unused(),
            0,
            "everything was used since the (initial) mark"
        );
        c.get(3);
        assert_eq!(c.clean_unused(), 1, "table 1 idle and clean");
        assert!(!c.contains(1) && c.contains(2) && c.contains(3));
    }

    #[test]
    fn dirty_range_grows_to_cover_all_marks() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![0; 64], false);
        let s = c.get(1).expect("cached");
        s.mark_dirty(8, 16);
        s.mark_dirty(40, 48);
        assert_eq!(s.dirty, Some((8, 48)));
    }
}
