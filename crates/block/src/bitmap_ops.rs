//! The bitmap commands, as the core decides them: add, remove, clear, enable, disable, merge,
//! and the debug hash. Each takes the node(s) already looked up in the graph.

use hbitmap::HBitmap;

use crate::bitmap::{check_new, check_usable, default_granularity, BitmapUse, DirtyBitmap};
use crate::error::{Error, Result};
use crate::node::NodeRef;

/// `block-dirty-bitmap-add`.
pub fn add(
    node: &NodeRef,
    name: &str,
    granularity: Option<u64>,
    persistent: bool,
    disabled: bool,
) -> Result<()> {
    let granularity = granularity.unwrap_or_else(|| default_granularity(node.facts().cluster_size));
    check_new(name, granularity)?;
    if node.bitmaps().get(name).is_some() {
        return Err(Error::generic(format!("Bitmap already exists: {name}")));
    }
    if persistent {
        let store = node.driver().bitmap_store().ok_or_else(|| {
            Error::generic(format!(
                "Can't store persistent bitmaps to {}: Operation not supported",
                node.name()
            ))
        })?;
        if node.read_only() {
            return Err(Error::generic(format!(
                "Can't make bitmap '{name}' persistent in '{}': Image is read-only",
                node.name()
            )));
        }
        store.can_store(name, granularity).map_err(|m| {
            Error::generic(format!(
                "Can't make bitmap '{name}' persistent in '{}': {m}",
                node.name()
            ))
        })?;
    }
    let bits = HBitmap::new(node.size(), granularity).map_err(|e| Error::generic(e.to_string()))?;
    let mut list = node.bitmaps();
    list.items.push(DirtyBitmap {
        name: Some(name.to_string()),
        bits,
        recording: !disabled,
        persistent,
        busy: false,
        inconsistent: false,
        readonly: false,
        frozen: false,
    });
    node.refresh_recording(&list);
    drop(list);
    node.note_bitmaps_changed();
    Ok(())
}

/// `block-dirty-bitmap-remove`: also deletes a persistent bitmap from the image at once.
pub fn remove(node: &NodeRef, name: &str) -> Result<()> {
    let persistent = check_removable(node, name)?;
    if persistent {
        remove_stored(node, name)?;
    }
    discard(node, name);
    Ok(())
}

/// Can `name` be removed? Returns whether it is persistent; QEMU's texts otherwise.
fn check_removable(node: &NodeRef, name: &str) -> Result<bool> {
    let list = node.bitmaps();
    let b = list.find(name)?;
    if b.busy {
        check_usable(b, name, BitmapUse::Read)?;
    }
    if b.readonly {
        check_usable(b, name, BitmapUse::Modify)?;
    }
    Ok(b.persistent)
}

/// Delete the image's stored copy of a persistent bitmap (the in-memory one stays).
pub fn remove_stored(node: &NodeRef, name: &str) -> Result<()> {
    if node.read_only() {
        return Ok(());
    }
    match node.driver().bitmap_store() {
        Some(store) => match store.remove(name) {
            // Added since the last store: not in the image yet, nothing to delete there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(|e| Error::io(format!("Failed to remove bitmap '{name}'"), &e)),
        },
        None => Ok(()),
    }
}

/// Drop a bitmap from the node's list (no checks; its stored copy, if any, is not touched).
pub fn discard(node: &NodeRef, name: &str) {
    let mut list = node.bitmaps();
    list.items.retain(|b| b.name.as_deref() != Some(name));
    node.refresh_recording(&list);
}

/// A transaction's remove, first half: check, delete the stored copy as the plain command
/// does, and hold the bitmap busy so later actions cannot use it. [`discard`] finishes it;
/// [`remove_abort`] undoes it.
pub fn remove_prepare(node: &NodeRef, name: &str) -> Result<()> {
    let persistent = check_removable(node, name)?;
    if persistent {
        remove_stored(node, name)?;
    }
    if let Some(b) = node.bitmaps().get_mut(name) {
        b.busy = true;
    }
    Ok(())
}

