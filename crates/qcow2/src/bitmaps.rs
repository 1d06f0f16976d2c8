//! The persistent dirty bitmaps extension: directory, bitmap tables, bitmap data.
//!
//! The directory is validated at open like QEMU does and kept in [`Meta::bitmaps`](crate::meta::Meta::bitmaps). Every change
//! (setting `in_use`, storing a new set, removing one) writes a complete new directory to fresh
//! clusters, switches the header extension to it, and only then frees the old clusters, so a
//! crash leaves either the old or the new set (at worst leaking clusters).

use crate::error::{invalid, Error, ErrorKind, Result};
use crate::header::{BitmapsExt, AUTOCLEAR_BITMAPS};
use crate::ondisk::on_disk_struct;
use crate::types::Geometry;

/// Most bitmaps in one image.
pub const MAX_BITMAPS: u32 = 65535;
/// Longest bitmap name in bytes.
pub const MAX_NAME: usize = 1023;
/// Largest directory in bytes.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Largest bitmap table in entries.
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Largest bitmap data (table entries × cluster size) in bytes.
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Granularity bits accepted (512 B .. 2 GiB).
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u32> = 9..=31;
/// Directory entry flag: the bitmap is loaded by a writer and may be stale.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap is enabled (recording) when loaded.
pub const FLAG_AUTO: u32 = 1 << 1;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry bits that must be zero.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;

on_disk_struct! {
    /// The fixed part of a bitmap directory entry (followed by extra data, name, padding).
    pub struct DirEntryHead [24] {
        /// Host offset of the bitmap table.
        0 => table_offset: u64,
        /// Number of bitmap table entries.
        8 => table_size: u32,
        /// `FLAG_IN_USE`, `FLAG_AUTO`.
        12 => flags: u32,
        /// Bitmap type (1).
        16 => bitmap_type: u8,
        /// log2 of the granularity in bytes.
        17 => granularity_bits: u8,
        /// Name length.
        18 => name_size: u16,
        /// Extra data length (QEMU supports only 0).
        20 => extra_data_size: u32,
    }
}

/// One bitmap as described by the directory in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Unique name.
    pub name: String,
    /// Host offset of its table.
    pub table_offset: u64,
    /// Table entries.
    pub table_size: u32,
    /// Directory flags.
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
}

/// A bitmap as listed by [`crate::Qcow2::bitmaps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// The in_use flag as currently in the file.
    pub in_use: bool,
    /// The auto (enabled) flag.
    pub auto: bool,
}

/// A bitmap read from the file by [`crate::Qcow2::load_bitmaps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedBitmap {
    /// Name.
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// Enabled (recording) after load.
    pub auto: bool,
    /// in_use was already set: not saved cleanly, content unreliable (only removable).
    pub inconsistent: bool,
    /// in_use was set, but the dirty-region log made it consistent: `data` is the stored
    /// bitmap with every region marked since its store added (see [`crate::dirty_log`]).
    pub recovered: bool,
    /// Bit i ↔ granule i, in byte i/8 at bit i%8 from the LSB; `ceil(granules/8)` bytes.
    pub data: Vec<u8>,
}

/// A bitmap to write by [`crate::Qcow2::store_bitmaps`] (see [`crate::StoreBitmapRef`] to lend
/// the data instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreBitmap {
    /// Name (1..=1023 bytes, unique).
    pub name: String,
    /// Bytes of guest disk per bit (a power of two, 512 B .. 2 GiB).
    pub granularity: u64,
    /// Enabled (recording): stored as the auto flag.
    pub auto: bool,
    /// The bitmap was loaded inconsistent: keep it in_use, and keep its on-disk data as is.
    pub inconsistent_keep_in_use: bool,
    /// Same layout as [`LoadedBitmap::data`]; missing bytes count as zero, extra ones are ignored.
    pub data: Vec<u8>,
}

