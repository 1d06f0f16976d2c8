//! Translation of typed QAPI options into the core's option types.
//!
//! The inputs are `qapi::types` structs, already checked against the schema and deserialised
//! (by `qapi::types::parse_command` for QMP, by `startup` for the command line), so every
//! member has the right type; this only maps QAPI names onto core options, applies QEMU's
//! defaults and refuses what blockd does not implement.
//!
//! * [`node_options`]: `BlockdevOptions` → `block::graph::NodeOptions` (`blockdev-add`,
//!   `--blockdev`, `--image`).
//! * [`export_args`]: `BlockExportOptions` → [`ExportArgs`] (`block-export-add`, `--export`).
//! * [`create_spec`]: `BlockdevCreateOptions` → `block::create::CreateSpec` (`blockdev-create`).

use block::create::CreateSpec;
use block::graph::{CbwOptions, ChildRef, DriverOptions, NodeOptions};
use block::node::NodeFlags;
use qapi::types::{
    BlockDirtyBitmapOrStr, BlockExportKind, BlockExportOptions, BlockExportType,
    BlockdevCreateOptions, BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevDriver,
    BlockdevDriverOptions, BlockdevOptions, BlockdevQcow2Version, BlockdevRef, BlockdevRefOrNull,
    OnCbwError, OnOffAuto,
};

use crate::daemon::Daemon;

#[path = "convert_blkdebug.rs"]
mod blkdebug;
use crate::exports::ExportArgs;

/// Size of a `null-co` node when the options give none (QEMU's default).
const NULL_DEFAULT_SIZE: u64 = 1 << 30;

/// A non-negative schema `int` as `u64`; negative values count as absent (as before typing).
fn non_negative(v: Option<i64>) -> Option<u64> {
    v.and_then(|x| u64::try_from(x).ok())
}

fn detect_zeroes_name(d: Option<BlockdevDetectZeroesOptions>) -> &'static str {
    match d {
        None | Some(BlockdevDetectZeroesOptions::Off) => "off",
        Some(BlockdevDetectZeroesOptions::On) => "on",
        Some(BlockdevDetectZeroesOptions::Unmap) => "unmap",
    }
}

/// A child given as `BlockdevRef`: a node name, or a node defined inline.
fn child_ref(r: &BlockdevRef) -> Result<ChildRef, String> {
    match r {
        BlockdevRef::Reference(name) => Ok(ChildRef::Name(name.clone())),
        BlockdevRef::Definition(o) => Ok(ChildRef::Inline(Box::new(node_options(o)?))),
    }
}

/// A `BlockdevRefOrNull` member: absent → `None` (the image decides), `null` → `Some(None)`
/// (no child), otherwise `Some(Some(child))`.
fn optional_child(r: Option<&BlockdevRefOrNull>) -> Result<Option<Option<ChildRef>>, String> {
    Ok(match r {
        None => None,
        Some(BlockdevRefOrNull::Null) => Some(None),
        Some(BlockdevRefOrNull::Reference(name)) => Some(Some(ChildRef::Name(name.clone()))),
        Some(BlockdevRefOrNull::Definition(o)) => {
            Some(Some(ChildRef::Inline(Box::new(node_options(o)?))))
        }
    })
}

