//! qcow2 metadata cache options (`cache-size`, `l2-cache-size`, `l2-cache-entry-size`,
//! `refcount-cache-size`, `cache-clean-interval`) with QEMU's semantics, defaults and
//! error texts, and the timer thread that drops idle cache entries.
//!
//! How the L2 budget maps onto blockd's cache (QEMU's `l2-cache-size` is the bytes of its cache
//! of L2 slices, each `l2-cache-entry-size` bytes; blockd keeps each cached table or slice in a
//! compact form that never takes more than its on-disk size, see `qcow2::l2table`):
//! - An explicit `l2-cache-size` or `cache-size` (and any explicit `l2-cache-entry-size`): the
//!   cache has QEMU's geometry exactly, the same number of entries of the same size (slices of
//!   4 KiB where QEMU picks them). The table data held is then at most what QEMU's cache holds,
//!   `max(l2-cache-size, 2 entries)` bytes, and usually much less.
//! - All defaults: whole tables, as many as QEMU's default cache (32 MiB at most) covers in
//!   QEMU's units: `bytes / cluster size` tables (at least two) map the same guest range as
//!   QEMU's `bytes / 4 KiB` slices. The bytes held are again at most the budget.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use qcow2::Qcow2;

/// QEMU's default upper bound of the L2 cache (Linux).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// QEMU's minimum (and default) refcount cache, in refcount blocks.
const MIN_REFCOUNT_TABLES: u64 = 4;
/// QEMU's minimum L2 cache, in entries.
const MIN_L2_ENTRIES: u64 = 2;
/// QEMU's default `cache-clean-interval` in seconds.
const DEFAULT_CLEAN_INTERVAL: u64 = 600;

/// The cache options as given to `blockdev-add` (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qcow2CacheOptions {
    /// `cache-size`: L2 and refcount caches together, in bytes.
    pub cache_size: Option<i64>,
    /// `l2-cache-size` in bytes.
    pub l2_cache_size: Option<i64>,
    /// `l2-cache-entry-size` in bytes.
    pub l2_cache_entry_size: Option<i64>,
    /// `refcount-cache-size` in bytes.
    pub refcount_cache_size: Option<i64>,
    /// `cache-clean-interval` in seconds (0: never).
    pub cache_clean_interval: Option<i64>,
}

/// The caches to set up for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePlan {
    /// L2 cache entries (tables or slices) held at most.
    pub l2_entries: usize,
    /// Bytes of one L2 cache entry: the cluster size (whole tables) or a slice.
    pub l2_entry_size: usize,
    /// Refcount blocks held at most.
    pub refcount_tables: usize,
    /// Seconds between drops of idle entries (0: never).
    pub clean_interval: u64,
}

/// A size option: negative values are refused like QEMU's option parser does.
fn size_opt(v: Option<i64>, name: &str) -> Result<Option<u64>, String> {
    match v {
        Some(n) if n < 0 => Err(format!(
            "Value '{n}' is out of range for parameter '{name}'"
        )),
        Some(n) => Ok(Some(n as u64)),
        None => Ok(None),
    }
}

impl Qcow2CacheOptions {
    /// Work out the caches for a disk of `virtual_size` bytes with `cluster_size` clusters,
    /// as QEMU does (including its checks, in its order, with its texts).
    pub fn plan(&self, virtual_size: u64, cluster_size: u64) -> Result<CachePlan, String> {
        let combined = size_opt(self.cache_size, "cache-size")?;
        let l2_set = size_opt(self.l2_cache_size, "l2-cache-size")?;
        let rc_set = size_opt(self.refcount_cache_size, "refcount-cache-size")?;
        let entry_set = size_opt(self.l2_cache_entry_size, "l2-cache-entry-size")?;
        let cs = cluster_size;
        let min_refcount = MIN_REFCOUNT_TABLES * cs;
        let max_l2 = virtual_size
            .div_ceil(cs)
            .saturating_mul(8)
            .div_ceil(cs)
            .saturating_mul(cs);
        let l2_max_setting = l2_set.unwrap_or(DEFAULT_L2_CACHE_MAX);
        let mut l2 = max_l2.min(l2_max_setting);
        let mut rc = rc_set.unwrap_or(0);
        let mut entry = entry_set.unwrap_or(cs);
        if let Some(combined) = combined {
            if l2_set.is_some() && rc_set.is_some() {
                return Err(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                        .into(),
                );
            } else if l2_set.is_some() && l2_max_setting > combined {
                return Err("l2-cache-size may not exceed cache-size".into());
            } else if rc > combined {
                return Err("refcount-cache-size may not exceed cache-size".into());
            }
            if l2_set.is_some() {
                rc = combined - l2;
            } else if rc_set.is_some() {
                l2 = combined - rc;
            } else if combined >= max_l2.saturating_add(min_refcount) {
                l2 = max_l2;
                rc = combined - l2;
            } else {
                rc = combined.min(min_refcount);
                l2 = combined - rc;
            }
        }
        if l2 < max_l2 && entry_set.is_none() {
            entry = cs.min(4096);
        }
        if entry < 512 || entry > cs || !entry.is_power_of_two() {
            return Err(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            ));
        }
        let l2_entries = (l2 / entry).max(MIN_L2_ENTRIES);
        if l2_entries > i32::MAX as u64 {
            return Err("L2 cache size too big".into());
        }
        let rc_tables = (rc / cs).max(MIN_REFCOUNT_TABLES);
        if rc_tables > i32::MAX as u64 {
            return Err("Refcount cache size too big".into());
        }
        // Values too large for an unsigned 32-bit number are refused (negative ones wrap).
        let clean = self
            .cache_clean_interval
            .map_or(DEFAULT_CLEAN_INTERVAL, |v| v as u64);
        if clean > u32::MAX as u64 {
            return Err("Cache clean interval too big".into());
        }
        let explicit = combined.is_some() || l2_set.is_some() || entry_set.is_some();
        let (l2_entries, entry) = if explicit {
            (l2_entries, entry)
        } else {
            // Defaults: whole tables covering what QEMU's slices cover, at least two.
            (
                (l2_entries.saturating_mul(entry) / cs).clamp(2, l2_entries),
                cs,
            )
        };
        Ok(CachePlan {
            l2_entries: l2_entries as usize,
            l2_entry_size: entry as usize,
            refcount_tables: rc_tables as usize,
            clean_interval: clean,
        })
    }
}