impl BitmapEntry {
    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// Public description.
    pub fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: self.name.clone(),
            granularity: self.granularity(),
            in_use: self.flags & FLAG_IN_USE != 0,
            auto: self.flags & FLAG_AUTO != 0,
        }
    }

    /// Size of this entry in the directory.
    fn encoded_len(&self) -> usize {
        (DirEntryHead::SIZE + self.name.len()).div_ceil(8) * 8
    }
}

/// Number of bytes of bitmap data for a disk of `size` at `granularity`.
pub fn data_len(size: u64, granularity_bits: u32) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// Most bitmap data one image may need in memory, all bitmaps together (8 bitmaps at 512 B
/// granularity on a 2 TiB disk). Beyond it the image is refused rather than loaded.
pub const MAX_TOTAL_BITMAP_BYTES: u64 = 4 << 30;

/// Refuse a bitmap whose data for the image's virtual size would exceed what any valid image
/// can store (QEMU's limit on one bitmap, `MAX_PHYS_BYTES`). An entry not in use already
/// passes (its table covers the disk within that limit); an in-use one may predate a resize
/// and is checked against the disk as it is now.
pub fn check_memory(e: &BitmapEntry, disk_size: u64) -> Result<()> {
    let need = data_len(disk_size, e.granularity_bits as u32);
    if need > MAX_PHYS_BYTES {
        return Err(Error::plain(
            ErrorKind::InvalidImage,
            format!(
                "Bitmap '{}' is too big: a {disk_size}-byte disk at granularity {} needs {need} \
                 bytes of bitmap, more than the limit of {MAX_PHYS_BYTES}",
                e.name,
                e.granularity()
            ),
        ));
    }
    Ok(())
}

/// Validate the bitmaps header extension.
pub fn check_ext(ext: &BitmapsExt, g: Geometry) -> Result<()> {
    if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
        return Err(invalid(format!(
            "bitmaps extension: {} bitmaps",
            ext.nb_bitmaps
        )));
    }
    if ext.reserved != 0 {
        return Err(invalid("bitmaps extension: reserved field is not zero"));
    }
    if ext.directory_size == 0 || ext.directory_size > MAX_DIRECTORY_BYTES {
        return Err(invalid(format!(
            "bitmaps extension: directory size {}",
            ext.directory_size
        )));
    }
    if ext.directory_offset == 0 || !g.is_aligned(ext.directory_offset) {
        return Err(invalid(
            "bitmaps extension: directory offset is not cluster aligned",
        ));
    }
    Ok(())
}

/// Parse and validate a bitmap directory.
pub fn parse_directory(
    buf: &[u8],
    nb: u32,
    g: Geometry,
    disk_size: u64,
) -> Result<Vec<BitmapEntry>> {
    let mut out: Vec<BitmapEntry> = Vec::new();
    let mut pos = 0usize;
    for i in 0..nb {
        let head = DirEntryHead::load(&buf[pos.min(buf.len())..])
            .ok_or_else(|| invalid(format!("bitmap directory: entry {i} is truncated")))?;
        let bad = |why: &str| invalid(format!("bitmap directory: entry {i}: {why}"));
        if head.extra_data_size != 0 {
            return Err(bad("extra data is not supported"));
        }
        let name_start = pos + DirEntryHead::SIZE;
        let name_end = name_start + head.name_size as usize;
        let next = name_end.div_ceil(8) * 8;
        if next > buf.len() {
            return Err(bad("entry runs past the directory"));
        }
        if head.name_size == 0 || head.name_size as usize > MAX_NAME {
            return Err(bad("bad name size"));
        }
        let name = std::str::from_utf8(&buf[name_start..name_end])
            .map_err(|_| bad("name is not UTF-8"))?
            .to_string();
        check_entry(&head, g, disk_size).map_err(|why| bad(&why))?;
        if out.iter().any(|b| b.name == name) {
            return Err(bad(&format!("duplicate bitmap name '{name}'")));
        }
        out.push(BitmapEntry {
            name,
            table_offset: head.table_offset,
            table_size: head.table_size,
            flags: head.flags,
            granularity_bits: head.granularity_bits,
        });
        pos = next;
    }
    if pos != buf.len() {
        return Err(invalid("bitmap directory: size does not match its entries"));
    }
    Ok(out)
}

