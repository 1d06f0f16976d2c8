//! Block node options: `blockdev-add`, `blockdev-reopen`, `blockdev-del`
//! (`block-options.json`).
//!
//! [`BlockdevOptions`] is the flat union on `driver`: the base members are fields, the
//! driver's own members are in [`BlockdevDriverOptions`]. The drivers blockd implements are
//! typed; every other driver is [`BlockdevDriverOptions::Other`] with its (schema-checked)
//! members, for the handler to refuse.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::block_core::BlockdevDetectZeroesOptions;
use super::{from_map, take_keys, to_map};

pub use super::block_drivers::*;

/// `BlockdevDriver`: every block driver QEMU knows (blockd implements a few).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum BlockdevDriver {
    #[serde(rename = "blkdebug")]
    Blkdebug,
    #[serde(rename = "blklogwrites")]
    Blklogwrites,
    #[serde(rename = "blkreplay")]
    Blkreplay,
    #[serde(rename = "blkverify")]
    Blkverify,
    #[serde(rename = "bochs")]
    Bochs,
    #[serde(rename = "cloop")]
    Cloop,
    #[serde(rename = "compress")]
    Compress,
    #[serde(rename = "copy-before-write")]
    CopyBeforeWrite,
    #[serde(rename = "copy-on-read")]
    CopyOnRead,
    #[serde(rename = "dmg")]
    Dmg,
    #[serde(rename = "file")]
    File,
    #[serde(rename = "snapshot-access")]
    SnapshotAccess,
    #[serde(rename = "ftp")]
    Ftp,
    #[serde(rename = "ftps")]
    Ftps,
    #[serde(rename = "gluster")]
    Gluster,
    #[serde(rename = "host_cdrom")]
    HostCdrom,
    #[serde(rename = "host_device")]
    HostDevice,
    #[serde(rename = "http")]
    Http,
    #[serde(rename = "https")]
    Https,
    #[serde(rename = "iscsi")]
    Iscsi,
    #[serde(rename = "luks")]
    Luks,
    #[serde(rename = "nbd")]
    Nbd,
    #[serde(rename = "nfs")]
    Nfs,
    #[serde(rename = "null-aio")]
    NullAio,
    #[serde(rename = "null-co")]
    NullCo,
    #[serde(rename = "nvme")]
    Nvme,
    #[serde(rename = "parallels")]
    Parallels,
    #[serde(rename = "preallocate")]
    Preallocate,
    #[serde(rename = "qcow")]
    Qcow,
    #[serde(rename = "qcow2")]
    Qcow2,
    #[serde(rename = "qed")]
    Qed,
    #[serde(rename = "quorum")]
    Quorum,
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "rbd")]
    Rbd,
    #[serde(rename = "replication")]
    Replication,
    #[serde(rename = "ssh")]
    Ssh,
    #[serde(rename = "throttle")]
    Throttle,
    #[serde(rename = "vdi")]
    Vdi,
    #[serde(rename = "vhdx")]
    Vhdx,
    #[serde(rename = "vmdk")]
    Vmdk,
    #[serde(rename = "vpc")]
    Vpc,
    #[serde(rename = "vvfat")]
    Vvfat,
}

impl BlockdevDriver {
    /// The driver's name as on the wire (`"null-co"`, `"host_device"`, ...).
    pub fn as_str(self) -> &'static str {
        DRIVER_NAMES[self as usize]
    }
}

/// Wire names of [`BlockdevDriver`], in declaration order (a test keeps them in step).
pub(crate) const DRIVER_NAMES: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// `BlockdevDiscardOptions`: what to do with discard requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDiscardOptions {
    /// Drop them.
    Ignore,
    /// Pass them down.
    Unmap,
}

/// `BlockdevCacheOptions`: cache mode of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCacheOptions {
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    /// Ignore flush requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_flush: Option<bool>,
}

/// `BlockdevAioOptions`: asynchronous I/O back end of the file driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockdevAioOptions {
    /// Thread pool.
    #[serde(rename = "threads")]
    Threads,
    /// Linux native AIO.
    #[serde(rename = "native")]
    Native,
    /// io_uring.
    #[serde(rename = "io_uring")]
    IoUring,
}

