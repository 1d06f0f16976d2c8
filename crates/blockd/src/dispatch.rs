//! The QMP dispatcher: `qapi::types::parse_command` checks a command's arguments against the
//! schema and deserialises them into a typed [`Command`]; one `match` routes each command to
//! the daemon or the core; core errors map to QMP error classes in one place ([`qmp_error`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use serde_json::{json, Map, Value};

use block::create::CreateJob;
use block::job::JobSpec;
use block::{bitmap_ops, ErrorKind};
use qapi::types::{
    BlockExportRemoveMode, BlockdevCreateArgs, Command, HumanMonitorCommandArgs, NbdServerAddArgs,
    NbdServerStartArgs, SocketAddressLegacy,
};

use crate::claims::{self, Claim, Key};
use crate::convert::{bitmap_source, create_spec, export_args, node_options};
use crate::daemon::Daemon;
use crate::exports::{ExportArgs, NbdAddr};
use crate::wire;

/// The one mapping from a core error to a QMP error.
fn qmp_error(e: block::Error) -> qmp::QmpError {
    let class = match e.kind() {
        ErrorKind::Generic => "GenericError",
        ErrorKind::DeviceNotFound => "DeviceNotFound",
        ErrorKind::DeviceNotActive => "DeviceNotActive",
    };
    qmp::QmpError::new(class, e.message())
}

pub(crate) fn generic(msg: impl Into<String>) -> block::Error {
    block::Error::generic(msg)
}

pub(crate) type CmdResult = Result<Value, block::Error>;

/// The empty reply of commands that return nothing.
/// Run a graph change (file I/O, bitmap loading, fsync, waiting for drained requests) on a
/// blocking thread, so the reactor keeps serving NBD and other monitors meanwhile.
async fn off_reactor(
    d: &Arc<Daemon>,
    f: impl FnOnce(&Arc<Daemon>) -> CmdResult + Send + 'static,
) -> CmdResult {
    let d = d.clone();
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| generic(format!("graph change failed: {e}")))?
}

fn done<T>(r: Result<T, block::Error>) -> CmdResult {
    r.map(|_| json!({}))
}

fn nbd_addr(a: &SocketAddressLegacy) -> Result<NbdAddr, block::Error> {
    match a {
        SocketAddressLegacy::Unix(u) => Ok(NbdAddr::Unix(u.path.clone().into())),
        SocketAddressLegacy::Inet(i) => Ok(NbdAddr::Inet(i.host.clone(), i.port.clone())),
        SocketAddressLegacy::Vsock(_) => Err(unsupported_addr("vsock")),
        SocketAddressLegacy::Fd(_) => Err(unsupported_addr("fd")),
    }
}

fn unsupported_addr(kind: &str) -> block::Error {
    generic(format!(
        "NBD server address type '{kind}' is not supported by blockd"
    ))
}

fn hard(mode: Option<BlockExportRemoveMode>) -> bool {
    mode == Some(BlockExportRemoveMode::Hard)
}

/// The dispatcher handed to the QMP server.
pub struct QmpDispatcher {
    daemon: Arc<Daemon>,
    server: OnceLock<qmp::Server>,
}

impl QmpDispatcher {
    /// A dispatcher over the daemon.
    pub fn new(daemon: Arc<Daemon>) -> Arc<QmpDispatcher> {
        Arc::new(QmpDispatcher {
            daemon,
            server: OnceLock::new(),
        })
    }

    /// Give it the server (for `quit`).
    pub fn set_server(&self, server: qmp::Server) {
        let _ = self.server.set(server);
    }
}

impl qmp::Dispatcher for QmpDispatcher {
    fn has_command(&self, name: &str) -> bool {
        COMMANDS.contains(&name)
    }

