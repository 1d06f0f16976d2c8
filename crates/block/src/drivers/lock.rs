//! Image locking compatible with QEMU's, so QEMU tools and blockd see each other's use.
//!
//! QEMU's scheme (file-posix): for each permission a user holds it takes a shared OFD lock on
//! byte `100 + bit`, and for each permission it refuses to share, on byte `200 + bit`. Before
//! locking it tests the opposite bytes for locks held by others. Permission bits: 0 consistent
//! read, 1 write, 2 write unchanged, 3 resize.

use std::fs::File;
use std::os::unix::io::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const READ: u32 = 1;
const WRITE: u32 = 2;
const WRITE_UNCHANGED: u32 = 4;
const RESIZE: u32 = 8;
const ALL: u32 = 0xf;

fn ofd(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_short,
    byte: i64,
) -> std::io::Result<libc::c_short> {
    // SAFETY: a zeroed flock is a valid value; fcntl reads and writes only that struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl on a descriptor we own with a pointer to a live flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

fn held_by_other(file: &File, byte: i64) -> bool {
    matches!(ofd(file, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, byte), Ok(t) if t != libc::F_UNLCK as libc::c_short)
}

/// Take QEMU-compatible locks for a writer (`read_only` false) or a reader. Err is QEMU's text.
pub fn lock_image(file: &File, read_only: bool) -> Result<(), String> {
    let (perm, shared) = image_bits(read_only);
    lock_perm(file, perm, shared)
}

/// No lock byte held: no permission, everything shared.
pub const NO_LOCKS: (u32, u32) = (0, ALL);

/// The (perm, shared) bits [`lock_image`] holds.
pub fn image_bits(read_only: bool) -> (u32, u32) {
    if read_only {
        (READ, ALL & !(WRITE | RESIZE))
    } else {
        (
            READ | WRITE | WRITE_UNCHANGED | RESIZE,
            READ | WRITE_UNCHANGED,
        )
    }
}

/// Hold lock bytes for `perm` (bits 0..3, QEMU's values) and refuse others what is not in
/// `shared`, after checking that nobody else holds what conflicts. Err is QEMU's text.
/// Locks already held by this descriptor are replaced (bytes no longer wanted are released).
pub fn lock_perm(file: &File, perm: u32, shared: u32) -> Result<(), String> {
    let perm = perm & ALL;
    let shared = shared & ALL;
    for (bit, name) in NAMES.iter().enumerate() {
        let mask = 1u32 << bit;
        if perm & mask != 0 && held_by_other(file, SHARED_BASE + bit as i64) {
            return Err(format!("Failed to get \"{name}\" lock"));
        }
        if shared & mask == 0 && held_by_other(file, PERM_BASE + bit as i64) {
            return Err(format!("Failed to get shared \"{name}\" lock"));
        }
    }
    hold_bits(file, perm, shared)
}

/// Hold exactly the lock bytes of `perm` and `shared` on `file`, without checking others':
/// for a new descriptor taking over what another descriptor of this process holds (the
/// locks are all shared, so both may hold them at once; no window lets another in).
pub fn hold_bits(file: &File, perm: u32, shared: u32) -> Result<(), String> {
    let perm = perm & ALL;
    let shared = shared & ALL;
    let rd = libc::F_RDLCK as libc::c_short;
    let un = libc::F_UNLCK as libc::c_short;
    for bit in 0..NAMES.len() {
        let mask = 1u32 << bit;
        let want = if perm & mask != 0 { rd } else { un };
        ofd(file, libc::F_OFD_SETLK, want, PERM_BASE + bit as i64).map_err(|e| e.to_string())?;
        let want = if shared & mask == 0 { rd } else { un };
        ofd(file, libc::F_OFD_SETLK, want, SHARED_BASE + bit as i64).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Drop every lock (before relocking in another mode).
pub fn unlock_image(file: &File) {
    let unlock = libc::F_UNLCK as libc::c_short;
    for base in [PERM_BASE, SHARED_BASE] {
        for bit in 0..NAMES.len() as i64 {
            let _ = ofd(file, libc::F_OFD_SETLK, unlock, base + bit);
        }
    }
}

/// The lock bytes someone other than this descriptor holds: (perm bits, unshared bits).
/// For tests and diagnostics: what other processes see of an image's users.
pub fn held_by_others(file: &File) -> (u32, u32) {
    let mut perm = 0;
    let mut unshared = 0;
    for bit in 0..NAMES.len() {
        if held_by_other(file, PERM_BASE + bit as i64) {
            perm |= 1 << bit;
        }
        if held_by_other(file, SHARED_BASE + bit as i64) {
            unshared |= 1 << bit;
        }
    }
    (perm, unshared)
}
