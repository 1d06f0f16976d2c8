//! The crate's one error type: a stable kind, a human context, an optional cause.

use std::fmt;
use std::io;

/// What went wrong, stable for callers to match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// `add_export` with a name already exported.
    DuplicateExport,
    /// The named export does not exist (or is already being removed).
    ExportNotFound,
    /// A safe removal was refused because clients are connected.
    ExportInUse,
    /// An export configuration breaks a protocol limit (name too long, bad block size).
    InvalidConfig,
    /// Socket-level failure (bind, accept).
    Io,
}

/// Error of the NBD server API.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<io::Error>,
}

impl Error {
    /// An error of `kind` described by `context` (the text QEMU would print, where one exists).
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            context: context.into(),
            source: Some(source),
        }
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable context (without the cause).
    pub fn context(&self) -> &str {
        &self.context
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(src) => write!(f, "{}: {}", self.context, src),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