    /// What runs beside other commands (off the QMP command lock), so that a slow disk holds
    /// up only the commands that need what waits for it:
    /// - `blockdev-add` opens files without the graph lock (names reserved, named children
    ///   pinned: `block::Graph::add_staged`); `blockdev-del` stores, flushes and closes
    ///   without it (the node marked as being deleted, then detached: `Graph::del_staged`).
    /// - The commands that change existing nodes over several steps or wait on their I/O
    ///   first claim the nodes they change and the names, files, job ids and export ids they
    ///   create (`crate::claims`), all at once: `blockdev-snapshot(-sync)`, `blockdev-reopen`,
    ///   the `block-dirty-bitmap-*` and internal snapshot commands, `transaction` (every
    ///   action's nodes, files and job ids, from prepare to commit or abort),
    ///   `blockdev-backup` / `drive-backup` (source, target or target file, job id) and
    ///   `block-export-add` / `nbd-server-add` (node, export id, the NBD server). Two of them
    ///   on one key run one after the other, each all or nothing, as under QEMU's lock; a job
    ///   id is created by one (the other then gets QEMU's "already in use").
    /// - Every query, which reads state under that state's own locks: `query-version`,
    ///   `query-commands`, `query-qmp-schema`; `query-jobs` and `query-block-jobs` read the
    ///   job table once (a transaction's jobs may show `created` before its commit, states
    ///   QEMU announces by JOB_STATUS_CHANGE too); `query-block`, `query-named-block-nodes`,
    ///   `query-block-exports` and `x-debug-block-dirty-bitmap-sha256` take a read claim on
    ///   the nodes they report, so a node that a claimed command changes is shown before or
    ///   after that command, never half way (they wait for it; other queries do not).
    ///
    /// Serialised stay the commands without I/O to wait on or whose effects the claims do
    /// not cover: `blockdev-create` (its job does the I/O), the job verbs (they claim their
    /// job id, so a verb on a job a transaction is still creating waits for it),
    /// `nbd-server-start` / `-stop` (they claim the NBD server), the export removals,
    /// `human-monitor-command`, `quit`. A serialised command waiting for a claim holds up
    /// the other serialised commands meanwhile, never the ones above.
    fn runs_unserialised(&self, name: &str) -> bool {
        matches!(
            name,
            "blockdev-add"
                | "blockdev-del"
                | "blockdev-snapshot"
                | "blockdev-snapshot-sync"
                | "blockdev-reopen"
                | "block-dirty-bitmap-add"
                | "block-dirty-bitmap-remove"
                | "block-dirty-bitmap-clear"
                | "block-dirty-bitmap-enable"
                | "block-dirty-bitmap-disable"
                | "block-dirty-bitmap-merge"
                | "blockdev-snapshot-internal-sync"
                | "blockdev-snapshot-delete-internal-sync"
                | "transaction"
                | "blockdev-backup"
                | "drive-backup"
                | "block-export-add"
                | "nbd-server-add"
                | "query-version"
                | "query-commands"
                | "query-qmp-schema"
                | "query-jobs"
                | "query-block-jobs"
                | "query-block"
                | "query-named-block-nodes"
                | "query-block-exports"
                | "x-debug-block-dirty-bitmap-sha256"
        )
    }

    fn dispatch(&self, name: &str, args: Map<String, Value>) -> qmp::DispatchFuture {
        let daemon = self.daemon.clone();
        let server = self.server.get().cloned();
        let in_flight = self.runs_unserialised(name).then(|| InFlight::new(&daemon));
        let name = name.to_string();
        Box::pin(async move {
            let _in_flight = in_flight;
            let cmd = qapi::types::parse_command(&name, args)
                .map_err(|e| qmp::QmpError::new(e.class, e.desc))?;
            run(&daemon, server, cmd).await.map_err(qmp_error)
        }) as Pin<Box<dyn Future<Output = _> + Send>>
    }
}

/// One command running beside others, counted in `Daemon::in_flight` until it ends.
struct InFlight(Arc<Daemon>);

