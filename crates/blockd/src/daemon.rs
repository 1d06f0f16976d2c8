//! The daemon's state and the handlers that translate commands into core calls.
//!
//! Locks: every field below is a std `Mutex` held for short, non-async sections only. QMP
//! commands are serialised by the qmp crate, so handlers never race each other, except the
//! commands `dispatch::runs_unserialised` lets run beside others (`blockdev-add` and `-del`
//! reserve and hold what they use in the graph; snapshots, reopens, transactions, backups and
//! export adds claim their nodes, ids and files, queries take read claims, see
//! [`crate::claims`]); I/O paths (NBD, jobs) clone node handles out and never take these
//! locks.

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use block::driver::NodeEvent;
use block::edge::Root;
use block::graph::{Graph, NodeOptions};
use block::job::{JobEvent, JobManager};
use block::perm::Perm;
use block::{bitmap_ops, Error, NodeRef, Result};

use crate::exports::ExportRec;
use crate::info;

/// A named device over a node (the short form's `drive0`), listed by `query-block`.
pub struct Device {
    /// Device name.
    pub name: String,
    /// Its edge into the graph (follows re-wiring).
    pub root: Arc<Root>,
}

/// Everything the daemon holds.
pub struct Daemon {
    /// The graph. Closed at shutdown.
    pub graph: Arc<Mutex<Graph>>,
    /// Jobs; cancelled at shutdown.
    pub jobs: Arc<JobManager>,
    /// Events to every monitor.
    pub events: qmp::EventBus,
    /// Named devices (short form); dropped at shutdown.
    pub devices: Mutex<Vec<Device>>,
    /// The NBD server, when started; stopped at shutdown.
    nbd: Mutex<Option<nbd::NbdServer>>,
    /// NBD exports; removed at shutdown.
    exports: Mutex<Vec<ExportRec>>,
    /// Cancelled by `quit` or a signal: the main task then shuts everything down.
    pub shutdown: CancellationToken,
    /// What the graph commands running beside others claim (see [`crate::claims`]).
    pub claims: Arc<crate::claims::Claims>,
    /// How many commands that run beside others are in progress (shutdown waits for them).
    pub in_flight: tokio::sync::watch::Sender<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Send a core job event to every monitor as the schema's event.
fn emit_job_event(events: &qmp::EventBus, ev: JobEvent) {
    match crate::wire::job_event(ev) {
        Ok(event) => crate::wire::emit(events, event),
        Err(e) => tracing::error!(error = %e, "job event not sent"),
    }
}

impl Daemon {
    /// A daemon with an empty graph.
    pub fn new(events: qmp::EventBus) -> Arc<Daemon> {
        let ev = events.clone();
        let jobs = JobManager::new(Arc::new(move |e| emit_job_event(&ev, e)));
        let mut graph = Graph::new();
        let ev = events.clone();
        graph.set_event_sink(Arc::new(move |e| match e {
            NodeEvent::ImageCorrupted { node, msg, fatal } => crate::wire::emit(
                &ev,
                qapi::types::Event::BlockImageCorrupted(qapi::types::BlockImageCorrupted {
                    device: String::new(),
                    node_name: Some(node),
                    msg,
                    offset: None,
                    size: None,
                    fatal,
                }),
            ),
        }));
        Arc::new(Daemon {
            graph: Arc::new(Mutex::new(graph)),
            jobs,
            events,
            devices: Mutex::new(Vec::new()),
            nbd: Mutex::new(None),
            exports: Mutex::new(Vec::new()),
            shutdown: CancellationToken::new(),
            claims: Arc::default(),
            in_flight: tokio::sync::watch::channel(0).0,
        })
    }

    /// The graph, locked.
    pub fn graph(&self) -> MutexGuard<'_, Graph> {
        lock(&self.graph)
    }

    /// The NBD server, if running.
    pub fn nbd(&self) -> Option<nbd::NbdServer> {
        lock(&self.nbd).clone()
    }

