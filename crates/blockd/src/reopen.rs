//! `blockdev-reopen`: the daemon's side (claims, the plan checked against the schema's
//! options, child changes and read-only switches in the order QEMU's atomic reopen allows,
//! all undone on a refusal). The graph does the work (`block::graph` reopen and switch).

use std::sync::Arc;

use serde_json::json;

use block::graph::ChildChange;
use block::NodeRef;
use qapi::types::BlockdevReopenArgs;

use crate::claims::Key;
use crate::convert::node_options;
use crate::daemon::Daemon;
use crate::dispatch::{generic, CmdResult};

/// What a `blockdev-reopen` claims (see [`crate::claims`]): every node it names.
fn reopen_keys(d: &Daemon, a: &BlockdevReopenArgs) -> Vec<Key> {
    let graph = d.graph();
    a.options
        .iter()
        .filter_map(|o| o.node_name.as_deref().and_then(|n| graph.get(n)))
        .map(Key::Node)
        .collect()
}

/// `blockdev-reopen`, all or nothing. Blocking: call it off the reactor.
pub(crate) fn blockdev_reopen(d: &Arc<Daemon>, a: BlockdevReopenArgs) -> CmdResult {
    // Runs beside other commands: a snapshot, reopen or transaction on the same nodes runs
    // wholly before or after it.
    let _claim = d
        .claims
        .take(|| Ok::<_, block::Error>(reopen_keys(d, &a)))?;
    // Check every entry first, then change through the graph (every child change, then the
    // read-only switches; permissions before bytes, drained); a refusal puts back everything
    // already changed, newest first: all or nothing.
    let mut plan = Vec::new();
    for o in &a.options {
        let Some(name) = o.node_name.as_deref() else {
            return Err(generic("node-name not specified"));
        };
        let node = d
            .graph()
            .get(name)
            .ok_or_else(|| generic(format!("Failed to find node with node-name='{name}'")))?;
        if o.driver.driver().as_str() != node.driver_name() {
            return Err(generic("Cannot change the option 'driver'"));
        }
        let opts = node_options(o).map_err(generic)?;
        let children = d.graph().check_reopen(&node, &opts)?;
        plan.push((node, children, o.read_only.unwrap_or(false)));
    }
    enum Undo {
        Child(NodeRef, ChildChange),
        ReadOnly(NodeRef, bool),
    }
    // Every node of the list is marked as being reopened (a blockdev-del or another reopen
    // of it waits) and its roots drained; nodes going read-only store their bitmaps and flush
    // first. All without the graph lock, as are the drivers' switches below
    // (`Graph::reopen_switch`): the lock is taken for the decisions and the swaps only.
    let switches: Vec<(NodeRef, bool)> = plan.iter().map(|(n, _, ro)| (n.clone(), *ro)).collect();
    let prep = block::Graph::prepare_reopen(&d.graph, &switches, true)?;
    // The children a change touches (old and new) drained as well, the wait for requests in
    // flight without the graph lock: the changes' own drained sections below find the roots
    // idle.
    let involved: Vec<NodeRef> = plan
        .iter()
        .filter(|(_, children, _)| !children.is_empty())
        .flat_map(|(n, children, _)| {
            let new = children.iter().filter_map(|c| c.to.clone());
            std::iter::once(n.clone())
                .chain(n.children().into_iter().map(|c| c.node))
                .chain(new)
        })
        .collect();
    let drained =
        (!involved.is_empty()).then(|| block::Graph::drain_begin_staged(&d.graph, &involved));
    let mut done: Vec<Undo> = Vec::new();
    let mut replaced: Vec<NodeRef> = Vec::new();
    let mut result = Ok(());
    // The child changes first, in list order; then the switches in an order that lets
    // each find its children as the whole list leaves them (`switch_order`).
    'plan: for (node, children, _) in &plan {
        let mut graph = d.graph();
        // A blockdev-del may have taken a node out since the checks: as if it had come
        // first.
        if !graph.contains(node) {
            result = Err(generic(format!(
                "Failed to find node with node-name='{}'",
                node.name()
            )));
            break;
        }
        for c in children {
            if let Some(to) = c.to.as_ref().filter(|t| !graph.contains(t)) {
                result = Err(generic(format!(
                    "Cannot find device='' nor node-name='{}'",
                    to.name()
                )));
                break 'plan;
            }
            match graph.reopen_child(node, c) {
                Ok(undo) => {
                    replaced.extend(undo.to.clone());
                    done.push(Undo::Child(node.clone(), undo));
                }
                Err(e) => {
                    result = Err(e);
                    break 'plan;
                }
            }
        }
    }
    if result.is_ok() {
        for i in block::graph::switch_order(&switches) {
            let (node, ro) = &switches[i];
            let was = node.read_only();
            if let Err(e) = block::Graph::reopen_switch(&d.graph, &prep, node, *ro) {
                result = Err(e);
                break;
            }
            done.push(Undo::ReadOnly(node.clone(), was));
        }
    }
    if let Err(e) = result {
        // Back to read-write first, while the nodes are still drained and marked.
        for u in done.into_iter().rev() {
            let undone = match &u {
                Undo::Child(n, c) => d.graph().reopen_child(n, c).map(|_| ()),
                Undo::ReadOnly(n, was) => block::Graph::reopen_switch(&d.graph, &prep, n, *was),
            };
            if let Err(e) = undone {
                tracing::warn!(error = %e, "undoing a reopen failed");
            }
        }
        d.graph().reopen_done(prep);
        return Err(e);
    }
    let mut graph = d.graph();
    graph.reopen_done(prep);
    // A replaced backing opened from an image header is closed without the graph lock.
    let orphans = graph.close_orphans(&replaced);
    drop(graph);
    drop(drained);
    block::graph::Graph::close_detached(&d.graph, orphans);
    Ok(json!({}))
}
