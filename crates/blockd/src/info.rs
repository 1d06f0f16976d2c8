//! Query results: nodes and bitmaps as the schema's BlockDeviceInfo / ImageInfo / BlockDirtyInfo
//! / BlockInfo (`qapi::types`), filled from the core's facts.

use serde_json::Value;

use block::bitmap::DirtyBitmap;
use block::driver::{FormatSpecific, ImageFacts};
use block::graph::resolve_backing_path;
use block::NodeRef;
use qapi::types as t;

/// The facts of nodes (a file's size: an `fstat`) read before a query takes its read claims
/// (see `crate::claims`), so a hung file system stalls that query only, never a command that
/// waits for those claims. A node the query meets that was not read ahead (added meanwhile) is
/// read when met.
#[derive(Default)]
pub struct Facts(Vec<(NodeRef, ImageFacts)>);

impl Facts {
    /// Read the facts of `nodes` and of every node below them.
    pub fn read(nodes: &[NodeRef]) -> Facts {
        let mut out = Facts::default();
        let mut todo: Vec<NodeRef> = nodes.to_vec();
        while let Some(n) = todo.pop() {
            if out.0.iter().any(|(m, _)| std::sync::Arc::ptr_eq(m, &n)) {
                continue;
            }
            todo.extend(n.children().into_iter().map(|c| c.node));
            let f = n.facts();
            out.0.push((n, f));
        }
        out
    }

    fn of(&self, node: &NodeRef) -> ImageFacts {
        match self.0.iter().find(|(m, _)| std::sync::Arc::ptr_eq(m, node)) {
            Some((_, f)) => f.clone(),
            None => node.facts(),
        }
    }
}

/// BlockDirtyInfo for one bitmap.
pub fn dirty_info(b: &DirtyBitmap) -> t::BlockDirtyInfo {
    t::BlockDirtyInfo {
        name: b.name.clone(),
        count: i64::try_from(b.bits.count()).unwrap_or(i64::MAX),
        granularity: u32::try_from(b.bits.granularity()).unwrap_or(u32::MAX),
        recording: b.recording,
        busy: b.busy,
        persistent: b.persistent,
        inconsistent: b.inconsistent.then_some(true),
    }
}

/// The node's bitmaps, newest first; `None` when it has none (QEMU omits the member).
pub fn dirty_bitmaps(node: &NodeRef) -> Option<Vec<t::BlockDirtyInfo>> {
    let mut out: Vec<t::BlockDirtyInfo> =
        node.bitmaps().items.iter().rev().map(dirty_info).collect();
    // The driver's own bitmaps (copy-before-write) were created at open: oldest.
    out.extend(
        node.driver()
            .internal_bitmaps()
            .into_iter()
            .map(|(granularity, count)| t::BlockDirtyInfo {
                name: None,
                count: i64::try_from(count).unwrap_or(i64::MAX),
                granularity: u32::try_from(granularity).unwrap_or(u32::MAX),
                recording: false,
                busy: false,
                persistent: false,
                inconsistent: None,
            }),
    );
    (!out.is_empty()).then_some(out)
}

fn bitmap_flag(flag: &str) -> Option<t::Qcow2BitmapInfoFlags> {
    match flag {
        "in-use" => Some(t::Qcow2BitmapInfoFlags::InUse),
        "auto" => Some(t::Qcow2BitmapInfoFlags::Auto),
        _ => None,
    }
}

fn format_specific(fs: &FormatSpecific) -> t::ImageInfoSpecific {
    match fs {
        FormatSpecific::File => t::ImageInfoSpecific::File(t::ImageInfoSpecificFile {
            extent_size_hint: None,
        }),
        FormatSpecific::Qcow2 {
            compat,
            lazy_refcounts,
            refcount_bits,
            corrupt,
            bitmaps,
        } => {
            let v3 = compat != "0.10";
            let bitmaps: Vec<t::Qcow2BitmapInfo> = bitmaps
                .iter()
                .map(|(name, gran, flags)| t::Qcow2BitmapInfo {
                    name: name.clone(),
                    granularity: u32::try_from(*gran).unwrap_or(u32::MAX),
                    flags: flags.iter().filter_map(|f| bitmap_flag(f)).collect(),
                })
                .collect();
            t::ImageInfoSpecific::Qcow2(t::ImageInfoSpecificQCow2 {
                compat: compat.clone(),
                data_file: None,
                data_file_raw: None,
                extended_l2: v3.then_some(false),
                lazy_refcounts: v3.then_some(*lazy_refcounts),
                corrupt: v3.then_some(*corrupt),
                refcount_bits: *refcount_bits as i64,
                bitmaps: (v3 && !bitmaps.is_empty()).then_some(bitmaps),
                compression_type: t::Qcow2CompressionType::Zlib,
            })
        }
    }
}

