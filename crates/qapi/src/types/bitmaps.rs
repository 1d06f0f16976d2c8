//! Dirty bitmaps: arguments of `block-dirty-bitmap-*` and bitmap info (`bitmaps.json`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// `BlockDirtyBitmap`: a bitmap named by node and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockDirtyBitmap {
    /// Node name (or device name) the bitmap belongs to.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

/// `BlockDirtyBitmapAdd`: arguments of `block-dirty-bitmap-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockDirtyBitmapAdd {
    /// Node name (or device name).
    pub node: String,
    /// Name of the new bitmap.
    pub name: String,
    /// Bytes per bit; a power of two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Store the bitmap in the image (qcow2) when the node closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Create it disabled (not recording writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// `BlockDirtyBitmapOrStr`: a bitmap on the target's node (just a name) or on any node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockDirtyBitmapOrStr {
    /// A bitmap of the node the command is about.
    Local(String),
    /// A bitmap of any node.
    External(BlockDirtyBitmap),
}

impl<'de> Deserialize<'de> for BlockDirtyBitmapOrStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(BlockDirtyBitmapOrStr::Local(s)),
            other => serde_json::from_value(other)
                .map(BlockDirtyBitmapOrStr::External)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for BlockDirtyBitmapOrStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BlockDirtyBitmapOrStr::Local(name) => s.serialize_str(name),
            BlockDirtyBitmapOrStr::External(b) => b.serialize(s),
        }
    }
}

/// `BlockDirtyBitmapMerge`: arguments of `block-dirty-bitmap-merge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockDirtyBitmapMerge {
    /// Node of the target bitmap.
    pub node: String,
    /// Bitmap that receives the union.
    pub target: String,
    /// Bitmaps to merge in.
    pub bitmaps: Vec<BlockDirtyBitmapOrStr>,
}

/// `BlockDirtyBitmapSha256`: reply of `x-debug-block-dirty-bitmap-sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDirtyBitmapSha256 {
    /// Hex SHA-256 of the bitmap's serialised bits.
    pub sha256: String,
}

/// `BlockDirtyInfo`: one bitmap in `query-block` / `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDirtyInfo {
    /// Bitmap name (absent for the anonymous successor during a backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Dirty bytes (set bits times granularity).
    pub count: i64,
    /// Bytes per bit.
    pub granularity: u32,
    /// Whether writes are being recorded.
    pub recording: bool,
    /// Whether an operation holds the bitmap.
    pub busy: bool,
    /// Whether it is stored in the image.
    pub persistent: bool,
    /// Present (true) when the stored copy was not saved cleanly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconsistent: Option<bool>,
}
