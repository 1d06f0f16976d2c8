//! The snapshot table: whole entries (fixed part, extra data, id, name) read from and written
//! to the image, and the public description of a snapshot.
//!
//! An entry is the 40-byte [`SnapshotHead`], `extra_data_size` bytes of extra data (QEMU
//! writes 24: the 64-bit VM state size, the virtual disk size at snapshot time and the
//! instruction count, -1 when unknown), the id string, the name, and padding to 8 bytes. The
//! table holds `nb_snapshots` entries back to back from the cluster-aligned `snapshots_offset`.
//! Entries are kept with their raw extra data, so rewriting the table never loses fields this
//! driver does not interpret.

use crate::error::{invalid, Error, Result};
use crate::header::MAX_SNAPSHOTS;
use crate::meta::Meta;
use crate::ondisk::be64_at;
use crate::snapshot::SnapshotHead;

/// Largest snapshot table we read or write (QEMU's limit).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data per entry (QEMU's limit).
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Extra data size of the entries we write.
const OUR_EXTRA: usize = 24;

/// An internal snapshot as `qemu-img snapshot -l` and QMP's `SnapshotInfo` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id (QEMU uses decimal numbers).
    pub id: String,
    /// Name (tag); unique among the image's snapshots when created through QMP.
    pub name: String,
    /// Bytes of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count at creation, if recorded (QEMU writes -1 for none).
    pub icount: Option<u64>,
    /// Virtual disk size when the snapshot was taken, if recorded.
    pub disk_size: Option<u64>,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
}

/// One table entry, raw enough to be written back unchanged.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The fixed part (the length fields are recomputed when serialising).
    pub head: SnapshotHead,
    /// Extra data as stored.
    pub extra: Vec<u8>,
    /// Id bytes.
    pub id: Vec<u8>,
    /// Name bytes.
    pub name: Vec<u8>,
}

impl Entry {
    /// A new disk-only entry (no VM state) with QEMU's 24 bytes of extra data.
    pub fn new(id: String, name: &str, when: SnapshotTime, l1: (u64, u32), disk_size: u64) -> Self {
        let mut extra = vec![0u8; OUR_EXTRA];
        extra[8..16].copy_from_slice(&disk_size.to_be_bytes());
        extra[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        Entry {
            head: SnapshotHead {
                l1_table_offset: l1.0,
                l1_size: l1.1,
                id_str_size: 0,
                name_size: 0,
                date_sec: when.date_sec,
                date_nsec: when.date_nsec,
                vm_clock_nsec: when.vm_clock_nsec,
                vm_state_size: 0,
                extra_data_size: 0,
            },
            extra,
            id: id.into_bytes(),
            name: name.as_bytes().to_vec(),
        }
    }

    /// Bytes this entry occupies in the table (padded to 8).
    fn len(&self) -> usize {
        (SnapshotHead::SIZE + self.extra.len() + self.id.len() + self.name.len()).div_ceil(8) * 8
    }

    /// The public description.
    pub fn info(&self) -> SnapshotInfo {
        let x = &self.extra;
        let large = (x.len() >= 8).then(|| be64_at(x, 0));
        let icount = (x.len() >= 24)
            .then(|| be64_at(x, 2))
            .filter(|&v| v != u64::MAX);
        SnapshotInfo {
            id: String::from_utf8_lossy(&self.id).into_owned(),
            name: String::from_utf8_lossy(&self.name).into_owned(),
            vm_state_size: large.unwrap_or(self.head.vm_state_size as u64),
            date_sec: self.head.date_sec,
            date_nsec: self.head.date_nsec,
            vm_clock_nsec: self.head.vm_clock_nsec,
            icount,
            disk_size: (x.len() >= 16).then(|| be64_at(x, 1)),
            l1_table_offset: self.head.l1_table_offset,
            l1_size: self.head.l1_size,
        }
    }

    /// Whether this entry matches the given id and/or name (both must match when both are
    /// given, as QEMU's lookup does).
    pub fn matches(&self, id: Option<&str>, name: Option<&str>) -> bool {
        id.is_none_or(|i| self.id == i.as_bytes()) && name.is_none_or(|n| self.name == n.as_bytes())
    }
}

/// When a snapshot is taken: wall clock and guest clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotTime {
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
}

/// Serialise a whole table.
pub fn serialize(entries: &[Entry]) -> Result<Vec<u8>> {
    let total: usize = entries.iter().map(Entry::len).sum();
    if total as u64 > MAX_TABLE_BYTES {
        return Err(Error::new(
            crate::error::ErrorKind::NoSpace,
            "snapshot table would exceed its maximum size",
        ));
    }
    let mut out = Vec::with_capacity(total);
    for e in entries {
        let mut head = e.head;
        head.extra_data_size = e.extra.len() as u32;
        head.id_str_size = u16::try_from(e.id.len()).map_err(|_| {
            Error::new(
                crate::error::ErrorKind::InvalidArgument,
                "snapshot id too long",
            )
        })?;
        head.name_size = u16::try_from(e.name.len()).map_err(|_| {
            Error::new(
                crate::error::ErrorKind::InvalidArgument,
                "snapshot name too long",
            )
        })?;
        let start = out.len();
        out.extend_from_slice(&head.to_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.name);
        out.resize(start + e.len(), 0);
    }
    Ok(out)
}

