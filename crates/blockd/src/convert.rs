//! Translation of schema-checked `BlockdevOptions` into the core's `NodeOptions`.
//!
//! The input has already passed `qapi` checking against `BlockdevOptions`, so member types are
//! known to be right; this only maps QAPI names onto core options and refuses drivers blockd
//! does not implement.

use serde_json::{Map, Value};

use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::node::NodeFlags;

fn str_of(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(Value::as_str).map(str::to_string)
}

fn bool_of(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k).and_then(Value::as_bool)
}

fn u64_of(m: &Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k).and_then(Value::as_u64)
}

fn child_ref(v: &Value) -> Result<ChildRef, String> {
    match v {
        Value::String(s) => Ok(ChildRef::Name(s.clone())),
        Value::Object(_) => Ok(ChildRef::Inline(Box::new(node_options(v)?))),
        _ => Err("Invalid reference".to_string()),
    }
}

/// BlockdevOptions (checked) → NodeOptions.
pub fn node_options(v: &Value) -> Result<NodeOptions, String> {
    let Some(m) = v.as_object() else {
        return Err("Invalid parameter type, expected: object".to_string());
    };
    let driver_name = str_of(m, "driver").unwrap_or_default();
    let cache = m.get("cache").and_then(Value::as_object);
    let flags = NodeFlags {
        detect_zeroes: str_of(m, "detect-zeroes").unwrap_or_else(|| "off".to_string()),
        cache_direct: cache.and_then(|c| bool_of(c, "direct")).unwrap_or(false),
        cache_no_flush: cache.and_then(|c| bool_of(c, "no-flush")).unwrap_or(false),
        discard_unmap: str_of(m, "discard").as_deref() == Some("unmap"),
    };
    let driver = match driver_name.as_str() {
        "file" => DriverOptions::File {
            filename: str_of(m, "filename").unwrap_or_default(),
            locking: str_of(m, "locking").as_deref() != Some("off"),
        },
        "null-co" => DriverOptions::Null {
            size: u64_of(m, "size").unwrap_or(1 << 30),
            read_zeroes: bool_of(m, "read-zeroes").unwrap_or(false),
        },
        "raw" => DriverOptions::Raw {
            file: child_ref(m.get("file").ok_or("Parameter 'file' is missing")?)?,
            offset: u64_of(m, "offset"),
            size: u64_of(m, "size"),
        },
        "qcow2" => DriverOptions::Qcow2 {
            file: child_ref(m.get("file").ok_or("Parameter 'file' is missing")?)?,
            backing: match m.get("backing") {
                None => None,
                Some(Value::Null) => Some(None),
                Some(b) => Some(Some(child_ref(b)?)),
            },
        },
        other => return Err(format!("Driver '{other}' is not supported by blockd")),
    };
    Ok(NodeOptions {
        node_name: str_of(m, "node-name"),
        read_only: bool_of(m, "read-only").unwrap_or(false),
        auto_read_only: bool_of(m, "auto-read-only").unwrap_or(false),
        flags,
        driver,
    })
}
