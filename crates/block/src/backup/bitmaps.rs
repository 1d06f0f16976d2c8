//! The sync bitmap during a backup: frozen (busy, its bits kept as at the start) with an
//! anonymous successor right after it in the node's list recording new writes; at the end
//! the successor replaces it or is merged back per `bitmap-mode`. No dirty bit is ever lost:
//! on failure or cancel the original keeps every bit it had plus every write made meanwhile.

use hbitmap::HBitmap;

use super::BitmapMode;
use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use crate::node::NodeRef;

/// A frozen sync bitmap.
pub(crate) struct Frozen {
    pub name: String,
    pub mode: BitmapMode,
}

/// Freeze `name` on `node` and give it a successor. Call with the node quiesced.
pub(crate) fn freeze(node: &NodeRef, name: &str, mode: BitmapMode) -> Result<Frozen> {
    let mut list = node.bitmaps();
    let idx = list
        .items
        .iter()
        .position(|b| b.name.as_deref() == Some(name))
        .ok_or_else(|| Error::generic(format!("Bitmap '{name}' could not be found")))?;
    let orig = &mut list.items[idx];
    let successor = DirtyBitmap {
        name: None,
        bits: HBitmap::new(orig.bits.size(), orig.bits.granularity())
            .map_err(|e| Error::generic(e.to_string()))?,
        recording: orig.recording,
        persistent: false,
        busy: false,
        inconsistent: false,
        readonly: false,
        frozen: false,
    };
    orig.busy = true;
    orig.frozen = true;
    list.items.insert(idx + 1, successor);
    node.refresh_recording(&list);
    Ok(Frozen {
        name: name.to_string(),
        mode,
    })
}

/// End of the job: `success` is whether it completed. With `always` on failure the clusters
/// not copied (`not_copied`) stay dirty too.
pub(crate) fn finish(node: &NodeRef, f: Frozen, success: bool, not_copied: &HBitmap) {
    let mut list = node.bitmaps();
    let Some(idx) = list
        .items
        .iter()
        .position(|b| b.name.as_deref() == Some(f.name.as_str()))
    else {
        tracing::error!(bitmap = %f.name, "frozen bitmap vanished during backup");
        return;
    };
    let successor = match list.items.get(idx + 1) {
        Some(s) if s.name.is_none() => Some(list.items.remove(idx + 1)),
        _ => None,
    };
    let sync = (success || f.mode == BitmapMode::Always) && f.mode != BitmapMode::Never;
    let orig = &mut list.items[idx];
    if let Some(s) = successor {
        if sync {
            orig.bits = s.bits;
        } else if let Err(e) = orig.bits.merge(&s.bits) {
            tracing::error!(bitmap = %f.name, error = %e, "merging successor failed");
        }
    } else {
        tracing::error!(bitmap = %f.name, "successor bitmap vanished during backup");
    }
    if !success && f.mode == BitmapMode::Always {
        if let Err(e) = orig.bits.merge(not_copied) {
            tracing::error!(bitmap = %f.name, error = %e, "merging uncopied regions failed");
        }
    }
    orig.busy = false;
    orig.frozen = false;
    node.refresh_recording(&list);
    drop(list);
    node.note_bitmaps_changed();
}