/// `BlockdevOptions` → `NodeOptions`; drivers blockd lacks are refused by name.
pub fn node_options(o: &BlockdevOptions) -> Result<NodeOptions, String> {
    let cache = o.cache.unwrap_or_default();
    let flags = NodeFlags {
        detect_zeroes: detect_zeroes_name(o.detect_zeroes).to_string(),
        cache_direct: cache.direct.unwrap_or(false),
        cache_no_flush: cache.no_flush.unwrap_or(false),
        discard_unmap: o.discard == Some(BlockdevDiscardOptions::Unmap),
    };
    let driver = match &o.driver {
        BlockdevDriverOptions::File(f) => DriverOptions::File {
            filename: f.filename.clone(),
            locking: f.locking != Some(OnOffAuto::Off),
        },
        BlockdevDriverOptions::NullCo(n) => DriverOptions::Null {
            size: non_negative(n.size).unwrap_or(NULL_DEFAULT_SIZE),
            read_zeroes: n.read_zeroes.unwrap_or(false),
        },
        BlockdevDriverOptions::Raw(r) => DriverOptions::Raw {
            file: child_ref(&r.file)?,
            offset: non_negative(r.offset),
            size: non_negative(r.size),
        },
        BlockdevDriverOptions::Qcow2(q) => DriverOptions::Qcow2 {
            file: child_ref(&q.file)?,
            backing: optional_child(q.backing.as_ref())?,
            cache: block::drivers::qcow2_cache::Qcow2CacheOptions {
                cache_size: q.cache_size,
                l2_cache_size: q.l2_cache_size,
                l2_cache_entry_size: q.l2_cache_entry_size,
                refcount_cache_size: q.refcount_cache_size,
                cache_clean_interval: q.cache_clean_interval,
            },
        },
        BlockdevDriverOptions::Other {
            driver: BlockdevDriver::Blkdebug,
            options,
        } => blkdebug::driver_options(options)?,
        BlockdevDriverOptions::CopyBeforeWrite(c) => DriverOptions::CopyBeforeWrite {
            file: child_ref(&c.file)?,
            target: child_ref(&c.target)?,
            bitmap: c.bitmap.as_ref().map(|b| (b.node.clone(), b.name.clone())),
            config: CbwOptions {
                min_cluster_size: c.min_cluster_size.unwrap_or(0),
                break_snapshot: c.on_cbw_error == Some(OnCbwError::BreakSnapshot),
                timeout_secs: c.cbw_timeout.unwrap_or(0),
            },
        },
        BlockdevDriverOptions::SnapshotAccess(g) => DriverOptions::SnapshotAccess {
            file: child_ref(&g.file)?,
        },
        other => {
            return Err(format!(
                "Driver '{}' is not supported by blockd",
                other.driver().as_str()
            ))
        }
    };
    Ok(NodeOptions {
        node_name: o.node_name.clone(),
        read_only: o.read_only.unwrap_or(false),
        auto_read_only: o.auto_read_only.unwrap_or(false),
        flags,
        driver,
    })
}

fn export_type_name(t: BlockExportType) -> &'static str {
    match t {
        BlockExportType::Nbd => "nbd",
        BlockExportType::VhostUserBlk => "vhost-user-blk",
        BlockExportType::Fuse => "fuse",
        BlockExportType::VduseBlk => "vduse-blk",
    }
}

/// `BlockExportOptions` → export arguments; only NBD exports are supported.
pub fn export_args(o: &BlockExportOptions) -> Result<ExportArgs, String> {
    let nbd = match &o.kind {
        BlockExportKind::Nbd(nbd) => nbd,
        BlockExportKind::Other { export_type, .. } => {
            return Err(format!(
                "Export type '{}' is not supported by blockd",
                export_type_name(*export_type)
            ))
        }
    };
    Ok(ExportArgs {
        id: o.id.clone(),
        node_name: o.node_name.clone(),
        name: nbd.name.clone(),
        description: nbd.description.clone(),
        writable: o.writable.unwrap_or(false),
        bitmaps: nbd.bitmaps.iter().flatten().map(bitmap_source).collect(),
        allocation_depth: nbd.allocation_depth.unwrap_or(false),
    })
}

/// A bitmap given by name (on the command's own node: `None`) or by node and name.
pub fn bitmap_source(b: &BlockDirtyBitmapOrStr) -> (Option<String>, String) {
    match b {
        BlockDirtyBitmapOrStr::Local(name) => (None, name.clone()),
        BlockDirtyBitmapOrStr::External(r) => (Some(r.node.clone()), r.name.clone()),
    }
}