/// Parse `nb` entries from the start of `table`; also returns the bytes they occupy.
#[cfg(test)]
fn parse(table: &[u8], nb: u32) -> Result<(Vec<Entry>, usize)> {
    parse_prefix(table, nb)?
        .ok_or_else(|| invalid("the snapshot table runs past the end of the file"))
}

/// Like [`parse`], but None when `table` ends before the last entry (read more).
fn parse_prefix(table: &[u8], nb: u32) -> Result<Option<(Vec<Entry>, usize)>> {
    if nb > MAX_SNAPSHOTS {
        return Err(invalid(format!("too many snapshots ({nb})")));
    }
    let mut pos = 0usize;
    let mut out = Vec::new();
    for i in 0..nb {
        let Some(head) = SnapshotHead::load(&table[pos.min(table.len())..]) else {
            return Ok(None);
        };
        if head.extra_data_size > MAX_EXTRA_DATA {
            return Err(invalid(format!("snapshot {i}: extra data too large")));
        }
        let x = pos + SnapshotHead::SIZE;
        let idp = x + head.extra_data_size as usize;
        let namep = idp + head.id_str_size as usize;
        let end = namep + head.name_size as usize;
        if end > table.len() {
            return Ok(None);
        }
        out.push(Entry {
            head,
            extra: table[x..idp].to_vec(),
            id: table[idp..namep].to_vec(),
            name: table[namep..end].to_vec(),
        });
        pos = end.div_ceil(8) * 8;
    }
    Ok(Some((out, pos.min(table.len()))))
}

impl Meta {
    /// Read the whole snapshot table from the file, reading only as much as it needs (a
    /// first guess, grown while entries run past it). Also returns its length in bytes.
    pub fn read_snapshot_table_len(&mut self) -> Result<(Vec<Entry>, usize)> {
        let r = self.header.raw;
        if r.nb_snapshots == 0 {
            return Ok((Vec::new(), 0));
        }
        let limit = self
            .file_limit()
            .saturating_sub(r.snapshots_offset)
            .min(MAX_TABLE_BYTES) as usize;
        let mut want = limit.min(64 << 10);
        loop {
            let mut table = vec![0u8; want];
            self.file
                .read_at(&mut table, r.snapshots_offset)
                .map_err(|e| Error::io(e, "reading the snapshot table"))?;
            if let Some(parsed) = parse_prefix(&table, r.nb_snapshots)? {
                return Ok(parsed);
            }
            if want >= limit {
                return Err(invalid("the snapshot table runs past the end of the file"));
            }
            want = want.saturating_mul(4).min(limit);
        }
    }

    /// Read the whole snapshot table from the file.
    pub fn read_snapshot_table(&mut self) -> Result<Vec<Entry>> {
        Ok(self.read_snapshot_table_len()?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_with_padding_and_extra_data() {
        let when = SnapshotTime {
            date_sec: 7,
            date_nsec: 8,
            vm_clock_nsec: 9,
        };
        let a = Entry::new("1".into(), "first", when, (0x30000, 1), 1 << 20);
        let mut b = Entry::new("2".into(), "second-longer", when, (0x50000, 2), 2 << 20);
        b.extra.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let bytes = serialize(&[a.clone(), b.clone()]).expect("serialize");
        assert_eq!(bytes.len() % 8, 0);
        let (back, used) = parse(&bytes, 2).expect("parse");
        assert_eq!(used, bytes.len());
        assert_eq!(back[0].info(), a.info());
        assert_eq!(back[1].extra, b.extra);
        let i = back[1].info();
        assert_eq!((i.id.as_str(), i.name.as_str()), ("2", "second-longer"));
        assert_eq!(i.disk_size, Some(2 << 20));
        assert_eq!(i.icount, None);
        assert_eq!((i.l1_table_offset, i.l1_size), (0x50000, 2));
    }

    #[test]
    fn a_truncated_table_is_invalid() {
        let e = Entry::new("1".into(), "n", SnapshotTime::default(), (0x30000, 1), 0);
        let bytes = serialize(&[e]).expect("serialize");
        assert!(parse(&bytes[..bytes.len() - 8], 1).is_err());
        assert!(parse(&bytes, 2).is_err());
    }

    #[test]
    fn lookup_by_id_and_name_needs_both_to_match() {
        let e = Entry::new("3".into(), "x", SnapshotTime::default(), (0, 0), 0);
        assert!(e.matches(Some("3"), None));
        assert!(e.matches(None, Some("x")));
        assert!(e.matches(Some("3"), Some("x")));
        assert!(!e.matches(Some("3"), Some("y")));
        assert!(!e.matches(Some("x"), None));
    }
}
