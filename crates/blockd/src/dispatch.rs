//! The QMP dispatcher: check arguments against the schema, deserialise them into a typed
//! command, route it with one `match`, and map core errors to QMP error classes in one place.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use block::create::{CreateJob, CreateSpec};
use block::job::{JobInfo, JobSpec};
use block::{bitmap_ops, ErrorKind};

use crate::daemon::Daemon;
use crate::exports::{ExportArgs, NbdAddr};

/// The one mapping from a core error to a QMP error.
fn qmp_error(e: block::Error) -> qmp::QmpError {
    let class = match e.kind() {
        ErrorKind::Generic => "GenericError",
        ErrorKind::DeviceNotFound => "DeviceNotFound",
        ErrorKind::DeviceNotActive => "DeviceNotActive",
    };
    qmp::QmpError::new(class, e.message())
}

fn generic(msg: impl Into<String>) -> block::Error {
    block::Error::generic(msg)
}

type CmdResult = Result<Value, block::Error>;

// ---- typed arguments (already checked against the schema; serde only maps them)

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NodeName {
    node_name: String,
}

#[derive(Deserialize)]
struct Flat {
    #[serde(default)]
    flat: bool,
}

#[derive(Deserialize)]
struct BitmapRef {
    node: String,
    name: String,
}

#[derive(Deserialize)]
struct BitmapAdd {
    node: String,
    name: String,
    granularity: Option<u64>,
    #[serde(default)]
    persistent: bool,
    #[serde(default)]
    disabled: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BitmapOrStr {
    Name(String),
    Ref(BitmapRef),
}

#[derive(Deserialize)]
struct BitmapMerge {
    node: String,
    target: String,
    bitmaps: Vec<BitmapOrStr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Hmp {
    command_line: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct BlockdevCreate {
    job_id: String,
    options: Value,
}

#[derive(Deserialize)]
struct Reopen {
    options: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NbdStart {
    addr: Value,
    max_connections: Option<u32>,
    tls_creds: Option<String>,
}

#[derive(Deserialize)]
struct NbdAdd {
    device: String,
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    writable: bool,
    bitmap: Option<String>,
}

#[derive(Deserialize)]
struct NameMode {
    name: String,
    mode: Option<String>,
}

#[derive(Deserialize)]
struct IdMode {
    id: String,
    mode: Option<String>,
}

#[derive(Deserialize)]
struct JobId {
    id: String,
}

#[derive(Deserialize)]
struct Device {
    device: String,
}

#[derive(Deserialize)]
struct SetSpeed {
    device: String,
    speed: u64,
}

fn typed<T: for<'de> Deserialize<'de>>(args: Map<String, Value>) -> Result<T, block::Error> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| generic(format!("Invalid arguments: {e}")))
}

/// Convert checked `BlockExportOptions` into export arguments.
pub fn export_args(v: &Value) -> Result<ExportArgs, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Opts {
        #[serde(rename = "type")]
        kind: String,
        id: String,
        node_name: String,
        #[serde(default)]
        writable: bool,
        name: Option<String>,
        description: Option<String>,
        #[serde(default)]
        bitmaps: Vec<BitmapOrStr>,
        #[serde(default)]
        allocation_depth: bool,
    }
    let o: Opts = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    if o.kind != "nbd" {
        return Err(format!(
            "Export type '{}' is not supported by blockd",
            o.kind
        ));
    }
    Ok(ExportArgs {
        id: o.id,
        node_name: o.node_name,
        name: o.name,
        description: o.description,
        writable: o.writable,
        bitmaps: o
            .bitmaps
            .into_iter()
            .map(|b| match b {
                BitmapOrStr::Name(n) => (None, n),
                BitmapOrStr::Ref(r) => (Some(r.node), r.name),
            })
            .collect(),
        allocation_depth: o.allocation_depth,
    })
}

fn nbd_addr(v: &Value) -> Result<NbdAddr, block::Error> {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    let s = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_string);
    match kind {
        "unix" => Ok(NbdAddr::Unix(s("path").unwrap_or_default().into())),
        "inet" => Ok(NbdAddr::Inet(
            s("host").unwrap_or_default(),
            s("port").unwrap_or_default(),
        )),
        other => Err(generic(format!(
            "NBD server address type '{other}' is not supported by blockd"
        ))),
    }
}

