//! The bits a store writes, read from the live bitmaps piece by piece (no copy of a bitmap).

use std::sync::Mutex;

use crate::bitmap::{BitmapList, DirtyBitmap};

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
