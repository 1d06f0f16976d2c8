//! The copy-before-write filter as a node, as QEMU's backup job has it: named
//! `filter-node-name` (or a generated name), with the source as its `file` child and the target
//! as its `target` child. It is created before the point in time is taken (its `target` edge
//! holds the write permission on the target from then on), inserted above the source once the
//! job exists (every parent and backend of the source, exports and devices included, now uses
//! the filter; the filter then lets nobody else write the source), and removed again when the
//! job is cleaned up, each re-wiring in a drained section. I/O through it goes to the source,
//! whose write hook does the copy-before-write (writers that reach the source some other way,
//! such as a job, are covered too).
//!
//! The job holds its nodes through roots with QEMU's backup permissions: a backend on the
//! filter (its main node) and a job edge on the target, both needing nothing and sharing
//! everything.
//!
//! For a `sync: none` job it also offers the point-in-time view to `snapshot-access` (image
//! fleecing through a backup job, as with QEMU's filter): clusters the hook has not copied
//! yet are read from the source, copied ones from the target.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use super::copy::Copier;
use crate::driver::{BlockStatus, Driver, ImageFacts, SnapshotApi};
use crate::edge::{Root, RootKind};
use crate::error::{errno, Error, Result};
use crate::graph::Graph;
use crate::node::{Child, NodeRef};
use crate::perm::{Perm, Role};

/// Gives a backup job the graph for its filter node (the daemon keeps it behind a lock).
pub trait GraphHost: Send + Sync {
    /// The graph and its lock; `None` once the graph is gone (shutdown).
    fn graph(&self) -> Option<Arc<Mutex<Graph>>>;
}

/// Where a `sync: none` job's point-in-time view goes once it exists (the filter is created
/// before it).
pub type ViewSlot = Arc<OnceLock<SnapshotView>>;

/// A job's filter node and its holds on the graph.
pub(crate) struct Installed {
    host: Arc<dyn GraphHost>,
    filter: NodeRef,
    source: NodeRef,
    /// The job's roots (main node: the filter; the target), once inserted.
    roots: Vec<Arc<Root>>,
}

fn gone() -> Error {
    Error::generic("the block graph is shut down")
}

fn on_graph<T>(host: &dyn GraphHost, f: impl FnOnce(&mut Graph) -> Result<T>) -> Result<T> {
    let graph = host.graph().ok_or_else(gone)?;
    let mut g = graph.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

/// `f` under the graph's lock in a drained section over `nodes` whose wait for requests in
/// flight runs without the lock ([`Graph::drained_staged`]).
fn drained_on_graph<T>(
    host: &dyn GraphHost,
    nodes: &[NodeRef],
    f: impl FnOnce(&mut Graph) -> Result<T>,
) -> Result<T> {
    let graph = host.graph().ok_or_else(gone)?;
    Graph::drained_staged(&graph, nodes, f)
}

impl Installed {
    /// Put the filter node in the graph (not yet above the source) and take its permissions:
    /// from here on its `target` edge holds write on the target. QEMU's "Could not create
    /// node: " errors.
    pub(crate) fn create(
        host: Arc<dyn GraphHost>,
        name: Option<&str>,
        source: &NodeRef,
        target: &NodeRef,
        view: ViewSlot,
    ) -> Result<Installed> {
        let children = vec![
            Child {
                role: "file",
                node: source.clone(),
            },
            Child {
                role: "target",
                node: target.clone(),
            },
        ];
        let driver = Box::new(CbwFilter::with_view(source.clone(), view));
        let filter = on_graph(&*host, |g| {
            let filter = g.insert_internal(name, driver, children)?;
            if let Err(e) = g.refresh_perms() {
                // Never used: nothing to flush.
                let d = g.remove_internal(&filter);
                g.close_detached_now(d);
                return Err(e);
            }
            Ok(filter)
        })
        .map_err(|e| e.context("Could not create node"))?;
        Ok(Installed {
            host,
            filter,
            source: source.clone(),
            roots: Vec::new(),
        })
    }

    /// Insert the filter above the source (drained; QEMU's "Could not replace node: "), then
    /// attach the job's roots: `job_id`'s main node (the filter) and its target.
    pub(crate) fn insert(&mut self, job_id: &str, target: &NodeRef) -> Result<()> {
        let (filter, source) = (self.filter.clone(), self.source.clone());
        // Drained without the graph lock over the wait: a request stalled on the source
        // delays the job's start, not other graph commands. The roots attached here reach
        // the filter, so they start stopped and resume with the section.
        let involved = [source.clone(), filter.clone()];
        let roots = drained_on_graph(&*self.host, &involved, |g| {
            // Shutdown may have begun while the section waited without the lock.
            if g.is_shut() {
                return Err(gone().context("Could not replace node"));
            }
            g.replace_node(&source, &filter)
                .map_err(|e| e.context("Could not replace node"))?;
            let main = Root::new(
                format!("block job '{job_id}'"),
                format!("block job '{job_id}'"),
                filter.clone(),
                Perm::NONE,
                Perm::ALL,
            );
            let held = Root::with_kind(
                RootKind::Job,
                format!("block job '{job_id}'"),
                format!("backup job '{job_id}'"),
                target.clone(),
                Perm::NONE,
                Perm::ALL,
            );
            let attached = g
                .attach_root(&main)
                .and_then(|_| g.attach_root(&held).inspect_err(|_| g.detach_root(&main)));
            if let Err(e) = attached {
                if let Err(e) = g.replace_node(&filter, &source) {
                    tracing::warn!(error = %e, "taking a backup filter out again");
                }
                return Err(e);
            }
            // QEMU's job blocks every operation on its main node, as on its target.
            filter.add_user(super::TARGET_USER.to_string());
            Ok(vec![main, held])
        })?;
        self.roots = roots;
        Ok(())
    }

    /// The filter node.
    pub(crate) fn node(&self) -> &NodeRef {
        &self.filter
    }

    /// Undo everything, in QEMU's order: the job's roots go, then the filter is taken out
    /// (drained, the wait for requests in flight without the graph lock) and closed.
    pub(crate) fn remove(self) {
        let Installed {
            host,
            filter,
            source,
            roots,
        } = self;
        let involved = [filter.clone(), source.clone()];
        let detached = drained_on_graph(&*host, &involved, |g| {
            if !roots.is_empty() {
                filter.remove_user(super::TARGET_USER);
            }
            for r in roots.iter().rev() {
                g.detach_root(r);
            }
            if let Err(e) = g.replace_node(&filter, &source) {
                tracing::warn!(node = filter.name(), error = %e, "taking a backup filter out");
            }
            Ok(g.remove_internal(&filter))
        });
        // Taken out under the graph lock; closed without it.
        if let Ok(d) = detached {
            d.close();
            let _ = on_graph(&*host, |g| {
                g.closed(d);
                Ok(())
            });
        }
    }
}

/// The point in time a running `sync: none` backup keeps (see [`super::prepare_with_view`]).
pub struct SnapshotView {
    copier: Arc<Copier>,
}

impl SnapshotView {
    pub(crate) fn new(copier: Arc<Copier>) -> SnapshotView {
        SnapshotView { copier }
    }

    /// Run `f` on each run of the range with writes there held off; EACCES once the job
    /// ended (the target no longer follows the source).
    fn with_runs<T>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&Copier, &[(u64, u64, bool)]) -> io::Result<T>,
    ) -> io::Result<T> {
        let c = &*self.copier;
        if c.stopped.load(Ordering::Acquire) {
            return Err(errno(libc::EACCES));
        }
        let (hold, runs) = c.begin_view_read(offset, len);
        // Checked again under the hold: a job that ended before it may have let writes by.
        let r = if c.stopped.load(Ordering::Acquire) {
            Err(errno(libc::EACCES))
        } else {
            f(c, &runs)
        };
        c.end_view_read(hold);
        r
    }
}

