//! `query-qmp-schema` output: QEMU's shape (masked names, int widths folded, optional members
//! with `default: null`), closed under references, and the structure qemu-storage-daemon
//! shows for a few commands (recorded from QSD 10.0.2; `introspect_vs_qsd.rs` compares every
//! command against a live QSD).

mod common;

use std::collections::HashSet;

use common::Introspection;
use qapi::Schema;
use serde_json::Value;

fn intro() -> (Value, Introspection) {
    let v = Schema::get().introspect();
    let i = Introspection::new(&v);
    (v, i)
}

/// Renders type `t` one level deep: `{a: str, *b: int}`; nested objects as `{..}`.
fn shape(i: &Introspection, t: &str, depth: usize) -> String {
    let e = i.entity(t);
    match e["meta-type"].as_str().unwrap() {
        "builtin" => t.to_owned(),
        "array" => format!("[{}]", shape(i, e["element-type"].as_str().unwrap(), depth)),
        "enum" => format!(
            "enum({})",
            e["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("|")
        ),
        "alternate" => format!(
            "alt({})",
            e["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| shape(i, m["type"].as_str().unwrap(), depth + 1))
                .collect::<Vec<_>>()
                .join("|")
        ),
        "object" if depth > 0 => "{..}".to_owned(),
        "object" => {
            let members: Vec<String> = e["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let opt = if m.get("default").is_some() { "*" } else { "" };
                    format!(
                        "{opt}{}: {}",
                        m["name"].as_str().unwrap(),
                        shape(i, m["type"].as_str().unwrap(), depth + 1)
                    )
                })
                .collect();
            format!("{{{}}}", members.join(", "))
        }
        other => panic!("meta-type {other}"),
    }
}

fn command_shape(i: &Introspection, name: &str) -> (String, String) {
    let c = i.entity(name);
    (
        shape(i, c["arg-type"].as_str().unwrap(), 0),
        shape(i, c["ret-type"].as_str().unwrap(), 0),
    )
}

#[test]
fn block_dirty_bitmap_add_has_qsd_structure() {
    let (_, i) = intro();
    let (arg, ret) = command_shape(&i, "block-dirty-bitmap-add");
    assert_eq!(
        arg,
        "{node: str, name: str, *granularity: int, *persistent: bool, *disabled: bool}"
    );
    assert_eq!(ret, "{}");
}

#[test]
fn query_named_block_nodes_has_qsd_structure() {
    let (_, i) = intro();
    let (arg, ret) = command_shape(&i, "query-named-block-nodes");
    assert_eq!(arg, "{*flat: bool}");
    assert_eq!(
        ret,
        "[{file: str, *node-name: str, ro: bool, drv: str, *backing_file: str, backing_file_depth: int, active: bool, \
         encrypted: bool, detect_zeroes: enum(off|on|unmap), bps: int, bps_rd: int, bps_wr: int, iops: int, iops_rd: int, \
         iops_wr: int, image: {..}, *bps_max: int, *bps_rd_max: int, *bps_wr_max: int, *iops_max: int, *iops_rd_max: int, \
         *iops_wr_max: int, *bps_max_length: int, *bps_rd_max_length: int, *bps_wr_max_length: int, *iops_max_length: int, \
         *iops_rd_max_length: int, *iops_wr_max_length: int, *iops_size: int, *group: str, cache: {..}, write_threshold: int, \
         *dirty-bitmaps: [{..}]}]"
    );
}

#[test]
fn blockdev_add_is_the_driver_union_with_every_branch() {
    let (_, i) = intro();
    let c = i.entity("blockdev-add");
    let u = i.entity(c["arg-type"].as_str().unwrap());
    assert_eq!(u["tag"], "driver");
    assert_eq!(
        shape(&i, c["arg-type"].as_str().unwrap(), 0),
        "{driver: enum(blkdebug|blklogwrites|blkreplay|blkverify|bochs|cloop|compress|copy-before-write|copy-on-read|dmg|\
         file|snapshot-access|ftp|ftps|gluster|host_cdrom|host_device|http|https|iscsi|luks|nbd|nfs|null-aio|null-co|nvme|\
         parallels|preallocate|qcow|qcow2|qed|quorum|raw|rbd|replication|ssh|throttle|vdi|vhdx|vmdk|vpc|vvfat), \
         *node-name: str, *discard: enum(ignore|unmap), *cache: {..}, *active: bool, *read-only: bool, \
         *auto-read-only: bool, *force-share: bool, *detect-zeroes: enum(off|on|unmap)}"
    );
    let variant = |case: &str| {
        let t = u["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["case"] == case)
            .unwrap()["type"]
            .as_str()
            .unwrap()
            .to_owned();
        shape(&i, &t, 0)
    };
    assert_eq!(u["variants"].as_array().unwrap().len(), 42);
    assert_eq!(
        variant("file"),
        "{filename: str, *pr-manager: str, *locking: enum(auto|on|off), *aio: enum(threads|native|io_uring), \
         *aio-max-batch: int, *drop-cache: bool, *x-check-cache-dropped: bool}"
    );
    assert_eq!(
        variant("null-co"),
        "{*size: int, *latency-ns: int, *read-zeroes: bool}"
    );
    assert_eq!(
        variant("raw"),
        "{file: alt({..}|str), *offset: int, *size: int}"
    );
    assert_eq!(
        variant("qcow2"),
        "{file: alt({..}|str), *backing: alt({..}|str|null), *lazy-refcounts: bool, *pass-discard-request: bool, \
         *pass-discard-snapshot: bool, *pass-discard-other: bool, *discard-no-unref: bool, \
         *overlap-check: alt({..}|enum(none|constant|cached|all)), *cache-size: int, *l2-cache-size: int, \
         *l2-cache-entry-size: int, *refcount-cache-size: int, *cache-clean-interval: int, *encrypt: {..}, \
         *data-file: alt({..}|str)}"
    );
    assert_eq!(
        variant("nbd"),
        "{server: {..}, *export: str, *tls-creds: str, *tls-hostname: str, *x-dirty-bitmap: str, *reconnect-delay: int, \
         *open-timeout: int}"
    );
}

#[test]
fn features_are_reported_where_qsd_reports_them() {
    let (_, i) = intro();
    assert_eq!(
        i.entity("nbd-server-add")["features"],
        serde_json::json!(["deprecated"])
    );
    assert_eq!(
        i.entity("x-debug-block-dirty-bitmap-sha256")["features"],
        serde_json::json!(["unstable"])
    );
    assert!(i.entity("blockdev-add").get("features").is_none());
}

#[test]
fn names_are_masked_and_references_resolve() {
    let (v, i) = intro();
    let schema = Schema::get();
    let real: HashSet<&str> = schema
        .commands()
        .into_iter()
        .chain(schema.events())
        .collect();
    let builtins = ["str", "int", "number", "bool", "null", "any"];
    for e in v.as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let mt = e["meta-type"].as_str().unwrap();
        match mt {
            "command" | "event" => assert!(real.contains(name), "{name}"),
            "builtin" => assert!(builtins.contains(&name), "{name}"),
            "array" => assert!(name.starts_with('[') && name.ends_with(']'), "{name}"),
            _ => assert!(name.parse::<u32>().is_ok(), "unmasked type name {name}"),
        }
        // Every type name mentioned anywhere must have an entity.
        for key in ["arg-type", "ret-type", "element-type"] {
            if let Some(t) = e.get(key).and_then(Value::as_str) {
                i.entity(t);
            }
        }
        for m in e
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = m.get("type").and_then(Value::as_str) {
                i.entity(t);
            }
            if let Some(d) = m.get("default") {
                assert!(d.is_null(), "default must be null");
            }
        }
        for m in e
            .get("variants")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            i.entity(m["type"].as_str().unwrap());
        }
    }
    assert_eq!(
        i.by_name.len(),
        v.as_array().unwrap().len(),
        "entity names are unique"
    );
}

#[test]
fn every_schema_info_entry_is_a_valid_schema_info() {
    let (v, _) = intro();
    for e in v.as_array().unwrap() {
        Schema::get()
            .check_type("SchemaInfo", e)
            .unwrap_or_else(|err| panic!("{e}: {err}"));
    }
}

#[test]
fn commands_without_arguments_share_the_empty_object() {
    let (_, i) = intro();
    let empty = i.entity("quit")["arg-type"].as_str().unwrap().to_owned();
    assert_eq!(i.entity("quit")["ret-type"], empty.as_str());
    assert_eq!(i.entity("query-version")["arg-type"], empty.as_str());
    assert_eq!(i.entity(&empty)["members"], serde_json::json!([]));
}
