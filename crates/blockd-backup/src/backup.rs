//! One backup run: plan each disk (full / incremental / differential, with the reason when a
//! disk falls back to a full), take all disks at one instant, copy, record, retire bitmaps.
//!
//! ```text
//!  cleanup leftovers ─▶ plan ─▶ [--estimate: stop] ─▶ scratch/target nodes
//!   ─▶ one transaction: bitmap add (new) + add/merge frozen copy + backup job (fleece|push)
//!   ─▶ pull: snapshot-access + NBD export with qemu:dirty-bitmap ─▶ N connections copy extents
//!      push: wait for the jobs
//!   ─▶ hash files + content ─▶ manifest (atomic) ─▶ teardown ─▶ retire old bitmaps (transaction)
//! ```
//! Until the manifest is written nothing old is touched: the previous bitmap keeps recording,
//! so a run killed at any point costs nothing but its leftovers, which the next run removes.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::chain::{self, Durability, HashAlgo};
use crate::copy;
use crate::error::{Context, Error, Kind, Result};
use crate::fleece::{self, action, bitmaps_of, NbdServer};
use crate::manifest::{now_secs, DiskRecord, FileRecord, Lock, Manifest, Repo, MANIFEST_VERSION};
use crate::plan::{keep_set, latest_records, plan_disk, Plan};
use crate::progress::Progress;
use crate::qmp::Qmp;
use crate::sums;

mod transfer;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Full backup of every disk.
    Full,
    /// Incremental; fails if a disk cannot do one.
    Inc,
    /// Differential (since the last full); fails if a disk cannot do one.
    Diff,
    /// Incremental where possible, else a full for that disk only.
    Auto,
}

/// Options of a backup run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kind wanted.
    pub want: Want,
    /// Node (or device) names of the disks.
    pub disks: Vec<String>,
    /// Push mode (`blockdev-backup` into the repository) instead of pull.
    pub push: bool,
    /// Someone may write during the backup: fleece (pull) and use one transaction.
    pub live: bool,
    /// Most NBD connections per disk (see [`copy`]).
    pub connections: usize,
    /// The daemon's running NBD server socket, if it has one.
    pub nbd_socket: Option<PathBuf>,
    /// Only print the estimate.
    pub estimate: bool,
    /// Folder for scratch images and the NBD socket.
    pub work_dir: PathBuf,
    /// Tag of this repository + machine in daemon object names (see [`fleece`]).
    pub tag: String,
}

/// Names used on the daemon for disk number `i` of backup `id`.
struct Names {
    /// New tracking bitmap.
    bitmap: String,
    /// Frozen copy of the source bitmap.
    frozen: String,
    /// Job id.
    job: String,
    /// Job filter node.
    filter: String,
    /// Scratch (pull) node.
    scratch: String,
    /// Push target node.
    target: String,
    /// snapshot-access node.
    access: String,
    /// Export id and name.
    export: String,
}

impl Names {
    /// Names for disk `i` of backup `id` in the repository tagged `tag`.
    fn new(tag: &str, id: &str, i: usize) -> Names {
        let p = fleece::prefix(tag);
        Names {
            bitmap: format!("{p}{id}"),
            frozen: format!("{p}{id}-x"),
            job: format!("{p}j{i}"),
            filter: format!("{p}f{i}"),
            scratch: format!("{p}s{i}"),
            target: format!("{p}t{i}"),
            access: format!("{p}a{i}"),
            export: format!("{p}e{i}"),
        }
    }
}

