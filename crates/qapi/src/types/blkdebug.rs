//! The `blkdebug` driver's options (`BlockdevOptionsBlkdebug` in `block-options.json`).
//!
//! [`super::BlockdevDriverOptions`] keeps blkdebug as `Other { options }` (schema-checked);
//! the daemon reads those members into [`BlockdevOptionsBlkdebug`] with
//! [`BlockdevOptionsBlkdebug::from_members`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::block_options::BlockdevRef;

/// `BlkdebugIOType`: request kinds an injection rule can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum BlkdebugIOType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

/// `BlockPermission`: a permission one node user may hold on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum BlockPermission {
    ConsistentRead,
    Write,
    WriteUnchanged,
    Resize,
}

/// `BlkdebugInjectErrorOptions`: one error-injection rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlkdebugInjectErrorOptions {
    /// `BlkdebugEvent` that arms the rule (wire name; the schema checked the value).
    pub event: String,
    /// Only while the node is in this state (0 or absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<i64>,
    /// Request kind that fails (absent: all but block-status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iotype: Option<BlkdebugIOType>,
    /// Error number returned (default EIO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i64>,
    /// Only requests containing this 512-byte sector (absent or -1: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sector: Option<i64>,
    /// Remove the rule after it injected once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub once: Option<bool>,
    /// Fail without yielding first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immediately: Option<bool>,
}

/// `BlkdebugSetStateOptions`: one state-transition rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkdebugSetStateOptions {
    /// `BlkdebugEvent` that triggers the transition.
    pub event: String,
    /// Only in this state (0 or absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<i64>,
    /// State after the event.
    pub new_state: i64,
}

/// `BlockdevOptionsBlkdebug`: options of the `blkdebug` filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsBlkdebug {
    /// The node being filtered.
    pub image: BlockdevRef,
    /// Rule file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Request alignment (0: the child's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub align: Option<i64>,
    /// Largest request passed down (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_transfer: Option<i32>,
    /// Preferred write-zeroes alignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opt_write_zero: Option<i32>,
    /// Largest write-zeroes request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_write_zero: Option<i32>,
    /// Preferred discard alignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opt_discard: Option<i32>,
    /// Largest discard request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_discard: Option<i32>,
    /// Error-injection rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject_error: Option<Vec<BlkdebugInjectErrorOptions>>,
    /// State-transition rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_state: Option<Vec<BlkdebugSetStateOptions>>,
    /// Extra permissions taken on `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take_child_perms: Option<Vec<BlockPermission>>,
    /// Permissions not shared on `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unshare_child_perms: Option<Vec<BlockPermission>>,
}

impl BlockdevOptionsBlkdebug {
    /// Read the driver members of a schema-checked `blkdebug` `BlockdevOptions`.
    pub fn from_members(members: &Map<String, Value>) -> Result<Self, String> {
        serde_json::from_value(Value::Object(members.clone()))
            .map_err(|e| format!("Invalid blkdebug options: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_deserialise_with_wire_names() {
        let v = serde_json::json!({
            "image": "n0", "max-transfer": 65536,
            "inject-error": [{"event": "write_aio", "errno": 28, "once": true, "iotype": "write-zeroes"}],
            "set-state": [{"event": "none", "new_state": 2}],
            "take-child-perms": ["consistent-read"]
        });
        let Value::Object(m) = v else { unreachable!() };
        let o = BlockdevOptionsBlkdebug::from_members(&m).expect("valid");
        assert_eq!(o.max_transfer, Some(65536));
        let rules = o.inject_error.expect("rules");
        assert_eq!(rules[0].iotype, Some(BlkdebugIOType::WriteZeroes));
        assert_eq!(rules[0].errno, Some(28));
        assert_eq!(o.set_state.expect("set")[0].new_state, 2);
        assert_eq!(
            o.take_child_perms,
            Some(vec![BlockPermission::ConsistentRead])
        );
    }
}
