//! Creating a new, empty image (what `qemu-img create -f qcow2` does).
//!
//! Layout of a fresh image: the header in cluster 0, the refcount table, the refcount blocks
//! describing all of these, then the (empty) L1 table. Everything else is allocated on write.

use crate::error::{Error, ErrorKind, Result};
use crate::header::{
    Header, RawHeader, COMPAT_LAZY_REFCOUNTS, MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MIN_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::ondisk::encode_u64_table;
use crate::refcount::set_entry;
use crate::storage::Storage;
use crate::types::Geometry;

/// Parameters of a new image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a multiple of 512).
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name recorded in the header.
    pub backing_file: Option<String>,
    /// Backing file format recorded in the header (needs `backing_file`).
    pub backing_fmt: Option<String>,
    /// 2 (compat=0.10) or 3 (compat=1.1, default).
    pub version: u32,
    /// Refcount width in bits: a power of two from 1 to 64 (default 16; v2 only 16).
    pub refcount_bits: u32,
    /// Set the lazy refcounts compatible feature (v3 only).
    pub lazy_refcounts: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            backing_file: None,
            backing_fmt: None,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
        }
    }
}

/// An `InvalidArgument` error.
fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Check the options; returns (cluster_bits, refcount_order, virtual size).
fn validate(opts: &CreateOptions) -> Result<(u32, u32, u64)> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
    {
        return Err(Error::plain(
            ErrorKind::InvalidArgument,
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(bad(format!("version {} (must be 2 or 3)", opts.version)));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(bad(format!(
            "refcount_bits {rb} must be a power of two up to 64"
        )));
    }
    if opts.version == 2 && (rb != 16 || opts.lazy_refcounts) {
        return Err(bad(
            "version 2 images support only 16-bit refcounts and no lazy refcounts",
        ));
    }
    if opts.backing_fmt.is_some() && opts.backing_file.is_none() {
        return Err(bad("a backing format needs a backing file"));
    }
    if let Some(b) = &opts.backing_file {
        if b.is_empty() || b.len() > MAX_BACKING_NAME as usize {
            return Err(bad("backing file name must be 1..=1023 bytes"));
        }
    }
    let size = opts
        .size
        .checked_next_multiple_of(512)
        .ok_or_else(|| bad("size too large"))?;
    let g = Geometry {
        cluster_bits: cs.trailing_zeros(),
        refcount_order: rb.trailing_zeros(),
    };
    if g.l1_entries_for(size) * 8 > MAX_L1_BYTES {
        return Err(bad(format!(
            "size {size} is too large for cluster size {cs}"
        )));
    }
    Ok((g.cluster_bits, g.refcount_order, size))
}

/// Write a new empty image to `file` (its previous content is discarded).
pub fn create(file: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    let (cluster_bits, refcount_order, size) = validate(opts)?;
    let g = Geometry {
        cluster_bits,
        refcount_order,
    };
    let cs = g.cluster_size();
    let l1_entries = g.l1_entries_for(size);
    let l1_clusters = g.clusters_for(l1_entries * 8).max(1);
    let epb = g.refblock_entries();
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters;
        let need_rb = total.div_ceil(epb);
        let need_rt = g.clusters_for(need_rb * 8);
        if (need_rb, need_rt) == (rb, rt) {
            break;
        }
        (rb, rt) = (need_rb.max(rb), need_rt.max(rt));
    }
    let total = 1 + rt + rb + l1_clusters;
    let (rt_off, rb_off, l1_off) = (cs, (1 + rt) * cs, (1 + rt + rb) * cs);
    let v3 = opts.version == 3;
    let raw = RawHeader {
        magic: MAGIC,
        version: opts.version,
        cluster_bits,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt as u32,
        compatible_features: if opts.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        refcount_order,
        header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN },
        ..RawHeader::default()
    };
    let header = Header {
        raw,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_fmt.clone(),
        feature_names: Vec::new(),
        bitmaps: None,
        unknown_exts: Vec::new(),
        stale_bitmaps: false,
    };
    let head = header.serialize()?;
    let table: Vec<u64> = (0..rt * cs / 8)
        .map(|i| if i < rb { rb_off + i * cs } else { 0 })
        .collect();
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for c in 0..total {
        let (b, i) = ((c / epb) as usize, (c % epb) as usize);
        set_entry(
            &mut blocks[b * cs as usize..(b + 1) * cs as usize],
            i,
            refcount_order,
            1,
        );
    }
    let io = |e| Error::io(e, "creating the image");
    file.truncate(0).map_err(io)?;
    file.write_at(&head, 0).map_err(io)?;
    file.write_at(&encode_u64_table(&table), rt_off)
        .map_err(io)?;
    file.write_at(&blocks, rb_off).map_err(io)?;
    file.write_at(&vec![0u8; (l1_entries * 8).max(8) as usize], l1_off)
        .map_err(io)?;
    file.flush().map_err(io)?;
    Ok(())
}