/// Base members of [`BlockdevOptions`], in schema order.
const BASE_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "active",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
];

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Base {
    driver: BlockdevDriver,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    discard: Option<BlockdevDiscardOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache: Option<BlockdevCacheOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auto_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    force_share: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detect_zeroes: Option<BlockdevDetectZeroesOptions>,
}

/// `BlockdevOptions`: how to open a block node (`blockdev-add`, `--blockdev`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    /// Node name (required at the top level of `blockdev-add`; generated when absent below).
    pub node_name: Option<String>,
    /// Discard handling (default: ignore).
    pub discard: Option<BlockdevDiscardOptions>,
    /// Cache mode.
    pub cache: Option<BlockdevCacheOptions>,
    /// Open the node active (default true).
    pub active: Option<bool>,
    /// Open read-only (default false).
    pub read_only: Option<bool>,
    /// May fall back to read-only.
    pub auto_read_only: Option<bool>,
    /// Share permissions with other users of the image.
    pub force_share: Option<bool>,
    /// Zero-write detection (default off).
    pub detect_zeroes: Option<BlockdevDetectZeroesOptions>,
    /// The driver and its own options.
    pub driver: BlockdevDriverOptions,
}

/// The driver-specific part of [`BlockdevOptions`].
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevDriverOptions {
    /// `file`: a host file.
    File(BlockdevOptionsFile),
    /// `host_device`: a host block device (same options as `file`).
    HostDevice(BlockdevOptionsFile),
    /// `raw`: the raw format, optionally a window of its child.
    Raw(BlockdevOptionsRaw),
    /// `null-co`: a sink that reads as zeroes (if asked) and discards writes.
    NullCo(BlockdevOptionsNull),
    /// `null-aio`: like `null-co`.
    NullAio(BlockdevOptionsNull),
    /// `qcow2`.
    Qcow2(BlockdevOptionsQcow2),
    /// `nbd`: an NBD client.
    Nbd(BlockdevOptionsNbd),
    /// `copy-before-write`: the fleecing / backup filter.
    CopyBeforeWrite(BlockdevOptionsCbw),
    /// `snapshot-access`: the point-in-time view of a copy-before-write node.
    SnapshotAccess(BlockdevOptionsGenericFormat),
    /// Any other driver, with its members as given (already checked against the schema).
    Other {
        /// The driver.
        driver: BlockdevDriver,
        /// Its members (without the base members).
        options: Map<String, Value>,
    },
}

impl BlockdevDriverOptions {
    /// The driver.
    pub fn driver(&self) -> BlockdevDriver {
        match self {
            BlockdevDriverOptions::File(_) => BlockdevDriver::File,
            BlockdevDriverOptions::HostDevice(_) => BlockdevDriver::HostDevice,
            BlockdevDriverOptions::Raw(_) => BlockdevDriver::Raw,
            BlockdevDriverOptions::NullCo(_) => BlockdevDriver::NullCo,
            BlockdevDriverOptions::NullAio(_) => BlockdevDriver::NullAio,
            BlockdevDriverOptions::Qcow2(_) => BlockdevDriver::Qcow2,
            BlockdevDriverOptions::Nbd(_) => BlockdevDriver::Nbd,
            BlockdevDriverOptions::CopyBeforeWrite(_) => BlockdevDriver::CopyBeforeWrite,
            BlockdevDriverOptions::SnapshotAccess(_) => BlockdevDriver::SnapshotAccess,
            BlockdevDriverOptions::Other { driver, .. } => *driver,
        }
    }
}

impl<'de> Deserialize<'de> for BlockdevOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut rest = Map::<String, Value>::deserialize(d)?;
        let base: Base = from_map(take_keys(&mut rest, BASE_KEYS))?;
        let driver = match base.driver {
            BlockdevDriver::File => BlockdevDriverOptions::File(from_map(rest)?),
            BlockdevDriver::HostDevice => BlockdevDriverOptions::HostDevice(from_map(rest)?),
            BlockdevDriver::Raw => BlockdevDriverOptions::Raw(from_map(rest)?),
            BlockdevDriver::NullCo => BlockdevDriverOptions::NullCo(from_map(rest)?),
            BlockdevDriver::NullAio => BlockdevDriverOptions::NullAio(from_map(rest)?),
            BlockdevDriver::Qcow2 => BlockdevDriverOptions::Qcow2(from_map(rest)?),
            BlockdevDriver::Nbd => BlockdevDriverOptions::Nbd(from_map(rest)?),
            BlockdevDriver::CopyBeforeWrite => {
                BlockdevDriverOptions::CopyBeforeWrite(from_map(rest)?)
            }
            BlockdevDriver::SnapshotAccess => {
                BlockdevDriverOptions::SnapshotAccess(from_map(rest)?)
            }
            other => BlockdevDriverOptions::Other {
                driver: other,
                options: rest,
            },
        };
        Ok(BlockdevOptions {
            node_name: base.node_name,
            discard: base.discard,
            cache: base.cache,
            active: base.active,
            read_only: base.read_only,
            auto_read_only: base.auto_read_only,
            force_share: base.force_share,
            detect_zeroes: base.detect_zeroes,
            driver,
        })
    }
}

