//! QMP argument checking: each case with the error class and text qemu-storage-daemon 10.0.2
//! gave for it (recorded by experiment; `validation_vs_qsd.rs` compares thousands more
//! against a live QSD).

use qapi::{QapiError, Schema};
use serde_json::{json, Map, Value};

fn check(cmd: &str, args: Value) -> Result<(), QapiError> {
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    Schema::get().check_command(cmd, &args)
}

fn err(cmd: &str, args: Value) -> String {
    let e = check(cmd, args).expect_err("should fail");
    assert_eq!(e.class, "GenericError");
    e.desc
}

const ADD: &str = "block-dirty-bitmap-add";

#[test]
fn unknown_argument_is_unexpected() {
    assert_eq!(
        err("query-version", json!({"x": 1})),
        "Parameter 'x' is unexpected"
    );
    assert_eq!(
        err(ADD, json!({"node": "n0", "name": "b", "zzz": 1})),
        "Parameter 'zzz' is unexpected"
    );
}

#[test]
fn missing_argument_is_reported_before_unexpected_ones() {
    assert_eq!(
        err(ADD, json!({"name": "b", "zzz": 1})),
        "Parameter 'node' is missing"
    );
    assert_eq!(err(ADD, json!({})), "Parameter 'node' is missing");
}

#[test]
fn wrong_json_types_name_the_expected_type() {
    assert_eq!(
        err(ADD, json!({"node": "n0", "name": 1})),
        "Invalid parameter type for 'name', expected: string"
    );
    assert_eq!(
        err(ADD, json!({"node": "n0", "name": null})),
        "Invalid parameter type for 'name', expected: string"
    );
    assert_eq!(
        err(ADD, json!({"node": "n0", "name": "b", "persistent": "on"})),
        "Invalid parameter type for 'persistent', expected: boolean"
    );
    assert_eq!(
        err("query-named-block-nodes", json!({"flat": 1})),
        "Invalid parameter type for 'flat', expected: boolean"
    );
    assert_eq!(
        err("job-cancel", json!({"id": null})),
        "Invalid parameter type for 'id', expected: string"
    );
}

#[test]
fn unsigned_members_say_uint64_for_non_integers_and_the_c_type_for_range() {
    for bad in [
        json!("x"),
        json!(1.5),
        json!(512.0),
        json!(true),
        json!(null),
        json!(18446744073709551616.0),
        json!([]),
        json!({}),
    ] {
        assert_eq!(
            err(ADD, json!({"node": "n0", "name": "b", "granularity": bad})),
            "Parameter 'granularity' expects uint64"
        );
    }
    for bad in [
        json!(-1),
        json!(4294967296u64),
        json!(9223372036854775808u64),
    ] {
        assert_eq!(
            err(ADD, json!({"node": "n0", "name": "b", "granularity": bad})),
            "Parameter 'granularity' expects uint32_t"
        );
    }
    assert!(check(
        ADD,
        json!({"node": "n0", "name": "b", "granularity": 65536})
    )
    .is_ok());
}

#[test]
fn signed_members_reject_values_beyond_int64() {
    let speed = |v: Value| check("block-job-set-speed", json!({"device": "j", "speed": v}));
    assert!(
        speed(json!(-1)).is_ok(),
        "range of speed is checked at run time"
    );
    assert_eq!(
        speed(json!(9223372036854775808u64)).unwrap_err().desc,
        "Invalid parameter type for 'speed', expected: integer"
    );
    assert_eq!(
        speed(json!(18446744073709551616.0)).unwrap_err().desc,
        "Invalid parameter type for 'speed', expected: integer"
    );
}

#[test]
fn enum_values_are_checked() {
    assert_eq!(
        err(
            "block-export-add",
            json!({"type": "foo", "id": "e", "node-name": "n0"})
        ),
        "Parameter 'type' does not accept value 'foo'"
    );
    assert_eq!(
        err(
            "block-export-add",
            json!({"type": 5, "id": "e", "node-name": "n0"})
        ),
        "Invalid parameter type for 'type', expected: string"
    );
    assert_eq!(
        err("block-export-del", json!({"id": "e", "mode": "foo"})),
        "Parameter 'mode' does not accept value 'foo'"
    );
    assert_eq!(
        err("qmp_capabilities", json!({"enable": ["foo"]})),
        "Parameter 'null' does not accept value 'foo'"
    );
}

