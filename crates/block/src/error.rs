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

/// A core error: kind plus a complete, user-facing message (QEMU's wording where QEMU defines
/// it), and the underlying error when there is one (an errno, a qcow2 error), kept for logs
/// and callers that inspect it ([`std::error::Error::source`]).
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// A `GenericError` with this message.
    pub fn generic(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Generic,
            message: message.into(),
            source: None,
        }
    }

    /// An error of a specific kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O failure while doing `what` (e.g. "Could not open '/x'"), worded like QEMU: "what: strerror".
    pub fn io(what: impl fmt::Display, err: &io::Error) -> Error {
        let cause = match err.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(err.kind(), err.to_string()),
        };
        Error::generic(format!("{what}: {}", strerror(err))).with_source(cause)
    }

    /// Keep `source` as the cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(std::sync::Arc::new(source));
        self
    }

    /// The errno of the underlying I/O error, if any.
    pub fn errno(&self) -> Option<i32> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            if let Some(code) = e.downcast_ref::<io::Error>().and_then(|e| e.raw_os_error()) {
                return Some(code);
            }
            cur = e.source();
        }
        None
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
            source: self.source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, Error>;

/// The C library's text for an I/O error ("No such file or directory"), without Rust's " (os error 2)".
pub fn strerror(err: &io::Error) -> String {
    match err.raw_os_error() {
        // The C library's own table (nix's differs: "I/O error" for EIO).
        Some(code) => {
            let text = io::Error::from_raw_os_error(code).to_string();
            let suffix = format!(" (os error {code})");
            text.strip_suffix(&suffix).unwrap_or(&text).to_string()
        }
        None => err.to_string(),
    }
}

/// An `io::Error` carrying an errno, for the I/O path (NBD maps errno to its own codes).
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}