/// Run a backup. Returns the manifest written (None for `--estimate`).
pub fn run(
    q: &mut Qmp,
    repo: &Repo<'_>,
    opts: &Options,
    progress: &Progress,
) -> Result<Option<Manifest>> {
    let _lock = Lock::take(repo)?;
    if !opts.estimate {
        // An interrupted prune is finished first: its manifests then name the right checksums.
        crate::prune::finish_pending(repo, progress)?;
    }
    if opts.disks.is_empty() {
        return Err(Error::new(
            Kind::Usage,
            "no disks to back up (give --disk NODE)",
        ));
    }
    let all = repo.backups()?;
    let latest = latest_records(&all);
    // Nodes, exports and jobs in one round trip (the last two for the cleanup).
    let mut st = fleece::state(q)?;
    // A disk is a node name, or a device (QEMU: `query-block`'s device or qdev id).
    let targets = fleece::resolve_disks(q, &st.nodes, &opts.disks)?;
    let target_nodes: Vec<String> = targets.iter().map(|(_, n)| n.clone()).collect();
    let keep = keep_set(&latest, &targets);
    if !opts.estimate {
        for what in fleece::cleanup(q, &opts.tag, &target_nodes, &keep, &mut st)? {
            progress.event(
                "cleanup",
                &format!("removed leftover {what}"),
                json!({"what": what}),
            );
        }
        for f in repo.orphans_of(&all)? {
            repo.store.remove(&f)?;
            progress.event(
                "cleanup",
                &format!("removed unrecorded file {f}"),
                json!({"what": f}),
            );
        }
        // Scratch images of a killed run (of however many disks): only runs use them, and
        // this one holds the lock.
        for f in leftover_scratch(&opts.work_dir) {
            if std::fs::remove_file(&f).is_ok() {
                let what = f.display().to_string();
                progress.event(
                    "cleanup",
                    &format!("removed leftover {what}"),
                    json!({"what": what}),
                );
            }
        }
    }
    let nodes = st.nodes;
    let mut plans = Vec::new();
    for (d, node) in &targets {
        plans.push(plan_disk(repo, &nodes, d, node, opts.want, latest.get(d))?);
    }
    for p in &plans {
        let msg = match &p.reason {
            Some(r) => format!("{}: full ({r}), ~{} bytes", p.disk, p.estimate),
            None => format!("{}: {}, ~{} bytes", p.disk, p.kind.as_str(), p.estimate),
        };
        progress.event(
            "plan",
            &msg,
            json!({"disk": p.disk, "kind": p.kind.as_str(), "reason": p.reason, "estimate": p.estimate}),
        );
    }
    if opts.estimate {
        let total: u64 = plans.iter().map(|p| p.estimate).sum();
        progress.event(
            "estimate",
            &format!("estimate: {total} bytes to read"),
            json!({"bytes": total}),
        );
        return Ok(None);
    }
    let id = repo.new_id(now_secs(), &all)?;
    std::fs::create_dir_all(&opts.work_dir)
        .map_err(|e| Error::io(e, format!("creating {}", opts.work_dir.display())))?;
    let mut run = Run {
        q,
        repo,
        opts,
        progress,
        id: id.clone(),
        plans,
        all,
        nodes,
        made: Made::default(),
        created_files: Vec::new(),
        server: None,
        follow: Vec::new(),
    };
    match run.execute() {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            run.rollback();
            Err(e)
        }
    }
}

/// Objects a run made on the daemon and has not removed yet: what teardown removes, so it
/// needs no query to find them.
#[derive(Default)]
struct Made {
    /// Export ids.
    exports: Vec<String>,
    /// Node names (snapshot-access, scratch, push target).
    nodes: Vec<String>,
    /// Job ids.
    jobs: Vec<String>,
}

impl Made {
    /// Forget `name` in `list` (it was removed).
    fn gone(list: &mut Vec<String>, name: &str) {
        list.retain(|x| x != name);
    }
}

/// State of one run, so a failure can be rolled back.
struct Run<'a, 'b> {
    /// The daemon.
    q: &'a mut Qmp,
    /// The repository.
    repo: &'a Repo<'b>,
    /// Options.
    opts: &'a Options,
    /// Progress.
    progress: &'a Progress,
    /// Backup id.
    id: String,
    /// Plans, in disk order.
    plans: Vec<Plan>,
    /// The repository's backups before this run, oldest first.
    all: Vec<crate::manifest::Manifest>,
    /// `query-named-block-nodes` after the cleanup (the disks' bitmaps before this run).
    nodes: Vec<serde_json::Value>,
    /// What this run made on the daemon and has not removed yet.
    made: Made,
    /// Repository files created so far.
    created_files: Vec<String>,
    /// The NBD server in use.
    server: Option<NbdServer>,
    /// Push: the new files to follow while the jobs write them (exported before the jobs
    /// start, so connecting to them never waits behind a busy daemon).
    follow: Vec<crate::follow::Target>,
}