    /// The NBD server slot, locked.
    pub fn nbd_slot(&self) -> MutexGuard<'_, Option<nbd::NbdServer>> {
        lock(&self.nbd)
    }

    /// The exports, locked.
    pub fn exports(&self) -> MutexGuard<'_, Vec<ExportRec>> {
        lock(&self.exports)
    }

    /// Find a node by node name or device name (QEMU accepts either where it takes a "node").
    pub fn lookup_node(&self, name: &str) -> Result<NodeRef> {
        if let Some(d) = lock(&self.devices).iter().find(|d| d.name == name) {
            return Ok(d.root.node());
        }
        self.graph().lookup(name)
    }

    /// [`Daemon::lookup_node`], held until the result is dropped (see
    /// [`Graph::hold_node`]): for commands that attach to the node after releasing the graph
    /// lock (an export's root, a backup's filter and target). A `blockdev-del` of it waits and
    /// then finds it in use; one that took it out first makes this fail as a lookup would.
    pub fn hold_lookup(&self, name: &str) -> Result<block::graph::NodeHold> {
        let node = self.lookup_node(name)?;
        Graph::hold_node(&self.graph, &node).ok_or_else(|| {
            Error::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    /// Find the node a bitmap command names: QEMU's "Node 'X' not found".
    /// The node is held until the result is dropped: a `blockdev-del` of it waits, and one
    /// that took it out after the lookup makes this fail as if it had never been there.
    pub fn bitmap_node(&self, name: &str) -> Result<block::graph::NodeHold> {
        let not_found = || Error::generic(format!("Node '{name}' not found"));
        let node = self.lookup_node(name).map_err(|_| not_found())?;
        Graph::hold_node(&self.graph, &node).ok_or_else(not_found)
    }

    /// Find and hold the node `block-dirty-bitmap-add` names (see [`Daemon::bitmap_node`]);
    /// a node taken out after the lookup gives its not-found text.
    pub fn bitmap_add_node(&self, node: &str) -> Result<block::graph::NodeHold> {
        let n = self.lookup_node(node)?;
        Graph::hold_node(&self.graph, &n).ok_or_else(|| {
            Error::generic(format!(
                "Cannot find device='{node}' nor node-name='{node}'"
            ))
        })
    }

    /// blockdev-add.
    pub fn blockdev_add(&self, opts: &NodeOptions) -> Result<NodeRef> {
        if let Some(n) = &opts.node_name {
            if lock(&self.devices).iter().any(|d| &d.name == n) {
                return Err(Error::generic(format!(
                    "node-name={n} is conflicting with a device id"
                )));
            }
        }
        // The graph lock is not held while files open (see `Graph::add_staged`).
        Graph::add_staged(&self.graph, opts)
    }

    /// blockdev-del.
    pub fn blockdev_del(&self, name: &str) -> Result<()> {
        let graph = self.graph();
        if let Some(node) = graph.get(name) {
            // QEMU checks for a BlockBackend (an export) before the job's op blocker.
            if graph.root_on(&node).is_some() {
                return Err(Error::generic(format!("Node {name} is in use")));
            }
            // As QEMU words it for a backup job's target and source.
            if node.has_user(block::backup::TARGET_USER) {
                return Err(block::backup::busy_error(name));
            }
            if node.has_user(block::backup::SOURCE_USER) {
                return Err(Error::generic(format!("Block device {name} is in use")));
            }
        }
        drop(graph);
        if lock(&self.devices)
            .iter()
            .any(|d| d.root.node().name() == name)
        {
            return Err(Error::generic(format!("Node {name} is in use")));
        }
        // Stores, flushes and closes without holding the graph lock (see `Graph::del_staged`).
        Graph::del_staged(&self.graph, name)
    }

    /// Attach a named device over a node (short form).
    pub fn add_device(&self, name: &str, node: NodeRef) {
        let root = Root::new(
            format!("device '{name}'"),
            format!("block device '{name}'"),
            node,
            Perm::NONE,
            Perm::ALL,
        );
        // Needs nothing, so it cannot conflict.
        if let Err(e) = self.graph().attach_root(&root) {
            tracing::warn!(error = %e, "attaching device '{name}'");
        }
        lock(&self.devices).push(Device {
            name: name.to_string(),
            root,
        });
    }

    /// query-named-block-nodes with the facts of `known`: the nodes are listed under the graph
    /// lock, facts not read ahead are read without it. Blocking: call it off the reactor.
    pub fn query_named_block_nodes_from(&self, flat: bool, known: &info::Facts) -> Value {
        let nodes: Vec<NodeRef> = self.graph().nodes().to_vec();
        info::named_block_nodes(&nodes, flat, known)
    }

    /// The nodes of the named devices now (what query-block reports, with their children).
    pub fn device_nodes(&self) -> Vec<NodeRef> {
        lock(&self.devices).iter().map(|d| d.root.node()).collect()
    }

    /// query-block with the facts of `known` (no file is stat'ed under the devices' lock
    /// unless a device's node was not read ahead).
    pub fn query_block_from(&self, known: &info::Facts) -> Value {
        let devices: Vec<(String, NodeRef)> = lock(&self.devices)
            .iter()
            .map(|d| (d.name.clone(), d.root.node()))
            .collect();
        let infos: Vec<_> = devices
            .iter()
            .map(|(name, node)| info::block_info(name, node, known))
            .collect();
        info::to_value(&infos)
    }

    /// block-dirty-bitmap-add.
    pub fn bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<()> {
        let n = self.bitmap_add_node(node)?;
        bitmap_ops::add(&n, name, granularity, persistent, disabled)
    }

    /// block-dirty-bitmap-merge: sources are (node or None for `node`, name).
    pub fn bitmap_merge(
        &self,
        node: &str,
        target: &str,
        sources: &[(Option<String>, String)],
    ) -> Result<()> {
        let n = self.bitmap_node(node)?;
        let mut resolved = Vec::with_capacity(sources.len());
        for (sn, name) in sources {
            let src = match sn {
                Some(sn) => self.bitmap_node(sn)?,
                None => self.bitmap_node(node)?,
            };
            resolved.push((src, name.clone()));
        }
        let resolved: Vec<(NodeRef, String)> = resolved
            .iter()
            .map(|(h, name)| ((**h).clone(), name.clone()))
            .collect();
        bitmap_ops::merge(&n, target, &resolved).map(|_| ())
    }

    /// Cancel jobs, remove exports, stop NBD, close every node (parents first).
    pub async fn close_all(&self) {
        // Commands running beside others (a transaction or backup creating jobs, an export
        // add) end first, so that no job starts and no export appears after these steps.
        let _ = self.in_flight.subscribe().wait_for(|n| *n == 0).await;
        self.jobs.cancel_all().await;
        if self.nbd().is_some() {
            let _ = self.nbd_server_stop().await;
        }
        lock(&self.devices).clear();
        // Flushing, storing bitmaps and closing are disk I/O: off the reactor and without the
        // graph lock, so the monitors and whatever else still runs stay responsive meanwhile.
        // From here on new adds and deletes are refused; one still opening files (it does not
        // hold the graph lock) inserts its nodes when done and one still closing finishes:
        // wait for them, so that every node is closed (bitmaps stored) with the rest.
        // The wait is woken by the graph's condvar (`Graph::shutdown_wait`), on a blocking
        // thread.
        let graph = self.graph.clone();
        let closed = tokio::task::spawn_blocking(move || {
            let nodes = Graph::shutdown_wait(&graph);
            Graph::close_detached(&graph, nodes)
        })
        .await;
        if let Err(e) = closed {
            tracing::error!(error = %e, "closing the block graph failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use block::graph::{DriverOptions, NodeOptions};

    fn null(name: &str) -> NodeOptions {
        NodeOptions {
            node_name: Some(name.to_string()),
            driver: DriverOptions::Null {
                size: 4096,
                read_zeroes: true,
            },
            ..NodeOptions::default()
        }
    }

    /// Once shutdown has closed the graph, a late `blockdev-add` (one that took the graph
    /// lock after shutdown did) is refused instead of opening a node nobody will close.
    #[tokio::test]
    async fn an_add_after_shutdown_closed_the_graph_is_refused() {
        let d = super::Daemon::new(qmp::EventBus::new());
        d.blockdev_add(&null("a")).expect("add before shutdown");
        d.close_all().await;
        assert!(d.graph().nodes().is_empty(), "every node is closed");
        let late = d.blockdev_add(&null("b")).map(|_| ());
        assert_eq!(
            late.expect_err("refused").to_string(),
            "blockd is shutting down"
        );
        assert!(d.graph().nodes().is_empty());
        let del = d.blockdev_del("a").expect_err("refused");
        assert_eq!(del.to_string(), "blockd is shutting down");
    }

    /// A node whose facts (fstat) hang stalls `query-named-block-nodes` only: the graph
    /// lock is free meanwhile, and the query answers once the file does.
    #[test]
    fn query_named_block_nodes_reads_facts_without_the_graph_lock() {
        use block::testing::{Op, TestDriver};
        use std::time::{Duration, Instant};

        let d = super::Daemon::new(qmp::EventBus::new());
        d.blockdev_add(&null("a")).expect("add a");
        let (t, ctl) = TestDriver::node("t", 4096);
        d.graph().add_node_ref(t).expect("add t");
        ctl.hold(Op::Facts);
        let q = {
            let d = d.clone();
            std::thread::spawn(move || {
                let nodes = d.graph().nodes().to_vec();
                let known = crate::info::Facts::read(&nodes);
                d.query_named_block_nodes_from(false, &known)
            })
        };
        let start = Instant::now();
        while ctl.waiting() < 1 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "facts never read"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The graph lock is free while the query waits for the file (a lock held over the
        // facts fails the test rather than hanging it).
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let d = d.clone();
            std::thread::spawn(move || {
                let _ = tx.send(d.graph().nodes().len());
            });
        }
        let free = rx.recv_timeout(Duration::from_secs(20));
        ctl.release(Op::Facts);
        let answer = q.join().expect("query thread");
        assert_eq!(free.expect("graph lock held over the facts"), 2);
        let names: Vec<&str> = answer
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .collect();
        assert_eq!(names, ["t", "a"]);
    }
}
