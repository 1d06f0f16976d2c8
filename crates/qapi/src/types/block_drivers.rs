//! The per-driver members of `BlockdevOptions` (`block-options.json`): the drivers blockd
//! implements (file, raw, qcow2, null, copy-before-write, nbd ...) and their nested types.

use serde::{Deserialize, Serialize};

use super::block_options::{
    present_ref_or_null, BlockdevAioOptions, BlockdevRef, BlockdevRefOrNull,
};
use super::common::OnOffAuto;
use super::sockets::SocketAddress;

/// `BlockdevOptionsFile`: options of `file` and `host_device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsFile {
    /// Host path.
    pub filename: String,
    /// Persistent-reservation manager object id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_manager: Option<String>,
    /// File locking (default auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locking: Option<OnOffAuto>,
    /// AIO back end (default threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio: Option<BlockdevAioOptions>,
    /// Largest batch of requests submitted together (0 = automatic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio_max_batch: Option<i64>,
    /// Drop the page cache on migration (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_cache: Option<bool>,
    /// Debugging aid (unstable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_check_cache_dropped: Option<bool>,
}

/// `BlockdevOptionsRaw`: options of `raw`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsRaw {
    /// The child holding the data.
    pub file: BlockdevRef,
    /// Start of the window in the child, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// Length of the window, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
}

/// `BlockdevOptionsGenericFormat`: formats whose only option is the child (`snapshot-access`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsGenericFormat {
    /// The child holding the data.
    pub file: BlockdevRef,
}

/// `OnCbwError`: what copy-before-write sacrifices when a copy fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCbwError {
    /// Fail the guest write (default).
    BreakGuestWrite,
    /// Let the write go on and break the snapshot.
    BreakSnapshot,
}

/// `BlockdevOptionsCbw`: options of `copy-before-write`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsCbw {
    /// The source (disk) node.
    pub file: BlockdevRef,
    /// Where old data is copied.
    pub target: BlockdevRef,
    /// Protect only this bitmap's dirty regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<super::bitmaps::BlockDirtyBitmap>,
    /// Failure policy (default break-guest-write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_cbw_error: Option<OnCbwError>,
    /// Seconds one copy may take (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbw_timeout: Option<u32>,
    /// Smallest copy granularity, a power of two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cluster_size: Option<u64>,
}

/// `BlockdevOptionsNull`: options of `null-co` and `null-aio`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsNull {
    /// Device size in bytes (default 1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Delay for every request, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ns: Option<u64>,
    /// Reads return zeroes (default false: buffer untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_zeroes: Option<bool>,
}

/// `Qcow2OverlapCheckMode`: a preset of metadata overlap checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Qcow2OverlapCheckMode {
    /// No checks.
    None,
    /// Checks that need no extra I/O.
    Constant,
    /// Checks on cached metadata.
    Cached,
    /// Every check.
    All,
}

/// `Qcow2OverlapCheckFlags`: individual overlap checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Qcow2OverlapCheckFlags {
    /// Preset the others start from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Qcow2OverlapCheckMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_header: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_l1: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_l2: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcount_table: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcount_block: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_table: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_l1: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_l2: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap_directory: Option<bool>,
}

/// `Qcow2OverlapChecks`: a preset or individual flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Qcow2OverlapChecks {
    /// Individual checks.
    Flags(Qcow2OverlapCheckFlags),
    /// A preset.
    Mode(Qcow2OverlapCheckMode),
}

/// `BlockdevQcow2Encryption`: how a qcow2 image is encrypted (blockd supports none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "kebab-case")]
pub enum BlockdevQcow2Encryption {
    /// Legacy AES.
    Aes(QcryptoKeySecret),
    /// LUKS.
    Luks(QcryptoKeySecret),
}

/// `QCryptoBlockOptionsQCow` / `QCryptoBlockOptionsLUKS`: the secret holding the key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QcryptoKeySecret {
    /// Id of the secret object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
}

/// `BlockdevOptionsQcow2`: options of `qcow2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsQcow2 {
    /// The node holding the image.
    pub file: BlockdevRef,
    /// Backing node: absent to use the one named in the image, `Some(Null)` for none.
    #[serde(
        default,
        deserialize_with = "present_ref_or_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing: Option<BlockdevRefOrNull>,
    /// Lazy refcounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Pass guest discards down to the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_discard_request: Option<bool>,
    /// Pass discards from snapshot deletion down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_discard_snapshot: Option<bool>,
    /// Pass other discards down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_discard_other: Option<bool>,
    /// Keep clusters allocated on guest discard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_no_unref: Option<bool>,
    /// Metadata overlap checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_check: Option<Qcow2OverlapChecks>,
    /// Total metadata cache size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<i64>,
    /// L2 table cache size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_cache_size: Option<i64>,
    /// L2 cache entry size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_cache_entry_size: Option<i64>,
    /// Refcount block cache size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcount_cache_size: Option<i64>,
    /// Seconds between cache cleanups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_clean_interval: Option<i64>,
    /// Encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<BlockdevQcow2Encryption>,
    /// External data file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file: Option<BlockdevRef>,
}

/// `BlockdevOptionsNbd`: options of the `nbd` client driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsNbd {
    /// Server address.
    pub server: SocketAddress,
    /// Export name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// TLS credentials object id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// Host name checked against the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// Read this dirty bitmap's status instead of allocation (unstable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_dirty_bitmap: Option<String>,
    /// Seconds to keep reconnecting before failing requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_delay: Option<u32>,
    /// Seconds to keep trying the first connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_timeout: Option<u32>,
}