impl Run<'_, '_> {
    /// Scratch image path of disk `i`.
    fn scratch_path(&self, i: usize) -> PathBuf {
        self.opts.work_dir.join(format!("bb-scratch-{i}.qcow2"))
    }

    /// Everything between the plan and the manifest.
    fn execute(&mut self) -> Result<Manifest> {
        let pull_fleece = self.opts.live && !self.opts.push;
        let mut files = Vec::new();
        for (i, p) in self.plans.clone().iter().enumerate() {
            let n = Names::new(&self.opts.tag, &self.id, i);
            let name = self.repo.disk_file(&p.disk, &self.id);
            let path = self.repo.store.local_path(&name)?;
            let parent_path = match p.parent.last() {
                Some(f) => Some(self.repo.store.local_path(&f.name)?),
                None => None,
            };
            self.created_files.push(name.clone());
            let what = || format!("creating the backup file of '{}'", p.disk);
            if self.opts.push {
                // The daemon writes it: created, not opened here.
                chain::create_file(&path, p.size, parent_path.as_deref(), Durability::Caller)
                    .ctx(what)?;
                // No flushes down to the disk: the tool syncs the file before recording it,
                // and the follower's flushes only need the daemon's cached L2 tables written.
                let file = json!({"driver": "file", "filename": path.to_string_lossy(),
                                  "cache": {"no-flush": true}});
                self.q.execute(
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": n.target, "file": file}),
                )?;
                self.made.nodes.push(n.target.clone());
                files.push((name, path, None));
            } else {
                let img = chain::create(&path, p.size, parent_path.as_deref(), Durability::Caller)
                    .ctx(what)?;
                files.push((name, path, Some(img)));
            }
            if pull_fleece {
                let sp = self.scratch_path(i);
                chain::create_file(&sp, p.size, None, Durability::Caller)?;
                let file = json!({"driver": "file", "filename": sp.to_string_lossy()});
                self.q.execute(
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": n.scratch, "file": file}),
                )?;
                self.made.nodes.push(n.scratch.clone());
            }
        }
        if self.opts.push {
            self.follow = self.follow_targets(&files);
        }
        die_at("prepared");
        // One instant for every disk.
        let mut actions = Vec::new();
        for (i, p) in self.plans.iter().enumerate() {
            let n = Names::new(&self.opts.tag, &self.id, i);
            actions.push(action(
                "block-dirty-bitmap-add",
                json!({"node": p.node, "name": n.bitmap, "persistent": p.persistent}),
            ));
            if let Some(src) = &p.src_bitmap {
                actions.push(action(
                    "block-dirty-bitmap-add",
                    json!({"node": p.node, "name": n.frozen, "disabled": true}),
                ));
                actions.push(action(
                    "block-dirty-bitmap-merge",
                    json!({"node": p.node, "target": n.frozen, "bitmaps": [src]}),
                ));
            }
            if self.opts.push {
                let mut b = json!({"job-id": n.job, "device": p.node, "target": n.target, "sync": "full",
                                   "auto-dismiss": false});
                if p.src_bitmap.is_some() {
                    b["sync"] = json!("incremental");
                    b["bitmap"] = json!(n.frozen);
                }
                actions.push(action("blockdev-backup", b));
            } else if pull_fleece {
                actions.push(action(
                    "blockdev-backup",
                    json!({"job-id": n.job, "device": p.node, "target": n.scratch, "sync": "none",
                           "filter-node-name": n.filter}),
                ));
            }
        }
        fleece::run_actions(self.q, &actions, self.opts.live)
            .ctx(|| "taking the snapshot".into())?;
        if self.opts.push || pull_fleece {
            for i in 0..self.plans.len() {
                let job = Names::new(&self.opts.tag, &self.id, i).job;
                self.made.jobs.push(job);
            }
        }
        let instant = now_secs();
        die_at("snapshot");
        self.progress.event(
            "snapshot",
            &format!("backup {} taken at one instant", self.id),
            json!({"id": self.id}),
        );
        let total: u64 = self.plans.iter().map(|p| p.estimate).sum();
        self.progress.start(&format!("backup {}", self.id), total);
        // The chunk-sums objects are prepared while the daemon copies (see `sums`).
        let stage_in: Vec<(String, Option<sums::PrevSums>, usize)> = self
            .plans
            .iter()
            .map(|p| {
                let n = p.size.div_ceil(chain::HASH_CHUNK) as usize;
                let top = p.parent.last().map(|f| f.name.as_str());
                let prev = self.prev_sums(&p.disk, top);
                (self.repo.sums_name(&p.disk, &self.id), prev, n)
            })
            .collect();
        self.created_files
            .extend(stage_in.iter().map(|(name, _, _)| name.clone()));
        let store = self.repo.store;
        let mut copied = vec![0u64; self.plans.len()];
        let mut known: Vec<Option<copy::KnownHashes>> = vec![None; self.plans.len()];
        let mut followed: Vec<Option<crate::follow::Followed>> =
            (0..self.plans.len()).map(|_| None).collect();
        let (moved, staged) = std::thread::scope(|s| {
            let stager = s.spawn(|| {
                stage_in
                    .iter()
                    .map(|(name, prev, n)| sums::stage(store, name, prev.as_ref(), *n))
                    .collect::<Vec<_>>()
            });
            let moved = self.transfer(&files, &mut copied, &mut known, &mut followed);
            (moved, stager.join())
        });
        moved?;
        let staged =
            staged.map_err(|_| Error::new(Kind::Io, "the thread preparing the sums panicked"))?;
        self.progress.finish();
        die_at("written");
        let mut disks = Vec::new();
        for ((i, p), mut staged) in self.plans.iter().enumerate().zip(staged) {
            if let Some(why) = staged.rejected.take() {
                self.progress.event(
                    "warning",
                    &format!("warning: {}: {why}", p.disk),
                    json!({"disk": p.disk, "what": "sums", "reason": why}),
                );
            }
            let (name, path, img) = &files[i];
            if let Some(img) = img {
                img.flush()?;
                img.close()?;
            }
            let mut paths = p
                .parent
                .iter()
                .map(|f| self.repo.store.local_path(&f.name))
                .collect::<Result<Vec<PathBuf>>>()?;
            paths.push(path.clone());
            let prev = staged.prev.take();
            // One pass: the file's block hashes are the content hashes of the chunks it holds.
            // The hashing reads what is written (the page cache) while the file is made
            // durable beside it; both end before the sums and the manifest are written.
            let store = self.repo.store;
            let (committed, hashed) = std::thread::scope(|s| {
                let sync = s.spawn(|| store.commit_object(name));
                let hashed = crate::blocksum::hash_new_file(
                    path,
                    &paths,
                    prev,
                    known[i].as_deref(),
                    followed[i].as_ref(),
                );
                (sync.join(), hashed)
            });
            committed
                .map_err(|_| Error::new(Kind::Io, "the thread syncing the file panicked"))??;
            let sums = hashed.ctx(|| format!("hashing disk {}", p.disk))?;
            mark("hashed");
            let hashes = sums.chunks;
            let mut chain_recs = p.parent.clone();
            chain_recs.push(FileRecord {
                name: name.clone(),
                size: sums.len,
                checksum: sums.checksum,
                hash: crate::filesum::FileHash::NEW,
            });
            let content = chain::digest(HashAlgo::NEW, &hashes);
            let sums = staged.name().to_string();
            staged.finish(self.repo.store, &hashes)?;
            mark("summed");
            let n = Names::new(&self.opts.tag, &self.id, i);
            disks.push(DiskRecord {
                name: p.disk.clone(),
                node: p.node.clone(),
                kind: p.kind,
                reason: p.reason.clone(),
                size: p.size,
                copied: copied[i],
                chain: chain_recs,
                bitmap: n.bitmap.clone(),
                full_bitmap: p.full_bitmap.clone().unwrap_or(n.bitmap),
                content_digest: content,
                sums: Some(sums),
            });
        }
        let m = Manifest {
            version: MANIFEST_VERSION,
            hash: HashAlgo::NEW,
            id: self.id.clone(),
            machine: self.repo.machine.clone(),
            time: instant,
            mode: if self.opts.push { "push" } else { "pull" }.into(),
            disks,
        };
        self.repo.write_manifest(&m)?;
        self.created_files.clear();
        die_at("manifest");
        // The backup exists now; what follows only tidies up (a failure is repaired next run,
        // whose cleanup removes the tool's bitmaps the latest manifest does not name). A
        // failure here must not roll back: that would remove the bitmap the manifest records.
        self.teardown();
        mark("torn-down");
        if let Err(e) = self.retire(&m) {
            self.progress.event(
                "warning",
                &format!(
                    "backup {} recorded; old bitmaps not retired ({e}): the next run retires them",
                    m.id
                ),
                json!({"id": m.id}),
            );
        }
        mark("retired");
        Ok(m)
    }

