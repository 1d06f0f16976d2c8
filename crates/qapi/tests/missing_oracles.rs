//! A test whose oracle tool is missing fails; only `BLOCKD_ALLOW_MISSING_ORACLES=1` lets it
//! pass (a developer without the tools). Checked end to end: this binary runs its own probe
//! test again with qemu-storage-daemon off `PATH` and must see it fail.

mod common;

use std::ffi::OsStr;
use std::process::Command;

use common::oracles::{self, ALLOW_MISSING};

/// Reruns [`probe_compare_with_qsd`] in a child with an empty `PATH`.
fn run_probe(allow: Option<&str>) -> std::process::Output {
    let empty = common::TempDir::new("no-oracles");
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--ignored",
        "--exact",
        "probe_compare_with_qsd",
        "--nocapture",
    ])
    .env("PATH", &empty.0)
    .env_remove("QSD_BINARY")
    .env_remove(ALLOW_MISSING);
    if let Some(v) = allow {
        cmd.env(ALLOW_MISSING, v);
    }
    cmd.output().expect("rerun the test binary")
}

/// What every comparison with QSD does first; run only by [`a_missing_qsd_fails_the_test`].
#[test]
#[ignore = "a probe: run by a_missing_qsd_fails_the_test with qemu-storage-daemon off PATH"]
fn probe_compare_with_qsd() {
    let Some(_qsd) = common::Qsd::start(&[]) else {
        return;
    };
}

#[test]
fn a_missing_qsd_fails_the_test() {
    let out = run_probe(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "passed without its oracle:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("1 failed"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("oracle qemu-storage-daemon is not installed")
            && stderr.contains(ALLOW_MISSING),
        "{stderr}"
    );

    // Anything but exactly "1" is no opt-out.
    let out = run_probe(Some("yes"));
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_explicit_opt_out_lets_it_pass_with_a_note() {
    let out = run_probe(Some("1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("checked nothing"), "{stderr}");
}

#[test]
fn lookup_finds_installed_tools_on_the_given_path() {
    let path = std::env::var_os("PATH");
    assert!(oracles::require_with("sh", path.as_deref(), None).is_some());
    assert!(oracles::find_on("blockd-no-such-tool", path.as_deref()).is_none());
    assert!(oracles::require_with("sh", Some(OsStr::new("")), Some(OsStr::new("1"))).is_none());
}
