//! Block node and device information: `query-block`, `query-named-block-nodes`
//! (`block-core.json`).

use serde::{Deserialize, Serialize};

use super::bitmaps::BlockDirtyInfo;

/// Arguments of `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QueryNamedBlockNodesArgs {
    /// Leave out `backing-image` chains from the image info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}

/// `BlockdevDetectZeroesOptions`: how writes of zeroes are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDetectZeroesOptions {
    /// No detection.
    Off,
    /// Turn zero writes into write-zeroes requests.
    On,
    /// Like `on`, and allow unmapping if discard is enabled.
    Unmap,
}

/// `BlockDeviceIoStatus`: result of the last I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockDeviceIoStatus {
    /// Succeeded.
    Ok,
    /// Failed.
    Failed,
    /// Failed for lack of space.
    Nospace,
}

/// `BlockdevCacheInfo`: effective cache mode of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCacheInfo {
    /// Write-back caching.
    pub writeback: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Flushes are ignored.
    pub no_flush: bool,
}

/// `SnapshotInfo`: an internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: i64,
    /// Creation time, seconds.
    pub date_sec: i64,
    /// Creation time, nanoseconds part.
    pub date_nsec: i64,
    /// Guest clock, seconds.
    pub vm_clock_sec: i64,
    /// Guest clock, nanoseconds part.
    pub vm_clock_nsec: i64,
    /// Instruction count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icount: Option<i64>,
}

/// `Qcow2BitmapInfoFlags`: flags of a bitmap stored in a qcow2 image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Qcow2BitmapInfoFlags {
    /// Not saved cleanly (or open read-write right now).
    InUse,
    /// Loaded and recording automatically on open.
    Auto,
}

/// `Qcow2BitmapInfo`: a bitmap stored in a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u32,
    /// Stored flags.
    pub flags: Vec<Qcow2BitmapInfoFlags>,
}

/// `Qcow2CompressionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Qcow2CompressionType {
    /// zlib (deflate).
    Zlib,
    /// zstd.
    Zstd,
}

/// `ImageInfoSpecificQCow2`: qcow2 details of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfoSpecificQCow2 {
    /// "0.10" (version 2) or "1.1" (version 3).
    pub compat: String,
    /// External data file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Whether the data file is a valid raw image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// Extended L2 entries (subclusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// Lazy refcounts (version 3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Marked corrupt (version 3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: i64,
    /// Bitmaps stored in the image (version 3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<Qcow2BitmapInfo>>,
    /// Compression algorithm.
    pub compression_type: Qcow2CompressionType,
}

/// `ImageInfoSpecificFile`: details of a file-protocol node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfoSpecificFile {
    /// Extent size hint set on the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extent_size_hint: Option<u64>,
}

/// `ImageInfoSpecific`: format-specific details, `{"type": .., "data": {..}}`. Only the kinds
/// blockd produces are modelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum ImageInfoSpecific {
    /// qcow2 images.
    Qcow2(ImageInfoSpecificQCow2),
    /// file/host_device nodes.
    File(ImageInfoSpecificFile),
}

/// `ImageInfo` (with the members of its base `BlockNodeInfo`): what an image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// File name (or JSON description) of the node.
    pub filename: String,
    /// Driver name.
    pub format: String,
    /// Image was not closed cleanly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
    /// Bytes allocated on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<i64>,
    /// Guest-visible size in bytes.
    pub virtual_size: i64,
    /// Cluster size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<i64>,
    /// Image is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// Image is compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed: Option<bool>,
    /// Backing file name as written in the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file name made absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// Backing file format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotInfo>>,
    /// Format-specific details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<ImageInfoSpecific>,
    /// The backing image, recursively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// `BlockDeviceInfo`: a node, as `query-named-block-nodes` and `query-block` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    /// File name (or JSON description) of the node.
    pub file: String,
    /// Node name.
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Read-only.
    pub ro: bool,
    /// Driver name.
    pub drv: String,
    /// Backing file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Length of the backing chain.
    pub backing_file_depth: i64,
    /// Node is active (not handed over for migration).
    pub active: bool,
    /// Node is encrypted.
    pub encrypted: bool,
    /// Zero-write detection.
    pub detect_zeroes: BlockdevDetectZeroesOptions,
    /// Throttling: total bytes per second (0 = none).
    pub bps: i64,
    /// Throttling: read bytes per second.
    pub bps_rd: i64,
    /// Throttling: write bytes per second.
    pub bps_wr: i64,
    /// Throttling: total operations per second.
    pub iops: i64,
    /// Throttling: read operations per second.
    pub iops_rd: i64,
    /// Throttling: write operations per second.
    pub iops_wr: i64,
    /// Image information.
    pub image: ImageInfo,
    /// Throttling burst values (absent when not throttled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_max: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_rd_max: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_wr_max: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_max: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_rd_max: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_wr_max: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_max_length: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_rd_max_length: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_wr_max_length: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_max_length: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_rd_max_length: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_wr_max_length: Option<i64>,
    /// See `bps_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_size: Option<i64>,
    /// Throttle group name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Cache mode.
    pub cache: BlockdevCacheInfo,
    /// Write threshold in bytes (0 = none).
    pub write_threshold: i64,
    /// Dirty bitmaps of the node, newest first.
    #[serde(
        rename = "dirty-bitmaps",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dirty_bitmaps: Option<Vec<BlockDirtyInfo>>,
}

/// `BlockInfo`: a device (a named front end over a node), as `query-block` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// Device name.
    pub device: String,
    /// qdev id or QOM path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    /// Always "unknown" (kept for compatibility).
    #[serde(rename = "type")]
    pub device_type: String,
    /// Removable media.
    pub removable: bool,
    /// Media locked by the guest.
    pub locked: bool,
    /// The node behind the device, when media is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inserted: Option<BlockDeviceInfo>,
    /// Tray open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tray_open: Option<bool>,
    /// I/O status, for devices that report it.
    #[serde(rename = "io-status", default, skip_serializing_if = "Option::is_none")]
    pub io_status: Option<BlockDeviceIoStatus>,
}