/// ImageInfo for a node; with `chain`, the backing image nested as `backing-image`.
pub fn image_info(node: &NodeRef, chain: bool, known: &Facts) -> t::ImageInfo {
    let facts = known.of(node);
    let full_backing = facts
        .backing_filename
        .as_ref()
        .map(|b| resolve_backing_path(&facts.filename, b));
    t::ImageInfo {
        filename: facts.filename.clone(),
        format: node.driver_name().to_string(),
        // snapshot-access has no image info to give (QEMU's get_info fails): no dirty flag.
        dirty_flag: (node.driver_name() != "snapshot-access").then_some(facts.dirty_flag),
        actual_size: facts.actual_size.map(|a| a as i64),
        // QEMU counts a node's length in 512-byte sectors, rounded up (a file of 196616
        // bytes has virtual-size 197120).
        virtual_size: node.size().div_ceil(512).saturating_mul(512) as i64,
        cluster_size: facts.cluster_size.map(|c| c as i64),
        encrypted: None,
        compressed: None,
        backing_filename_format: facts
            .backing_filename
            .as_ref()
            .and(facts.backing_format.clone()),
        backing_filename: facts.backing_filename.clone(),
        full_backing_filename: full_backing,
        snapshots: crate::internal_snapshot::image_snapshots(node),
        format_specific: facts.format_specific.as_ref().map(format_specific),
        backing_image: if chain {
            node.child("backing")
                .map(|b| Box::new(image_info(&b, true, known)))
        } else {
            None
        },
    }
}

fn backing_depth(node: &NodeRef) -> i64 {
    let mut depth = 0;
    let mut cur = node.child("backing");
    while let Some(n) = cur {
        depth += 1;
        cur = n.child("backing");
    }
    depth
}

fn detect_zeroes(setting: &str) -> t::BlockdevDetectZeroesOptions {
    match setting {
        "on" => t::BlockdevDetectZeroesOptions::On,
        "unmap" => t::BlockdevDetectZeroesOptions::Unmap,
        _ => t::BlockdevDetectZeroesOptions::Off,
    }
}

/// BlockDeviceInfo for a node (`query-named-block-nodes`, `query-block`'s `inserted`).
pub fn node_info(node: &NodeRef, flat: bool, known: &Facts) -> t::BlockDeviceInfo {
    let facts = known.of(node);
    let flags = node.flags();
    t::BlockDeviceInfo {
        file: facts.filename.clone(),
        node_name: Some(node.name().to_string()),
        ro: node.read_only(),
        drv: node.driver_name().to_string(),
        // The backing child's file, and nothing without one: QEMU reports none after
        // `backing: null` (at blockdev-add or blockdev-reopen) even though the image's header
        // still names one (that stays in `image`'s `backing-filename`).
        backing_file: node.child("backing").map(|b| known.of(&b).filename),
        backing_file_depth: if flat { 0 } else { backing_depth(node) },
        active: true,
        encrypted: false,
        detect_zeroes: detect_zeroes(&flags.detect_zeroes),
        bps: 0,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 0,
        image: image_info(node, !flat, known),
        bps_max: None,
        bps_rd_max: None,
        bps_wr_max: None,
        iops_max: None,
        iops_rd_max: None,
        iops_wr_max: None,
        bps_max_length: None,
        bps_rd_max_length: None,
        bps_wr_max_length: None,
        iops_max_length: None,
        iops_rd_max_length: None,
        iops_wr_max_length: None,
        iops_size: None,
        group: None,
        cache: t::BlockdevCacheInfo {
            writeback: true,
            direct: flags.cache_direct,
            no_flush: flags.cache_no_flush,
        },
        write_threshold: 0,
        dirty_bitmaps: dirty_bitmaps(node),
    }
}

/// Serialize a reply value (the schema's types always serialise).
pub fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `query-named-block-nodes`: newest first, as QEMU lists them.
pub fn named_block_nodes(nodes: &[NodeRef], flat: bool, known: &Facts) -> Value {
    let nodes: Vec<t::BlockDeviceInfo> = nodes
        .iter()
        .rev()
        .map(|n| node_info(n, flat, known))
        .collect();
    to_value(&nodes)
}

/// `query-block`'s entry for a named device over `node`.
pub fn block_info(device: &str, node: &NodeRef, known: &Facts) -> t::BlockInfo {
    t::BlockInfo {
        device: device.to_string(),
        qdev: None,
        device_type: "unknown".to_string(),
        removable: false,
        locked: false,
        inserted: Some(node_info(node, false, known)),
        tray_open: None,
        io_status: None,
    }
}