fn job_info(j: &JobInfo) -> Value {
    let mut v = json!({
        "id": j.id, "type": j.job_type, "status": j.status.as_str(),
        "current-progress": j.current, "total-progress": j.total,
    });
    if let Some(e) = &j.error {
        v["error"] = json!(e);
    }
    v
}

fn block_job_info(j: &JobInfo) -> Value {
    let mut v = json!({
        "auto-finalize": j.auto_finalize, "io-status": j.io_status, "device": j.id,
        "auto-dismiss": j.auto_dismiss, "busy": j.status == block::job::JobStatus::Running,
        "len": j.total, "offset": j.current, "status": j.status.as_str(),
        "paused": j.user_paused, "speed": j.speed, "ready": false, "type": j.job_type,
    });
    if let Some(e) = &j.error {
        v["error"] = json!(e);
    }
    v
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

    fn dispatch(&self, name: &str, args: Map<String, Value>) -> qmp::DispatchFuture {
        let daemon = self.daemon.clone();
        let server = self.server.get().cloned();
        let name = name.to_string();
        Box::pin(async move {
            let args = qapi::Schema::get()
                .normalize_command(&name, &args)
                .map_err(|e| qmp::QmpError::new(e.class, e.desc))?;
            run(&daemon, server, &name, args).await.map_err(qmp_error)
        }) as Pin<Box<dyn Future<Output = _> + Send>>
    }
}

/// Every command blockd implements; a test checks this equals the schema's command list.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-qmp-schema",
    "quit",
    "query-block",
    "query-named-block-nodes",
    "blockdev-add",
    "blockdev-del",
    "blockdev-create",
    "blockdev-reopen",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
    "human-monitor-command",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "nbd-server-remove",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "query-jobs",
    "job-cancel",
    "job-pause",
    "job-resume",
    "job-complete",
    "job-dismiss",
    "job-finalize",
    "query-block-jobs",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-dismiss",
    "block-job-finalize",
    "block-job-set-speed",
];

