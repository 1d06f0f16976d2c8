//! `transaction`: translates each typed action into the core's transaction action and runs
//! the list through [`block::transaction::run`], which decides everything else.

use std::sync::Arc;

use block::transaction::bitmaps::{Add, Merge, NodeLookup, Op, OnBitmap};
use block::transaction::{self, AbortAction, Action, CompletionMode};
use block::{Error, NodeRef, Result};
use qapi::types::{ActionCompletionMode, TransactionAction, TransactionArgs};

use crate::convert::bitmap_source;
use crate::daemon::Daemon;

/// Actions find nodes the way the plain commands do.
struct DaemonLookup(Arc<Daemon>);

impl NodeLookup for DaemonLookup {
    fn node(&self, name: &str) -> Result<NodeRef> {
        self.0.lookup_node(name)
    }
    fn bitmap_node(&self, name: &str) -> Result<NodeRef> {
        self.0.bitmap_node(name)
    }
}

/// An action blockd does not do yet: refused at prepare, so nothing of the transaction
/// takes effect.
struct NotSupported(&'static str);

impl Action for NotSupported {
    fn kind(&self) -> &'static str {
        self.0
    }
    fn prepare(&mut self) -> Result<()> {
        Err(Error::generic(format!(
            "Transaction action '{}' is not supported by blockd yet",
            self.0
        )))
    }
}

/// Run a `transaction` command.
pub fn run(d: &Arc<Daemon>, args: TransactionArgs) -> Result<()> {
    let lookup: Arc<dyn NodeLookup> = Arc::new(DaemonLookup(d.clone()));
    let mut actions: Vec<Box<dyn Action>> = args
        .actions
        .into_iter()
        .map(|a| action(&lookup, a))
        .collect();
    let mode = match args.properties.and_then(|p| p.completion_mode) {
        Some(ActionCompletionMode::Grouped) => CompletionMode::Grouped,
        _ => CompletionMode::Individual,
    };
    transaction::run(&mut actions, mode)
}

fn action(lookup: &Arc<dyn NodeLookup>, a: TransactionAction) -> Box<dyn Action> {
    let on = |op, b: qapi::types::BlockDirtyBitmap| -> Box<dyn Action> {
        Box::new(OnBitmap::new(lookup.clone(), op, b.node, b.name))
    };
    match a {
        TransactionAction::Abort(_) => Box::new(AbortAction),
        TransactionAction::BlockDirtyBitmapAdd(b) => Box::new(Add::new(
            lookup.clone(),
            b.node,
            b.name,
            b.granularity.map(u64::from),
            b.persistent.unwrap_or(false),
            b.disabled.unwrap_or(false),
        )),
        TransactionAction::BlockDirtyBitmapRemove(b) => on(Op::Remove, b),
        TransactionAction::BlockDirtyBitmapClear(b) => on(Op::Clear, b),
        TransactionAction::BlockDirtyBitmapEnable(b) => on(Op::Enable, b),
        TransactionAction::BlockDirtyBitmapDisable(b) => on(Op::Disable, b),
        TransactionAction::BlockDirtyBitmapMerge(m) => Box::new(Merge::new(
            lookup.clone(),
            m.node,
            m.target,
            m.bitmaps.iter().map(bitmap_source).collect(),
        )),
        TransactionAction::BlockdevBackup(_) => Box::new(NotSupported("blockdev-backup")),
        TransactionAction::DriveBackup(_) => Box::new(NotSupported("drive-backup")),
        TransactionAction::BlockdevSnapshot(_) => Box::new(NotSupported("blockdev-snapshot")),
        TransactionAction::BlockdevSnapshotSync(_) => {
            Box::new(NotSupported("blockdev-snapshot-sync"))
        }
        TransactionAction::BlockdevSnapshotInternalSync(_) => {
            Box::new(NotSupported("blockdev-snapshot-internal-sync"))
        }
    }
}