    /// The chunk-sums object recorded for the point whose top file is `top`, with the content
    /// digest it must hash to (None: the point is hashed whole, also when its sums were taken
    /// with another algorithm than new backups use).
    fn prev_sums(&self, disk: &str, top: Option<&str>) -> Option<sums::PrevSums> {
        let top = top?;
        let d = self
            .all
            .iter()
            .rev()
            .filter(|m| m.hash == HashAlgo::NEW)
            .flat_map(|m| m.disks.iter())
            .find(|d| d.name == disk && d.chain.last().is_some_and(|f| f.name == top))?;
        Some(sums::PrevSums {
            name: d.sums.clone()?,
            digest: d.content_digest.clone(),
            algo: HashAlgo::NEW,
        })
    }

    /// Remove what the run made on the daemon (users before what they use: exports,
    /// snapshot-access nodes, jobs with their filters, scratch / target nodes), its scratch
    /// files and NBD server; best effort (the next run's cleanup finds what is left).
    fn teardown(&mut self) {
        for id in std::mem::take(&mut self.made.exports) {
            let _ = fleece::del_export(self.q, &id);
        }
        let access = fleece::prefix(&self.opts.tag) + "a";
        let (first, later): (Vec<String>, Vec<String>) = std::mem::take(&mut self.made.nodes)
            .into_iter()
            .partition(|n| n.starts_with(&access));
        // The views go, then their jobs are cancelled: one round trip, then a wait per job.
        let jobs = std::mem::take(&mut self.made.jobs);
        let mut cmds: Vec<(&str, serde_json::Value)> = first
            .iter()
            .map(|name| ("blockdev-del", json!({"node-name": name})))
            .collect();
        for id in &jobs {
            self.q
                .drop_events(|ev, d| ev == "JOB_STATUS_CHANGE" && d["id"] == id.as_str());
            cmds.push(("job-cancel", json!({"id": id})));
        }
        let _ = self.q.execute_many(&cmds);
        for id in &jobs {
            let _ = fleece::wait_job_gone(self.q, id);
        }
        for name in later {
            let _ = self.q.execute("blockdev-del", json!({"node-name": name}));
        }
        for i in 0..self.plans.len() {
            let _ = std::fs::remove_file(self.scratch_path(i));
        }
        if let Some(s) = self.server.take() {
            s.stop(self.q);
        }
    }

