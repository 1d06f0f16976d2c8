//! qcow2 metadata cache options (`cache-size`, `l2-cache-size`, `l2-cache-entry-size`,
//! `refcount-cache-size`, `cache-clean-interval`) with QEMU's semantics, defaults and
//! error texts, and the timer thread that drops idle cache entries.
//!
//! The L2 cache holds whole tables: a byte budget is turned into a number of tables (at least
//! two). `l2-cache-entry-size` is validated as QEMU does (same texts); a valid value other than
//! the cluster size, which QEMU would honour with smaller cache entries, is refused.

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
    /// L2 tables held at most.
    pub l2_tables: usize,
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
        if entry_set.is_some_and(|e| e != cs) {
            // QEMU caches L2 slices of this size; blockd's cache holds whole tables, and
            // accepting the value without honouring it would misstate the memory bound.
            return Err(format!(
                "l2-cache-entry-size other than the cluster size ({cs}) is not supported by \
                 blockd: its L2 cache holds whole tables"
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
        // Whole tables: the byte budget of the entries, at least two tables.
        let l2_tables = (l2_entries.saturating_mul(entry) / cs).clamp(2, l2_entries);
        Ok(CachePlan {
            l2_tables: l2_tables as usize,
            refcount_tables: rc_tables as usize,
            clean_interval: clean,
        })
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
    fn defaults_cover_the_disk_up_to_32_mib_with_four_refcount_blocks() {
        let small = plan(Qcow2CacheOptions::default(), GIB).expect("ok");
        // 1 GiB: 16384 entries = 128 KiB of L2 = 2 tables.
        assert_eq!((small.l2_tables, small.refcount_tables), (2, 4));
        assert_eq!(small.clean_interval, 600);
        let big = plan(Qcow2CacheOptions::default(), 1 << 40).expect("ok");
        assert_eq!(big.l2_tables, 512, "32 MiB of 64 KiB tables");
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
        assert_eq!(p.l2_tables, ((4 << 20) - (256 << 10)) / 65536);
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
        assert_eq!(
            err(entry(4096)),
            "l2-cache-entry-size other than the cluster size (65536) is not supported by blockd: \
             its L2 cache holds whole tables"
        );
        assert!(plan(entry(65536), GIB).is_ok());
    }
}
