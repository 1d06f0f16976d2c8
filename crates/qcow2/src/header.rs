//! The image header (cluster 0): fixed fields, feature bits, header extensions.
//!
//! [`Header::parse`] validates everything an opener needs before trusting any offset in it;
//! [`Header::serialize`] writes the header back (fixed fields, then extensions, then the backing
//! file name), keeping unknown extensions.

use crate::error::{invalid, unsupported, Error, ErrorKind, Result};
use crate::ondisk::on_disk_struct;
use crate::types::Geometry;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest supported cluster_bits (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Size of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest valid version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Size of the version 3 header we write (with the compression type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible feature bits this driver understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
/// Compatible feature bit 0: lazy refcounts allowed.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is valid.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bits this driver keeps on a writable open.
pub const AUTOCLEAR_KNOWN: u64 = AUTOCLEAR_BITMAPS | crate::dirty_log::AUTOCLEAR_DIRTY_LOG;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

on_disk_struct! {
    /// The fixed header fields (v3 layout; a v2 header is the first 72 bytes).
    pub struct RawHeader [112] {
        /// Must be [`MAGIC`].
        0 => magic: u32,
        /// 2 or 3.
        4 => version: u32,
        /// Where the backing file name is stored (0: none).
        8 => backing_file_offset: u64,
        /// Length of the backing file name.
        16 => backing_file_size: u32,
        /// log2 of the cluster size.
        20 => cluster_bits: u32,
        /// Virtual disk size in bytes.
        24 => size: u64,
        /// 0 none, 1 AES, 2 LUKS.
        32 => crypt_method: u32,
        /// Number of L1 entries.
        36 => l1_size: u32,
        /// Host offset of the L1 table.
        40 => l1_table_offset: u64,
        /// Host offset of the refcount table.
        48 => refcount_table_offset: u64,
        /// Length of the refcount table in clusters.
        56 => refcount_table_clusters: u32,
        /// Number of internal snapshots.
        60 => nb_snapshots: u32,
        /// Host offset of the snapshot table.
        64 => snapshots_offset: u64,
        /// Incompatible feature bits (v3).
        72 => incompatible_features: u64,
        /// Compatible feature bits (v3).
        80 => compatible_features: u64,
        /// Autoclear feature bits (v3).
        88 => autoclear_features: u64,
        /// log2 of the refcount width (v3; v2 implies 4).
        96 => refcount_order: u32,
        /// Length of this header (v3).
        100 => header_length: u32,
        /// Compression type (valid when header_length > 104): 0 zlib, 1 zstd.
        104 => compression_type: u8,
    }
}

on_disk_struct! {
    /// The head of one header extension.
    pub struct ExtHead [8] {
        /// Extension type.
        0 => ext_type: u32,
        /// Data length (data is padded to 8 bytes).
        4 => len: u32,
    }
}

on_disk_struct! {
    /// The bitmaps header extension.
    pub struct BitmapsExt [24] {
        /// Number of bitmaps in the directory.
        0 => nb_bitmaps: u32,
        /// Must be zero.
        4 => reserved: u32,
        /// Directory size in bytes.
        8 => directory_size: u64,
        /// Host offset of the directory.
        16 => directory_offset: u64,
    }
}

/// The feature names we write into the feature table: (type, bit, name).
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The parsed, validated header with its extensions.
#[derive(Debug, Clone)]
pub struct Header {
    /// Fixed fields (v2: v3-only fields zero, refcount_order 4, header_length 72).
    pub raw: RawHeader,
    /// The backing file name.
    pub backing_file: Option<String>,
    /// The backing file format name (extension).
    pub backing_format: Option<String>,
    /// Feature names from the image's feature table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// The bitmaps extension, if present (valid only when autoclear bit 0 is set).
    pub bitmaps: Option<BitmapsExt>,
    /// Extensions we do not interpret, kept as (type, data) to be written back.
    pub unknown_exts: Vec<(u32, Vec<u8>)>,
    /// A bitmaps extension was present without autoclear bit 0: stale, dropped on rewrite.
    pub stale_bitmaps: bool,
}

impl Header {
    /// Geometry of this image.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.raw.cluster_bits,
            refcount_order: self.raw.refcount_order,
        }
    }

    /// Parse and validate a header. `buf` holds the start of the file (at least the first
    /// cluster plus room for a backing name, zero-filled past EOF); `file_size` is the file length.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        let not_qcow2 = || Error::plain(ErrorKind::InvalidImage, "Image is not in qcow2 format");
        let mut raw = RawHeader::load(buf).ok_or_else(not_qcow2)?;
        if file_size < 4 || raw.magic != MAGIC {
            return Err(not_qcow2());
        }
        if file_size < V2_HEADER_LEN as u64 {
            return Err(Error::plain(
                ErrorKind::InvalidImage,
                "qcow2 header too short",
            ));
        }
        match raw.version {
            2 => {
                raw.incompatible_features = 0;
                raw.compatible_features = 0;
                raw.autoclear_features = 0;
                raw.refcount_order = 4;
                raw.header_length = V2_HEADER_LEN;
                raw.compression_type = 0;
            }
            3 => {}
            v => {
                return Err(Error::plain(
                    ErrorKind::Unsupported,
                    format!("Unsupported qcow2 version {v}"),
                ))
            }
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&raw.cluster_bits) {
            return Err(Error::plain(
                ErrorKind::Unsupported,
                format!("Unsupported cluster size: 2^{}", raw.cluster_bits),
            ));
        }
        let cs = 1u64 << raw.cluster_bits;
        if raw.version == 3 {
            if raw.header_length < V3_MIN_HEADER_LEN {
                return Err(invalid(format!(
                    "header_length {} is too short",
                    raw.header_length
                )));
            }
            if raw.header_length as u64 > cs {
                return Err(invalid("header_length exceeds the cluster size"));
            }
            if raw.header_length % 8 != 0 {
                return Err(invalid(format!(
                    "header_length {} is not a multiple of 8",
                    raw.header_length
                )));
            }
            if raw.header_length <= V3_MIN_HEADER_LEN {
                raw.compression_type = 0;
            }
            if raw.refcount_order > 6 {
                return Err(invalid(format!(
                    "refcount_order {} exceeds 6",
                    raw.refcount_order
                )));
            }
        }
        if raw.crypt_method != 0 {
            return Err(unsupported(format!(
                "encryption (crypt_method {})",
                raw.crypt_method
            )));
        }
        let mut hdr = Header {
            raw,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            bitmaps: None,
            unknown_exts: Vec::new(),
            stale_bitmaps: false,
        };
        hdr.parse_extensions(buf)?;
        hdr.check_features()?;
        hdr.check_tables(file_size)?;
        hdr.parse_backing_name(buf, file_size)?;
        Ok(hdr)
    }

    /// Name of a feature bit from the image's feature table, or a generic description.
    fn named_feature(&self, kind: u8, bit: u32) -> Option<String> {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == kind && *b as u32 == bit)
            .map(|(_, _, n)| n.clone())
    }

    /// Refuse incompatible features we do not implement.
    fn check_features(&self) -> Result<()> {
        let inc = self.raw.incompatible_features;
        if inc & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported("external data file"));
        }
        if inc & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)"));
        }
        let unknown = inc & !(INCOMPAT_KNOWN | INCOMPAT_DATA_FILE | INCOMPAT_EXTL2);
        if unknown != 0 {
            // QEMU's wording: named bits by name, the rest as one hex mask.
            let mut names: Vec<String> = Vec::new();
            let mut nameless = 0u64;
            for b in (0..64).filter(|b| unknown & (1u64 << b) != 0) {
                match self.named_feature(0, b) {
                    Some(n) => names.push(n),
                    None => nameless |= 1u64 << b,
                }
            }
            if nameless != 0 {
                names.push(format!("Unknown incompatible feature: {nameless:x}"));
            }
            return Err(Error::plain(
                ErrorKind::Unsupported,
                format!("Unsupported qcow2 feature(s): {}", names.join(", ")),
            ));
        }
        let has_type_bit = inc & INCOMPAT_COMPRESSION != 0;
        match (self.raw.compression_type, has_type_bit) {
            (0, _) => {}
            (1, true) => return Err(unsupported("zstd compression type")),
            (t, true) => return Err(unsupported(format!("compression type {t}"))),
            (t, false) => {
                return Err(invalid(format!(
                    "compression type {t} set without the compression type feature bit"
                )))
            }
        }
        Ok(())
    }

    /// Validate sizes and offsets of the L1, refcount and snapshot tables against the file.
    fn check_tables(&self, file_size: u64) -> Result<()> {
        let r = &self.raw;
        let g = self.geometry();
        let need_l1 = g.l1_entries_for(r.size);
        if need_l1 > MAX_L1_BYTES / 8 {
            return Err(invalid(format!("virtual size {} is too large", r.size)));
        }
        if (r.l1_size as u64) < need_l1 {
            return Err(invalid(format!(
                "L1 table too small: {} entries for {} needed by the virtual size",
                r.l1_size, need_l1
            )));
        }
        if r.l1_size as u64 > MAX_L1_BYTES / 8 {
            return Err(invalid(format!(
                "L1 table too large ({} entries)",
                r.l1_size
            )));
        }
        check_table(
            "L1 table",
            r.l1_table_offset,
            r.l1_size as u64 * 8,
            g,
            file_size,
        )?;
        if r.l1_size > 0 && r.l1_table_offset == 0 {
            return Err(invalid("L1 table offset is 0"));
        }
        let rt_bytes = r.refcount_table_clusters as u64 * g.cluster_size();
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "refcount table too large ({} clusters)",
                r.refcount_table_clusters
            )));
        }
        if r.refcount_table_clusters == 0 || r.refcount_table_offset == 0 {
            return Err(invalid("image has no refcount table"));
        }
        check_table(
            "refcount table",
            r.refcount_table_offset,
            rt_bytes,
            g,
            file_size,
        )?;
        if r.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(format!("too many snapshots ({})", r.nb_snapshots)));
        }
        if r.nb_snapshots > 0 {
            check_table("snapshot table", r.snapshots_offset, 1, g, file_size)?;
        }
        Ok(())
    }

    /// Walk the header extensions after the fixed header, within the first cluster.
    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let cs = 1usize << self.raw.cluster_bits;
        let mut end = cs.min(buf.len());
        if self.raw.backing_file_offset != 0 && (self.raw.backing_file_offset as usize) < end {
            end = self.raw.backing_file_offset as usize;
        }
        let mut pos = self.raw.header_length as usize;
        while pos + ExtHead::SIZE <= end {
            let head = ExtHead::load(&buf[pos..]).ok_or_else(|| invalid("truncated extension"))?;
            pos += ExtHead::SIZE;
            if head.ext_type == EXT_END {
                return Ok(());
            }
            let len = head.len as usize;
            if len > end - pos {
                return Err(invalid(format!(
                    "header extension {:#x} (length {len}) exceeds the first cluster",
                    head.ext_type
                )));
            }
            let data = &buf[pos..pos + len];
            self.parse_extension(head.ext_type, data)?;
            pos += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Interpret one header extension.
    fn parse_extension(&mut self, ext_type: u32, data: &[u8]) -> Result<()> {
        match ext_type {
            EXT_BACKING_FORMAT => {
                if data.len() > 1023 {
                    return Err(invalid("backing format name too long"));
                }
                let name = std::str::from_utf8(data)
                    .map_err(|_| invalid("backing format name is not UTF-8"))?;
                self.backing_format = Some(name.to_string());
            }
            EXT_FEATURE_TABLE => {
                for entry in data.chunks_exact(48) {
                    let name_bytes = &entry[2..];
                    let n = name_bytes
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(name_bytes.len());
                    let name = String::from_utf8_lossy(&name_bytes[..n]).into_owned();
                    self.feature_names.push((entry[0], entry[1], name));
                }
            }
            EXT_BITMAPS => {
                if self.raw.version < 3 {
                    // Bitmaps need v3; QEMU ignores the extension in a v2 image.
                    return Ok(());
                }
                if data.len() != BitmapsExt::SIZE {
                    return Err(invalid(format!(
                        "bitmaps extension has length {}",
                        data.len()
                    )));
                }
                let ext = BitmapsExt::load(data).ok_or_else(|| invalid("bitmaps extension"))?;
                if self.raw.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
                    // Stale: written before an older program changed the image. Ignore it.
                    self.stale_bitmaps = true;
                    return Ok(());
                }
                crate::bitmaps::check_ext(&ext, self.geometry())?;
                self.bitmaps = Some(ext);
            }
            EXT_CRYPTO => return Err(unsupported("encryption header extension")),
            EXT_DATA_FILE => {
                // Only meaningful with the external data file feature, refused above/after.
                self.unknown_exts.push((ext_type, data.to_vec()));
            }
            _ => self.unknown_exts.push((ext_type, data.to_vec())),
        }
        Ok(())
    }

    /// Read the backing file name.
    fn parse_backing_name(&mut self, buf: &[u8], file_size: u64) -> Result<()> {
        let off = self.raw.backing_file_offset;
        if off == 0 {
            return Ok(());
        }
        let len = self.raw.backing_file_size;
        if len > MAX_BACKING_NAME {
            return Err(invalid(format!("backing file name too long ({len} bytes)")));
        }
        let cs = 1u64 << self.raw.cluster_bits;
        if off > cs || off.saturating_add(len as u64) > file_size {
            return Err(invalid(format!(
                "invalid backing file name offset {off:#x}"
            )));
        }
        let (start, end) = (off as usize, off as usize + len as usize);
        if end > buf.len() {
            return Err(invalid("backing file name beyond the header buffer"));
        }
        let name = std::str::from_utf8(&buf[start..end])
            .map_err(|_| invalid("backing file name is not UTF-8"))?;
        if !name.is_empty() {
            self.backing_file = Some(name.to_string());
        }
        Ok(())
    }

    /// Encode the header, extensions and backing name into one buffer for offset 0.
    /// Fails if it does not fit into the first cluster.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let cs = 1usize << self.raw.cluster_bits;
        let mut raw = self.raw;
        let v3 = raw.version >= 3;
        let fixed = if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN } as usize;
        if v3 {
            raw.header_length = V3_HEADER_LEN;
        }
        let mut out = vec![0u8; fixed];
        let push_ext = |out: &mut Vec<u8>, ext_type: u32, data: &[u8]| {
            let head = ExtHead {
                ext_type,
                len: data.len() as u32,
            };
            out.extend_from_slice(&head.to_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        };
        // Bitmaps first: it is rewritten most often, and this keeps it in the first sector.
        if let Some(b) = &self.bitmaps {
            push_ext(&mut out, EXT_BITMAPS, &b.to_bytes());
        }
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut out, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if v3 {
            let mut table = Vec::with_capacity(FEATURE_NAMES.len() * 48);
            for (t, b, name) in FEATURE_NAMES {
                let mut e = [0u8; 48];
                e[0] = *t;
                e[1] = *b;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&e);
            }
            push_ext(&mut out, EXT_FEATURE_TABLE, &table);
        }
        for (t, data) in &self.unknown_exts {
            push_ext(&mut out, *t, data);
        }
        out.extend_from_slice(
            &ExtHead {
                ext_type: EXT_END,
                len: 0,
            }
            .to_bytes(),
        );
        if let Some(name) = &self.backing_file {
            raw.backing_file_offset = out.len() as u64;
            raw.backing_file_size = name.len() as u32;
            out.extend_from_slice(name.as_bytes());
        } else {
            raw.backing_file_offset = 0;
            raw.backing_file_size = 0;
        }
        if out.len() > cs {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "header, extensions and backing file name do not fit into the first cluster",
            ));
        }
        let mut head = raw.to_bytes();
        head.truncate(fixed);
        out[..fixed].copy_from_slice(&head);
        Ok(out)
    }
}

