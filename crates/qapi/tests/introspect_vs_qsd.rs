//! Our `query-qmp-schema` against qemu-storage-daemon's, command by command and event by
//! event, member by member (masked type names resolved on both sides). Fails when
//! qemu-storage-daemon is not installed, unless `BLOCKD_ALLOW_MISSING_ORACLES=1`.

mod common;

use common::{Comparer, Introspection, Qsd};
use qapi::Schema;
use serde_json::json;

/// Commands we define that qemu-storage-daemon does not have (QEMU's system emulator does).
const NOT_IN_QSD: &[&str] = &["human-monitor-command"];

#[test]
fn every_command_and_event_matches_qsd_member_by_member() {
    let Some(mut qsd) = Qsd::start(&[]) else {
        return;
    };
    let reply = qsd.execute("query-qmp-schema", json!({}));
    let theirs = Introspection::new(&reply["return"]);
    let ours_value = Schema::get().introspect();
    let ours = Introspection::new(&ours_value);
    let mut cmp = Comparer::new(&ours, &theirs);
    let schema = Schema::get();
    for name in schema.commands().into_iter().chain(schema.events()) {
        if !theirs.by_name.contains_key(name) {
            assert!(
                NOT_IN_QSD.contains(&name),
                "{name} is not a qemu-storage-daemon command or event"
            );
            eprintln!("note: {name} is not in qemu-storage-daemon; not compared");
            continue;
        }
        cmp.entity(name);
    }
    assert!(
        cmp.diffs.is_empty(),
        "{} differences:\n{}",
        cmp.diffs.len(),
        cmp.diffs.join("\n")
    );
}
