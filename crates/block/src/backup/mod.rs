//! Backup jobs (`blockdev-backup`, `drive-backup`): the checks QEMU makes before a backup
//! starts, the point-in-time start (bitmap freeze and copy-before-write hook installed while
//! the source is quiesced), and the job body.
//!
//! - `copy`: what is still to copy, claims, the copy-before-write hook.
//! - `bitmaps`: sync bitmap freeze (successor) and its fate at the end (`bitmap-mode`).
//! - `run`: the job body (workers, progress, speed, error policies, pause, cancel).

mod bitmaps;
mod copy;
pub mod filter;
mod kcopy;
mod run;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hbitmap::HBitmap;

use crate::bitmap::BitmapUse;
use crate::error::{Error, Result};
use crate::graph::check_node_name;
use crate::job::{Job, JobBody, JobManager, JobSpec, OnError};
use crate::node::{NodeRef, WriteHook};

use copy::{CbwHook, Copier};

/// QEMU's MirrorSyncMode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Clusters the top layer holds.
    Top,
    /// Everything.
    Full,
    /// Only what writes overwrite (copy-before-write only; runs until cancelled).
    None,
    /// The bitmap's dirty clusters, bitmap-mode on-success.
    Incremental,
    /// The bitmap's dirty clusters, any bitmap-mode.
    Bitmap,
}

impl SyncMode {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Top => "top",
            SyncMode::Full => "full",
            SyncMode::None => "none",
            SyncMode::Incremental => "incremental",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// QEMU's BitmapSyncMode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    /// Cleared on success.
    OnSuccess,
    /// Never cleared.
    Never,
    /// Cleared of what was copied, always.
    Always,
}

impl BitmapMode {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

/// `x-perf`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Perf {
    /// Copy offloading (`copy_file_range`, which may share extents); QEMU's default is off.
    pub use_copy_range: bool,
    /// Parallel copy requests as given (1 to 2^31-1; QEMU's default 64). Without a value
    /// blockd runs [`DEFAULT_WORKERS`]; a given value is followed up to [`MAX_WORKERS`].
    pub max_workers: Option<i64>,
    /// Largest copy request in bytes (0: default).
    pub max_chunk: i64,
    /// Smallest copy unit (0: default).
    pub min_cluster_size: u64,
}

/// Everything a backup needs, with the nodes already looked up.
pub struct BackupParams {
    /// Job id.
    pub job_id: String,
    /// Source node.
    pub source: NodeRef,
    /// Target node.
    pub target: NodeRef,
    /// What to copy.
    pub sync: SyncMode,
    /// Sync bitmap name.
    pub bitmap: Option<String>,
    /// Its mode, as given.
    pub bitmap_mode: Option<BitmapMode>,
    /// Speed limit, as given (negative is refused).
    pub speed: i64,
    /// Compressed writes.
    pub compress: bool,
    /// Source read error policy.
    pub on_source_error: OnError,
    /// Target write error policy.
    pub on_target_error: OnError,
    /// auto-finalize.
    pub auto_finalize: bool,
    /// auto-dismiss.
    pub auto_dismiss: bool,
    /// Name for the copy-before-write filter.
    pub filter_node_name: Option<String>,
    /// Discard source regions once copied.
    pub discard_source: bool,
    /// Tuning.
    pub perf: Perf,
}

/// Copy workers of a job without `x-perf.max-workers`: QEMU runs 64 coroutines on one thread;
/// blockd's workers are threads, and a few large requests keep the disks and cores busy.
pub const DEFAULT_WORKERS: usize = 2;
/// Most copy workers a job runs, whatever `x-perf.max-workers` asks (each holds a buffer of
/// up to one chunk, and a thread of the blocking pool).
pub const MAX_WORKERS: usize = 64;

/// Default copy unit, and the smallest one.
pub const MIN_CLUSTER: u64 = 64 * 1024;

