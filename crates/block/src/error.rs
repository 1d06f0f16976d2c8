//! The core's one error type: a stable kind the daemon maps to a QMP error class, and a message.

use std::fmt;
use std::io;

/// What went wrong, in terms a protocol front end can map to its own error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Anything QEMU reports as `GenericError`: bad values, state conflicts, I/O failures.
    Generic,
    /// A node or device name that does not exist where QEMU reports `DeviceNotFound`.
    DeviceNotFound,
    /// A block job id that does not exist (QEMU's `DeviceNotActive` for `block-job-*`).
    DeviceNotActive,
}

/// A core error: kind plus a complete, user-facing message (QEMU's wording where QEMU defines it).
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// A `GenericError` with this message.
    pub fn generic(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Generic,
            message: message.into(),
        }
    }

    /// An error of a specific kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// An I/O failure while doing `what` (e.g. "Could not open '/x'"), worded like QEMU: "what: strerror".
    pub fn io(what: impl fmt::Display, err: &io::Error) -> Error {
        Error::generic(format!("{what}: {}", strerror(err)))
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with context, keeping the kind.
    pub fn context(self, what: impl fmt::Display) -> Error {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, Error>;

/// The C library's text for an I/O error ("No such file or directory"), without Rust's " (os error 2)".
pub fn strerror(err: &io::Error) -> String {
    match err.raw_os_error() {
        // The C library's own text (glibc: "Input/output error"), as QEMU prints it; Rust
        // appends " (os error N)" to it, nix has its own shorter table.
        Some(code) => {
            let text = io::Error::from_raw_os_error(code).to_string();
            match text.rfind(" (os error ") {
                Some(i) => text[..i].to_string(),
                None => text,
            }
        }
        None => err.to_string(),
    }
}

/// An `io::Error` carrying an errno, for the I/O path (NBD maps errno to its own codes).
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}
