//! An open image's persistent bitmaps: listing, loading (flagging them in use), storing,
//! removing, and the dirty-region log that keeps them consistent across a crash.

use crate::bitmaps::FLAG_IN_USE;
use crate::*;

impl Qcow2 {
    /// The bitmaps as currently in the file.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.lock()
            .map(|m| m.bitmaps.iter().map(|b| b.info()).collect())
            .unwrap_or_default()
    }

    /// Load all bitmaps with their data. Bitmaps whose in_use flag was already set are flagged
    /// inconsistent. On a writable image, in_use is then written for every bitmap.
    pub fn load_bitmaps(&self) -> Result<Vec<LoadedBitmap>> {
        self.check_open()?;
        let mut m = self.lock()?;
        let entries = m.bitmaps.clone();
        let mut total = 0u64;
        for e in &entries {
            bitmaps::check_memory(e, m.header.raw.size)?;
            total += bitmaps::data_len(m.header.raw.size, e.granularity_bits as u32);
        }
        if total > bitmaps::MAX_TOTAL_BITMAP_BYTES {
            return Err(Error::plain(
                ErrorKind::InvalidImage,
                format!(
                    "Bitmaps of this image are too big: together they need {total} bytes, more \
                     than the limit of {}",
                    bitmaps::MAX_TOTAL_BITMAP_BYTES
                ),
            ));
        }
        let mut out = Vec::with_capacity(entries.len());
        let size = m.header.raw.size;
        for e in &entries {
            let in_use = e.flags & FLAG_IN_USE != 0;
            let mut recovered = false;
            // `check_memory` bounded the allocation; an in-use bitmap's content is unreliable
            // unless the dirty-region log recovers it, so a failure to read it leaves it clear.
            let data = match m.read_bitmap_data(e) {
                Ok(mut d) => {
                    recovered = in_use && self.log.recover(e, &mut d, size);
                    d
                }
                Err(_) if in_use => {
                    vec![
                        0u8;
                        bitmaps::data_len(m.header.raw.size, e.granularity_bits as u32) as usize
                    ]
                }
                Err(err) => return Err(err.while_(&format!("loading bitmap '{}'", e.name))),
            };
            out.push(LoadedBitmap {
                name: e.name.clone(),
                granularity: e.granularity(),
                auto: e.flags & bitmaps::FLAG_AUTO != 0,
                inconsistent: in_use && !recovered,
                recovered,
                data,
            });
        }
        if !self.read_only {
            self.claim_locked(&mut m)?;
        }
        Ok(out)
    }

    /// Mark every bitmap in the file in_use (once per open, and again after each store that
    /// left them not in use).
    ///
    /// Idempotent: checked again under the metadata lock, because concurrent first writers each
    /// see `bitmaps_claimed` clear before one of them takes the lock. A repeated claim would find
    /// every bitmap already in use and so write a log covering none of them, silently ending
    /// the crash protection of bitmaps the first claim flagged in use.
    fn claim_locked(&self, m: &mut Meta) -> Result<()> {
        if self.bitmaps_claimed.load(Ordering::Acquire) {
            return Ok(());
        }
        // The new dirty-region log goes into the same header write as the in_use flags.
        let (log_changed, log) = self.log.claim(m);
        if m.bitmaps.iter().any(|b| b.flags & FLAG_IN_USE == 0) {
            let mut entries = m.bitmaps.clone();
            for e in &mut entries {
                e.flags |= FLAG_IN_USE;
            }
            // The new log first, synced: flags in use without it would read as a crash the log
            // cannot cover (inconsistent). A new log without the flags is harmless: bitmaps not
            // in use load exactly as stored.
            if log_changed {
                m.write_header()?;
                m.sync()?;
            }
            m.rewrite_flags(entries)?;
            // The in_use flags must be on disk before the modification they announce.
            m.sync()?;
        } else if log_changed {
            m.write_header()?;
        }
        self.log.activate(log);
        self.bitmaps_claimed.store(true, Ordering::Release);
        Ok(())
    }

    /// Before the first modification: bitmaps in the file will miss it, so mark them in_use
    /// (the core normally did so already through `load_bitmaps`).
    pub fn claim_bitmaps(&self) -> Result<()> {
        if self.bitmaps_claimed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.lock()?;
        self.claim_locked(&mut m)
    }

    /// Replace the persistent bitmap set in the file with `bitmaps`: data clusters (non-zero
    /// ones), tables, a new directory; old clusters freed; autoclear bit 0 set or cleared.
    /// Each bitmap is flagged in_use when `in_use` (a write-back while still open) or when it
    /// was loaded inconsistent.
    pub fn store_bitmaps(&self, bitmaps: &[StoreBitmap], in_use: bool) -> Result<()> {
        let refs: Vec<StoreBitmapRef<'_>> = bitmaps.iter().map(StoreBitmapRef::from).collect();
        self.store_bitmaps_ref(&refs, in_use)
    }

    /// [`Qcow2::store_bitmaps`] with the data lent, not copied.
    pub fn store_bitmaps_ref(&self, bitmaps: &[StoreBitmapRef<'_>], in_use: bool) -> Result<()> {
        self.check_writable()?;
        let mut m = self.lock()?;
        if bitmaps.is_empty() && m.bitmaps.is_empty() && m.header.bitmaps.is_none() {
            return Ok(());
        }
        // Marks stop now, but the log keeps naming the old tables in the header write that
        // switches the directory: a torn write of it may pair the old (in use) directory with
        // the new log sectors, so those must still cover it. Only once the new directory is
        // durable does a second header write empty the log (its own tear is harmless: the
        // directory it names is the new one, exact or in use without cover either way).
        self.log.stop();
        let stored = m.store(bitmaps, in_use);
        // Also after a failed store: writes from now on are not marked, so the log must not
        // cover the old tables any more (they fall back to inconsistent after a crash).
        self.log.retire(&mut m);
        let emptied = m.write_header(); // synced
        stored?;
        emptied?;
        self.bitmaps_claimed
            .store(in_use || m.bitmaps.is_empty(), Ordering::Release);
        Ok(())
    }

    /// Check that a new persistent bitmap `name` with `granularity` could be stored.
    pub fn can_store_bitmap(&self, name: &str, granularity: u64) -> Result<()> {
        self.check_writable()?;
        self.lock()?.can_store(name, granularity)
    }

    /// Region size of this open's dirty-region log in bytes (0: none).
    pub fn dirty_log_region(&self) -> u64 {
        self.log.region_size()
    }

    /// Delete a bitmap from the file at once.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        self.lock()?.remove(name)
    }
}

/// A bitmap to write, its data lent by the caller (see [`StoreBitmap`] for the fields).
#[derive(Clone, Copy)]
pub struct StoreBitmapRef<'a> {
    /// Name (1..=1023 bytes, unique).
    pub name: &'a str,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// Enabled (recording): stored as the auto flag.
    pub auto: bool,
    /// Loaded inconsistent: keep it in_use with its on-disk data as is.
    pub inconsistent_keep_in_use: bool,
    /// Serialized bits, read one cluster at a time; missing bytes count as zero, extra ones
    /// are ignored.
    pub data: &'a dyn BitmapData,
}

impl<'a> From<&'a StoreBitmap> for StoreBitmapRef<'a> {
    fn from(b: &'a StoreBitmap) -> Self {
        StoreBitmapRef {
            name: &b.name,
            granularity: b.granularity,
            auto: b.auto,
            inconsistent_keep_in_use: b.inconsistent_keep_in_use,
            data: &b.data,
        }
    }
}

/// `Qcow2` must stay shareable across threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Qcow2>();
};