impl InFlight {
    fn new(d: &Arc<Daemon>) -> InFlight {
        d.in_flight.send_modify(|n| *n += 1);
        InFlight(d.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

/// Every command blockd implements: exactly the typed commands of `qapi`, each of which the
/// exhaustive `match` in [`run`] routes; a test checks this equals the schema's command list.
pub const COMMANDS: &[&str] = Command::NAMES;

/// A job verb, shared by the `job-*` and `block-job-*` commands.
#[derive(Clone, Copy)]
enum Verb {
    Cancel,
    Pause,
    Resume,
    Complete,
    Dismiss,
    Finalize,
}

/// Applies one typed command.
async fn run(d: &Arc<Daemon>, server: Option<qmp::Server>, cmd: Command) -> CmdResult {
    match cmd {
        // Negotiation is the protocol's business (the qmp crate answers it before us).
        Command::QmpCapabilities(_) => Ok(json!({})),
        // Members in the schema's order, so the reply's bytes are QSD's (QDict walk order).
        Command::QueryVersion => wire::version_info(),
        Command::QueryCommands => Ok(Value::Array(
            qapi::Schema::get()
                .commands()
                .into_iter()
                .map(|c| json!({"name": c}))
                .collect(),
        )),
        Command::QueryQmpSchema => Ok(qapi::Schema::get().introspect()),
        Command::Quit => {
            if let Some(s) = server {
                s.begin_shutdown();
            }
            d.shutdown.cancel();
            Ok(json!({}))
        }
        Command::HumanMonitorCommand(a) => human_monitor_command(d, a).await,
        // The queries that report nodes wait for the commands changing them (a read claim,
        // see `crate::claims`), so they show each such command's nodes before or after it.
        Command::QueryBlock => {
            off_reactor(d, |d| {
                // Files are stat'ed before the claims are taken: a hung one stalls this
                // query, not the commands that would wait for its claims.
                let known = crate::info::Facts::read(&d.device_nodes());
                let _read = d.claims.read(|| Ok(claims::device_keys(d)))?;
                Ok(d.query_block_from(&known))
            })
            .await
        }
        Command::QueryNamedBlockNodes(a) => {
            let flat = a.flat.unwrap_or(false);
            off_reactor(d, move |d| {
                let nodes = d.graph().nodes().to_vec();
                let known = crate::info::Facts::read(&nodes);
                let _read = d.claims.read(|| Ok(claims::all_node_keys(d)))?;
                Ok(d.query_named_block_nodes_from(flat, &known))
            })
            .await
        }
        Command::BlockdevAdd(o) => {
            let opts = node_options(&o).map_err(generic)?;
            off_reactor(d, move |d| done(d.blockdev_add(&opts))).await
        }
        Command::BlockdevReopen(a) => {
            off_reactor(d, move |d| crate::reopen::blockdev_reopen(d, a)).await
        }
        Command::BlockdevDel(a) => {
            off_reactor(d, move |d| done(d.blockdev_del(&a.node_name))).await
        }
        Command::BlockdevCreate(a) => blockdev_create(d, a),
        Command::BlockdevSnapshot(a) => {
            off_reactor(d, move |d| done(d.blockdev_snapshot(&a))).await
        }
        Command::BlockdevSnapshotSync(a) => {
            off_reactor(d, move |d| done(d.blockdev_snapshot_sync(&a))).await
        }
        Command::BlockdevSnapshotInternalSync(a) => {
            off_reactor(d, move |d| {
                let _claim = d
                    .claims
                    .take(|| Ok::<_, block::Error>(node_keys(d, &a.device)))?;
                done(d.take_internal_snapshot(&a))
            })
            .await
        }
        Command::BlockdevSnapshotDeleteInternalSync(a) => {
            off_reactor(d, move |d| {
                let _claim = d
                    .claims
                    .take(|| Ok::<_, block::Error>(node_keys(d, &a.device)))?;
                Ok(crate::info::to_value(&d.delete_internal_snapshot(&a)?))
            })
            .await
        }
        // Off the reactor: a bitmap command waits for a blockdev-del of its node in progress
        // (see `Daemon::bitmap_node`), and a persistent one may write the image.
        Command::BlockDirtyBitmapAdd(a) => {
            off_reactor(d, move |d| {
                let _claim = claim_nodes(d, &[&a.node])?;
                done(d.bitmap_add(
                    &a.node,
                    &a.name,
                    a.granularity.map(u64::from),
                    a.persistent.unwrap_or(false),
                    a.disabled.unwrap_or(false),
                ))
            })
            .await
        }
        Command::BlockDirtyBitmapRemove(a) => {
            off_reactor(d, move |d| {
                let _claim = claim_nodes(d, &[&a.node])?;
                done(bitmap_ops::remove(&*d.bitmap_node(&a.node)?, &a.name))
            })
            .await
        }
        Command::BlockDirtyBitmapClear(a) => {
            off_reactor(d, move |d| {
                let _claim = claim_nodes(d, &[&a.node])?;
                done(bitmap_ops::clear(&*d.bitmap_node(&a.node)?, &a.name))
            })
            .await
        }
        Command::BlockDirtyBitmapEnable(a) => {
            off_reactor(d, move |d| {
                let _claim = claim_nodes(d, &[&a.node])?;
                done(bitmap_ops::set_recording(
                    &*d.bitmap_node(&a.node)?,
                    &a.name,
                    true,
                ))
            })
            .await
        }
        Command::BlockDirtyBitmapDisable(a) => {
            off_reactor(d, move |d| {
                let _claim = claim_nodes(d, &[&a.node])?;
                done(bitmap_ops::set_recording(
                    &*d.bitmap_node(&a.node)?,
                    &a.name,
                    false,
                ))
            })
            .await
        }
        Command::BlockDirtyBitmapMerge(a) => {
            let sources: Vec<_> = a.bitmaps.iter().map(bitmap_source).collect();
            off_reactor(d, move |d| {
                let mut names: Vec<&str> = vec![&a.node];
                names.extend(sources.iter().filter_map(|(n, _)| n.as_deref()));
                let _claim = claim_nodes(d, &names)?;
                done(d.bitmap_merge(&a.node, &a.target, &sources))
            })
            .await
        }
        Command::Transaction(a) => {
            off_reactor(d, move |d| done(crate::transaction::run(d, a))).await
        }
        Command::XDebugBlockDirtyBitmapSha256(a) => {
            off_reactor(d, move |d| {
                let _read = d.claims.read(|| Ok(node_keys(d, &a.node)))?;
                let node = d.bitmap_node(&a.node)?;
                Ok(json!({"sha256": bitmap_ops::sha256(&node, &a.name)?}))
            })
            .await
        }
        Command::QueryBlockJobs => {
            let jobs = d.jobs.list();
            let infos = jobs
                .iter()
                .filter(|j| j.is_block_job)
                .map(wire::block_job_info);
            Ok(Value::Array(infos.collect::<Result<_, _>>()?))
        }
        Command::BlockJobSetSpeed(a) => {
            let _claim = claims::claim_off_reactor(d, vec![Key::Job(a.device.clone())]).await?;
            let job = d.jobs.find(&a.device, true)?;
            let speed = u64::try_from(a.speed).map_err(|_| generic("Invalid parameter 'speed'"))?;
            done(d.jobs.set_speed(&job, speed))
        }
        Command::BlockJobCancel(a) => job_verb(d, Verb::Cancel, &a.device, true).await,
        Command::BlockJobPause(a) => job_verb(d, Verb::Pause, &a.device, true).await,
        Command::BlockJobResume(a) => job_verb(d, Verb::Resume, &a.device, true).await,
        Command::BlockJobComplete(a) => job_verb(d, Verb::Complete, &a.device, true).await,
        Command::BlockJobDismiss(a) => job_verb(d, Verb::Dismiss, &a.id, true).await,
        Command::BlockJobFinalize(a) => job_verb(d, Verb::Finalize, &a.id, true).await,
        Command::BlockdevBackup(a) => {
            off_reactor(d, move |d| {
                let _claim = d.claims.take(|| {
                    let mut keys = node_keys(d, &a.common.device);
                    keys.extend(node_keys(d, &a.target));
                    keys.extend(claims::backup_keys(&a.common));
                    Ok::<_, block::Error>(keys)
                })?;
                done(crate::backup::blockdev_backup(d, a))
            })
            .await
        }
        Command::DriveBackup(a) => {
            off_reactor(d, move |d| {
                let _claim = d.claims.take(|| {
                    let mut keys = node_keys(d, &a.common.device);
                    keys.push(Key::File(a.target.clone()));
                    keys.extend(claims::backup_keys(&a.common));
                    Ok::<_, block::Error>(keys)
                })?;
                done(crate::backup::drive_backup(d, a))
            })
            .await
        }
        Command::QueryJobs => {
            let jobs = d.jobs.list();
            Ok(Value::Array(
                jobs.iter().map(wire::job_info).collect::<Result<_, _>>()?,
            ))
        }
        Command::JobPause(a) => job_verb(d, Verb::Pause, &a.id, false).await,
        Command::JobResume(a) => job_verb(d, Verb::Resume, &a.id, false).await,
        Command::JobCancel(a) => job_verb(d, Verb::Cancel, &a.id, false).await,
        Command::JobComplete(a) => job_verb(d, Verb::Complete, &a.id, false).await,
        Command::JobDismiss(a) => job_verb(d, Verb::Dismiss, &a.id, false).await,
        Command::JobFinalize(a) => job_verb(d, Verb::Finalize, &a.id, false).await,
        Command::NbdServerStart(a) => {
            let _claim = claims::claim_off_reactor(d, vec![Key::NbdServer]).await?;
            nbd_server_start(d, a).await
        }
        Command::NbdServerAdd(a) => {
            let name = a.name.clone().unwrap_or_else(|| a.device.clone());
            let keys = vec![Key::Export(name), Key::NbdServer];
            let _claim = claims::claim_off_reactor_on(d, &a.device, keys).await?;
            nbd_server_add(d, a)
        }
        Command::NbdServerRemove(a) => done(d.export_del(&a.name, hard(a.mode))),
        Command::NbdServerStop => {
            let _claim = claims::claim_off_reactor(d, vec![Key::NbdServer]).await?;
            done(d.nbd_server_stop().await)
        }
        Command::BlockExportAdd(o) => {
            let args = export_args(&o).map_err(generic)?;
            let keys = vec![Key::Export(args.id.clone()), Key::NbdServer];
            let _claim = claims::claim_off_reactor_on(d, &args.node_name, keys).await?;
            done(d.export_add(args))
        }
        Command::BlockExportDel(a) => done(d.export_del(&a.id, hard(a.mode))),
        Command::QueryBlockExports => {
            off_reactor(d, |d| {
                let _read = d.claims.read(|| Ok(claims::export_keys(d)))?;
                d.query_exports()
            })
            .await
        }
    }
}

/// A job verb waits for a command that creates a job of that id (a `transaction` between
/// its prepare and its commit or abort), so it finds the job as that command leaves it.
async fn job_verb(d: &Arc<Daemon>, verb: Verb, id: &str, block_verb: bool) -> CmdResult {
    let _claim = claims::claim_off_reactor(d, vec![Key::Job(id.to_string())]).await?;
    let job = d.jobs.find(id, block_verb)?;
    done(match verb {
        Verb::Cancel => d.jobs.cancel(&job),
        Verb::Pause => d.jobs.pause(&job),
        Verb::Resume => d.jobs.resume(&job),
        Verb::Complete => d.jobs.complete(&job),
        Verb::Dismiss => d.jobs.dismiss(&job),
        Verb::Finalize => d.jobs.finalize(&job),
    })
}

async fn nbd_server_start(d: &Arc<Daemon>, a: NbdServerStartArgs) -> CmdResult {
    if a.tls_creds.is_some() {
        return Err(generic("TLS is not supported by blockd"));
    }
    done(
        d.nbd_server_start(
            nbd_addr(&a.addr)?,
            a.max_connections,
            a.handshake_max_seconds,
        )
        .await,
    )
}

fn nbd_server_add(d: &Arc<Daemon>, a: NbdServerAddArgs) -> CmdResult {
    d.lookup_node(&a.device)?;
    let name = a.name.unwrap_or_else(|| a.device.clone());
    done(d.export_add(ExportArgs {
        id: name.clone(),
        node_name: a.device,
        name: Some(name),
        description: a.description,
        writable: a.writable.unwrap_or(false),
        bitmaps: a.bitmap.into_iter().map(|b| (None, b)).collect(),
        allocation_depth: false,
    }))
}

async fn human_monitor_command(d: &Arc<Daemon>, a: HumanMonitorCommandArgs) -> CmdResult {
    let words = crate::hmp::split_words(&a.command_line).map_err(generic)?;
    match words.first().map(String::as_str) {
        Some("qemu-io") => {}
        Some(other) => return Ok(json!(format!("unknown command: '{other}'\r\n"))),
        None => return Ok(json!("")),
    }
    let rest: Vec<&String> = words
        .iter()
        .skip(1)
        .filter(|w| w.as_str() != "-d")
        .collect();
    let (Some(node), Some(cmd)) = (rest.first(), rest.get(1)) else {
        return Err(generic("Parameter 'command' is missing"));
    };
    let node = match d.lookup_node(node) {
        Ok(n) => n,
        Err(e) => return Ok(json!(format!("Error: {e}\r\n"))),
    };
    let cmd = cmd.to_string();
    let out = tokio::task::spawn_blocking(move || crate::hmp::qemu_io(&node, &cmd))
        .await
        .map_err(|e| generic(format!("qemu-io failed: {e}")))?;
    Ok(json!(out.replace('\n', "\r\n")))
}

fn blockdev_create(d: &Arc<Daemon>, a: BlockdevCreateArgs) -> CmdResult {
    let spec = create_spec(d, &a.options).map_err(generic)?;
    let spec_job = JobSpec {
        id: a.job_id,
        job_type: "create",
        is_block_job: false,
        auto_finalize: true,
        auto_dismiss: false,
        speed: 0,
        drain_at_start: false,
    };
    let job = d.jobs.create(spec_job, CreateJob::new(spec))?;
    d.jobs.start(&job);
    Ok(json!({}))
}

/// What an internal snapshot command claims: its node.
fn node_keys(d: &Daemon, name: &str) -> Vec<Key> {
    d.lookup_node(name)
        .ok()
        .map(Key::Node)
        .into_iter()
        .collect()
}

/// Claim the nodes `names` resolve to (see [`crate::claims`]); a name that resolves to
/// nothing is left to the command to refuse with its own text. Blocking.
fn claim_nodes(d: &Daemon, names: &[&str]) -> Result<Claim, block::Error> {
    d.claims.take(|| {
        Ok(names
            .iter()
            .filter_map(|n| d.lookup_node(n).ok())
            .map(Key::Node)
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::COMMANDS;
    use qmp::Dispatcher;

    #[test]
    fn every_schema_command_is_dispatched_and_no_other() {
        let mut schema: Vec<&str> = qapi::Schema::get().commands();
        let mut ours: Vec<&str> = COMMANDS.to_vec();
        schema.sort_unstable();
        ours.sort_unstable();
        assert_eq!(schema, ours);
    }

    /// The exhaustive `match` in `run` routes every typed command; this checks that each
    /// listed name is accepted by the dispatcher and that its arguments reach the typed form
    /// (a schema error such as a missing parameter is fine; "not found" or a typed-form
    /// failure is not).
    #[tokio::test]
    async fn every_listed_command_reaches_a_handler() {
        let daemon = crate::daemon::Daemon::new(qmp::EventBus::new());
        let dispatcher = super::QmpDispatcher::new(daemon);
        for name in COMMANDS.iter().filter(|n| **n != "quit") {
            assert!(dispatcher.has_command(name), "{name} is not offered");
            let result = dispatcher.dispatch(name, serde_json::Map::new()).await;
            if let Err(e) = result {
                assert_ne!(e.class, "CommandNotFound", "{name} has no handler");
                assert!(!e.desc.contains("internal error"), "{name}: {}", e.desc);
            }
        }
    }
}
