//! Command-line keyval input: parsing, conversion to schema types, and QEMU's error texts.
//! Expected texts were recorded from qemu-storage-daemon 10.0.2 (`--blockdev ...`); the last
//! test replays every case against qemu-storage-daemon itself when it is installed.

mod common;

use std::process::Command;

use qapi::{parse_keyval, Schema};
use serde_json::{json, Value};

/// Parses a `--blockdev` argument (implied key `driver`) and converts it to `BlockdevOptions`.
fn blockdev(arg: &str) -> Result<Value, String> {
    let tree = parse_keyval(arg, Some("driver")).map_err(|e| e.desc)?;
    Schema::get()
        .coerce_keyval("BlockdevOptions", Value::Object(tree))
        .map_err(|e| e.desc)
}

#[test]
fn file_node_converts_to_typed_json() {
    assert_eq!(
        blockdev("driver=file,node-name=f,filename=/x").unwrap(),
        json!({"driver": "file", "node-name": "f", "filename": "/x"})
    );
}

#[test]
fn booleans_accept_qemu_words() {
    for (word, value) in [
        ("on", true),
        ("yes", true),
        ("true", true),
        ("y", true),
        ("off", false),
        ("no", false),
        ("false", false),
        ("n", false),
    ] {
        let v = blockdev(&format!("driver=null-co,node-name=n,read-only={word}")).unwrap();
        assert_eq!(v["read-only"], json!(value), "{word}");
    }
}

#[test]
fn size_members_accept_suffixes() {
    let v = blockdev("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=1M")
        .unwrap();
    assert_eq!(v["min-cluster-size"], json!(1048576));
    let v = blockdev("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=1.5k")
        .unwrap();
    assert_eq!(v["min-cluster-size"], json!(1536));
}

#[test]
fn int_members_accept_hex_and_octal_but_not_suffixes() {
    assert_eq!(
        blockdev("driver=null-co,node-name=n,size=0x10").unwrap()["size"],
        json!(16)
    );
    assert_eq!(
        blockdev("driver=null-co,node-name=n,size=010").unwrap()["size"],
        json!(8)
    );
    assert_eq!(
        blockdev("driver=null-co,node-name=n,size=1G").unwrap_err(),
        "Parameter 'size' expects integer"
    );
}

#[test]
fn numbered_keys_become_lists() {
    let v = blockdev("driver=quorum,node-name=q,children.0=a,children.1.driver=file,children.1.filename=/x,vote-threshold=2").unwrap();
    assert_eq!(
        v["children"],
        json!(["a", {"driver": "file", "filename": "/x"}])
    );
    assert_eq!(v["vote-threshold"], json!(2));
}

#[test]
fn nested_objects_and_escaped_commas() {
    let v =
        blockdev("qcow2,node-name=q,file.driver=file,file.filename=/a,,b,cache.direct=on").unwrap();
    assert_eq!(v["file"], json!({"driver": "file", "filename": "/a,b"}));
    assert_eq!(v["cache"], json!({"direct": true}));
}

#[test]
fn later_duplicate_key_wins() {
    assert_eq!(
        blockdev("driver=null-co,node-name=a,node-name=b").unwrap()["node-name"],
        json!("b")
    );
}

#[test]
fn unsigned_member_takes_minus_one_as_max() {
    assert_eq!(
        blockdev("driver=null-co,node-name=a,latency-ns=-1").unwrap()["latency-ns"],
        json!(u64::MAX)
    );
}