/// The checks QEMU's blockdev.c makes on the arguments (bitmap and mode combinations);
/// returns the effective bitmap mode.
pub fn check_arguments(p: &BackupParams) -> Result<Option<BitmapMode>> {
    let mut mode = p.bitmap_mode;
    if matches!(p.sync, SyncMode::Bitmap | SyncMode::Incremental) && p.bitmap.is_none() {
        return Err(Error::generic(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            p.sync.as_str()
        )));
    }
    if p.sync == SyncMode::Incremental {
        if mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
            return Err(Error::generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        mode = Some(BitmapMode::OnSuccess);
    }
    if let Some(name) = &p.bitmap {
        let list = p.source.bitmaps();
        let Some(b) = list.get(name) else {
            return Err(Error::generic(format!(
                "Bitmap '{name}' could not be found"
            )));
        };
        let Some(m) = mode else {
            return Err(Error::generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ));
        };
        crate::bitmap::check_usable(b, name, BitmapUse::Read)?;
        if p.sync == SyncMode::None {
            return Err(Error::generic(
                "sync mode 'none' does not produce meaningful bitmap outputs",
            ));
        }
        if m == BitmapMode::Never && p.sync != SyncMode::Bitmap {
            return Err(Error::generic(format!(
                "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
                p.sync.as_str()
            )));
        }
    } else if mode.is_some() {
        return Err(Error::generic(
            "Cannot specify bitmap sync mode without a bitmap",
        ));
    }
    Ok(mode)
}

/// What a job that uses a node as its target registers on it.
pub const TARGET_USER: &str = "block job: backup";
/// What a job registers on its source (the copy-before-write filter sits above it in QEMU).
pub const SOURCE_USER: &str = "backup source";

/// QEMU's refusal for a node a backup job holds (its target).
pub fn busy_error(node: &str) -> Error {
    Error::generic(format!(
        "Node '{node}' is busy: block device is in use by block job: backup"
    ))
}

/// Can the target hold compressed clusters? (qcow2, looking through filters.)
fn supports_compressed(node: &NodeRef) -> bool {
    match node.driver_name() {
        "qcow2" => true,
        "blkdebug" | "copy-before-write" | "throttle" => node
            .children()
            .first()
            .is_some_and(|c| supports_compressed(&c.node)),
        _ => false,
    }
}

/// What the daemon provides to a starting backup.
pub struct BackupEnv<'a> {
    /// Is this node name taken (for `filter-node-name`)?
    pub name_taken: &'a dyn Fn(&str) -> bool,
    /// Called once when the job has released everything (drive-backup closes its target).
    pub on_clean: Option<Box<dyn Fn() + Send + Sync>>,
    /// The caller already holds writes to the source off ([`Node::quiesce`]): a transaction
    /// quiesces every source of its backups together, so they share one point in time.
    pub source_quiesced: bool,
    /// The graph, for the job's copy-before-write filter node and its roots (see
    /// [`filter`]); `None`: no filter node (tests of the job alone).
    pub host: Option<Arc<dyn filter::GraphHost>>,
}

/// Check everything, freeze the bitmap and install the copy-before-write hook (the point in
/// time), create the job and start it. Nothing changes when it fails.
pub fn start(jobs: &Arc<JobManager>, p: BackupParams, env: BackupEnv<'_>) -> Result<Arc<Job>> {
    let job = prepare(jobs, p, env)?;
    jobs.start(&job);
    Ok(job)
}

/// [`start`] without starting: the job is left `created` (a transaction starts it at commit,
/// or drops it with [`JobManager::discard_unstarted`] at abort, which undoes everything).
pub fn prepare(jobs: &Arc<JobManager>, p: BackupParams, env: BackupEnv<'_>) -> Result<Arc<Job>> {
    prepare_with_view(jobs, p, env).map(|(job, _)| job)
}