/// `BlockdevCreateOptions` → what the create job does. A qcow2 `file` must name an existing
/// node; if it does not, the job (not the command) fails, as in QEMU.
pub fn create_spec(d: &Daemon, o: &BlockdevCreateOptions) -> Result<CreateSpec, String> {
    match o {
        BlockdevCreateOptions::File(f) => Ok(CreateSpec::File {
            filename: f.filename.clone(),
            size: f.size,
        }),
        BlockdevCreateOptions::Qcow2(q) => {
            let mut file = match &q.file {
                BlockdevRef::Reference(n) => d.lookup_node(n).map_err(|e| e.to_string()),
                BlockdevRef::Definition(_) => {
                    Err("blockdev-create: 'file' must name an existing node".to_string())
                }
            };
            // blockd writes (and opens) zlib images only; the job fails as QEMU's does for v2.
            if q.compression_type == Some(qapi::types::Qcow2CompressionType::Zstd) {
                file = Err(if q.version == Some(BlockdevQcow2Version::V2) {
                    "Non-zlib compression type is only supported with compatibility level 1.1 \
                     and above (use version=v3 or greater)"
                        .to_string()
                } else {
                    "The zstd compression type is not supported by blockd (use zlib)".to_string()
                });
            }
            let mut opts = qcow2::CreateOptions {
                size: q.size,
                ..qcow2::CreateOptions::default()
            };
            if let Some(c) = q.cluster_size {
                opts.cluster_size = c;
            }
            if q.version == Some(BlockdevQcow2Version::V2) {
                opts.version = 2;
            }
            if let Some(r) = non_negative(q.refcount_bits) {
                opts.refcount_bits = r as u32;
            }
            opts.lazy_refcounts = q.lazy_refcounts.unwrap_or(false);
            opts.backing_file = q.backing_file.clone();
            opts.backing_fmt = q.backing_fmt.map(|f| f.as_str().to_string());
            Ok(CreateSpec::Qcow2 { file, opts })
        }
        BlockdevCreateOptions::Other { driver, .. } => Err(format!(
            "Driver '{}' does not support blockdev-create",
            driver.as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> BlockdevOptions {
        serde_json::from_value(v).expect("valid BlockdevOptions")
    }

    #[test]
    fn null_co_without_size_is_one_gib() {
        let o = node_options(&parse(serde_json::json!({"driver": "null-co"}))).unwrap();
        assert!(matches!(o.driver, DriverOptions::Null { size, .. } if size == 1 << 30));
    }

    #[test]
    fn qcow2_backing_absent_null_and_named_stay_distinct() {
        let backing = |b: Option<serde_json::Value>| {
            let mut v = serde_json::json!({"driver": "qcow2", "file": "f"});
            if let Some(b) = b {
                v["backing"] = b;
            }
            match node_options(&parse(v)).unwrap().driver {
                DriverOptions::Qcow2 { backing, .. } => backing,
                other => panic!("not qcow2: {other:?}"),
            }
        };
        assert!(backing(None).is_none());
        assert!(matches!(backing(Some(serde_json::Value::Null)), Some(None)));
        assert!(matches!(
            backing(Some(serde_json::json!("b"))),
            Some(Some(ChildRef::Name(n))) if n == "b"
        ));
    }

    #[test]
    fn unsupported_driver_is_refused_by_name() {
        let e = node_options(&parse(serde_json::json!({
            "driver": "null-aio", "node-name": "n"
        })))
        .unwrap_err();
        assert_eq!(e, "Driver 'null-aio' is not supported by blockd");
    }

    #[test]
    fn file_flags_map_onto_node_flags() {
        let o = node_options(&parse(serde_json::json!({
            "driver": "file", "filename": "/x", "locking": "off", "discard": "unmap",
            "detect-zeroes": "unmap", "cache": {"direct": true, "no-flush": true},
            "read-only": true, "auto-read-only": true, "node-name": "f"
        })))
        .unwrap();
        assert!(o.read_only && o.auto_read_only);
        assert_eq!(o.node_name.as_deref(), Some("f"));
        assert_eq!(o.flags.detect_zeroes, "unmap");
        assert!(o.flags.cache_direct && o.flags.cache_no_flush && o.flags.discard_unmap);
        assert!(matches!(
            o.driver,
            DriverOptions::File { locking: false, .. }
        ));
    }
}
