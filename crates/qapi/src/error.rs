//! The crate's one error type: a QMP error as QEMU reports it.

use std::fmt;

/// A QMP error: the `class` and `desc` of a QMP error reply.
///
/// Every failure this crate reports is one QEMU would report the same way, so the error is
/// already in wire form. The texts follow QEMU 10.0.2 (see the crate tests for the exact
/// texts checked against qemu-storage-daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QapiError {
    /// QMP error class, e.g. `"GenericError"` or `"CommandNotFound"`.
    pub class: &'static str,
    /// Human-readable description, QEMU's text.
    pub desc: String,
}

/// The QMP class of almost every error.
pub const GENERIC_ERROR: &str = "GenericError";
/// The QMP class for an unknown command.
pub const COMMAND_NOT_FOUND: &str = "CommandNotFound";

impl QapiError {
    /// A `GenericError` with the given description.
    pub fn generic(desc: impl Into<String>) -> Self {
        QapiError {
            class: GENERIC_ERROR,
            desc: desc.into(),
        }
    }

    /// `CommandNotFound`: "The command X has not been found".
    pub fn command_not_found(name: &str) -> Self {
        QapiError {
            class: COMMAND_NOT_FOUND,
            desc: format!("The command {name} has not been found"),
        }
    }

    /// "Parameter 'x' is missing".
    pub(crate) fn missing(path: &str) -> Self {
        Self::generic(format!("Parameter '{path}' is missing"))
    }

    /// "Parameter 'x' is unexpected".
    pub(crate) fn unexpected(path: &str) -> Self {
        Self::generic(format!("Parameter '{path}' is unexpected"))
    }

    /// "Invalid parameter type for 'x', expected: string".
    pub(crate) fn invalid_type(path: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{path}', expected: {expected}"
        ))
    }

    /// "Parameter 'x' expects uint32_t" (and the other "expects" forms).
    pub(crate) fn expects(path: &str, what: &str) -> Self {
        Self::generic(format!("Parameter '{path}' expects {what}"))
    }

    /// "Parameter 'x' does not accept value 'v'".
    pub(crate) fn bad_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }
}

impl fmt::Display for QapiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QapiError {}
