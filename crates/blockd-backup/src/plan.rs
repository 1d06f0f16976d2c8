//! Planning a backup run: for each disk, full, incremental or differential (with the reason
//! when a disk falls back to a full), from the repository's latest records and the daemon's
//! bitmaps; and which of the tool's bitmaps on a node belong to a recorded chain.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::backup::Want;
use crate::error::{Error, Kind, Result};
use crate::fleece::bitmaps_of;
use crate::manifest::{DiskKind, DiskRecord, FileRecord, Manifest, Repo};

/// One disk's plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The disk's name in the repository (as given with `--disk`).
    pub disk: String,
    /// Node name the daemon's commands address.
    pub node: String,
    /// Kind to take.
    pub kind: DiskKind,
    /// Why a full was chosen instead of an incremental.
    pub reason: Option<String>,
    /// Virtual size.
    pub size: u64,
    /// Bitmap whose frozen copy says what to read (inc/diff).
    pub src_bitmap: Option<String>,
    /// Chain the new file is backed by (base first); empty for a full.
    pub parent: Vec<FileRecord>,
    /// The bitmap since the last full, carried on (inc/diff).
    pub full_bitmap: Option<String>,
    /// Bytes expected to be read.
    pub estimate: u64,
    /// The node can store persistent bitmaps (qcow2).
    pub persistent: bool,
}

/// The latest backup record of each disk.
pub fn latest_records(all: &[Manifest]) -> HashMap<String, DiskRecord> {
    let mut m = HashMap::new();
    for b in all {
        for d in &b.disks {
            m.insert(d.name.clone(), d.clone());
        }
    }
    m
}

/// Plan one disk.
pub fn plan_disk(
    repo: &Repo<'_>,
    nodes: &[Value],
    disk: &str,
    node: &str,
    want: Want,
    prev: Option<&DiskRecord>,
) -> Result<Plan> {
    let info = nodes
        .iter()
        .find(|n| n["node-name"] == node)
        .ok_or_else(|| Error::new(Kind::Usage, format!("no node '{node}' on the daemon")))?;
    let named = if disk == node {
        format!("'{disk}'")
    } else {
        format!("'{disk}' (node '{node}')")
    };
    let size = info["image"]["virtual-size"].as_u64().unwrap_or(0);
    // A read-only image cannot store a bitmap (blockd refuses the add; QSD accepts it and
    // drops it at close): its bitmap lives in the daemon only.
    let persistent = info["drv"] == "qcow2" && info["ro"] != true;
    let mut plan = Plan {
        disk: disk.to_string(),
        node: node.to_string(),
        kind: DiskKind::Full,
        reason: None,
        size,
        src_bitmap: None,
        parent: Vec::new(),
        full_bitmap: None,
        estimate: size,
        persistent,
    };
    if want == Want::Full {
        return Ok(plan);
    }
    let kind = if want == Want::Diff {
        DiskKind::Diff
    } else {
        DiskKind::Inc
    };
    let why_not = (|| -> std::result::Result<(String, u64, Vec<FileRecord>, String), String> {
        let p = prev.ok_or("no earlier backup of this disk")?;
        let bm = if kind == DiskKind::Diff {
            &p.full_bitmap
        } else {
            &p.bitmap
        };
        let b = bitmaps_of(nodes, node)
            .into_iter()
            .find(|b| b["name"] == bm.as_str())
            .ok_or_else(|| format!("bitmap '{bm}' is missing on node '{node}'"))?;
        if b["inconsistent"] == true {
            return Err(format!(
                "bitmap '{bm}' is inconsistent (the image was not closed cleanly)"
            ));
        }
        if b["recording"] != true {
            return Err(format!("bitmap '{bm}' is not recording"));
        }
        if p.size != size {
            return Err(format!("disk size changed from {} to {size}", p.size));
        }
        let chain: Vec<FileRecord> = if kind == DiskKind::Diff {
            p.chain.iter().take(1).cloned().collect()
        } else {
            p.chain.clone()
        };
        if let Some(f) = chain.iter().find(|f| !repo.store.exists(&f.name)) {
            return Err(format!("chain file {} is missing", f.name));
        }
        Ok((
            bm.clone(),
            b["count"].as_u64().unwrap_or(size),
            chain,
            p.full_bitmap.clone(),
        ))
    })();
    match why_not {
        Ok((bm, count, chain, full_bm)) => {
            plan.kind = kind;
            plan.src_bitmap = Some(bm);
            plan.estimate = count;
            plan.parent = chain;
            plan.full_bitmap = Some(full_bm);
        }
        Err(reason) if want == Want::Auto => plan.reason = Some(reason),
        Err(reason) => {
            return Err(Error::new(
                Kind::Repository,
                format!(
                    "cannot take {} backup of {named}: {reason} (use 'auto' or 'full')",
                    kind.as_str()
                ),
            ))
        }
    }
    Ok(plan)
}

/// Bitmaps to keep per node: the latest backup's tracking and full-anchor bitmaps.
/// `targets` pairs each disk name with its node. A node's bitmaps recorded under another disk
/// name (the same disk named by its device once, by its node another time) are kept too.
pub fn keep_set(
    latest: &HashMap<String, DiskRecord>,
    targets: &[(String, String)],
) -> HashMap<String, HashSet<String>> {
    let mut keep: HashMap<String, HashSet<String>> = HashMap::new();
    for (d, node) in targets {
        let set = keep.entry(node.clone()).or_default();
        for r in latest.values().filter(|r| r.name == *d || r.node == *node) {
            set.insert(r.bitmap.clone());
            set.insert(r.full_bitmap.clone());
        }
    }
    keep
}
