//! Monitor control: capabilities, version, command list (`control.json`).

use serde::{Deserialize, Serialize};

/// `QMPCapability`: an optional protocol feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpCapability {
    /// Out-of-band command execution.
    Oob,
}

/// Arguments of `qmp_capabilities`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QmpCapabilitiesArgs {
    /// Capabilities the client turns on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<Vec<QmpCapability>>,
}

/// `VersionTriple`: major.minor.micro.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: i64,
    /// Minor version.
    pub minor: i64,
    /// Micro version.
    pub micro: i64,
}

/// `VersionInfo`: reply of `query-version` (also inside the greeting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The QEMU version blockd presents itself as.
    pub qemu: VersionTriple,
    /// Free-form package string.
    pub package: String,
}

/// `CommandInfo`: one entry of `query-commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// Command name.
    pub name: String,
}