#[test]
fn union_discriminator_is_required_and_checked_first() {
    assert_eq!(
        err("block-export-add", json!({"id": "e", "node-name": "n0"})),
        "Parameter 'type' is missing"
    );
    assert_eq!(
        err(
            "block-export-add",
            json!({"type": "nbd", "node-name": "n0", "zz": 5})
        ),
        "Parameter 'id' is missing"
    );
    assert_eq!(
        err(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "n0", "zz": 5})
        ),
        "Parameter 'zz' is unexpected"
    );
    assert_eq!(
        err("blockdev-add", json!({})),
        "Parameter 'driver' is missing"
    );
    assert_eq!(
        err("blockdev-add", json!({"driver": "foo"})),
        "Parameter 'driver' does not accept value 'foo'"
    );
    assert_eq!(
        err("blockdev-add", json!({"driver": "qcow2"})),
        "Parameter 'file' is missing"
    );
}

#[test]
fn nested_members_use_dotted_and_indexed_paths() {
    let add = |v: Value| err("blockdev-add", v);
    assert_eq!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file"}})),
        "Parameter 'file.filename' is missing"
    );
    assert_eq!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": {}})),
        "Parameter 'file.driver' is missing"
    );
    assert_eq!(
        add(
            json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "/x", "aio": 5}})
        ),
        "Invalid parameter type for 'file.aio', expected: string"
    );
    assert_eq!(
        add(
            json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "/x", "aio-max-batch": 1.5}})
        ),
        "Invalid parameter type for 'file.aio-max-batch', expected: integer"
    );
    assert_eq!(
        add(
            json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "nbd", "server": {"type": "unix", "path": "/x"}, "reconnect-delay": 1.5}})
        ),
        "Parameter 'file.reconnect-delay' expects uint64"
    );
    assert_eq!(
        add(json!({"driver": "blkdebug", "node-name": "q", "image": "n0", "inject-error": [{}]})),
        "Parameter 'inject-error[0].event' is missing"
    );
    assert_eq!(
        add(
            json!({"driver": "quorum", "node-name": "q", "children": [{"driver": "file"}], "vote-threshold": 1})
        ),
        "Parameter 'children[0].filename' is missing"
    );
    let start = |v: Value| err("nbd-server-start", json!({"addr": v}));
    assert_eq!(
        start(json!({"type": "unix", "data": {}})),
        "Parameter 'addr.data.path' is missing"
    );
    assert_eq!(
        start(json!({"type": "unix"})),
        "Parameter 'addr.data' is missing"
    );
    assert_eq!(
        start(json!({"type": "unix", "data": {"path": 5}})),
        "Invalid parameter type for 'addr.data.path', expected: string"
    );
    assert_eq!(
        start(json!({"type": "unix", "data": 5})),
        "Invalid parameter type for 'addr.data', expected: object"
    );
    assert_eq!(
        start(json!(5)),
        "Invalid parameter type for 'addr', expected: object"
    );
    assert_eq!(
        start(json!({"type": "unix", "data": {"path": "/x", "zz": 1}})),
        "Parameter 'addr.data.zz' is unexpected"
    );
    assert_eq!(
        start(json!({"type": "unix", "data": {"path": "/x"}, "zz": 1})),
        "Parameter 'addr.zz' is unexpected"
    );
    assert_eq!(
        err(
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "file": {"driver": "file"}}]})
        ),
        "Parameter 'options[0].file.filename' is missing"
    );
    assert_eq!(
        err("blockdev-reopen", json!({"options": [5]})),
        "Invalid parameter type for 'options[0]', expected: object"
    );
    assert_eq!(
        err(
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "b", "bitmaps": ["a", {"node": "n0", "name": "c", "x": 1}]})
        ),
        "Parameter 'bitmaps[1].x' is unexpected"
    );
}

#[test]
fn range_enum_and_alternate_errors_use_the_bare_member_name() {
    let start = |addr: Value, extra: Value| {
        let mut args = json!({"addr": addr});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        err("nbd-server-start", args)
    };
    let unix = json!({"type": "unix", "data": {"path": "/x"}});
    assert_eq!(
        start(
            json!({"type": "inet", "data": {"host": "h", "port": "1", "to": 70000}}),
            json!({})
        ),
        "Parameter 'to' expects uint16_t"
    );
    assert_eq!(
        start(json!({"type": "foo", "data": 5}), json!({})),
        "Parameter 'type' does not accept value 'foo'"
    );
    assert_eq!(
        start(unix.clone(), json!({"max-connections": -1})),
        "Parameter 'max-connections' expects uint32_t"
    );
    assert_eq!(
        start(unix, json!({"handshake-max-seconds": -1})),
        "Parameter 'handshake-max-seconds' expects uint32_t"
    );
    let add = |v: Value| err("blockdev-add", v);
    assert_eq!(
        add(
            json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "/x", "aio": "foo"}})
        ),
        "Parameter 'aio' does not accept value 'foo'"
    );
    assert_eq!(
        add(
            json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "nbd", "server": {"type": "unix", "path": "/x"}, "reconnect-delay": -1}})
        ),
        "Parameter 'reconnect-delay' expects uint32_t"
    );
    assert_eq!(
        add(
            json!({"driver": "blkdebug", "node-name": "q", "image": "n0", "max-transfer": 2147483648u64})
        ),
        "Parameter 'max-transfer' expects int32_t"
    );
    assert_eq!(
        add(
            json!({"driver": "blkdebug", "node-name": "q", "image": "n0", "take-child-perms": ["foo"]})
        ),
        "Parameter 'null' does not accept value 'foo'"
    );
    assert_eq!(
        add(
            json!({"driver": "blkdebug", "node-name": "q", "image": "n0", "inject-error": [{"event": "foo"}]})
        ),
        "Parameter 'event' does not accept value 'foo'"
    );
    assert_eq!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "foo"}})),
        "Parameter 'driver' does not accept value 'foo'"
    );
}