/// The checks QEMU applies to one directory entry.
fn check_entry(h: &DirEntryHead, g: Geometry, disk_size: u64) -> std::result::Result<(), String> {
    if h.bitmap_type != TYPE_DIRTY_TRACKING {
        return Err(format!("unknown bitmap type {}", h.bitmap_type));
    }
    if !GRANULARITY_BITS.contains(&(h.granularity_bits as u32)) {
        return Err(format!(
            "granularity bits {} out of range 9..=31",
            h.granularity_bits
        ));
    }
    if h.flags & !(FLAG_IN_USE | FLAG_AUTO) != 0 {
        return Err(format!("reserved flags set ({:#x})", h.flags));
    }
    if h.table_offset == 0 || !g.is_aligned(h.table_offset) {
        return Err("bitmap table offset is zero or unaligned".into());
    }
    if h.table_size == 0 || h.table_size as u64 > MAX_TABLE_ENTRIES {
        return Err(format!("bitmap table size {} out of range", h.table_size));
    }
    let phys = h.table_size as u64 * g.cluster_size();
    if phys > MAX_PHYS_BYTES {
        return Err("bitmap is too large".into());
    }
    // An in_use bitmap may predate a resize (it is stored with the new size at close).
    let covered = ((phys as u128) * 8) << h.granularity_bits;
    if h.flags & FLAG_IN_USE == 0 && (disk_size as u128) > covered {
        return Err("bitmap table is too small for the disk".into());
    }
    Ok(())
}

/// Encode a directory.
pub fn serialize_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let head = DirEntryHead {
            table_offset: e.table_offset,
            table_size: e.table_size,
            flags: e.flags,
            bitmap_type: TYPE_DIRTY_TRACKING,
            granularity_bits: e.granularity_bits,
            name_size: e.name.len() as u16,
            extra_data_size: 0,
        };
        out.extend_from_slice(&head.to_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Validate a bitmap name and granularity for storing.
pub fn check_new(name: &str, granularity: u64) -> Result<u8> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("bitmap name must be 1..={MAX_NAME} bytes"),
        ));
    }
    if !granularity.is_power_of_two() || !GRANULARITY_BITS.contains(&granularity.trailing_zeros()) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("bitmap granularity {granularity} must be a power of two from 512 B to 2 GiB"),
        ));
    }
    Ok(granularity.trailing_zeros() as u8)
}

mod image;
#[cfg(test)]
use image::mask_tail;

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        refcount_order: 4,
    };

    fn entry(name: &str) -> BitmapEntry {
        BitmapEntry {
            name: name.into(),
            table_offset: 0x70000,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
        }
    }

    #[test]
    fn directory_round_trips() {
        let dir = serialize_directory(&[entry("a"), entry("bitmap-two")]);
        let parsed = parse_directory(&dir, 2, G, 1 << 30).expect("valid");
        assert_eq!(parsed, vec![entry("a"), entry("bitmap-two")]);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let dir = serialize_directory(&[entry("a"), entry("a")]);
        assert!(parse_directory(&dir, 2, G, 1 << 30).is_err());
    }

    #[test]
    fn reserved_flag_is_rejected() {
        let mut e = entry("a");
        e.flags |= 4;
        assert!(parse_directory(&serialize_directory(&[e]), 1, G, 1 << 30).is_err());
    }

    #[test]
    fn table_too_small_for_disk_is_rejected() {
        // One 64 KiB table cluster at 64 KiB granularity covers 32 TiB; at 512 B only 256 GiB.
        let mut e = entry("a");
        e.granularity_bits = 9;
        assert!(parse_directory(&serialize_directory(&[e]), 1, G, 1 << 40).is_err());
    }

    #[test]
    fn tail_bits_past_the_disk_are_cleared() {
        let mut d = vec![0xff];
        mask_tail(&mut d, 3 * 65536, 16);
        assert_eq!(d, vec![0b111]);
    }
}
