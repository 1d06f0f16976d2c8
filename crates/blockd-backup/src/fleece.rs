//! The QMP side of a backup: leftovers cleanup, the one-instant transaction, fleecing
//! (a copy-before-write filter from a `sync: none` backup job + `snapshot-access`), NBD
//! exports with the frozen bitmap, push jobs, and teardown.
//!
//! Every object the tool creates on the daemon is named with the prefix `bb-TAG-`, where TAG
//! identifies the repository and machine (so two repositories backing up one disk never touch
//! each other's objects), and leftovers of an interrupted run are recognised and removed
//! before the next one: `bb-TAG-<id>` tracking bitmap, `bb-TAG-<id>-x` frozen copy,
//! `bb-TAG-jN` job, `-fN` filter, `-sN` scratch / `-tN` push target node, `-aN`
//! snapshot-access, `-eN` export.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Kind, Result};
use crate::progress::Progress;
use crate::qmp::{qmp_desc, Qmp};

/// Prefix of everything one repository's runs create on a daemon.
pub fn prefix(tag: &str) -> String {
    format!("bb-{tag}-")
}

/// How long teardown waits for a job or export to go away.
const WAIT: Duration = Duration::from_secs(30);

/// Longest wait for an event before the daemon is asked again (events only wake a wait up;
/// the query after them decides, so a missed or stale event costs at most this).
const EVENT_WAIT: Duration = Duration::from_millis(200);

/// Name of a node in a `query-named-block-nodes` entry.
fn node_name(n: &Value) -> &str {
    n["node-name"].as_str().unwrap_or("")
}

/// Names of the bitmaps on `node`.
pub fn bitmaps_of(nodes: &[Value], node: &str) -> Vec<Value> {
    nodes
        .iter()
        .find(|n| node_name(n) == node)
        .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
        .unwrap_or_default()
}

/// Whether `ev`/`data` is a `JOB_STATUS_CHANGE` of job `id` to a status in `to`.
fn job_event(ev: &str, data: &Value, id: &str, to: &[&str]) -> bool {
    ev == "JOB_STATUS_CHANGE"
        && data["id"] == id
        && data["status"].as_str().is_some_and(|s| to.contains(&s))
}

/// Wait until `query-jobs` no longer lists `id` (dismissing it if it concluded), waking up on
/// the job's status events.
pub fn wait_job_gone(q: &mut Qmp, id: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let jobs = q.execute("query-jobs", json!({}))?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == id).cloned());
        match job {
            None => return Ok(()),
            Some(j) if j["status"] == "concluded" => {
                let _ = q.execute("job-dismiss", json!({"id": id}));
                continue;
            }
            Some(_) => {}
        }
        if Instant::now() > deadline {
            return Err(Error::new(Kind::Daemon, format!("job {id} did not finish")));
        }
        let ev = q.wait_event(EVENT_WAIT, |ev, d| {
            job_event(ev, d, id, &["concluded", "null"])
        })?;
        // "null" is the job's last word: it is gone, no query needed to confirm.
        if ev.is_some_and(|e| e["data"]["status"] == "null") {
            return Ok(());
        }
    }
}

/// Remove export `id` and wait until it is gone (`BLOCK_EXPORT_DELETED`, confirmed by
/// `query-block-exports` unless the event came with the reply).
pub fn del_export(q: &mut Qmp, id: &str) -> Result<()> {
    let deleted = |ev: &str, d: &Value| ev == "BLOCK_EXPORT_DELETED" && d["id"] == id;
    q.drop_events(deleted);
    if let Err(e) = q.execute("block-export-del", json!({"id": id, "mode": "hard"})) {
        if qmp_desc(&e).is_some_and(|d| d.contains("not found")) {
            return Ok(());
        }
        return Err(e);
    }
    if q.wait_event(Duration::ZERO, deleted)?.is_some() {
        return Ok(());
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let ex = q.execute("query-block-exports", json!({}))?;
        if !ex
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["id"] == id))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                Kind::Daemon,
                format!("export {id} did not go away"),
            ));
        }
        if q.wait_event(EVENT_WAIT, deleted)?.is_some() {
            return Ok(());
        }
    }
}

