//! `transaction`: translates each typed action into the core's transaction action and runs
//! the list through [`block::transaction::run`], which decides the order of prepare, commit,
//! abort and clean.
//!
//! One instant for every backup: before the first action is prepared, writes to the source of
//! every backup action are held off together, and they stay held off until every action has
//! committed (the jobs have started and their copy-before-write hooks are in place). A write
//! that reached one source before that instant reached it before any backup's point in time;
//! a write after it is seen by every backup's hook. (With a snapshot action in the same
//! transaction each backup holds its own source off only while it prepares, since a snapshot
//! drains the node itself.) The hold is a drained section over the sources plus their write
//! gates; each backup's filter node is inserted above its source in a nested drained section.

use std::sync::Arc;

use block::job::JobGroup;
use block::transaction::bitmaps::{Add, Merge, NodeLookup, OnBitmap, Op};
use block::transaction::{self, AbortAction, Action, CompletionMode};
use block::{Error, NodeRef, Result};
use qapi::types::{
    ActionCompletionMode, BlockdevBackup, BlockdevSnapshot, BlockdevSnapshotSync, DriveBackup,
    TransactionAction, TransactionArgs,
};

use crate::backup::{prepare_blockdev_backup, prepare_drive_backup, Prepared};
use crate::convert::bitmap_source;
use crate::daemon::Daemon;

/// The arguments of a backup action.
enum BackupArgs {
    Blockdev(BlockdevBackup),
    Drive(DriveBackup),
}

/// `blockdev-backup` / `drive-backup`: the job is created at prepare and started at commit;
/// an abort drops it before it ever ran.
struct BackupAction {
    daemon: Arc<Daemon>,
    args: Option<BackupArgs>,
    group: Option<Arc<JobGroup>>,
    source_quiesced: bool,
    prepared: Option<Prepared>,
}

impl Action for BackupAction {
    fn kind(&self) -> &'static str {
        match self.args {
            Some(BackupArgs::Drive(_)) => "drive-backup",
            _ => "blockdev-backup",
        }
    }
    fn supports_grouped(&self) -> bool {
        true
    }
    fn prepare(&mut self) -> Result<()> {
        let d = &self.daemon;
        let prepared = match self.args.take() {
            Some(BackupArgs::Blockdev(a)) => prepare_blockdev_backup(d, a, self.source_quiesced)?,
            Some(BackupArgs::Drive(a)) => prepare_drive_backup(d, a, self.source_quiesced)?,
            None => return Ok(()),
        };
        if let Some(g) = &self.group {
            g.add(prepared.job());
        }
        self.prepared = Some(prepared);
        Ok(())
    }
    fn commit(&mut self) {
        if let Some(p) = self.prepared.take() {
            p.commit();
        }
    }
    fn abort(&mut self) {
        if let Some(p) = self.prepared.take() {
            p.abort();
        }
    }
}

/// The arguments of a snapshot action.
enum SnapshotArgs {
    Existing(BlockdevSnapshot),
    Sync(BlockdevSnapshotSync),
}

/// `blockdev-snapshot` / `blockdev-snapshot-sync`: the overlay is put in place at prepare,
/// taken out again at abort; the base goes read-only at commit.
struct SnapshotAction {
    daemon: Arc<Daemon>,
    args: SnapshotArgs,
    prepared: Option<block::graph::SnapshotUndo>,
}

impl Action for SnapshotAction {
    fn kind(&self) -> &'static str {
        match self.args {
            SnapshotArgs::Existing(_) => "blockdev-snapshot",
            SnapshotArgs::Sync(_) => "blockdev-snapshot-sync",
        }
    }
    fn prepare(&mut self) -> Result<()> {
        let d = &self.daemon;
        self.prepared = Some(match &self.args {
            SnapshotArgs::Existing(a) => d.prepare_blockdev_snapshot(a)?,
            SnapshotArgs::Sync(a) => d.prepare_blockdev_snapshot_sync(a)?,
        });
        Ok(())
    }
    fn commit(&mut self) {
        if let Some(p) = self.prepared.take() {
            let created = matches!(self.args, SnapshotArgs::Sync(_));
            if let Err(e) = self.daemon.commit_snapshot(p, created) {
                tracing::warn!(error = %e, "dropping an unused snapshot overlay failed");
            }
        }
    }
    fn abort(&mut self) {
        if let Some(p) = self.prepared.take() {
            self.daemon.abort_snapshot(p);
        }
    }
}

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
    let mode = match args.properties.and_then(|p| p.completion_mode) {
        Some(ActionCompletionMode::Grouped) => CompletionMode::Grouped,
        _ => CompletionMode::Individual,
    };
    let has_snapshot = args.actions.iter().any(|a| {
        matches!(
            a,
            TransactionAction::BlockdevSnapshot(_) | TransactionAction::BlockdevSnapshotSync(_)
        )
    });
    // Every backup source, once each, to hold off together (see the module docs).
    let mut sources: Vec<NodeRef> = Vec::new();
    if !has_snapshot {
        for a in &args.actions {
            let device = match a {
                TransactionAction::BlockdevBackup(b) => &b.common.device,
                TransactionAction::DriveBackup(b) => &b.common.device,
                _ => continue,
            };
            if let Ok(n) = d.lookup_node(device) {
                if !sources.iter().any(|s| Arc::ptr_eq(s, &n)) {
                    sources.push(n);
                }
            }
        }
    }
    let ctx = Ctx {
        daemon: d.clone(),
        lookup: Arc::new(DaemonLookup(d.clone())),
        group: (mode == CompletionMode::Grouped).then(JobGroup::new),
        quiesced: !sources.is_empty(),
    };
    let mut actions: Vec<Box<dyn Action>> =
        args.actions.into_iter().map(|a| action(&ctx, a)).collect();
    // First a drained section over the sources (exports and devices on them stop, requests in
    // flight finish), then the sources' write gates (writers that reach them other than through
    // a root). Each backup inserts its filter in a nested drained section, which finds the
    // roots already idle; gates go first, the section last (reverse order of the locals).
    let _drained = d.graph().drain_begin(&sources);
    let _quiet: Vec<_> = sources.iter().map(|n| n.quiesce()).collect();
    transaction::run(&mut actions, mode)
}

/// What every action of one transaction shares.
struct Ctx {
    daemon: Arc<Daemon>,
    lookup: Arc<dyn NodeLookup>,
    group: Option<Arc<JobGroup>>,
    quiesced: bool,
}

fn action(ctx: &Ctx, a: TransactionAction) -> Box<dyn Action> {
    let lookup = &ctx.lookup;
    let backup = |args| -> Box<dyn Action> {
        Box::new(BackupAction {
            daemon: ctx.daemon.clone(),
            args: Some(args),
            group: ctx.group.clone(),
            source_quiesced: ctx.quiesced,
            prepared: None,
        })
    };
    let snapshot = |args| -> Box<dyn Action> {
        Box::new(SnapshotAction {
            daemon: ctx.daemon.clone(),
            args,
            prepared: None,
        })
    };
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
        TransactionAction::BlockdevBackup(b) => backup(BackupArgs::Blockdev(b)),
        TransactionAction::DriveBackup(b) => backup(BackupArgs::Drive(b)),
        TransactionAction::BlockdevSnapshot(s) => snapshot(SnapshotArgs::Existing(s)),
        TransactionAction::BlockdevSnapshotSync(s) => snapshot(SnapshotArgs::Sync(s)),
        TransactionAction::BlockdevSnapshotInternalSync(_) => {
            Box::new(NotSupported("blockdev-snapshot-internal-sync"))
        }
    }
}
