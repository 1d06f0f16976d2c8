//! Query results: nodes and bitmaps rendered as QEMU's BlockDeviceInfo / BlockDirtyInfo.

use serde_json::{json, Map, Value};

use block::bitmap::DirtyBitmap;
use block::driver::FormatSpecific;
use block::graph::Graph;
use block::NodeRef;

/// BlockDirtyInfo for one bitmap, members in QEMU 10's order.
pub fn dirty_info(b: &DirtyBitmap) -> Value {
    let mut m = Map::new();
    if let Some(name) = &b.name {
        m.insert("name".into(), json!(name));
    }
    m.insert("recording".into(), json!(b.recording));
    m.insert("persistent".into(), json!(b.persistent));
    m.insert("busy".into(), json!(b.busy));
    m.insert("granularity".into(), json!(b.bits.granularity()));
    m.insert("count".into(), json!(b.bits.count()));
    if b.inconsistent {
        m.insert("inconsistent".into(), json!(true));
    }
    Value::Object(m)
}

/// The node's bitmaps, newest first; `None` when it has none (QEMU omits the member).
pub fn dirty_bitmaps(node: &NodeRef) -> Option<Value> {
    let list = node.bitmaps();
    if list.items.is_empty() {
        return None;
    }
    Some(Value::Array(
        list.items.iter().rev().map(dirty_info).collect(),
    ))
}

fn format_specific(fs: &FormatSpecific) -> Value {
    match fs {
        FormatSpecific::File => json!({"type": "file", "data": {}}),
        FormatSpecific::Qcow2 {
            compat,
            lazy_refcounts,
            refcount_bits,
            corrupt,
            bitmaps,
        } => {
            let mut data = Map::new();
            data.insert("compat".into(), json!(compat));
            if compat != "0.10" {
                data.insert("compression-type".into(), json!("zlib"));
                data.insert("lazy-refcounts".into(), json!(lazy_refcounts));
                if !bitmaps.is_empty() {
                    let list: Vec<Value> = bitmaps
                        .iter()
                        .map(|(name, gran, flags)| json!({"flags": flags, "name": name, "granularity": gran}))
                        .collect();
                    data.insert("bitmaps".into(), Value::Array(list));
                }
            }
            data.insert("refcount-bits".into(), json!(refcount_bits));
            if compat != "0.10" {
                data.insert("corrupt".into(), json!(corrupt));
                data.insert("extended-l2".into(), json!(false));
            }
            json!({"type": "qcow2", "data": data})
        }
    }
}

/// ImageInfo for a node; with `chain`, the backing image nested as `backing-image`.
pub fn image_info(node: &NodeRef, chain: bool) -> Value {
    let facts = node.facts();
    let mut m = Map::new();
    m.insert("virtual-size".into(), json!(node.size()));
    m.insert("filename".into(), json!(facts.filename));
    if let Some(c) = facts.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("format".into(), json!(node.driver_name()));
    if let Some(a) = facts.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(fs) = &facts.format_specific {
        m.insert("format-specific".into(), format_specific(fs));
    }
    m.insert("dirty-flag".into(), json!(facts.dirty_flag));
    if let Some(b) = &facts.backing_filename {
        m.insert("backing-filename".into(), json!(b));
        m.insert(
            "full-backing-filename".into(),
            json!(block::graph::resolve_backing_path(&facts.filename, b)),
        );
        if let Some(f) = &facts.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    if chain {
        if let Some(b) = node.child("backing") {
            m.insert("backing-image".into(), image_info(b, true));
        }
    }
    Value::Object(m)
}

fn backing_depth(node: &NodeRef) -> u64 {
    let mut depth = 0;
    let mut cur = node.child("backing").cloned();
    while let Some(n) = cur {
        depth += 1;
        cur = n.child("backing").cloned();
    }
    depth
}

/// BlockDeviceInfo for a node (`query-named-block-nodes`, `query-block`'s `inserted`).
pub fn node_info(node: &NodeRef, flat: bool) -> Value {
    let facts = node.facts();
    let flags = node.flags();
    let mut m = Map::new();
    m.insert("iops_rd".into(), json!(0));
    m.insert(
        "detect_zeroes".into(),
        json!(if flags.detect_zeroes.is_empty() {
            "off"
        } else {
            &flags.detect_zeroes
        }),
    );
    m.insert("active".into(), json!(true));
    m.insert("image".into(), image_info(node, !flat));
    m.insert("iops_wr".into(), json!(0));
    m.insert("ro".into(), json!(node.read_only()));
    m.insert("node-name".into(), json!(node.name()));
    m.insert(
        "backing_file_depth".into(),
        json!(if flat { 0 } else { backing_depth(node) }),
    );
    m.insert("drv".into(), json!(node.driver_name()));
    m.insert("iops".into(), json!(0));
    m.insert("bps_wr".into(), json!(0));
    m.insert("write_threshold".into(), json!(0));
    if let Some(b) = &facts.backing_filename {
        let full = block::graph::resolve_backing_path(&facts.filename, b);
        m.insert("backing_file".into(), json!(full));
    }
    if let Some(bitmaps) = dirty_bitmaps(node) {
        m.insert("dirty-bitmaps".into(), bitmaps);
    }
    m.insert("encrypted".into(), json!(false));
    m.insert("bps".into(), json!(0));
    m.insert("bps_rd".into(), json!(0));
    m.insert(
        "cache".into(),
        json!({"no-flush": flags.cache_no_flush, "direct": flags.cache_direct, "writeback": true}),
    );
    m.insert("file".into(), json!(facts.filename));
    Value::Object(m)
}

/// `query-named-block-nodes`: newest first, as QEMU lists them.
pub fn named_block_nodes(graph: &Graph, flat: bool) -> Value {
    Value::Array(
        graph
            .nodes()
            .iter()
            .rev()
            .map(|n| node_info(n, flat))
            .collect(),
    )
}