/// Cancel job `id` (known to exist) and wait until it is gone.
pub fn cancel_job(q: &mut Qmp, id: &str) -> Result<()> {
    q.drop_events(|ev, d| ev == "JOB_STATUS_CHANGE" && d["id"] == id);
    let _ = q.execute("job-cancel", json!({"id": id}));
    wait_job_gone(q, id)
}

/// What a run starts from: the daemon's nodes (`query-named-block-nodes`), exports and jobs.
pub struct DaemonState {
    /// `query-named-block-nodes` (flat).
    pub nodes: Vec<Value>,
    /// `query-block-exports`.
    pub exports: Vec<Value>,
    /// `query-jobs`.
    pub jobs: Vec<Value>,
}

/// Ask for the [`DaemonState`] in one round trip (the three queries pipelined).
pub fn state(q: &mut Qmp) -> Result<DaemonState> {
    let mut r = q
        .execute_many(&[
            ("query-named-block-nodes", json!({"flat": true})),
            ("query-block-exports", json!({})),
            ("query-jobs", json!({})),
        ])?
        .into_iter();
    let mut next = || -> Result<Vec<Value>> {
        let v = r
            .next()
            .unwrap_or_else(|| Err(Error::new(Kind::Daemon, "no QMP reply")))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    };
    Ok(DaemonState {
        nodes: next()?,
        exports: next()?,
        jobs: next()?,
    })
}

/// Remove every object of an earlier interrupted run: exports, jobs, nodes, and the
/// bitmaps on `disks` that start with the prefix and are not in `keep[node]`. `st` is the
/// daemon as of now; its nodes are brought up to date if something is removed. Returns a
/// description of each thing removed.
pub fn cleanup(
    q: &mut Qmp,
    tag: &str,
    disks: &[String],
    keep: &HashMap<String, HashSet<String>>,
    st: &mut DaemonState,
) -> Result<Vec<String>> {
    let pre = prefix(tag);
    let mut done = Vec::new();
    let nodes = &mut st.nodes;
    for e in std::mem::take(&mut st.exports) {
        let id = e["id"].as_str().unwrap_or("").to_string();
        if id.starts_with(&pre) {
            del_export(q, &id)?;
            done.push(format!("export {id}"));
        }
    }
    for j in std::mem::take(&mut st.jobs) {
        let id = j["id"].as_str().unwrap_or("").to_string();
        if id.starts_with(&pre) {
            cancel_job(q, &id)?;
            done.push(format!("job {id}"));
        }
    }
    if !done.is_empty() {
        *nodes = q.nodes()?;
    }
    // Users before what they use: snapshot-access, job filter, scratch / push target.
    for order in ["a", "f", "s", "t"] {
        let p = format!("{pre}{order}");
        let names: Vec<String> = nodes
            .iter()
            .map(|n| node_name(n).to_string())
            .filter(|n| n.starts_with(&p))
            .collect();
        if names.is_empty() {
            continue;
        }
        for name in names {
            q.execute("blockdev-del", json!({"node-name": name}))?;
            done.push(format!("node {name}"));
        }
        *nodes = q.nodes()?;
    }
    let mut removed = false;
    for d in disks {
        let empty = HashSet::new();
        let k = keep.get(d).unwrap_or(&empty);
        for b in bitmaps_of(nodes, d) {
            let name = b["name"].as_str().unwrap_or("");
            if name.starts_with(&pre) && !k.contains(name) {
                q.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": d, "name": name}),
                )?;
                done.push(format!("bitmap {d}/{name}"));
                removed = true;
            }
        }
    }
    if removed {
        *nodes = q.nodes()?;
    }
    Ok(done)
}

