//! The oracle tools the Rust tests compare blockd's crates against (qemu-storage-daemon,
//! qemu-img, qemu-io, nbdinfo, nbdcopy). Included by each crate's `tests/common` with
//! `#[path]`, so every test crate looks them up the same way.
//!
//! A missing oracle FAILS the test: a comparison that is not run proves nothing, and
//! `tests/run.sh` and CI must never pass without it. A developer without the tools may opt
//! out explicitly with `BLOCKD_ALLOW_MISSING_ORACLES=1`; those tests then return early with
//! a note on stderr.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;

/// The environment variable that lets tests whose oracle is missing pass (developers only).
pub const ALLOW_MISSING: &str = "BLOCKD_ALLOW_MISSING_ORACLES";

/// `program`'s path on `path` (a `PATH`-style list), if it is there.
pub fn find_on(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    let path = path?;
    std::env::split_paths(path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `program`'s path on this process's `PATH`, or `None` when it is missing and the developer
/// opted out (`BLOCKD_ALLOW_MISSING_ORACLES=1`). Panics when it is missing otherwise.
pub fn require(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH");
    let allow = std::env::var_os(ALLOW_MISSING);
    require_with(program, path.as_deref(), allow.as_deref())
}

/// [`require`] with the environment given (testable without touching the process's).
pub fn require_with(
    program: &str,
    path: Option<&OsStr>,
    allow_missing: Option<&OsStr>,
) -> Option<PathBuf> {
    if let Some(found) = find_on(program, path) {
        return Some(found);
    }
    if allow_missing == Some(OsStr::new("1")) {
        eprintln!(
            "note: oracle {program} not installed; this test checked nothing ({ALLOW_MISSING}=1)"
        );
        return None;
    }
    panic!(
        "oracle {program} is not installed (Debian: qemu-utils for qemu-img/qemu-io/\
         qemu-storage-daemon, libnbd-bin for nbdinfo/nbdcopy); a test without its oracle \
         fails. Developers without the tools may set {ALLOW_MISSING}=1 to let such tests pass"
    );
}

/// Whether every program in `programs` is installed; see [`require`].
pub fn require_all(programs: &[&str]) -> bool {
    programs.iter().all(|p| require(p).is_some())
}
