//! Typed commands, replies and events, one module per schema family.
//!
//! [`parse_command`] checks a command's arguments against the schema (QEMU's error texts) and
//! then deserialises them into the command's struct, so a handler receives a [`Command`] and
//! never raw JSON. Argument structs deny unknown members and use the schema's member names;
//! optional members are `Option`s (defaults are the handler's business, as in QEMU).
//!
//! Unions whose branches blockd does not implement keep those branches as
//! `Other { .., options }` (checked against the schema, then left for the handler to refuse).
//!
//! Reply and event payload structs only serialise; optional members are left out when `None`.
//! The tests check every command, reply and event type here against the schema.

pub mod bitmaps;
pub mod blkdebug;
pub mod block_backup;
pub mod block_core;
pub mod block_create;
mod block_drivers;
pub mod block_export;
pub mod block_job;
pub mod block_options;
pub mod block_snapshot;
pub mod common;
pub mod control;
pub mod events;
pub mod job;
pub mod misc;
pub mod sockets;
pub mod transaction;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::QapiError;
use crate::Schema;

pub use bitmaps::*;
pub use blkdebug::*;
pub use block_backup::*;
pub use block_core::*;
pub use block_create::*;
pub use block_export::*;
pub use block_job::*;
pub use block_options::*;
pub use block_snapshot::*;
pub use common::*;
pub use control::*;
pub use events::*;
pub use job::*;
pub use misc::*;
pub use sockets::*;
pub use transaction::*;

/// Moves the members named in `keys` out of `map` into a new map.
pub(crate) fn take_keys(map: &mut Map<String, Value>, keys: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    for k in keys {
        if let Some(v) = map.remove(*k) {
            out.insert((*k).to_owned(), v);
        }
    }
    out
}

/// Deserialises a struct from a JSON object, with the error type of the caller's deserializer.
pub(crate) fn from_map<T: DeserializeOwned, E: serde::de::Error>(
    map: Map<String, Value>,
) -> Result<T, E> {
    serde_json::from_value(Value::Object(map)).map_err(E::custom)
}

/// Serialises a struct into a JSON object, with the error type of the caller's serializer.
pub(crate) fn to_map<T: Serialize, E: serde::ser::Error>(
    value: &T,
) -> Result<Map<String, Value>, E> {
    match serde_json::to_value(value).map_err(E::custom)? {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        other => Err(E::custom(format!("expected an object, got {other}"))),
    }
}

/// Declares [`Command`], its names and the dispatch from name to typed arguments in one
/// place, so the three cannot drift apart.
macro_rules! commands {
    ( $( $(#[$doc:meta])* $name:literal => $variant:ident $( ( $ty:ty ) )? , )* ) => {
        /// A QMP command with typed arguments.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Command {
            $( $(#[$doc])* $variant $( ( $ty ) )?, )*
        }

        impl Command {
            /// Every command name this enum covers (the tests keep it equal to the schema's).
            pub const NAMES: &'static [&'static str] = &[ $( $name ),* ];

            /// The command's QMP name.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Command::$variant { .. } => $name, )*
                }
            }
        }

        fn typed(name: &str, args: Map<String, Value>) -> Result<Command, QapiError> {
            match name {
                $( $name => Ok(commands!(@build $variant, name, args $(, $ty)?)), )*
                _ => Err(QapiError::generic(format!(
                    "internal error: command {name} is in the schema but has no typed form"
                ))),
            }
        }
    };
    (@build $variant:ident, $name:ident, $args:ident) => {{
        let _ = $args;
        Command::$variant
    }};
    (@build $variant:ident, $name:ident, $args:ident, $ty:ty) => {
        Command::$variant(deserialize::<$ty>($name, $args)?)
    };
}

fn deserialize<T: DeserializeOwned>(name: &str, args: Map<String, Value>) -> Result<T, QapiError> {
    serde_json::from_value(Value::Object(args)).map_err(|e| {
        QapiError::generic(format!("internal error: arguments of {name} passed the schema check but not the typed form: {e}"))
    })
}