async fn run(
    d: &Arc<Daemon>,
    server: Option<qmp::Server>,
    name: &str,
    args: Map<String, Value>,
) -> CmdResult {
    let ok = || Ok(json!({}));
    match name {
        // Negotiation is the protocol's business (the qmp crate answers it before us).
        "qmp_capabilities" => ok(),
        "query-version" => Ok(json!({
            "qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": format!("blockd {}", env!("CARGO_PKG_VERSION")),
        })),
        "query-commands" => Ok(Value::Array(
            qapi::Schema::get()
                .commands()
                .into_iter()
                .map(|c| json!({"name": c}))
                .collect(),
        )),
        "query-qmp-schema" => Ok(qapi::Schema::get().introspect()),
        "quit" => {
            if let Some(s) = server {
                s.begin_shutdown();
            }
            d.shutdown.cancel();
            ok()
        }
        "query-block" => Ok(d.query_block()),
        "query-named-block-nodes" => Ok(d.query_named_block_nodes(typed::<Flat>(args)?.flat)),
        "blockdev-add" => {
            let opts = crate::convert::node_options(&Value::Object(args)).map_err(generic)?;
            d.blockdev_add(&opts).map(|_| json!({}))
        }
        "blockdev-del" => d
            .blockdev_del(&typed::<NodeName>(args)?.node_name)
            .map(|_| json!({})),
        "blockdev-create" => blockdev_create(d, typed(args)?),
        "blockdev-reopen" => blockdev_reopen(d, typed(args)?),
        "block-dirty-bitmap-add" => {
            let a: BitmapAdd = typed(args)?;
            d.bitmap_add(&a.node, &a.name, a.granularity, a.persistent, a.disabled)
                .map(|_| json!({}))
        }
        "block-dirty-bitmap-remove" => {
            let a: BitmapRef = typed(args)?;
            bitmap_ops::remove(&d.bitmap_node(&a.node)?, &a.name).map(|_| json!({}))
        }
        "block-dirty-bitmap-clear" => {
            let a: BitmapRef = typed(args)?;
            bitmap_ops::clear(&d.bitmap_node(&a.node)?, &a.name).map(|_| json!({}))
        }
        "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => {
            let a: BitmapRef = typed(args)?;
            let on = name == "block-dirty-bitmap-enable";
            bitmap_ops::set_recording(&d.bitmap_node(&a.node)?, &a.name, on).map(|_| json!({}))
        }
        "block-dirty-bitmap-merge" => {
            let a: BitmapMerge = typed(args)?;
            let sources: Vec<(Option<String>, String)> = a
                .bitmaps
                .into_iter()
                .map(|b| match b {
                    BitmapOrStr::Name(n) => (None, n),
                    BitmapOrStr::Ref(r) => (Some(r.node), r.name),
                })
                .collect();
            d.bitmap_merge(&a.node, &a.target, &sources)
                .map(|_| json!({}))
        }
        "x-debug-block-dirty-bitmap-sha256" => {
            let a: BitmapRef = typed(args)?;
            Ok(json!({"sha256": bitmap_ops::sha256(&d.bitmap_node(&a.node)?, &a.name)?}))
        }
        "human-monitor-command" => human_monitor_command(d, typed(args)?).await,
        "nbd-server-start" => {
            let a: NbdStart = typed(args)?;
            if a.tls_creds.is_some() {
                return Err(generic("TLS is not supported by blockd"));
            }
            d.nbd_server_start(nbd_addr(&a.addr)?, a.max_connections)
                .await
                .map(|_| json!({}))
        }
        "nbd-server-stop" => d.nbd_server_stop().await.map(|_| json!({})),
        "nbd-server-add" => {
            let a: NbdAdd = typed(args)?;
            d.lookup_node(&a.device)?;
            let name = a.name.unwrap_or_else(|| a.device.clone());
            d.export_add(ExportArgs {
                id: name.clone(),
                node_name: a.device,
                name: Some(name),
                description: a.description,
                writable: a.writable,
                bitmaps: a.bitmap.into_iter().map(|b| (None, b)).collect(),
                allocation_depth: false,
            })
            .map(|_| json!({}))
        }
        "nbd-server-remove" => {
            let a: NameMode = typed(args)?;
            d.export_del(&a.name, a.mode.as_deref() == Some("hard"))
                .map(|_| json!({}))
        }
        "block-export-add" => {
            let a = export_args(&Value::Object(args)).map_err(generic)?;
            d.export_add(a).map(|_| json!({}))
        }
        "block-export-del" => {
            let a: IdMode = typed(args)?;
            d.export_del(&a.id, a.mode.as_deref() == Some("hard"))
                .map(|_| json!({}))
        }
        "query-block-exports" => Ok(d.query_exports()),
        "query-jobs" => Ok(Value::Array(d.jobs.list().iter().map(job_info).collect())),
        "query-block-jobs" => Ok(Value::Array(
            d.jobs
                .list()
                .iter()
                .filter(|j| j.is_block_job)
                .map(block_job_info)
                .collect(),
        )),
        "job-cancel" | "job-pause" | "job-resume" | "job-complete" | "job-dismiss"
        | "job-finalize" => {
            let id = typed::<JobId>(args)?.id;
            job_verb(d, &name[4..], &id, false)
        }
        "block-job-finalize" | "block-job-dismiss" => {
            let id = typed::<JobId>(args)?.id;
            job_verb(d, &name[10..], &id, true)
        }
        "block-job-cancel" | "block-job-pause" | "block-job-resume" | "block-job-complete" => {
            let id = typed::<Device>(args)?.device;
            job_verb(d, &name[10..], &id, true)
        }
        "block-job-set-speed" => {
            let a: SetSpeed = typed(args)?;
            let job = d.jobs.find(&a.device, true)?;
            d.jobs.set_speed(&job, a.speed).map(|_| json!({}))
        }
        other => Err(block::Error::generic(format!(
            "The command {other} has not been found"
        ))),
    }
}

fn job_verb(d: &Arc<Daemon>, verb: &str, id: &str, block_verb: bool) -> CmdResult {
    let job = d.jobs.find(id, block_verb)?;
    let r = match verb {
        "cancel" => d.jobs.cancel(&job),
        "pause" => d.jobs.pause(&job),
        "resume" => d.jobs.resume(&job),
        "complete" => d.jobs.complete(&job),
        "dismiss" => d.jobs.dismiss(&job),
        "finalize" => d.jobs.finalize(&job),
        _ => Err(generic(format!("unknown job verb {verb}"))),
    };
    r.map(|_| json!({}))
}

