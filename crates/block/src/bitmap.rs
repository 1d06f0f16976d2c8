//! Named dirty bitmaps of a node and the rules for using them.
//!
//! Each node keeps its bitmaps in one `Mutex<BitmapList>` (per node, never global). Every write
//! through the node marks the recording ones together while holding that lock for a few word
//! operations; a leaf block they share is marked once. The path allocates only on the first
//! dirtying of a block, or to copy a block (32 KiB, once) that a frozen copy or a bitmap not
//! being marked still shares with the recording ones. The QMP-visible rules (busy, inconsistent, read-only) are
//! checked in [`BitmapList::usable`], so every command refuses the same way QEMU does.

use hbitmap::HBitmap;

use crate::error::{Error, Result};

/// Longest bitmap name QEMU accepts, in bytes.
pub const MAX_NAME_LEN: usize = 1023;
/// Smallest granularity.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity (2 GiB).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// One dirty bitmap.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    /// Name; `None` for the anonymous successor a backup job creates.
    pub name: Option<String>,
    /// The bits.
    pub bits: HBitmap,
    /// Records writes (QEMU: enabled).
    pub recording: bool,
    /// Stored in the image at close.
    pub persistent: bool,
    /// Held by an operation (backup job, NBD export); user commands refuse it.
    pub busy: bool,
    /// Loaded from an image that was not closed cleanly; only removal is allowed.
    pub inconsistent: bool,
    /// Loaded from a read-only image: its bits cannot change (clear, merge into, remove).
    pub readonly: bool,
    /// Frozen by a backup job: its bits stay as they were at the job's start while its
    /// anonymous successor records new writes (queries still show it recording).
    pub frozen: bool,
}

/// What a caller wants to do with a bitmap, for the refusal rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapUse {
    /// Read it without changing it (export, backup source, merge source).
    Read,
    /// Change its bits (clear, merge target, remove of a stored bitmap).
    Modify,
    /// Change its recording state only (enable, disable).
    Toggle,
}

/// The bitmaps of one node, newest last (queries list them newest first).
#[derive(Debug, Default)]
pub struct BitmapList {
    /// The bitmaps.
    pub items: Vec<DirtyBitmap>,
}

impl BitmapList {
    /// Find by name.
    pub fn get(&self, name: &str) -> Option<&DirtyBitmap> {
        self.items.iter().find(|b| b.name.as_deref() == Some(name))
    }

    /// Find by name, mutable.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut DirtyBitmap> {
        self.items
            .iter_mut()
            .find(|b| b.name.as_deref() == Some(name))
    }

    /// Find by name or fail with QEMU's "not found" text.
    pub fn find(&self, name: &str) -> Result<&DirtyBitmap> {
        self.get(name).ok_or_else(|| not_found(name))
    }

    /// Find a bitmap usable for `how` or fail with QEMU's refusal text.
    pub fn usable(&mut self, name: &str, how: BitmapUse) -> Result<&mut DirtyBitmap> {
        let bitmap = self.get_mut(name).ok_or_else(|| not_found(name))?;
        check_usable(bitmap, name, how)?;
        Ok(bitmap)
    }

    /// Mark `[offset, offset+len)` in every recording bitmap, together: a leaf block the
    /// recording bitmaps share (and no one else holds) is marked once (see `hbitmap`'s
    /// `HBitmap::set_in_all`).
    pub fn mark(&mut self, offset: u64, len: u64) {
        HBitmap::set_in_all(&mut self.items, recording_bits, offset, len);
    }

    /// Let bitmaps that hold identical bits share their leaf blocks (after loading them
    /// from an image). Changes no bit.
    pub fn share_identical(&mut self) {
        HBitmap::share_identical(&mut self.items, |b: &mut DirtyBitmap| Some(&mut b.bits));
    }

    /// Heap bytes of all the bitmaps' bits, each shared leaf block counted once.
    pub fn memory_usage(&self) -> usize {
        HBitmap::memory_usage_together(self.items.iter().map(|b| &b.bits))
    }

    /// Number of recording bitmaps.
    pub fn recording_count(&self) -> usize {
        self.items
            .iter()
            .filter(|b| b.recording && !b.frozen)
            .count()
    }
}

/// The bits a guest write marks: those of a recording bitmap that is not frozen.
fn recording_bits(b: &mut DirtyBitmap) -> Option<&mut HBitmap> {
    (b.recording && !b.frozen).then_some(&mut b.bits)
}

/// QEMU's refusal rules for using a bitmap.
pub fn check_usable(bitmap: &DirtyBitmap, name: &str, how: BitmapUse) -> Result<()> {
    if bitmap.busy {
        return Err(Error::generic(format!(
            "Bitmap '{name}' is currently in use by another operation and cannot be used"
        )));
    }
    if how == BitmapUse::Modify && bitmap.readonly {
        return Err(Error::generic(format!(
            "Bitmap '{name}' is readonly and cannot be modified"
        )));
    }
    if bitmap.inconsistent {
        return Err(Error::generic(format!(
            "Bitmap '{name}' is inconsistent and cannot be used"
        )));
    }
    Ok(())
}

/// "Dirty bitmap 'X' not found".
pub fn not_found(name: &str) -> Error {
    Error::generic(format!("Dirty bitmap '{name}' not found"))
}

/// Validate a new bitmap's name and granularity with QEMU's messages.
pub fn check_new(name: &str, granularity: u64) -> Result<()> {
    if name.is_empty() {
        return Err(Error::generic("Bitmap name cannot be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::generic(format!("Bitmap name too long: {name}")));
    }
    if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
    {
        return Err(Error::generic(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    Ok(())
}

/// QEMU's default granularity: the cluster size clamped to [4 KiB, 64 KiB], else 64 KiB.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) => c.clamp(4096, 65536),
        None => 65536,
    }
}