/// Run `actions` at one instant: as a `transaction` when `atomic`, else one by one (used
/// when nothing writes to the disks, e.g. a stopped disk), undoing bitmap additions if one fails.
pub fn run_actions(q: &mut Qmp, actions: &[Value], atomic: bool) -> Result<()> {
    if atomic {
        return q
            .execute("transaction", json!({"actions": actions}))
            .map(|_| ());
    }
    let mut added: Vec<Value> = Vec::new();
    for a in actions {
        let ty = a["type"].as_str().unwrap_or("");
        if let Err(e) = q.execute(ty, a["data"].clone()) {
            for b in added.iter().rev() {
                let _ = q.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": b["node"], "name": b["name"]}),
                );
            }
            return Err(e);
        }
        if ty == "block-dirty-bitmap-add" {
            added.push(a["data"].clone());
        }
    }
    Ok(())
}

/// A transaction action.
pub fn action(ty: &str, data: Value) -> Value {
    json!({"type": ty, "data": data})
}

/// The NBD server the tool reads from: one it started (stopped at the end) or the user's.
pub struct NbdServer {
    /// Socket path.
    pub path: PathBuf,
    /// We started it.
    owned: bool,
}

impl NbdServer {
    /// Use `given` if set, else start a server on `own`. A server already running on `own`
    /// (a killed run's: `own` is in the run's work folder) is recognised by a probe export of
    /// `node`, named after `tag`, reachable through `own`; it is then taken as this run's.
    pub fn start(
        q: &mut Qmp,
        given: Option<&Path>,
        own: &Path,
        tag: &str,
        node: &str,
    ) -> Result<NbdServer> {
        if let Some(p) = given {
            return Ok(NbdServer {
                path: p.to_path_buf(),
                owned: false,
            });
        }
        let addr = json!({"type": "unix", "data": {"path": own.to_string_lossy()}});
        let running = |e: &Error| qmp_desc(e).is_some_and(|d| d.contains("already running"));
        let ours = NbdServer {
            path: own.to_path_buf(),
            owned: true,
        };
        match q.execute("nbd-server-start", json!({"addr": addr})) {
            Ok(_) => return Ok(ours),
            Err(e) if !running(&e) => {
                // A stale socket file of a dead daemon's server stands in the way.
                if own.exists() {
                    let _ = std::fs::remove_file(own);
                    q.execute("nbd-server-start", json!({"addr": addr}))?;
                    return Ok(ours);
                }
                return Err(e);
            }
            Err(_) => {}
        }
        if own.exists() && serves_here(q, own, tag, node) {
            return Ok(ours);
        }
        Err(Error::new(
            Kind::Usage,
            "the daemon already runs an NBD server; pass its socket with --nbd-socket",
        ))
    }