async fn human_monitor_command(d: &Arc<Daemon>, a: Hmp) -> CmdResult {
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

fn blockdev_create(d: &Arc<Daemon>, a: BlockdevCreate) -> CmdResult {
    let o = &a.options;
    let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
    let size = o.get("size").and_then(Value::as_u64).unwrap_or(0);
    let spec = match s("driver").as_deref() {
        Some("file") => CreateSpec::File {
            filename: s("filename").unwrap_or_default(),
            size,
        },
        Some("qcow2") => {
            let file = match o.get("file") {
                Some(Value::String(n)) => d.lookup_node(n).map_err(|e| e.to_string()),
                _ => Err("blockdev-create: 'file' must name an existing node".to_string()),
            };
            let mut opts = qcow2::CreateOptions {
                size,
                ..qcow2::CreateOptions::default()
            };
            if let Some(c) = o.get("cluster-size").and_then(Value::as_u64) {
                opts.cluster_size = c;
            }
            if s("version").as_deref() == Some("v2") {
                opts.version = 2;
            }
            if let Some(r) = o.get("refcount-bits").and_then(Value::as_u64) {
                opts.refcount_bits = r as u32;
            }
            opts.lazy_refcounts = o
                .get("lazy-refcounts")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            opts.backing_file = s("backing-file");
            opts.backing_fmt = s("backing-fmt");
            CreateSpec::Qcow2 { file, opts }
        }
        Some(other) => {
            return Err(generic(format!(
                "Driver '{other}' does not support blockdev-create"
            )))
        }
        None => return Err(generic("Parameter 'driver' is missing")),
    };
    let spec_job = JobSpec {
        id: a.job_id,
        job_type: "create",
        is_block_job: false,
        auto_finalize: true,
        auto_dismiss: false,
        speed: 0,
    };
    let job = d.jobs.create(spec_job, CreateJob::new(spec))?;
    d.jobs.start(&job);
    Ok(json!({}))
}

fn blockdev_reopen(d: &Arc<Daemon>, a: Reopen) -> CmdResult {
    // Check everything first, then apply: the command is all or nothing.
    let mut plan = Vec::new();
    for o in &a.options {
        let Some(name) = o.get("node-name").and_then(Value::as_str) else {
            return Err(generic("node-name not specified"));
        };
        let node = d
            .graph()
            .get(name)
            .ok_or_else(|| generic(format!("Failed to find node with node-name='{name}'")))?;
        if o.get("driver").and_then(Value::as_str) != Some(node.driver_name()) {
            return Err(generic("Cannot change the option 'driver'"));
        }
        let ro = o.get("read-only").and_then(Value::as_bool).unwrap_or(false);
        if ro && node.writers() > 0 {
            return Err(generic(format!(
                "Read-only block node '{name}' cannot support read-write users"
            )));
        }
        plan.push((node, ro));
    }
    for (node, ro) in plan {
        node.set_read_only(ro)
            .map_err(|e| block::Error::io("Could not reopen", &e))?;
        if let Some(file) = node.child("file") {
            if !ro || file.read_only() != ro {
                file.set_read_only(ro)
                    .map_err(|e| block::Error::io("Could not reopen", &e))?;
            }
        }
    }
    d.graph().refresh_locks()?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::COMMANDS;

    #[test]
    fn every_schema_command_is_dispatched_and_no_other() {
        let mut schema: Vec<&str> = qapi::Schema::get().commands();
        let mut ours: Vec<&str> = COMMANDS.to_vec();
        schema.sort_unstable();
        ours.sort_unstable();
        assert_eq!(schema, ours);
    }

    #[tokio::test]
    async fn every_listed_command_reaches_a_handler() {
        let daemon = crate::daemon::Daemon::new(qmp::EventBus::new());
        for name in COMMANDS.iter().filter(|n| **n != "quit") {
            let result = super::run(&daemon, None, name, serde_json::Map::new()).await;
            if let Err(e) = result {
                assert!(
                    !e.message().starts_with("The command "),
                    "{name} has no handler"
                );
            }
        }
    }
}