impl SnapshotApi for SnapshotView {
    fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with_runs(offset, buf.len() as u64, |c, runs| {
            for &(s, e, in_source) in runs {
                let at = (s - offset) as usize..(e - offset) as usize;
                let node = if in_source { &c.source } else { &c.target };
                node.read(s, &mut buf[at])?;
            }
            Ok(())
        })
    }

    fn snapshot_block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.with_runs(offset, len, |c, runs| {
            let Some(&(s, e, in_source)) = runs.first() else {
                return Ok((BlockStatus::Data, len));
            };
            if !in_source {
                // Copied: what the target holds is data as far as the view says.
                return Ok((BlockStatus::Data, e - s));
            }
            let (st, depth, n) = c.source.status_above(s, e - s)?;
            let st = match st {
                BlockStatus::Unallocated if depth == 0 => BlockStatus::Zero,
                BlockStatus::Unallocated => BlockStatus::Data,
                other => other,
            };
            Ok((st, n.clamp(1, e - s)))
        })
    }

    fn snapshot_discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        // The hook keeps protecting the range; nothing is lost by ignoring the hint.
        Ok(())
    }

    fn snapshot_status_is_cheap(&self) -> bool {
        self.copier.source.driver().status_is_cheap()
    }
}

/// The filter's driver: everything forwarded to the source.
pub struct CbwFilter {
    source: NodeRef,
    view: ViewSlot,
}

impl CbwFilter {
    /// A filter over `source`.
    pub fn new(source: NodeRef) -> CbwFilter {
        CbwFilter::with_view(source, ViewSlot::default())
    }

    /// A filter over `source` that offers the view put in `view` (if any) to
    /// `snapshot-access`.
    pub fn with_view(source: NodeRef, view: ViewSlot) -> CbwFilter {
        CbwFilter { source, view }
    }
}

impl Driver for CbwFilter {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }
    fn size(&self) -> u64 {
        self.source.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.source.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.source.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.source.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.source.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.source.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        self.source.block_status(offset, len)
    }
    fn facts(&self) -> ImageFacts {
        let mut f = self.source.facts();
        f.format_specific = None;
        f.backing_filename = None;
        f.backing_format = None;
        f
    }
    fn close(&self) -> io::Result<()> {
        // The source is not ours to close.
        Ok(())
    }
    fn status_is_cheap(&self) -> bool {
        self.source.driver().status_is_cheap()
    }
    fn snapshot_api(&self) -> Option<&dyn SnapshotApi> {
        self.view.get().map(|v| v as &dyn SnapshotApi)
    }
    fn child_role(&self, child: &str) -> Role {
        // As QEMU's: once the filter has parents (the job's main node at least) it has moved
        // the source's writers above itself and lets nobody else write or resize the source.
        match child {
            "target" => Role::CbwTarget,
            _ => Role::CbwSource,
        }
    }
}