/// Undo [`remove_prepare`]: the bitmap is usable again, and a persistent one is stored again
/// at the next checkpoint (its stored copy was deleted).
pub fn remove_abort(node: &NodeRef, name: &str) {
    let persistent = match node.bitmaps().get_mut(name) {
        Some(b) => {
            b.busy = false;
            b.persistent
        }
        None => false,
    };
    if persistent {
        node.note_bitmaps_changed();
        if let Err(e) = node.checkpoint_bitmaps() {
            tracing::warn!(node = node.name(), bitmap = name, error = %e,
                "storing a bitmap again after an aborted remove failed; it is stored at close");
        }
    }
}

/// `block-dirty-bitmap-clear`; returns the old bits (for a transaction's undo).
pub fn clear(node: &NodeRef, name: &str) -> Result<HBitmap> {
    let mut list = node.bitmaps();
    let b = list.usable(name, BitmapUse::Modify)?;
    let old = b.bits.clone();
    b.bits.reset_all();
    drop(list);
    node.note_bitmaps_changed();
    Ok(old)
}

/// `block-dirty-bitmap-enable` / `-disable`; returns the previous recording state.
pub fn set_recording(node: &NodeRef, name: &str, recording: bool) -> Result<bool> {
    let mut list = node.bitmaps();
    let b = list.usable(name, BitmapUse::Toggle)?;
    let was = b.recording;
    b.recording = recording;
    node.refresh_recording(&list);
    drop(list);
    node.note_bitmaps_changed();
    Ok(was)
}

/// `block-dirty-bitmap-merge`: target |= every source. Returns the target's old bits.
pub fn merge(node: &NodeRef, target: &str, sources: &[(NodeRef, String)]) -> Result<HBitmap> {
    if sources.is_empty() {
        return Err(Error::generic(
            "'bitmaps' must name at least one source bitmap",
        ));
    }
    {
        let mut list = node.bitmaps();
        list.usable(target, BitmapUse::Modify)?;
    }
    // Copy the sources out first, one node lock at a time, so no two node locks are ever held.
    let mut copies = Vec::with_capacity(sources.len());
    for (src_node, src_name) in sources {
        let mut list = src_node.bitmaps();
        let b = list.usable(src_name, BitmapUse::Read)?;
        copies.push(b.bits.clone());
    }
    let mut list = node.bitmaps();
    let t = list.usable(target, BitmapUse::Modify)?;
    let old = t.bits.clone();
    let mut merged = t.bits.clone();
    for src in &copies {
        if src.size() != merged.size() {
            return Err(Error::generic(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                merged.size(),
                src.size()
            )));
        }
        merged
            .merge(src)
            .map_err(|e| Error::generic(e.to_string()))?;
    }
    t.bits = merged;
    let persistent = t.persistent;
    drop(list);
    node.note_bitmaps_changed();
    if persistent {
        // Merged bits came from no write: store them now, so a crash cannot lose them.
        node.checkpoint_bitmaps()?;
    }
    Ok(old)
}

/// Put back bits saved by [`clear`] or [`merge`] (transaction abort).
pub fn restore(node: &NodeRef, name: &str, bits: HBitmap) {
    if let Some(b) = node.bitmaps().get_mut(name) {
        b.bits = bits;
    }
    node.note_bitmaps_changed();
}

/// `x-debug-block-dirty-bitmap-sha256`: hex SHA-256 over the bits as QEMU lays them out.
pub fn sha256(node: &NodeRef, name: &str) -> Result<String> {
    let list = node.bitmaps();
    let b = list.find(name)?;
    // Streams the words: no buffer the size of the bitmap (hundreds of MiB at 512 B granules).
    let digest = b.bits.qemu_sha256();
    Ok(digest.iter().map(|x| format!("{x:02x}")).collect())
}

/// Mark a bitmap busy (export, job) after checking it is usable; `Err` with QEMU's text otherwise.
pub fn acquire(node: &NodeRef, name: &str) -> Result<()> {
    let mut list = node.bitmaps();
    let b = list.usable(name, BitmapUse::Read)?;
    b.busy = true;
    Ok(())
}

/// Release a bitmap taken with [`acquire`].
pub fn release(node: &NodeRef, name: &str) {
    if let Some(b) = node.bitmaps().get_mut(name) {
        b.busy = false;
    }
}