commands! {
    /// `qmp_capabilities` (only meaningful during capabilities negotiation).
    "qmp_capabilities" => QmpCapabilities(QmpCapabilitiesArgs),
    /// `query-version`.
    "query-version" => QueryVersion,
    /// `query-commands`.
    "query-commands" => QueryCommands,
    /// `quit`.
    "quit" => Quit,
    /// `query-qmp-schema`.
    "query-qmp-schema" => QueryQmpSchema,
    /// `human-monitor-command` (HMP; blockd supports `qemu-io`).
    "human-monitor-command" => HumanMonitorCommand(HumanMonitorCommandArgs),
    /// `query-block`.
    "query-block" => QueryBlock,
    /// `query-named-block-nodes`.
    "query-named-block-nodes" => QueryNamedBlockNodes(QueryNamedBlockNodesArgs),
    /// `blockdev-add`.
    "blockdev-add" => BlockdevAdd(BlockdevOptions),
    /// `blockdev-reopen`.
    "blockdev-reopen" => BlockdevReopen(BlockdevReopenArgs),
    /// `blockdev-del`.
    "blockdev-del" => BlockdevDel(BlockdevDelArgs),
    /// `blockdev-create`.
    "blockdev-create" => BlockdevCreate(BlockdevCreateArgs),
    /// `blockdev-snapshot-sync`.
    "blockdev-snapshot-sync" => BlockdevSnapshotSync(BlockdevSnapshotSync),
    /// `blockdev-snapshot`.
    "blockdev-snapshot" => BlockdevSnapshot(BlockdevSnapshot),
    /// `blockdev-snapshot-internal-sync`.
    "blockdev-snapshot-internal-sync" => BlockdevSnapshotInternalSync(BlockdevSnapshotInternal),
    /// `blockdev-snapshot-delete-internal-sync`.
    "blockdev-snapshot-delete-internal-sync" =>
        BlockdevSnapshotDeleteInternalSync(BlockdevSnapshotDeleteInternal),
    /// `block-dirty-bitmap-add`.
    "block-dirty-bitmap-add" => BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    /// `block-dirty-bitmap-remove`.
    "block-dirty-bitmap-remove" => BlockDirtyBitmapRemove(BlockDirtyBitmap),
    /// `block-dirty-bitmap-clear`.
    "block-dirty-bitmap-clear" => BlockDirtyBitmapClear(BlockDirtyBitmap),
    /// `block-dirty-bitmap-enable`.
    "block-dirty-bitmap-enable" => BlockDirtyBitmapEnable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-disable`.
    "block-dirty-bitmap-disable" => BlockDirtyBitmapDisable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-merge`.
    "block-dirty-bitmap-merge" => BlockDirtyBitmapMerge(BlockDirtyBitmapMerge),
    /// `transaction`.
    "transaction" => Transaction(TransactionArgs),
    /// `x-debug-block-dirty-bitmap-sha256`.
    "x-debug-block-dirty-bitmap-sha256" => XDebugBlockDirtyBitmapSha256(BlockDirtyBitmap),
    /// `query-block-jobs`.
    "query-block-jobs" => QueryBlockJobs,
    /// `block-job-set-speed`.
    "block-job-set-speed" => BlockJobSetSpeed(BlockJobSetSpeedArgs),
    /// `block-job-cancel`.
    "block-job-cancel" => BlockJobCancel(BlockJobCancelArgs),
    /// `block-job-pause`.
    "block-job-pause" => BlockJobPause(BlockJobDeviceArgs),
    /// `block-job-resume`.
    "block-job-resume" => BlockJobResume(BlockJobDeviceArgs),
    /// `block-job-complete`.
    "block-job-complete" => BlockJobComplete(BlockJobDeviceArgs),
    /// `block-job-dismiss`.
    "block-job-dismiss" => BlockJobDismiss(BlockJobIdArgs),
    /// `block-job-finalize`.
    "block-job-finalize" => BlockJobFinalize(BlockJobIdArgs),
    /// `blockdev-backup`.
    "blockdev-backup" => BlockdevBackup(BlockdevBackup),
    /// `drive-backup` (deprecated in QEMU; use `blockdev-backup`).
    "drive-backup" => DriveBackup(DriveBackup),
    /// `query-jobs`.
    "query-jobs" => QueryJobs,
    /// `job-pause`.
    "job-pause" => JobPause(JobIdArgs),
    /// `job-resume`.
    "job-resume" => JobResume(JobIdArgs),
    /// `job-cancel`.
    "job-cancel" => JobCancel(JobIdArgs),
    /// `job-complete`.
    "job-complete" => JobComplete(JobIdArgs),
    /// `job-dismiss`.
    "job-dismiss" => JobDismiss(JobIdArgs),
    /// `job-finalize`.
    "job-finalize" => JobFinalize(JobIdArgs),
    /// `nbd-server-start`.
    "nbd-server-start" => NbdServerStart(NbdServerStartArgs),
    /// `nbd-server-add` (deprecated in QEMU; use `block-export-add`).
    "nbd-server-add" => NbdServerAdd(NbdServerAddArgs),
    /// `nbd-server-remove` (deprecated in QEMU; use `block-export-del`).
    "nbd-server-remove" => NbdServerRemove(NbdServerRemoveArgs),
    /// `nbd-server-stop`.
    "nbd-server-stop" => NbdServerStop,
    /// `block-export-add`.
    "block-export-add" => BlockExportAdd(BlockExportOptions),
    /// `block-export-del`.
    "block-export-del" => BlockExportDel(BlockExportDelArgs),
    /// `query-block-exports`.
    "query-block-exports" => QueryBlockExports,
}

/// Checks `args` against the schema for command `name` (QEMU's errors; `CommandNotFound` for
/// an unknown name) and returns the typed command.
///
/// A failure of the typed form after a successful schema check is a bug in this crate; it is
/// reported as a `GenericError` naming the command rather than a panic.
pub fn parse_command(name: &str, args: Map<String, Value>) -> Result<Command, QapiError> {
    let normalized = Schema::get().normalize_command(name, &args)?;
    typed(name, normalized)
}