/// The job's filter node (when the daemon gave a graph), the point-in-time view a `sync: none`
/// job offers through it to `snapshot-access` (as in QEMU's fleecing), and the job itself.
pub fn prepare_with_view(
    jobs: &Arc<JobManager>,
    p: BackupParams,
    env: BackupEnv<'_>,
) -> Result<(Arc<Job>, Option<NodeRef>)> {
    let mode = check_arguments(&p)?;
    if Arc::ptr_eq(&p.source, &p.target) {
        return Err(Error::generic("Source and target cannot be the same"));
    }
    if p.compress && !supports_compressed(&p.target) {
        return Err(Error::generic(
            "Compression is not supported for this drive ",
        ));
    }
    if p.source.has_user(TARGET_USER) {
        return Err(busy_error(p.source.name()));
    }
    if p.target.has_user(TARGET_USER) {
        return Err(busy_error(p.target.name()));
    }
    if env.host.is_none() && p.target.has_user(SOURCE_USER) {
        // Without a filter node nothing else sees the conflict QEMU's filter reports.
        return Err(Error::generic(format!(
            "Could not create node: Permission conflict on node '{}': permissions 'write' are both required by a backup target and unshared by the copy-before-write filter of another backup job",
            p.target.name()
        )));
    }
    if p.perf
        .max_workers
        .is_some_and(|w| w < 1 || w > i64::from(i32::MAX))
    {
        return Err(Error::generic(format!(
            "max-workers must be between 1 and {}",
            i32::MAX
        )));
    }
    if p.perf.max_chunk < 0 {
        return Err(Error::generic(
            "max-chunk must be zero (which means no limit) or positive",
        ));
    }
    if let Some(name) = &p.bitmap {
        if mode != Some(BitmapMode::Never) {
            let list = p.source.bitmaps();
            let b = list.find(name)?;
            crate::bitmap::check_usable(b, name, BitmapUse::Modify)?;
        }
    }
    if p.target.read_only() {
        return Err(Error::generic("Block node is read-only"));
    }
    if p.source.size() != p.target.size() {
        return Err(Error::generic(
            "Source and target image have different sizes",
        ));
    }
    let filter_prefix = "Could not create node: ";
    if let Some(f) = &p.filter_node_name {
        check_node_name(f).map_err(|e| e.context("Could not create node"))?;
        if (env.name_taken)(f) {
            return Err(Error::generic(format!(
                "{filter_prefix}Duplicate nodes with node-name='{f}'"
            )));
        }
    }
    let min = p.perf.min_cluster_size;
    if min != 0 && !min.is_power_of_two() {
        return Err(Error::generic(format!(
            "{filter_prefix}Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
        )));
    }
    if min > 1 << 30 {
        // QEMU aborts here (assertion in its bitmap code); refuse instead.
        return Err(Error::generic(format!(
            "{filter_prefix}Cannot create block-copy-state: min-cluster-size is too large (at most 1 GiB)"
        )));
    }
    let cluster = MIN_CLUSTER
        .max(p.target.facts().cluster_size.unwrap_or(0))
        .max(min);
    if p.perf.max_chunk != 0 && (p.perf.max_chunk as u64) < cluster {
        return Err(Error::generic(format!(
            "Required max-chunk ({}) is less than backup cluster size ({cluster})",
            p.perf.max_chunk
        )));
    }
    if !crate::job::valid_id(&p.job_id) {
        return Err(Error::generic(format!("Invalid job ID '{}'", p.job_id)));
    }
    if jobs.find(&p.job_id, false).is_ok() {
        return Err(Error::generic(format!(
            "Job ID '{}' already in use",
            p.job_id
        )));
    }
    if p.speed < 0 {
        // QEMU creates the job first and fails it while setting the speed.
        jobs.announce_failed_creation(&p.job_id);
        return Err(Error::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }

    let size = p.source.size();
    let mut todo = HBitmap::new(size, cluster).map_err(|e| Error::generic(e.to_string()))?;
    // The filter node first, as QEMU creates it before the job: its target edge holds write
    // on the target before the copy-before-write hook may write there.
    let view_slot = filter::ViewSlot::default();
    let mut installed = match env.host.clone() {
        Some(host) => Some(filter::Installed::create(
            host,
            p.filter_node_name.as_deref(),
            &p.source,
            &p.target,
            view_slot.clone(),
        )?),
        None => None,
    };
    let drop_filter = |installed: Option<filter::Installed>| {
        if let Some(i) = installed {
            i.remove();
        }
    };
    let copier;
    let hook: Arc<dyn WriteHook>;
    let frozen;
    {
        // The point in time: no write is between its hook and its bitmap marks meanwhile.
        let _quiet = (!env.source_quiesced).then(|| p.source.quiesce());
        frozen = match (&p.bitmap, mode) {
            (Some(name), Some(m)) => match bitmaps::freeze(&p.source, name, m) {
                Ok(f) => Some(f),
                Err(e) => {
                    drop(_quiet);
                    drop_filter(installed);
                    return Err(e);
                }
            },
            _ => None,
        };
        match (p.sync, &frozen) {
            (SyncMode::Bitmap | SyncMode::Incremental, Some(f)) => {
                let list = p.source.bitmaps();
                if let Some(b) = list.get(&f.name) {
                    // Same granularity rules as the bitmap's own: cannot fail for a bitmap
                    // of this node, but a failure must not leave the bitmap frozen.
                    if let Err(e) = todo.merge(&b.bits) {
                        drop(list);
                        drop(_quiet);
                        if let Some(f) = frozen {
                            // Nothing was copied.
                            todo.set_all();
                            bitmaps::finish(&p.source, f, false, &todo);
                        }
                        drop_filter(installed);
                        return Err(Error::generic(e.to_string()));
                    }
                }
            }
            _ => todo.set_all(),
        }
        copier = Arc::new(Copier::new(
            p.source.clone(),
            p.target.clone(),
            cluster,
            todo,
            p.compress,
            p.discard_source,
            p.perf.use_copy_range,
        ));
        hook = Arc::new(CbwHook {
            copier: copier.clone(),
            max_buf: 64 << 20,
        });
        p.source.add_hook(hook.clone());
    }
    p.target.add_user(TARGET_USER.to_string());
    p.source.add_user(SOURCE_USER.to_string());
    if p.sync == SyncMode::None {
        let _ = view_slot.set(filter::SnapshotView::new(copier.clone()));
    }
    // Everything that used the source now uses the filter; the job holds its nodes.
    let inserted = match installed.as_mut() {
        Some(i) => i.insert(&p.job_id, &p.target),
        None => Ok(()),
    };
    let filter_node = installed.as_ref().map(|i| i.node().clone());
    let body = Arc::new(BackupJob {
        copier,
        hook,
        sync: p.sync,
        frozen: Mutex::new(frozen),
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
        perf: p.perf,
        filter: Mutex::new(installed),
        on_clean: Mutex::new(env.on_clean),
    });
    if let Err(e) = inserted {
        body.abort();
        body.clean();
        return Err(e);
    }
    let spec = JobSpec {
        id: p.job_id.clone(),
        job_type: "backup",
        is_block_job: true,
        auto_finalize: p.auto_finalize,
        auto_dismiss: p.auto_dismiss,
        speed: p.speed as u64,
        drain_at_start: true,
    };
    match jobs.create(spec, body.clone()) {
        Ok(job) => Ok((job, filter_node)),
        Err(e) => {
            body.abort();
            body.clean();
            Err(e)
        }
    }
}

/// The backup job body and what it must release.
pub struct BackupJob {
    copier: Arc<Copier>,
    hook: Arc<dyn WriteHook>,
    sync: SyncMode,
    frozen: Mutex<Option<bitmaps::Frozen>>,
    on_source_error: OnError,
    on_target_error: OnError,
    perf: Perf,
    /// The filter node and the job's roots, until clean.
    filter: Mutex<Option<filter::Installed>>,
    on_clean: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl BackupJob {
    fn end_bitmap(&self, success: bool) {
        let frozen = self.frozen.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = frozen {
            let not_copied = self.copier.not_copied();
            bitmaps::finish(&self.copier.source, f, success, &not_copied);
        }
    }
}

impl JobBody for BackupJob {
    fn run(
        self: Arc<Self>,
        ctx: crate::job::JobCtx,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<(), String>> + Send>>
    {
        Box::pin(run::run(self, ctx))
    }

    fn commit(&self) {
        self.end_bitmap(true);
    }

    fn abort(&self) {
        self.end_bitmap(false);
    }

    fn clean(&self) {
        let c = &self.copier;
        c.stopped.store(true, Ordering::Release);
        // Waits for hook calls in progress (they hold the hook list's read lock).
        c.source.remove_hook(&self.hook);
        c.target.remove_user(TARGET_USER);
        c.source.remove_user(SOURCE_USER);
        // The job's roots go, then the filter is taken out (drained) and closed.
        let installed = self.filter.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(i) = installed {
            i.remove();
        }
        let cb = self
            .on_clean
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(cb) = cb {
            cb();
        }
    }
}
