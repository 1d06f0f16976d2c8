//! Shared helpers for the integration tests: temp dirs, qemu-img/qemu-io, a PRNG, adapters.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use qcow2::{FileStorage, OpenOptions, Qcow2};

#[path = "../../../../tests/oracles.rs"]
pub mod oracles;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    /// A fresh directory under /tmp.
    pub fn new(name: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("qcow2-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether qemu-img and qemu-io are installed. A missing one fails the test (see
/// [`oracles`]) unless the developer opted out, when this is `false`.
pub fn have_qemu() -> bool {
    oracles::require_all(&["qemu-img", "qemu-io"])
}

/// Run a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {:?} failed: {}\nstdout: {}\nstderr: {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command and return (success, stdout+stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-img` with arguments.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-io -f qcow2 <path> -c <cmd>...`
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = path.to_str().expect("utf-8 path");
    args.push(p);
    run("qemu-io", &args);
}

/// `qemu-img check` passes with no errors and no leaks.
pub fn assert_check_clean(path: &Path) {
    let p = path.to_str().expect("path");
    let (ok, text) = run_status("qemu-img", &["check", "-f", "qcow2", p]);
    assert!(ok, "qemu-img check failed:\n{text}");
    assert!(
        text.contains("No errors were found"),
        "qemu-img check output:\n{text}"
    );
    assert!(
        !text.contains("leaked"),
        "qemu-img check found leaks:\n{text}"
    );
}

/// Convert an image to raw with qemu-img and return its bytes.
pub fn to_raw(dir: &TempDir, path: &Path) -> Vec<u8> {
    let out = dir.path("converted.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().expect("p"),
        out.to_str().expect("p"),
    ]);
    std::fs::read(&out).expect("read raw")
}

/// Open an image file with our driver.
pub fn open(path: &Path, writable: bool) -> Qcow2 {
    let st = FileStorage::open(path, writable).expect("open file");
    Qcow2::open(
        Arc::new(st),
        OpenOptions {
            read_only: !writable,
        },
    )
    .expect("open image")
}

/// Read the whole virtual disk with our driver, in `chunk`-sized requests.
pub fn read_all(img: &Qcow2, chunk: usize) -> Vec<u8> {
    let size = img.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        img.read_at(&mut out[off..off + n], off as u64)
            .expect("read");
        off += n;
    }
    out
}

/// Compare two byte vectors, reporting the first difference.
pub fn assert_same(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length differs");
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: ours {:#04x}, qemu {:#04x}",
            ours[i], theirs[i]
        );
    }
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[allow(unused_imports)]
pub use qcow2::ImageStorage;

/// `qemu-img create -q -f qcow2 [-o <opts>] <path> <size>`; an empty `opts` keeps QEMU's
/// defaults.
pub fn qemu_create(path: &Path, opts: &str, size: &str) {
    let p = path.to_str().expect("utf-8 path");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p, size]);
    qemu_img(&args);
}

/// `qemu-img map --output=json` of the qcow2 image `path`: its extents as JSON objects.
pub fn qemu_map_json(path: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        path.to_str().expect("p"),
    ]);
    match serde_json::from_str(&out).expect("map json") {
        serde_json::Value::Array(v) => v,
        other => panic!("qemu-img map gave no array: {other}"),
    }
}

/// `qemu-img map --output=json` extents as (start, length, compressed, data).
pub fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool)> {
    qemu_map_json(path)
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["compressed"].as_bool().unwrap_or(false),
                e["data"].as_bool().expect("data"),
            )
        })
        .collect()
}

/// `qemu-img compare` finds the qcow2 image `img` identical to `data` (written to a raw file
/// in `dir`).
pub fn assert_compares_to_raw(dir: &TempDir, img: &Path, data: &[u8]) {
    let raw = dir.path("expected.raw");
    std::fs::write(&raw, data).expect("write raw");
    let (ok, text) = run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().expect("p"),
            raw.to_str().expect("p"),
        ],
    );
    assert!(ok, "qemu-img compare: {text}");
    assert!(text.contains("Images are identical."), "{text}");
}

/// The guest content of snapshot `name`, as QEMU reads it.
pub fn qemu_snapshot_content(dir: &TempDir, path: &Path, name: &str) -> Vec<u8> {
    let out = dir.path("snap.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-l",
        &format!("snapshot.name={name}"),
        path.to_str().expect("p"),
        out.to_str().expect("p"),
    ]);
    std::fs::read(&out).expect("read raw")
}

/// The big-endian u32 at `off` in image bytes.
pub fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// The big-endian u64 at `off` in image bytes.
pub fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Store `v` big-endian at `off` in image bytes.
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Store `v` big-endian at `off` in image bytes.
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
