//! `transaction`: translates each typed action into the core's transaction action and runs
//! the list through [`block::transaction::run`], which decides the order of prepare, commit,
//! abort and clean.
//!
//! One instant for every backup and internal snapshot: before the first action is prepared,
//! writes to the source of every backup action and to every node an internal snapshot is
//! taken of are held off together, and they stay held off until every action has
//! committed (the jobs have started and their copy-before-write hooks are in place). A write
//! that reached one source before that instant reached it before any backup's point in time;
//! a write after it is seen by every backup's hook. (With a snapshot action in the same
//! transaction each backup holds its own source off only while it prepares, since a snapshot
//! drains the node itself.) The hold is a drained section over the sources plus their write
//! gates; each backup's filter node is inserted above its source in a nested drained section.

use std::sync::{Arc, Mutex};

use block::graph::NodeHold;
use block::job::{Job, JobGroup};
use block::transaction::bitmaps::{Add, Merge, NodeLookup, OnBitmap, Op};
use block::transaction::{self, AbortAction, Action, CompletionMode};
use block::{Graph, NodeRef, Result};
use qapi::types::{
    ActionCompletionMode, BlockDirtyBitmapOrStr, BlockdevBackup, BlockdevSnapshot,
    BlockdevSnapshotInternal, BlockdevSnapshotSync, DriveBackup, TransactionAction,
    TransactionArgs,
};

use crate::backup::{prepare_blockdev_backup, prepare_drive_backup, Prepared};
use crate::claims::Key;
use crate::convert::bitmap_source;
use crate::daemon::Daemon;
use crate::internal_snapshot::TakenSnapshot;

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
    started: Started,
}

/// The jobs a transaction's commits started, in commit order (newest action first); they run
/// once every action has committed.
type Started = Arc<Mutex<Vec<Arc<Job>>>>;

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
            let job = p.commit_held();
            self.started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(job);
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
    prepared: Option<crate::snapshot::PreparedSnapshot>,
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

/// Each holds the node it found, as the plain bitmap commands do (see `Daemon::bitmap_node`).
impl NodeLookup for DaemonLookup {
    fn node(&self, name: &str) -> Result<NodeHold> {
        self.0.bitmap_add_node(name)
    }
    fn bitmap_node(&self, name: &str) -> Result<NodeHold> {
        self.0.bitmap_node(name)
    }
}

/// `blockdev-snapshot-internal-sync`: the snapshot is taken at prepare and deleted again at
/// abort, as QEMU does.
struct InternalSnapshotAction {
    daemon: Arc<Daemon>,
    args: BlockdevSnapshotInternal,
    taken: Option<TakenSnapshot>,
}

impl Action for InternalSnapshotAction {
    fn kind(&self) -> &'static str {
        "blockdev-snapshot-internal-sync"
    }
    fn prepare(&mut self) -> Result<()> {
        self.taken = Some(self.daemon.take_internal_snapshot(&self.args)?);
        Ok(())
    }
    fn commit(&mut self) {
        self.taken = None;
    }
    fn abort(&mut self) {
        if let Some(t) = self.taken.take() {
            t.undo();
        }
    }
}

/// What a transaction claims (see [`crate::claims`]): every node its actions name, and the
/// node-names and files its `blockdev-snapshot-sync` actions create. The snapshots and
/// reopens that run beside serialised commands then never see it half done: between an
/// action's prepare and its commit or abort, nothing else changes those nodes.
fn keys(d: &Daemon, actions: &[TransactionAction]) -> Vec<Key> {
    let mut keys = Vec::new();
    let node = |keys: &mut Vec<Key>, name: &str| {
        if let Ok(n) = d.lookup_node(name) {
            keys.push(Key::Node(n));
        }
    };
    for a in actions {
        match a {
            TransactionAction::Abort(_) => {}
            TransactionAction::BlockDirtyBitmapAdd(b) => node(&mut keys, &b.node),
            TransactionAction::BlockDirtyBitmapRemove(b)
            | TransactionAction::BlockDirtyBitmapClear(b)
            | TransactionAction::BlockDirtyBitmapEnable(b)
            | TransactionAction::BlockDirtyBitmapDisable(b) => node(&mut keys, &b.node),
            TransactionAction::BlockDirtyBitmapMerge(m) => {
                node(&mut keys, &m.node);
                for b in &m.bitmaps {
                    if let BlockDirtyBitmapOrStr::External(e) = b {
                        node(&mut keys, &e.node);
                    }
                }
            }
            TransactionAction::BlockdevBackup(b) => {
                node(&mut keys, &b.common.device);
                node(&mut keys, &b.target);
                keys.extend(crate::claims::backup_keys(&b.common));
            }
            TransactionAction::DriveBackup(b) => {
                node(&mut keys, &b.common.device);
                keys.push(Key::File(b.target.clone()));
                keys.extend(crate::claims::backup_keys(&b.common));
            }
            TransactionAction::BlockdevSnapshot(s) => keys.extend(d.snapshot_keys(s)),
            TransactionAction::BlockdevSnapshotSync(s) => keys.extend(d.snapshot_sync_keys(s)),
            TransactionAction::BlockdevSnapshotInternalSync(s) => node(&mut keys, &s.device),
        }
    }
    // Duplicates are harmless: a claim waits for other commands' claims only.
    keys
}

/// Run a `transaction` command.
pub fn run(d: &Arc<Daemon>, args: TransactionArgs) -> Result<()> {
    let _claim = d
        .claims
        .take(|| Ok::<_, block::Error>(keys(d, &args.actions)))?;
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
                TransactionAction::BlockdevSnapshotInternalSync(s) => &s.device,
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
        started: Started::default(),
    };
    let mut actions: Vec<Box<dyn Action>> =
        args.actions.into_iter().map(|a| action(&ctx, a)).collect();
    // First a drained section over the sources (exports and devices on them stop, requests in
    // flight finish), then the sources' write gates (writers that reach them other than through
    // a root). Each backup inserts its filter in a nested drained section, which finds the
    // roots already idle; gates go first, the section last (reverse order of the locals).
    // The wait for requests in flight runs without the graph lock (a stalled request delays
    // this transaction, not other graph commands); roots attached meanwhile start stopped.
    let _drained = Graph::drain_begin_staged(&d.graph, &sources);
    let _quiet: Vec<_> = sources.iter().map(|n| n.quiesce()).collect();
    let result = transaction::run(&mut actions, mode);
    // The jobs resume together, in the order they started, as QEMU's do when the
    // transaction's drained section ends.
    let started = std::mem::take(&mut *ctx.started.lock().unwrap_or_else(|p| p.into_inner()));
    for job in &started {
        d.jobs.resume_held(job);
    }
    result
}

/// What every action of one transaction shares.
struct Ctx {
    daemon: Arc<Daemon>,
    lookup: Arc<dyn NodeLookup>,
    group: Option<Arc<JobGroup>>,
    quiesced: bool,
    started: Started,
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
            started: ctx.started.clone(),
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
        TransactionAction::BlockdevSnapshotInternalSync(args) => Box::new(InternalSnapshotAction {
            daemon: ctx.daemon.clone(),
            args,
            taken: None,
        }),
    }
}
