//! Exports and the NBD server: `nbd-server-*`, `block-export-*` (`block-export.json`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::bitmaps::BlockDirtyBitmapOrStr;
use super::sockets::{SocketAddress, SocketAddressLegacy};
use super::{from_map, take_keys, to_map};

/// The NBD server's settings (QEMU's `NbdServerOptionsBase` plus an address). The command
/// takes the legacy address union, the command line the flat one:
/// [`NbdServerStartArgs`] and [`NbdServerOptions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerSettings<A> {
    /// Seconds a client may take for the handshake (default 10; 0 = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_max_seconds: Option<u32>,
    /// TLS credentials object id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// Authorization object id for TLS clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    /// Most clients at once (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Where to listen.
    pub addr: A,
}

/// Arguments of `nbd-server-start`.
pub type NbdServerStartArgs = NbdServerSettings<SocketAddressLegacy>;

/// `NbdServerOptions`: the `--nbd-server` command-line option (convert it with
/// [`crate::Schema::coerce_keyval`]`("NbdServerOptions", ..)`, no implied key).
pub type NbdServerOptions = NbdServerSettings<SocketAddress>;

/// Arguments of `nbd-server-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerAddArgs {
    /// Export name (default: the device name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-form description for clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Node or device to export.
    pub device: String,
    /// Allow writes (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    /// Dirty bitmap to expose as `qemu:dirty-bitmap:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
}

/// `BlockExportRemoveMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportRemoveMode {
    /// Fail while clients are connected.
    Safe,
    /// Disconnect clients.
    Hard,
}

/// Arguments of `nbd-server-remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerRemoveArgs {
    /// Export name.
    pub name: String,
    /// Removal mode (default safe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}

/// Arguments of `block-export-del`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportDelArgs {
    /// Export id.
    pub id: String,
    /// Removal mode (default safe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}

/// `BlockExportType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportType {
    /// NBD.
    Nbd,
    /// vhost-user-blk.
    VhostUserBlk,
    /// FUSE.
    Fuse,
    /// VDUSE.
    VduseBlk,
}

/// `BlockExportOptionsNbd`: NBD part of `block-export-add`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportOptionsNbd {
    /// Export name (default: the node name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-form description for clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Dirty bitmaps to expose as `qemu:dirty-bitmap:NAME` metadata contexts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BlockDirtyBitmapOrStr>>,
    /// Expose `qemu:allocation-depth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_depth: Option<bool>,
}

/// Base members of [`BlockExportOptions`].
const EXPORT_BASE_KEYS: &[&str] = &[
    "type",
    "id",
    "fixed-iothread",
    "iothread",
    "node-name",
    "writable",
    "writethrough",
    "allow-inactive",
];

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ExportBase {
    #[serde(rename = "type")]
    export_type: BlockExportType,
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fixed_iothread: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iothread: Option<String>,
    node_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writethrough: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow_inactive: Option<bool>,
}

/// `BlockExportOptions`: arguments of `block-export-add` (and `--export`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockExportOptions {
    /// Export id.
    pub id: String,
    /// Fail instead of moving the node to another iothread.
    pub fixed_iothread: Option<bool>,
    /// Iothread to serve from.
    pub iothread: Option<String>,
    /// Node to export.
    pub node_name: String,
    /// Allow writes (default false).
    pub writable: Option<bool>,
    /// Flush every write (default false).
    pub writethrough: Option<bool>,
    /// Allow exporting an inactive node.
    pub allow_inactive: Option<bool>,
    /// The export type and its own options.
    pub kind: BlockExportKind,
}

/// The type-specific part of [`BlockExportOptions`].
#[derive(Debug, Clone, PartialEq)]
pub enum BlockExportKind {
    /// NBD export (served by the NBD server).
    Nbd(BlockExportOptionsNbd),
    /// Another export type, with its (schema-checked) members.
    Other {
        /// The type.
        export_type: BlockExportType,
        /// Its members, without the base members.
        options: Map<String, Value>,
    },
}

impl BlockExportKind {
    /// The export type.
    pub fn export_type(&self) -> BlockExportType {
        match self {
            BlockExportKind::Nbd(_) => BlockExportType::Nbd,
            BlockExportKind::Other { export_type, .. } => *export_type,
        }
    }
}

impl<'de> Deserialize<'de> for BlockExportOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut rest = Map::<String, Value>::deserialize(d)?;
        let base: ExportBase = from_map(take_keys(&mut rest, EXPORT_BASE_KEYS))?;
        let kind = match base.export_type {
            BlockExportType::Nbd => BlockExportKind::Nbd(from_map(rest)?),
            other => BlockExportKind::Other {
                export_type: other,
                options: rest,
            },
        };
        Ok(BlockExportOptions {
            id: base.id,
            fixed_iothread: base.fixed_iothread,
            iothread: base.iothread,
            node_name: base.node_name,
            writable: base.writable,
            writethrough: base.writethrough,
            allow_inactive: base.allow_inactive,
            kind,
        })
    }
}

impl Serialize for BlockExportOptions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let base = ExportBase {
            export_type: self.kind.export_type(),
            id: self.id.clone(),
            fixed_iothread: self.fixed_iothread,
            iothread: self.iothread.clone(),
            node_name: self.node_name.clone(),
            writable: self.writable,
            writethrough: self.writethrough,
            allow_inactive: self.allow_inactive,
        };
        let mut map = to_map(&base)?;
        map.extend(match &self.kind {
            BlockExportKind::Nbd(o) => to_map(o)?,
            BlockExportKind::Other { options, .. } => options.clone(),
        });
        map.serialize(s)
    }
}

/// `BlockExportInfo`: one entry of `query-block-exports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Export type.
    #[serde(rename = "type")]
    pub export_type: BlockExportType,
    /// Exported node.
    pub node_name: String,
    /// Removal requested, clients still connected.
    pub shutting_down: bool,
}