impl Serialize for BlockdevOptions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let base = Base {
            driver: self.driver.driver(),
            node_name: self.node_name.clone(),
            discard: self.discard,
            cache: self.cache,
            active: self.active,
            read_only: self.read_only,
            auto_read_only: self.auto_read_only,
            force_share: self.force_share,
            detect_zeroes: self.detect_zeroes,
        };
        let mut map = to_map(&base)?;
        let own = match &self.driver {
            BlockdevDriverOptions::File(o) | BlockdevDriverOptions::HostDevice(o) => to_map(o)?,
            BlockdevDriverOptions::Raw(o) => to_map(o)?,
            BlockdevDriverOptions::NullCo(o) | BlockdevDriverOptions::NullAio(o) => to_map(o)?,
            BlockdevDriverOptions::Qcow2(o) => to_map(o)?,
            BlockdevDriverOptions::Nbd(o) => to_map(o)?,
            BlockdevDriverOptions::CopyBeforeWrite(o) => to_map(o)?,
            BlockdevDriverOptions::SnapshotAccess(o) => to_map(o)?,
            BlockdevDriverOptions::Other { options, .. } => options.clone(),
        };
        map.extend(own);
        map.serialize(s)
    }
}

/// `BlockdevRef`: a child node, either the name of an existing node or defined inline.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevRef {
    /// Node name of an existing node.
    Reference(String),
    /// A new node defined in place.
    Definition(Box<BlockdevOptions>),
}

/// `BlockdevRefOrNull`: like [`BlockdevRef`], or `null` for "no child" (e.g. no backing file).
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevRefOrNull {
    /// Node name of an existing node.
    Reference(String),
    /// A new node defined in place.
    Definition(Box<BlockdevOptions>),
    /// Explicitly none.
    Null,
}

impl<'de> Deserialize<'de> for BlockdevRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(BlockdevRef::Reference(s)),
            v @ Value::Object(_) => serde_json::from_value(v)
                .map(|o| BlockdevRef::Definition(Box::new(o)))
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "BlockdevRef must be a string or an object, not {other}"
            ))),
        }
    }
}

impl Serialize for BlockdevRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BlockdevRef::Reference(name) => s.serialize_str(name),
            BlockdevRef::Definition(o) => o.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for BlockdevRefOrNull {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(BlockdevRefOrNull::Null),
            Value::String(s) => Ok(BlockdevRefOrNull::Reference(s)),
            v @ Value::Object(_) => serde_json::from_value(v)
                .map(|o| BlockdevRefOrNull::Definition(Box::new(o)))
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "BlockdevRefOrNull must be a string, an object or null, not {other}"
            ))),
        }
    }
}

impl Serialize for BlockdevRefOrNull {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BlockdevRefOrNull::Reference(name) => s.serialize_str(name),
            BlockdevRefOrNull::Definition(o) => o.serialize(s),
            BlockdevRefOrNull::Null => s.serialize_unit(),
        }
    }
}

/// A present member of type [`BlockdevRefOrNull`], including an explicit `null`: serde would
/// otherwise read `null` as an absent `Option`.
pub(super) fn present_ref_or_null<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BlockdevRefOrNull>, D::Error> {
    BlockdevRefOrNull::deserialize(d).map(Some)
}

/// Arguments of `blockdev-reopen`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevReopenArgs {
    /// New options for each node to reopen.
    pub options: Vec<BlockdevOptions>,
}

/// Arguments of `blockdev-del`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevDelArgs {
    /// Node to remove.
    pub node_name: String,
}
