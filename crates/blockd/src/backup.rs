//! `blockdev-backup` and `drive-backup`: typed arguments → `block::backup::start`.
//! drive-backup opens (mode `existing`, format probed) or creates (mode `absolute-paths`,
//! through the blockdev-create code) its target, opened with discard and zero detection on
//! as QEMU does, and closes it when the job ends.

use std::sync::{Arc, Weak};

use block::backup::{self, BackupEnv, BackupParams, BitmapMode, Perf, SyncMode};
use block::graph::{probe_format, ChildRef, DriverOptions, NodeOptions};
use block::job::OnError;
use block::node::{NodeFlags, NodeRef};
use block::{Error, Result};
use qapi::types::{
    BackupCommon, BitmapSyncMode, BlockdevBackup, BlockdevOnError, DriveBackup, MirrorSyncMode,
    NewImageMode,
};

use crate::daemon::Daemon;

fn sync_mode(s: MirrorSyncMode) -> SyncMode {
    match s {
        MirrorSyncMode::Top => SyncMode::Top,
        MirrorSyncMode::Full => SyncMode::Full,
        MirrorSyncMode::None => SyncMode::None,
        MirrorSyncMode::Incremental => SyncMode::Incremental,
        MirrorSyncMode::Bitmap => SyncMode::Bitmap,
    }
}

fn bitmap_mode(m: BitmapSyncMode) -> BitmapMode {
    match m {
        BitmapSyncMode::OnSuccess => BitmapMode::OnSuccess,
        BitmapSyncMode::Never => BitmapMode::Never,
        BitmapSyncMode::Always => BitmapMode::Always,
    }
}

fn on_error(e: Option<BlockdevOnError>) -> OnError {
    match e {
        None | Some(BlockdevOnError::Report) => OnError::Report,
        Some(BlockdevOnError::Ignore) => OnError::Ignore,
        Some(BlockdevOnError::Enospc) => OnError::Enospc,
        Some(BlockdevOnError::Stop) => OnError::Stop,
        Some(BlockdevOnError::Auto) => OnError::Auto,
    }
}

fn params(c: &BackupCommon, source: NodeRef, target: NodeRef, sync: SyncMode) -> BackupParams {
    let perf = c.x_perf.clone().unwrap_or_default();
    BackupParams {
        // QSD has no backends to take a default id from: an absent id is the empty one.
        job_id: c.job_id.clone().unwrap_or_default(),
        source,
        target,
        sync,
        bitmap: c.bitmap.clone(),
        bitmap_mode: c.bitmap_mode.map(bitmap_mode),
        speed: c.speed.unwrap_or(0),
        compress: c.compress.unwrap_or(false),
        on_source_error: on_error(c.on_source_error),
        on_target_error: on_error(c.on_target_error),
        auto_finalize: c.auto_finalize.unwrap_or(true),
        auto_dismiss: c.auto_dismiss.unwrap_or(true),
        filter_node_name: c.filter_node_name.clone(),
        discard_source: c.discard_source.unwrap_or(false),
        perf: Perf {
            use_copy_range: perf.use_copy_range.unwrap_or(false),
            max_workers: perf.max_workers,
            max_chunk: perf.max_chunk.unwrap_or(0),
            min_cluster_size: perf.min_cluster_size.unwrap_or(0),
        },
    }
}

/// Gives backup jobs the daemon's graph (for their filter nodes), while the daemon lives.
struct DaemonGraph(Weak<Daemon>);

impl backup::filter::GraphHost for DaemonGraph {
    fn graph(&self) -> Option<Arc<std::sync::Mutex<block::Graph>>> {
        self.0.upgrade().map(|d| d.graph.clone())
    }
}

/// A backup job created but not started: a transaction's backup action between prepare and
/// commit (or abort). Its filter node is already above the source.
pub struct Prepared {
    daemon: Arc<Daemon>,
    job: Arc<block::job::Job>,
}

impl Prepared {
    /// The job.
    pub fn job(&self) -> &Arc<block::job::Job> {
        &self.job
    }

    /// Start the job.
    pub fn commit(self) {
        let jobs = self.daemon.jobs.clone();
        let job = self.commit_held();
        jobs.resume_held(&job);
    }

    /// Like [`Prepared::commit`], but the job waits (paused) until the caller passes the
    /// returned job to `JobManager::resume_held`: a transaction resumes its jobs together
    /// once every action has committed.
    pub fn commit_held(self) -> Arc<block::job::Job> {
        self.daemon.jobs.start_held(&self.job);
        self.job.clone()
    }

    /// Drop the job before it ever ran: everything it took is given back (its filter node
    /// taken out), no BLOCK_JOB_* event is sent (QEMU's created → aborting → concluded → null).
    pub fn abort(self) {
        self.daemon.jobs.discard_unstarted(&self.job);
    }
}

/// Create the job (its filter node takes write on the target and is inserted above the
/// source); `opened` is a target this command opened (drive-backup), closed again when the job
/// ends or fails to start. `source_quiesced`: the caller holds writes to the source off (a
/// transaction).
fn prepare(
    d: &Arc<Daemon>,
    p: BackupParams,
    opened: Option<NodeRef>,
    source_quiesced: bool,
) -> Result<Prepared> {
    let target = p.target.clone();
    let weak: Weak<Daemon> = Arc::downgrade(d);
    let t = target.clone();
    let o = opened.clone();
    let on_clean: Box<dyn Fn() + Send + Sync> = Box::new(move || {
        if let Some(d) = weak.upgrade() {
            release(&d, &t, o.as_ref());
        }
    });
    let graph_names = |name: &str| d.graph().get(name).is_some();
    let env = BackupEnv {
        name_taken: &graph_names,
        on_clean: Some(on_clean),
        source_quiesced,
        host: Some(Arc::new(DaemonGraph(Arc::downgrade(d)))),
    };
    match backup::prepare_with_view(&d.jobs, p, env) {
        Ok((job, _filter)) => Ok(Prepared {
            daemon: d.clone(),
            job,
        }),
        Err(e) => {
            release(d, &target, opened.as_ref());
            Err(e)
        }
    }
}