    /// Undo a run that failed before its manifest was written.
    fn rollback(&mut self) {
        self.teardown();
        for (i, p) in self.plans.iter().enumerate() {
            let n = Names::new(&self.opts.tag, &self.id, i);
            for b in [&n.frozen, &n.bitmap] {
                let _ = self.q.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": p.node, "name": b}),
                );
            }
        }
        for f in self.created_files.drain(..) {
            let _ = self.repo.store.remove(&f);
        }
    }

    /// After the manifest: remove every tool bitmap on the disks except the new tracking
    /// bitmap and the full anchor, in one transaction when the daemon is live. The bitmaps are
    /// those seen after the cleanup plus the ones this run added; if the daemon's differ (the
    /// transaction is refused), they are asked for and the removal tried once more.
    fn retire(&mut self, m: &Manifest) -> Result<()> {
        let mut nodes = self.nodes.clone();
        for (i, p) in self.plans.iter().enumerate() {
            let n = Names::new(&self.opts.tag, &self.id, i);
            let mut added = vec![n.bitmap];
            if p.src_bitmap.is_some() {
                added.push(n.frozen);
            }
            if let Some(entry) = nodes.iter_mut().find(|e| e["node-name"] == p.node.as_str()) {
                if !entry["dirty-bitmaps"].is_array() {
                    entry["dirty-bitmaps"] = json!([]);
                }
                if let Some(list) = entry["dirty-bitmaps"].as_array_mut() {
                    list.extend(added.into_iter().map(|name| json!({"name": name})));
                }
            }
        }
        if self.retire_from(m, &nodes).is_ok() {
            return Ok(());
        }
        let nodes = self.q.nodes()?;
        self.retire_from(m, &nodes)
    }

    /// Remove the tool's bitmaps that `nodes` lists on the disks of `m` and no chain keeps.
    fn retire_from(&mut self, m: &Manifest, nodes: &[serde_json::Value]) -> Result<()> {
        // The chains of other disk names on the same node (see `keep_set`) keep their bitmaps.
        let mut all = self.all.clone();
        all.push(m.clone());
        let latest = latest_records(&all);
        let targets: Vec<(String, String)> = m
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.node.clone()))
            .collect();
        let keep = keep_set(&latest, &targets);
        let mut actions = Vec::new();
        for d in &m.disks {
            for b in bitmaps_of(nodes, &d.node) {
                let name = b["name"].as_str().unwrap_or("");
                if name.starts_with(&fleece::prefix(&self.opts.tag))
                    && !keep.get(&d.node).is_some_and(|k| k.contains(name))
                {
                    actions.push(action(
                        "block-dirty-bitmap-remove",
                        json!({"node": d.node, "name": name}),
                    ));
                }
            }
        }
        if actions.is_empty() {
            return Ok(());
        }
        fleece::run_actions(self.q, &actions, self.opts.live).ctx(|| "retiring old bitmaps".into())
    }
}

