//! Small enums shared by several families (`common.json`).

use serde::{Deserialize, Serialize};

/// `OnOffAuto`: a three-way switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnOffAuto {
    /// Decide automatically.
    Auto,
    /// On.
    On,
    /// Off.
    Off,
}

/// `IoOperationType`: the kind of I/O that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoOperationType {
    /// A read.
    Read,
    /// A write.
    Write,
}
