//! One error type for the tool: a stable kind (which decides the exit code), a context
//! chain saying what was being done, and the cause.

use std::fmt;

/// What went wrong, coarse enough to pick an exit code (see README "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bad command line or arguments that cannot work together (exit 2).
    Usage,
    /// The repository is missing, locked, inconsistent or a checksum does not match (exit 3).
    Repository,
    /// The daemon refused a QMP command or could not be reached (exit 4).
    Daemon,
    /// NBD transfer failed (exit 5).
    Nbd,
    /// Local I/O failed, e.g. the repository's disk is full (exit 6).
    Io,
    /// `verify` found a damaged backup (exit 7).
    Verify,
}

impl Kind {
    /// The process exit status for this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Usage => 2,
            Kind::Repository => 3,
            Kind::Daemon => 4,
            Kind::Nbd => 5,
            Kind::Io => 6,
            Kind::Verify => 7,
        }
    }
}

/// An error: kind + what was being done + cause.
#[derive(Debug)]
pub struct Error {
    /// The stable kind.
    pub kind: Kind,
    /// Innermost message first, outer contexts appended by [`Error::context`].
    msg: String,
    /// Contexts, outermost last.
    ctx: Vec<String>,
    /// The underlying cause, if any.
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Result with the tool's error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: Kind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
            ctx: Vec::new(),
            cause: None,
        }
    }

    /// An I/O error while doing `what`.
    pub fn io(e: std::io::Error, what: impl Into<String>) -> Error {
        Error {
            kind: Kind::Io,
            msg: what.into(),
            ctx: Vec::new(),
            cause: Some(Box::new(e)),
        }
    }

    /// An error of `kind` caused by `cause` while doing `what`.
    pub fn caused(
        kind: Kind,
        what: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error {
            kind,
            msg: what.into(),
            ctx: Vec::new(),
            cause: Some(Box::new(cause)),
        }
    }

    /// Add an outer context ("while backing up disk d0").
    pub fn context(mut self, what: impl Into<String>) -> Error {
        self.ctx.push(what.into());
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.ctx.iter().rev() {
            write!(f, "{c}: ")?;
        }
        write!(f, "{}", self.msg)?;
        if let Some(c) = &self.cause {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_ref()
            .map(|c| c.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<qcow2::Error> for Error {
    fn from(e: qcow2::Error) -> Error {
        Error::caused(Kind::Io, "qcow2", e)
    }
}

/// Extension to add context to any result.
pub trait Context<T> {
    /// Wrap the error with `what`.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.context(what()))
    }
}