#[test]
fn alternates_pick_their_branch_by_json_type() {
    let add = |v: Value| check("blockdev-add", v);
    assert!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": "n0", "backing": null})).is_ok()
    );
    assert!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": "n0", "backing": "b0"})).is_ok()
    );
    assert!(add(json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "null-co"}, "backing": {"driver": "null-co"}})).is_ok());
    assert_eq!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": 42}))
            .unwrap_err()
            .desc,
        "Invalid parameter type for 'file', expected: BlockdevRef"
    );
    assert_eq!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": null}))
            .unwrap_err()
            .desc,
        "Invalid parameter type for 'file', expected: BlockdevRef"
    );
    assert_eq!(
        add(json!({"driver": "qcow2", "node-name": "q", "file": "n0", "backing": []}))
            .unwrap_err()
            .desc,
        "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"
    );
    assert_eq!(
        add(json!({"driver": "quorum", "node-name": "q", "children": [5], "vote-threshold": 1}))
            .unwrap_err()
            .desc,
        "Invalid parameter type for 'null', expected: BlockdevRef"
    );
    let merge = |b: Value| {
        err(
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "b", "bitmaps": b}),
        )
    };
    assert_eq!(
        merge(json!([42])),
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
    );
    assert_eq!(
        merge(json!([null])),
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
    );
    assert_eq!(
        merge(json!([{"node": "n0"}])),
        "Parameter 'bitmaps[0].name' is missing"
    );
    assert_eq!(
        merge(json!("x")),
        "Invalid parameter type for 'bitmaps', expected: array"
    );
}

#[test]
fn size_members_read_like_uint64_in_qmp() {
    let create = |size: Value| {
        check(
            "blockdev-create",
            json!({"job-id": "c", "options": {"driver": "file", "filename": "/x", "size": size}}),
        )
    };
    assert_eq!(
        create(json!("x")).unwrap_err().desc,
        "Parameter 'options.size' expects uint64"
    );
    assert_eq!(
        create(json!(1.5)).unwrap_err().desc,
        "Parameter 'options.size' expects uint64"
    );
    assert!(create(json!(-1)).is_ok());
    assert_eq!(
        check(
            "blockdev-create",
            json!({"job-id": "c", "options": {"driver": "raw", "x": 1}})
        )
        .unwrap_err()
        .desc,
        "Parameter 'options.x' is unexpected"
    );
    assert!(
        check(
            "blockdev-create",
            json!({"job-id": "c", "options": {"driver": "raw"}})
        )
        .is_ok(),
        "raw has no create branch"
    );
}

#[test]
fn command_without_arguments_rejects_any() {
    assert!(check("query-block", json!({})).is_ok());
    assert_eq!(
        err("quit", json!({"now": true})),
        "Parameter 'now' is unexpected"
    );
}

#[test]
fn unknown_command_is_command_not_found() {
    let e = Schema::get()
        .check_command("nosuch", &Map::new())
        .unwrap_err();
    assert_eq!(
        (e.class, e.desc.as_str()),
        ("CommandNotFound", "The command nosuch has not been found")
    );
}

#[test]
fn check_type_serves_the_json_form_of_blockdev() {
    let s = Schema::get();
    assert!(s
        .check_type(
            "BlockdevOptions",
            &json!({"driver": "null-co", "node-name": "n"})
        )
        .is_ok());
    assert_eq!(
        s.check_type("BlockdevOptions", &json!({"driver": "file"}))
            .unwrap_err()
            .desc,
        "Parameter 'filename' is missing"
    );
    assert!(s.check_type("NoSuchType", &json!({})).is_err());
}

#[test]
fn several_stray_members_name_the_one_qemu_names() {
    // Recorded from qemu-storage-daemon 10.0.2: the choice follows QEMU's hash tables.
    assert_eq!(
        err(ADD, json!({"node": "n", "name": "x", "a": 1, "b": 1})),
        "Parameter 'b' is unexpected"
    );
    assert_eq!(
        err(
            ADD,
            json!({"node": "n", "name": "x", "xx": 1, "yy": 1, "zz": 1})
        ),
        "Parameter 'yy' is unexpected"
    );
}