/// Check that a table at `offset` of `bytes` is cluster aligned and inside the file.
pub fn check_table(what: &str, offset: u64, bytes: u64, g: Geometry, file_size: u64) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if !g.is_aligned(offset) {
        return Err(invalid(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_size.div_ceil(g.cluster_size()) * g.cluster_size() => Ok(()),
        _ => Err(invalid(format!(
            "{what} at {offset:#x} ({bytes} bytes) lies beyond the end of the file"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header with 64 KiB clusters, as a 64 KiB buffer.
    fn header(version: u32) -> Header {
        let raw = RawHeader {
            magic: MAGIC,
            version,
            cluster_bits: 16,
            size: 1 << 20,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            refcount_order: 4,
            header_length: if version == 3 {
                V3_HEADER_LEN
            } else {
                V2_HEADER_LEN
            },
            ..RawHeader::default()
        };
        Header {
            raw,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            feature_names: Vec::new(),
            bitmaps: None,
            unknown_exts: vec![(0x1234_5678, vec![1, 2, 3])],
            stale_bitmaps: false,
        }
    }

    /// Serialize and parse again; the backing name location fields are cleared (they are
    /// recomputed by every serialization).
    fn reparse(h: &Header) -> Header {
        let mut buf = h.serialize().expect("fits");
        buf.resize(65536 + 1024, 0);
        let mut back = Header::parse(&buf, 0x40000).expect("parses");
        assert_ne!(back.raw.backing_file_offset, 0);
        back.raw.backing_file_offset = 0;
        back.raw.backing_file_size = 0;
        back
    }

    #[test]
    fn v3_header_round_trips_with_backing_and_unknown_extension() {
        let h = header(3);
        let back = reparse(&h);
        assert_eq!(back.raw, h.raw);
        assert_eq!(back.backing_file, h.backing_file);
        assert_eq!(back.backing_format, h.backing_format);
        assert_eq!(back.unknown_exts, h.unknown_exts);
        assert_eq!(back.feature_names.len(), FEATURE_NAMES.len());
    }

    #[test]
    fn v2_header_round_trips_without_feature_table() {
        let h = header(2);
        let back = reparse(&h);
        assert_eq!(back.raw, h.raw);
        assert!(back.feature_names.is_empty());
        assert_eq!(back.backing_file, h.backing_file);
    }

    #[test]
    fn header_too_large_for_the_cluster_is_refused() {
        let mut h = header(3);
        h.raw.cluster_bits = 9;
        h.unknown_exts = vec![(1, vec![0; 600])];
        assert_eq!(
            h.serialize().expect_err("too big").kind(),
            ErrorKind::NoSpace
        );
    }
}