/// Test hook: `BLOCKD_BACKUP_DIE_AT=PHASE` kills the process with SIGKILL when the run
/// reaches PHASE (`prepared`, `snapshot`, `copy`, `written`, `manifest`; `prune-…` in
/// `prune.rs`), so tests can
/// interrupt a backup at every step exactly as a crash or `kill -9` would.
pub fn die_at(phase: &str) {
    mark(phase);
    die_if(phase);
}

/// [`die_at`] without the debug line (for a point reached once per piece copied).
pub fn die_if(phase: &str) {
    if std::env::var("BLOCKD_BACKUP_DIE_AT").is_ok_and(|p| p == phase) {
        // SAFETY: sending SIGKILL to ourselves; nothing runs after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// With `BLOCKD_BACKUP_DEBUG` set, a line on stderr: `phase` reached, in ms since the start.
pub fn mark(phase: &str) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(std::time::Instant::now).elapsed();
    crate::follow::debug(&format!("phase {phase} at {:.1} ms", t.as_secs_f64() * 1e3));
}

/// The tag of a repository + machine: 8 hex digits of a hash of the repository's absolute
/// path and the machine name.
pub fn repo_tag(root: &Path, machine: &str) -> String {
    use sha2::{Digest, Sha256};
    let abs = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut h = Sha256::new();
    h.update(abs.to_string_lossy().as_bytes());
    h.update(b"\0");
    h.update(machine.as_bytes());
    chain::hex(&h.finalize()[..4])
}

/// The scratch images in `work` (`bb-scratch-N.qcow2`).
fn leftover_scratch(work: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(work) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bb-scratch-") && n.ends_with(".qcow2"))
        })
        .collect()
}

/// Default work folder for scratch images: inside the repository's machine folder.
pub fn default_work_dir(repo_root: &Path, machine: &str) -> PathBuf {
    repo_root.join(machine).join(".work")
}