/// (`--blockdev` argument, QSD's error). The arguments end in `zzzz=1` where they are
/// otherwise valid, so QSD stops at argument checking.
const CASES: &[(&str, &str)] = &[
    ("driver=null-co,node-name=a,size=1G", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=a,size=x", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=a,size=1.5", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=a,size=", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=a,size=5 ", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=a,size= 5,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("driver=null-co,node-name=a,size=9223372036854775808", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=a,size=0x10,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("driver=null-co,node-name=a,latency-ns=1k", "Parameter 'latency-ns' expects integer"),
    ("driver=null-co,node-name=a,latency-ns=18446744073709551616", "Parameter 'latency-ns' expects integer"),
    ("driver=null-co,node-name=a,latency-ns=18446744073709551615,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("driver=null-co,node-name=a,read-only=1", "Parameter 'read-only' expects 'on' or 'off'"),
    ("driver=null-co,node-name=a,read-only=ON", "Parameter 'read-only' expects 'on' or 'off'"),
    ("driver=null-co,node-name=a,read-only=", "Parameter 'read-only' expects 'on' or 'off'"),
    ("driver=null-co,node-name=a,read-only=y,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("driver=null-co,node-name=a,read-only", "Expected '=' after parameter 'read-only'"),
    ("driver=null-co,node-name=a,cache.direct=on,cache.no-flush=x", "Parameter 'cache.no-flush' expects 'on' or 'off'"),
    ("driver=null-co,node-name=a,cache=x", "Invalid parameter type for 'cache', expected: object"),
    ("driver=null-co,node-name=a,cache.direct.x=1", "Parameters 'cache.direct.*' are unexpected"),
    ("driver=null-co,node-name=a,zz=1", "Parameter 'zz' is unexpected"),
    ("driver=null-co,node-name=a,x.y=1", "Parameter 'x' is unexpected"),
    ("driver=null-co,node-name=a,,,b", "Expected '=' after parameter 'b'"),
    ("driver=null-co,node-name=a,=b", "Invalid parameter ''"),
    ("driver=null-co,node-name=a,a..b=1", "Invalid parameter 'a..b'"),
    ("driver=null-co,node-name=a,.a=1", "Invalid parameter '.a'"),
    ("driver=null-co,node-name=a,1a=1", "Invalid parameter '1a'"),
    ("driver=null-co,node-name=a,a+b=1", "Invalid parameter 'a+b'"),
    ("driver=null-co,node-name=a,node-name.x=1", "Parameters 'node-name.*' used inconsistently"),
    ("driver=null-co,node-name=a,a.b=1,a=2", "Parameters 'a.*' used inconsistently"),
    ("driver=null-co,node-name=a,cache.direct=on,cache=x", "Parameters 'cache.*' used inconsistently"),
    ("driver=null-co,node-name=a,discard=", "Parameter 'discard' does not accept value ''"),
    ("driver=null-co,node-name=a,discard=foo", "Parameter 'discard' does not accept value 'foo'"),
    ("null-co,node-name=a,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("", "Parameter 'driver' is missing"),
    ("driver=file", "Parameter 'filename' is missing"),
    ("driver=qcow2,node-name=q,file.driver=file", "Parameter 'file.filename' is missing"),
    ("driver=qcow2,node-name=q,file=x,file.driver=file", "Parameters 'file.*' used inconsistently"),
    ("driver=quorum,node-name=q,children.0=a,children.2=b,vote-threshold=1", "Parameter 'children.1' missing"),
    ("driver=quorum,node-name=q,children.0=a,children.x=b,vote-threshold=1", "Parameters 'children.*' used inconsistently"),
    ("driver=quorum,node-name=q,children=a,vote-threshold=1", "Invalid parameter type for 'children', expected: array"),
    ("driver=quorum,node-name=q,children.0.driver=file,vote-threshold=1", "Parameter 'children.0.filename' is missing"),
    ("driver=blkdebug,node-name=q,image=n,take-child-perms.1=write", "Parameter 'take-child-perms.0' missing"),
    ("driver=blkdebug,node-name=q,image=n,take-child-perms.0=write,take-child-perms.1=foo", "Parameter 'null' does not accept value 'foo'"),
    ("driver=blkdebug,node-name=q,image=n,inject-error.0.event=foo", "Parameter 'event' does not accept value 'foo'"),
    ("driver=blkdebug,node-name=q,image=n,inject-error.0.event=none,inject-error.0.x=1", "Parameter 'inject-error.0.x' is unexpected"),
    ("driver=blkdebug,node-name=q,image=n,inject-error.0.event=none,inject-error.0.errno=x", "Parameter 'inject-error.0.errno' expects integer"),
    ("driver=blkdebug,node-name=q,image=n,inject-error.0=x", "Invalid parameter type for 'inject-error.0', expected: object"),
    ("driver=blkdebug,node-name=q,image=n,max-transfer=4G", "Parameter 'max-transfer' expects integer"),
    ("driver=blkdebug,node-name=q,image=n,max-transfer=2147483648", "Parameter 'max-transfer' expects int32_t"),
    ("driver=nbd,node-name=q,server.type=unix,server.path=/x,reconnect-delay=4294967296", "Parameter 'reconnect-delay' expects uint32_t"),
    ("driver=nbd,node-name=q,server.type=unix,server.path=/x,reconnect-delay=-1", "Parameter 'reconnect-delay' expects uint32_t"),
    ("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=1.5", "Parameter 'min-cluster-size' expects size"),
    ("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=-1", "Parameter 'min-cluster-size' expects size"),
    ("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=16E", "Parameter 'min-cluster-size' expects size"),
    ("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=1kB", "Parameter 'min-cluster-size' expects size"),
    ("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=", "Parameter 'min-cluster-size' expects size"),
    ("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=1P,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("driver=copy-before-write,node-name=c,file=a,target=b,min-cluster-size=0x10,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("driver=blklogwrites,node-name=l,file=a,log=b,log-super-update-interval=1k", "Parameter 'log-super-update-interval' expects integer"),
    ("driver=blklogwrites,node-name=l,file=a,log=b,log-sector-size=4294967296", "Parameter 'log-sector-size' expects uint32_t"),
    ("driver=qcow2,node-name=q,file=a,overlap-check=all,zzzz=1", "Parameter 'zzzz' is unexpected"),
    ("driver=qcow2,node-name=q,file=a,overlap-check=bogus", "Parameter 'overlap-check' does not accept value 'bogus'"),
    ("driver=qcow2,node-name=q,file=a,overlap-check.template=all,overlap-check.main-header=off,zzzz=1", "Parameter 'zzzz' is unexpected"),
];

/// `--nbd-server` arguments (type `NbdServerOptions`, no implied key) and QSD's error.
const NBD_SERVER_CASES: &[(&str, &str)] = &[
    ("addr.type=unix", "Parameter 'addr.path' is missing"),
    (
        "addr.type=unix,addr.path=/x,max-connections=-1",
        "Parameter 'max-connections' expects uint32_t",
    ),
    (
        "addr.type=inet,addr.host=h,addr.port=1,addr.to=70000",
        "Parameter 'to' expects uint16_t",
    ),
    ("max-connections=2", "Parameter 'addr' is missing"),
    (
        "addr.type=unix,addr.path=/x,zz=1",
        "Parameter 'zz' is unexpected",
    ),
    ("unix,path=/x", "Expected '=' after parameter 'unix'"),
];

/// `--export` arguments (type `BlockExportOptions`, implied key `type`) and QSD's error.
const EXPORT_CASES: &[(&str, &str)] = &[
    ("nbd,id=e,node-name=n,zz=1", "Parameter 'zz' is unexpected"),
    ("nbd,node-name=n", "Parameter 'id' is missing"),
    ("foo,id=e", "Parameter 'type' does not accept value 'foo'"),
    (
        "nbd,id=e,node-name=n,writable=maybe",
        "Parameter 'writable' expects 'on' or 'off'",
    ),
    (
        "nbd,id=e,node-name=n,bitmaps.0=b,bitmaps.1.node=n,bitmaps.1.name=c,zz=1",
        "Parameter 'zz' is unexpected",
    ),
    (
        "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,num-queues=70000",
        "Parameter 'num-queues' expects uint16_t",
    ),
    (
        "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,logical-block-size=4k,zz=1",
        "Parameter 'zz' is unexpected",
    ),
    (
        "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,logical-block-size=4x",
        "Parameter 'logical-block-size' expects size",
    ),
];

/// One case: QSD option, implied key, schema type, argument, QSD's error.
type Case = (
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
    &'static str,
);

fn all_cases() -> Vec<Case> {
    let mut out: Vec<Case> = Vec::new();
    out.extend(
        CASES
            .iter()
            .map(|(a, w)| ("--blockdev", Some("driver"), "BlockdevOptions", *a, *w)),
    );
    out.extend(
        NBD_SERVER_CASES
            .iter()
            .map(|(a, w)| ("--nbd-server", None, "NbdServerOptions", *a, *w)),
    );
    out.extend(
        EXPORT_CASES
            .iter()
            .map(|(a, w)| ("--export", Some("type"), "BlockExportOptions", *a, *w)),
    );
    out
}

#[test]
fn keyval_errors_match_recorded_qsd_texts() {
    let mut wrong = Vec::new();
    for (_, implied, ty, arg, want) in all_cases() {
        let got = parse_keyval(arg, implied)
            .and_then(|tree| Schema::get().coerce_keyval(ty, Value::Object(tree)))
            .map_or_else(|e| e.desc, |v| format!("accepted: {v}"));
        if got != want {
            wrong.push(format!("{arg}\n    want: {want}\n    got:  {got}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn keyval_errors_match_live_qsd() {
    let Some(bin) = common::qsd_binary() else {
        return; // not installed and the developer opted out (qsd_binary printed a note)
    };
    let mut wrong = Vec::new();
    for (option, _, _, arg, want) in all_cases() {
        let out = Command::new(&bin)
            .args([option, arg])
            .output()
            .expect("run qemu-storage-daemon");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let prefix = format!("qemu-storage-daemon: {option} {arg}: ");
        let line = stderr
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("<no error line>");
        if line != want {
            wrong.push(format!(
                "{option} {arg}\n    recorded: {want}\n    qsd now:  {line}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn parse_keyval_rejects_overlong_key() {
    let key = "a".repeat(128);
    let e = parse_keyval(&format!("{key}=1"), None).unwrap_err();
    assert_eq!(e.desc, format!("Parameter '{key}' is too long"));
    assert!(parse_keyval(&format!("{}=1", "a".repeat(127)), None).is_ok());
}
