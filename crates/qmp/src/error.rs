//! The one error type of this crate: an error as it travels on the QMP wire.
//!
//! QMP errors have no deeper structure than a class and a human-readable description
//! (`{"error": {"class": ..., "desc": ...}}`), so [`QmpError`] is exactly that. The class is a
//! free string because the set is owned by QEMU's schema (`QapiErrorClass`); the common ones
//! are provided as constants. Nothing in this crate fails in any other way that a caller has to
//! handle: I/O failures end a connection and are logged.

use std::fmt;

/// An error reply: the `class` and `desc` members of a QMP `error` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// Error class, e.g. [`QmpError::GENERIC_ERROR`] (`"GenericError"`).
    pub class: String,
    /// Human-readable description, worded as QEMU words it.
    pub desc: String,
}

impl QmpError {
    /// `GenericError`: almost every failure.
    pub const GENERIC_ERROR: &'static str = "GenericError";
    /// `CommandNotFound`: unknown command, or any command before capabilities negotiation.
    pub const COMMAND_NOT_FOUND: &'static str = "CommandNotFound";
    /// `DeviceNotActive`: e.g. a `block-job-*` verb naming a job that does not exist.
    pub const DEVICE_NOT_ACTIVE: &'static str = "DeviceNotActive";
    /// `DeviceNotFound`: a legacy device lookup failed.
    pub const DEVICE_NOT_FOUND: &'static str = "DeviceNotFound";

    /// An error of any class.
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        QmpError {
            class: class.into(),
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(Self::GENERIC_ERROR, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(Self::COMMAND_NOT_FOUND, desc)
    }

    /// The wire form of the inner object: `{"class": ..., "desc": ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        obj.insert("class".into(), self.class.clone().into());
        obj.insert("desc".into(), self.desc.clone().into());
        serde_json::Value::Object(obj)
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpError {}
