//! Commands outside the block families (`misc.json`).

use serde::{Deserialize, Serialize};

/// Arguments of `human-monitor-command`; the reply is the command's text output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HumanMonitorCommandArgs {
    /// The HMP command line, e.g. `qemu-io drive0 "write 0 64k"`.
    pub command_line: String,
    /// CPU to run it on (meaningless for blockd; accepted and ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_index: Option<i64>,
}
