//! Image creation: `blockdev-create` (`block-create.json`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::block_core::Qcow2CompressionType;
use super::block_options::{BlockdevDriver, BlockdevRef};
use super::{from_map, take_keys, to_map};

/// Arguments of `blockdev-create` (runs as a job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCreateArgs {
    /// Id of the job.
    pub job_id: String,
    /// What to create.
    pub options: BlockdevCreateOptions,
}

/// `PreallocMode`: how much of a new image to allocate up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreallocMode {
    /// Nothing.
    Off,
    /// Metadata only.
    Metadata,
    /// fallocate() the data.
    Falloc,
    /// Write the data.
    Full,
}

/// `BlockdevQcow2Version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevQcow2Version {
    /// compat=0.10.
    V2,
    /// compat=1.1.
    V3,
}

/// `BlockdevCreateOptionsFile`: create a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCreateOptionsFile {
    /// Host path.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// Preallocation (default off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<PreallocMode>,
    /// Set the no-copy-on-write attribute (btrfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nocow: Option<bool>,
    /// Extent size hint for the file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extent_size_hint: Option<u64>,
}

/// `BlockdevCreateOptionsQcow2`: create a qcow2 image on an existing node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCreateOptionsQcow2 {
    /// Node to write the image to.
    pub file: BlockdevRef,
    /// External data file node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file: Option<BlockdevRef>,
    /// Data file is a valid raw image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// Extended L2 entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// qcow2 version (default v3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<BlockdevQcow2Version>,
    /// Backing file name to record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Backing file format to record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_fmt: Option<BlockdevDriver>,
    /// Encryption (`QCryptoBlockCreateOptions`; blockd does not support encryption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<Map<String, Value>>,
    /// Cluster size in bytes (default 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Preallocation (default off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<PreallocMode>,
    /// Lazy refcounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcount_bits: Option<i64>,
    /// Compression algorithm (default zlib).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<Qcow2CompressionType>,
}

/// `BlockdevCreateOptions`: flat union on `driver`; `file` and `qcow2` are typed.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevCreateOptions {
    /// Create a host file.
    File(BlockdevCreateOptionsFile),
    /// Create a qcow2 image.
    Qcow2(BlockdevCreateOptionsQcow2),
    /// Any other driver, with its (schema-checked) members.
    Other {
        /// The driver.
        driver: BlockdevDriver,
        /// Its members, without `driver`.
        options: Map<String, Value>,
    },
}

impl BlockdevCreateOptions {
    /// The driver.
    pub fn driver(&self) -> BlockdevDriver {
        match self {
            BlockdevCreateOptions::File(_) => BlockdevDriver::File,
            BlockdevCreateOptions::Qcow2(_) => BlockdevDriver::Qcow2,
            BlockdevCreateOptions::Other { driver, .. } => *driver,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBase {
    driver: BlockdevDriver,
}

impl<'de> Deserialize<'de> for BlockdevCreateOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut rest = Map::<String, Value>::deserialize(d)?;
        let base: CreateBase = from_map(take_keys(&mut rest, &["driver"]))?;
        Ok(match base.driver {
            BlockdevDriver::File => BlockdevCreateOptions::File(from_map(rest)?),
            BlockdevDriver::Qcow2 => BlockdevCreateOptions::Qcow2(from_map(rest)?),
            other => BlockdevCreateOptions::Other {
                driver: other,
                options: rest,
            },
        })
    }
}

impl Serialize for BlockdevCreateOptions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = to_map(&CreateBase {
            driver: self.driver(),
        })?;
        map.extend(match self {
            BlockdevCreateOptions::File(o) => to_map(o)?,
            BlockdevCreateOptions::Qcow2(o) => to_map(o)?,
            BlockdevCreateOptions::Other { options, .. } => options.clone(),
        });
        map.serialize(s)
    }
}
