//! The crate's single error type: a stable kind, a human context, an optional I/O cause.

use std::fmt;
use std::io;

/// What went wrong, in a form callers can match on (the core maps it to QMP classes and errnos).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The storage below failed (the cause holds the `io::Error`).
    Io,
    /// The image's header or metadata is malformed; the context says which field and why.
    InvalidImage,
    /// The image uses a feature this driver does not implement (encryption, extended L2, ...).
    Unsupported,
    /// Metadata inconsistency found while running; the image has been marked corrupt.
    Corrupt,
    /// A modification was requested on an image opened read-only (or marked corrupt).
    ReadOnly,
    /// The storage is full, or a format limit (L1 or refcount table size) would be exceeded.
    NoSpace,
    /// A request reaches beyond the virtual disk.
    OutOfRange,
    /// A caller-supplied argument is invalid (bad cluster size, bitmap name, ...).
    InvalidArgument,
    /// A named object (bitmap) already exists.
    Exists,
    /// A named object (bitmap) does not exist.
    NotFound,
    /// The image has been closed.
    Closed,
}

impl ErrorKind {
    /// A short lowercase description of the kind, used as the message prefix.
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::InvalidImage => "invalid qcow2 image",
            ErrorKind::Unsupported => "unsupported qcow2 feature",
            ErrorKind::Corrupt => "qcow2 image is corrupt",
            ErrorKind::ReadOnly => "image is read-only",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::OutOfRange => "request out of range",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Exists => "already exists",
            ErrorKind::NotFound => "not found",
            ErrorKind::Closed => "image is closed",
        }
    }
}

/// An error from the qcow2 driver: kind + context + optional cause.
#[derive(Debug)]
pub struct Error {
    /// The stable category.
    kind: ErrorKind,
    /// What was being done / what is wrong, in words for a human.
    context: String,
    /// The underlying storage error, if any.
    source: Option<io::Error>,
    /// The context is a complete message worded as QEMU words it: print it without the
    /// kind prefix, so front ends can pass it through verbatim.
    plain: bool,
}

impl Error {
    /// A new error of `kind` with a context message.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            source: None,
            plain: false,
        }
    }

    /// An error whose message is complete as given (QEMU's wording), shown without a prefix.
    pub fn plain(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            plain: true,
            ..Error::new(kind, message)
        }
    }

    /// An I/O error (kind `Io`, or `NoSpace` for ENOSPC/EFBIG) with what was being done.
    pub fn io(err: io::Error, context: impl Into<String>) -> Error {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ if err.kind() == io::ErrorKind::StorageFull => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            context: context.into(),
            source: Some(err),
            plain: false,
        }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context message (without the kind prefix or cause).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The errno that best represents this error (for NBD replies and the like).
    pub fn errno(&self) -> i32 {
        if let Some(code) = self.source.as_ref().and_then(|e| e.raw_os_error()) {
            return code;
        }
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::InvalidImage => libc::EIO,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::OutOfRange | ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Closed => libc::EIO,
        }
    }

    /// Prefix the context with what the caller was doing.
    pub(crate) fn while_(mut self, what: &str) -> Error {
        self.context = format!("{what}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.plain {
            f.write_str(&self.context)?;
        } else {
            write!(f, "{}: {}", self.kind.describe(), self.context)?;
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Build an `InvalidImage` error.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidImage, msg)
}

/// Build an `Unsupported` error.
pub(crate) fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}