    /// Stop it if we started it.
    pub fn stop(&self, q: &mut Qmp) {
        if self.owned {
            let _ = q.execute("nbd-server-stop", json!({}));
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether the daemon's running NBD server listens on `sock`: a probe export of `node` must be
/// reachable there.
fn serves_here(q: &mut Qmp, sock: &Path, tag: &str, node: &str) -> bool {
    let id = format!("{}probe", prefix(tag));
    let ex = json!({"type": "nbd", "id": id, "node-name": node, "name": id});
    if q.execute("block-export-add", ex).is_err() {
        return false;
    }
    let here = crate::nbd::NbdClient::connect_timeout(sock, &id, &[], Duration::from_secs(5))
        .map(|c| c.disconnect())
        .is_ok();
    let _ = del_export(q, &id);
    here
}

/// Wait for push jobs `ids` (started with `auto-dismiss: false`) to conclude, reporting
/// progress; error if any failed (the caller dismisses them). Wakes up on the jobs' `JOB_STATUS_CHANGE`
/// to `concluded` (or every [`EVENT_WAIT`] for progress) and reads their state from
/// `query-jobs`, so a missed event costs no more than one progress interval.
pub fn wait_push_jobs(q: &mut Qmp, ids: &[String], progress: &Progress) -> Result<()> {
    let mut last = 0u64;
    loop {
        let jobs = q.execute("query-jobs", json!({}))?;
        let mine: Vec<Value> = jobs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|j| j["id"].as_str().is_some_and(|i| ids.iter().any(|x| x == i)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let cur: u64 = mine
            .iter()
            .filter_map(|j| j["current-progress"].as_u64())
            .sum();
        if cur > last {
            progress.add(cur - last);
            last = cur;
        }
        if let Some(j) = mine
            .iter()
            .find(|j| j["status"] == "concluded" && j.get("error").is_some())
        {
            let id = j["id"].as_str().unwrap_or("");
            let err = j["error"].as_str().unwrap_or("");
            return Err(Error::new(
                Kind::Daemon,
                format!("push job {id} failed: {err}"),
            ));
        }
        if mine.len() < ids.len() {
            return Err(Error::new(
                Kind::Daemon,
                "a push job disappeared before it concluded",
            ));
        }
        if mine.iter().all(|j| j["status"] == "concluded") {
            return Ok(());
        }
        let waiting: Vec<&str> = mine
            .iter()
            .filter(|j| j["status"] != "concluded")
            .filter_map(|j| j["id"].as_str())
            .collect();
        q.wait_event(EVENT_WAIT, |ev, d| {
            waiting
                .iter()
                .any(|id| job_event(ev, d, id, &["concluded"]))
        })?;
    }
}

/// Whether `qdev` (a `query-block` entry's `qdev`: an id, or a QOM path such as
/// `/machine/peripheral/vda/virtio-backend`) names the device `id`.
fn qdev_is(qdev: &str, id: &str) -> bool {
    if qdev == id {
        return true;
    }
    qdev.strip_prefix("/machine/peripheral/")
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|first| first == id)
}

/// Pair each disk name with the node to address: a node name stands for itself; otherwise
/// the name of a device in `query-block` (QEMU: a `-drive` id, or a `-device` id, whose
/// root node may have a generated name) gives its inserted root node.
pub fn resolve_disks(
    q: &mut Qmp,
    nodes: &[Value],
    disks: &[String],
) -> Result<Vec<(String, String)>> {
    let mut block: Option<Vec<Value>> = None;
    let mut out = Vec::with_capacity(disks.len());
    for d in disks {
        if nodes.iter().any(|n| node_name(n) == d) {
            out.push((d.clone(), d.clone()));
            continue;
        }
        let devices = match &block {
            Some(b) => b,
            None => block.insert(
                q.execute("query-block", json!({}))?
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            ),
        };
        let node = devices
            .iter()
            .find(|b| {
                b["device"] == d.as_str() || b["qdev"].as_str().is_some_and(|x| qdev_is(x, d))
            })
            .and_then(|b| b["inserted"]["node-name"].as_str())
            .ok_or_else(|| {
                Error::new(
                    Kind::Usage,
                    format!("no node or device '{d}' with a medium on the daemon"),
                )
            })?;
        out.push((d.clone(), node.to_string()));
    }
    let mut seen = HashSet::new();
    if let Some((d, n)) = out.iter().find(|(_, n)| !seen.insert(n.clone())) {
        return Err(Error::new(
            Kind::Usage,
            format!("disk '{d}' is node '{n}', which is already named by another --disk"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::qdev_is;

    #[test]
    fn qdev_ids_and_paths() {
        assert!(qdev_is("vda", "vda"));
        assert!(qdev_is("/machine/peripheral/vda/virtio-backend", "vda"));
        assert!(qdev_is("/machine/peripheral/vda", "vda"));
        assert!(!qdev_is("/machine/peripheral/vdab/virtio-backend", "vda"));
        assert!(!qdev_is(
            "/machine/peripheral-anon/device[0]/virtio-backend",
            "vda"
        ));
        assert!(!qdev_is("/machine/unattached/vda", "vda"));
    }
}
