//! Storing a node's persistent bitmaps (on command, at close, as checkpoints after flushes),
//! and the bits a store writes, read from the live bitmaps piece by piece (no copy of a bitmap).

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Node, FLUSH_CHECKPOINTS};
use crate::bitmap::{BitmapList, DirtyBitmap};
use crate::driver::BitmapToStore;

/// One persistent bitmap's bits as a store reads them: each call takes the node's bitmap lock
/// for one piece (one cluster of serialised bytes), so a store needs no copy of any bitmap and
/// its memory stays that of one buffer, however dense the bitmaps. A bitmap frozen by a backup
/// also yields the writes its successor recorded since (see `stored_bits` before), so a stored
/// bitmap never misses a write whatever becomes of the job.
///
/// Stores run while writes are held off (checkpoint gate) or drained (close), so no write bit
/// changes between pieces; a bitmap command running meanwhile (clear, merge) can land between
/// two pieces, which leaves every piece either before or after it, and the command's own store
/// follows.
#[derive(Clone)]
pub struct LiveBits<'a> {
    list: &'a Mutex<BitmapList>,
    name: String,
    len: usize,
    granularity: u64,
}

impl std::fmt::Debug for LiveBits<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveBits")
            .field("name", &self.name)
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> LiveBits<'a> {
    pub(super) fn new(list: &'a Mutex<BitmapList>, b: &DirtyBitmap) -> LiveBits<'a> {
        LiveBits {
            list,
            name: b.name.clone().unwrap_or_default(),
            len: b.bits.serialized_len(),
            granularity: b.bits.granularity(),
        }
    }

    /// Bytes of the serialised form (as when the store began).
    pub fn serialized_len(&self) -> usize {
        self.len
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Run `f` on the bitmap and its successor (when frozen), under the bitmap lock; `None`
    /// when the bitmap is gone.
    fn with<T>(&self, f: impl FnOnce(&DirtyBitmap, Option<&DirtyBitmap>) -> T) -> Option<T> {
        let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let i = list
            .items
            .iter()
            .position(|b| b.name.as_deref() == Some(self.name.as_str()))?;
        let b = &list.items[i];
        let succ = list
            .items
            .get(i + 1)
            .filter(|s| b.frozen && s.name.is_none());
        Some(f(b, succ))
    }

    /// Serialised bits of granules `start_granule ..` into `buf` (zero where none).
    pub fn serialize_part(&self, start_granule: u64, buf: &mut [u8]) {
        let done = self.with(|b, succ| {
            b.bits.serialize_part(start_granule, buf);
            if let Some(s) = succ {
                let mut extra = vec![0u8; buf.len()];
                s.bits.serialize_part(start_granule, &mut extra);
                buf.iter_mut().zip(&extra).for_each(|(d, e)| *d |= e);
            }
        });
        if done.is_none() {
            buf.fill(0);
        }
    }

    /// Whether any granule of disk bytes `start .. end` is dirty.
    pub fn any_dirty(&self, start: u64, end: u64) -> bool {
        self.with(|b, succ| {
            b.bits.next_dirty(start, end).is_some()
                || succ.is_some_and(|s| s.bits.next_dirty(start, end).is_some())
        })
        .unwrap_or(false)
    }
}

/// Storing a node's persistent bitmaps into its image: at close, on command, and as
/// checkpoints after flushes.
impl Node {
    /// Write the persistent bitmaps into the image. `in_use` leaves them flagged as loaded.
    pub fn store_bitmaps(&self, in_use: bool) -> crate::Result<()> {
        let Some(store) = self.driver.bitmap_store() else {
            return Ok(());
        };
        if self.read_only() {
            return Ok(());
        }
        let list = snapshot_persistent(&self.bitmaps(), &self.bitmaps);
        store
            .store(&list, in_use)
            .map_err(|e| crate::Error::io("Could not store bitmaps", &e))
    }

    /// Checkpoint (beyond QEMU, which stores bitmaps only at close): store the persistent
    /// bitmaps exactly, not in use, while no write is in flight. The format flags them in use
    /// again before the next modification reaches the image, so after a crash a bitmap is
    /// either exact as of its last checkpoint or marked inconsistent, never silently short.
    /// Does nothing when nothing changed since the last one. Returns whether it stored.
    pub fn checkpoint_bitmaps(&self) -> crate::Result<bool> {
        if self.driver.bitmap_store().is_none() || self.read_only() {
            return Ok(false);
        }
        if !self.bitmaps().items.iter().any(|b| b.persistent) {
            return Ok(false);
        }
        let _gate = self
            .checkpoint_gate
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if !self.bitmaps_changed.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let stored = self.store_bitmaps(false).and_then(|_| {
            self.driver
                .flush()
                .map_err(|e| crate::Error::io("Could not flush bitmaps", &e))
        });
        if stored.is_err() {
            if self.driver.is_corrupt() {
                // The driver reported BLOCK_IMAGE_CORRUPTED: stop writing to the image at all.
                self.read_only.store(true, Ordering::Release);
            } else {
                self.bitmaps_changed.store(true, Ordering::Release);
            }
        }
        stored.map(|_| true)
    }

    /// A flush-triggered checkpoint, at most once per `min_interval`.
    pub(super) fn checkpoint_after_flush(&self, min_interval: Duration) {
        if !FLUSH_CHECKPOINTS.load(Ordering::Relaxed) {
            return;
        }
        let due = self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= min_interval);
        if due {
            if let Err(e) = self.checkpoint_bitmaps() {
                tracing::warn!(node = %self.name, error = %e, "bitmap checkpoint failed");
            }
        }
    }
}

fn snapshot_persistent<'a>(
    list: &BitmapList,
    lock: &'a Mutex<BitmapList>,
) -> Vec<BitmapToStore<'a>> {
    list.items
        .iter()
        .filter(|b| b.persistent && b.name.is_some())
        .map(|b| BitmapToStore {
            name: b.name.clone().unwrap_or_default(),
            granularity: b.bits.granularity(),
            recording: b.recording,
            inconsistent: b.inconsistent,
            bits: (!b.inconsistent).then(|| LiveBits::new(lock, b)),
        })
        .collect()
}