fn release(d: &Daemon, target: &NodeRef, opened: Option<&NodeRef>) {
    let mut g = d.graph();
    let mut closing = block::graph::Detached::none();
    if let Some(n) = opened {
        match g.remove_unnamed(n) {
            Ok(detached) => closing = detached,
            Err(e) => tracing::warn!(node = n.name(), error = %e, "closing backup target failed"),
        }
    }
    if let Err(e) = g.refresh_locks() {
        tracing::warn!(node = target.name(), error = %e, "releasing backup target locks failed");
    }
    drop(g);
    // Its close (bitmaps, flush) runs without the graph lock.
    block::Graph::close_detached(&d.graph, closing);
}

/// `blockdev-backup`.
pub fn blockdev_backup(d: &Arc<Daemon>, a: BlockdevBackup) -> Result<()> {
    prepare_blockdev_backup(d, a, false).map(Prepared::commit)
}

/// `drive-backup`.
pub fn drive_backup(d: &Arc<Daemon>, a: DriveBackup) -> Result<()> {
    prepare_drive_backup(d, a, false).map(Prepared::commit)
}

/// `blockdev-backup` up to a created job (see [`Prepared`]).
pub fn prepare_blockdev_backup(
    d: &Arc<Daemon>,
    a: BlockdevBackup,
    source_quiesced: bool,
) -> Result<Prepared> {
    // Both held until the job holds them (its filter's edges, its roots): a concurrent
    // blockdev-del waits and then finds them in use, or took one out first and this fails
    // as a lookup would.
    let source = d.hold_lookup(&a.common.device)?;
    let target = d.hold_lookup(&a.target)?;
    let p = params(
        &a.common,
        (*source).clone(),
        (*target).clone(),
        sync_mode(a.common.sync),
    );
    prepare(d, p, None, source_quiesced)
}

/// `drive-backup` up to a created job (see [`Prepared`]).
pub fn prepare_drive_backup(
    d: &Arc<Daemon>,
    a: DriveBackup,
    source_quiesced: bool,
) -> Result<Prepared> {
    // Held until the job holds it (see `prepare_blockdev_backup`).
    let held = d.hold_lookup(&a.common.device)?;
    let source: NodeRef = (*held).clone();
    let mode = a.mode.unwrap_or(NewImageMode::AbsolutePaths);
    let mut sync = sync_mode(a.common.sync);
    // The node the new image is based on: the source's backing for `top` (no backing:
    // a full copy), the source itself for `none`.
    let base = match sync {
        SyncMode::Top => {
            let b = source.child("backing");
            if b.is_none() {
                sync = SyncMode::Full;
            }
            b
        }
        SyncMode::None => Some(source.clone()),
        _ => None,
    };
    let format = match (&a.format, mode) {
        (Some(f), _) => f.clone(),
        (None, NewImageMode::AbsolutePaths) => source.driver_name().to_string(),
        (None, NewImageMode::Existing) => probe_format(&a.target)
            .map_err(|e| Error::io(format!("Could not open '{}'", a.target), &e))?,
    };
    if !matches!(format.as_str(), "qcow2" | "raw" | "file") {
        let qemu_knows =
            serde_json::from_value::<qapi::types::BlockdevDriver>(serde_json::json!(format))
                .is_ok();
        return Err(Error::generic(if qemu_knows {
            format!("Driver '{format}' is not supported by blockd")
        } else {
            format!("Unknown file format '{format}'")
        }));
    }
    if mode == NewImageMode::AbsolutePaths {
        let backing = base
            .as_ref()
            .map(|b| (b.facts().filename, b.driver_name().to_string()));
        block::create::create_image(&a.target, &format, source.size(), backing)
            .map_err(Error::generic)?;
    }
    let file = Box::new(NodeOptions {
        driver: DriverOptions::File {
            filename: a.target.clone(),
            locking: true,
        },
        ..NodeOptions::default()
    });
    let driver = match format.as_str() {
        "qcow2" => DriverOptions::Qcow2 {
            file: ChildRef::Inline(file),
            cache: Default::default(),
            backing: match (mode, &base) {
                (NewImageMode::AbsolutePaths, Some(b)) => {
                    Some(Some(ChildRef::Name(b.name().to_string())))
                }
                (NewImageMode::AbsolutePaths, None) => Some(None),
                (NewImageMode::Existing, _) => None,
            },
        },
        "raw" => DriverOptions::Raw {
            file: ChildRef::Inline(file),
            offset: None,
            size: None,
        },
        "file" => DriverOptions::File {
            filename: a.target.clone(),
            locking: true,
        },
        other => return Err(Error::generic(format!("Unknown driver '{other}'"))),
    };
    let opts = NodeOptions {
        node_name: None,
        read_only: false,
        auto_read_only: false,
        flags: NodeFlags {
            detect_zeroes: "unmap".to_string(),
            discard_unmap: true,
            ..NodeFlags::default()
        },
        driver,
    };
    let target = d.graph().add_unnamed(&opts)?;
    let p = params(&a.common, source, target.clone(), sync);
    prepare(d, p, Some(target), source_quiesced)
}