impl CachePlan {
    /// Set up `image`'s caches by this plan.
    pub fn apply(&self, image: &Qcow2) -> qcow2::Result<()> {
        image.set_l2_slice_size(self.l2_entry_size)?;
        image.set_cache_capacity(self.l2_entries, self.refcount_tables)
    }

    /// The most bytes of L2 table data the cache holds under this plan.
    pub fn l2_bound(&self) -> usize {
        self.l2_entries.max(2) * self.l2_entry_size
    }
}

/// Drops idle cache entries every `interval` until stopped (joined on drop).
pub struct CacheCleaner {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl CacheCleaner {
    /// Start cleaning `image` every `secs` seconds (None when `secs` is 0).
    pub fn start(image: &Arc<Qcow2>, secs: u64) -> Option<CacheCleaner> {
        if secs == 0 {
            return None;
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let weak: Weak<Qcow2> = Arc::downgrade(image);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qcow2-cache-clean".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    // Checked before every wait: a stop may come before the first one.
                    if *stopped {
                        return;
                    }
                    let (guard, timeout) = cv
                        .wait_timeout(stopped, Duration::from_secs(secs))
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = guard;
                    if timeout.timed_out() && !*stopped {
                        let Some(image) = weak.upgrade() else { return };
                        let dropped = image.clean_caches();
                        tracing::debug!(dropped, "qcow2 cache clean");
                    }
                }
            })
            .ok()?;
        Some(CacheCleaner {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CacheCleaner {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn plan(o: Qcow2CacheOptions, size: u64) -> Result<CachePlan, String> {
        o.plan(size, 65536)
    }

    #[test]
    fn a_cleaner_stopped_at_once_does_not_wait_out_its_interval() {
        let mem = Arc::new(qcow2::MemStorage::new());
        let opts = qcow2::CreateOptions {
            size: GIB,
            ..Default::default()
        };
        Qcow2::create(mem.as_ref(), &opts).expect("create");
        let image = Arc::new(Qcow2::open(mem, qcow2::OpenOptions::default()).expect("open"));
        for _ in 0..50 {
            let t = std::time::Instant::now();
            drop(CacheCleaner::start(&image, 600));
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "stop waited for the interval"
            );
        }
    }

    #[test]
    fn the_l2_table_data_held_stays_within_the_planned_bytes() {
        // A 1 TiB image, scattered writes over 64 L2 tables, dense runs in a few: the default
        // plan (whole tables), an explicit l2-cache-size (QEMU's 4 KiB slices) and 512-byte
        // entries; the bytes held never exceed the plan's bound.
        let opts = [
            Qcow2CacheOptions::default(),
            Qcow2CacheOptions {
                l2_cache_size: Some(64 << 10),
                ..Default::default()
            },
            Qcow2CacheOptions {
                l2_cache_size: Some(32 << 10),
                l2_cache_entry_size: Some(512),
                ..Default::default()
            },
        ];
        for o in opts {
            let mem = Arc::new(qcow2::MemStorage::new());
            let create = qcow2::CreateOptions {
                size: 1 << 40,
                ..Default::default()
            };
            Qcow2::create(mem.as_ref(), &create).expect("create");
            let image = Qcow2::open(mem, qcow2::OpenOptions::default()).expect("open");
            let p = o.plan(1 << 40, 65536).expect("plan");
            p.apply(&image).expect("apply");
            for t in 0..64u64 {
                for k in 0..32u64 {
                    let off = (t << 34) + (k << 24);
                    image.write_at(&[t as u8 | 1; 4096], off).expect("write");
                }
                if t % 16 == 0 {
                    image.write_at(&vec![3; 4 << 20], t << 34).expect("run");
                }
                let (held, bytes) = (image.cached_tables().0, image.l2_cache_memory());
                assert!(
                    held <= p.l2_entries && bytes <= p.l2_bound(),
                    "{o:?}: {held} entries, {bytes} bytes, plan {p:?}"
                );
            }
            image.close().expect("close");
        }
    }

    #[test]
    fn defaults_cover_the_disk_up_to_32_mib_with_four_refcount_blocks() {
        let small = plan(Qcow2CacheOptions::default(), GIB).expect("ok");
        // 1 GiB: 16384 entries = 128 KiB of L2 = 2 tables.
        assert_eq!((small.l2_entries, small.refcount_tables), (2, 4));
        assert_eq!((small.l2_entry_size, small.clean_interval), (65536, 600));
        let big = plan(Qcow2CacheOptions::default(), 1 << 40).expect("ok");
        // QEMU: 8192 slices of 4 KiB (32 MiB); blockd: whole tables covering the same 256 GiB.
        assert_eq!((big.l2_entries, big.l2_entry_size), (512, 65536));
        assert_eq!(big.l2_bound(), 32 << 20);
    }

    #[test]
    fn combined_size_goes_to_l2_first_then_refcounts() {
        let o = Qcow2CacheOptions {
            cache_size: Some(4 << 20),
            ..Default::default()
        };
        let p = plan(o, 1 << 40).expect("ok");
        // Not enough for the whole disk: 4 refcount blocks (256 KiB), the rest L2.
        assert_eq!(p.refcount_tables, 4);
        // Explicit: QEMU's geometry, 4 KiB slices as the cache does not cover the disk.
        assert_eq!(p.l2_entries, ((4 << 20) - (256 << 10)) / 4096);
        assert_eq!(p.l2_entry_size, 4096);
        assert_eq!(p.l2_bound(), (4 << 20) - (256 << 10));
        let tiny = Qcow2CacheOptions {
            l2_cache_size: Some(1),
            ..Default::default()
        };
        let t = plan(tiny, 1 << 40).expect("ok");
        assert_eq!((t.l2_entries, t.l2_entry_size), (2, 4096), "QEMU's minimum");
    }

    #[test]
    fn qemu_texts_for_conflicting_or_bad_values() {
        let o = |c: Option<i64>, l: Option<i64>, r: Option<i64>| Qcow2CacheOptions {
            cache_size: c,
            l2_cache_size: l,
            refcount_cache_size: r,
            ..Default::default()
        };
        let err = |x: Qcow2CacheOptions| plan(x, GIB).expect_err("refused");
        assert_eq!(
            err(o(Some(1 << 20), Some(1 << 19), Some(1 << 18))),
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
        );
        assert_eq!(
            err(o(Some(1 << 20), Some(2 << 20), None)),
            "l2-cache-size may not exceed cache-size"
        );
        assert_eq!(
            err(o(Some(1 << 20), None, Some(2 << 20))),
            "refcount-cache-size may not exceed cache-size"
        );
        assert_eq!(
            err(o(None, Some(-1), None)),
            "Value '-1' is out of range for parameter 'l2-cache-size'"
        );
        assert_eq!(
            err(o(None, None, Some(1 << 62))),
            "Refcount cache size too big"
        );
        let interval = |v| Qcow2CacheOptions {
            cache_clean_interval: Some(v),
            ..Default::default()
        };
        assert_eq!(err(interval(-1)), "Cache clean interval too big");
        assert_eq!(err(interval(1 << 32)), "Cache clean interval too big");
        assert!(plan(interval((1 << 32) - 1), GIB).is_ok());
        let entry = |v| Qcow2CacheOptions {
            l2_cache_entry_size: Some(v),
            ..Default::default()
        };
        for bad in [256, 1000, 131072] {
            assert_eq!(
                err(entry(bad)),
                "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"
            );
        }
        let p = plan(entry(4096), GIB).expect("slices honoured");
        // 1 GiB: QEMU's cache covers the disk, 128 KiB in 4 KiB slices.
        assert_eq!((p.l2_entries, p.l2_entry_size), (32, 4096));
        let p = plan(entry(512), 1 << 40).expect("slices honoured");
        assert_eq!((p.l2_entries, p.l2_entry_size), ((32 << 20) / 512, 512));
        assert!(plan(entry(65536), GIB).is_ok());
    }
}
