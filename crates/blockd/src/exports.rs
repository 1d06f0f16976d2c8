//! NBD server and exports as QMP manages them: `nbd-server-start/stop`, `block-export-add/del`,
//! `query-block-exports`, and the older `nbd-server-add/remove`.
//!
//! An export pins its node (a registered user, so `blockdev-del` refuses) and its bitmaps (busy)
//! until the NBD server reports the last client gone; then BLOCK_EXPORT_DELETED is emitted.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use block::bitmap_ops;
use block::edge::Root;
use block::perm::Perm;
use block::{Error, NodeRef, Result};

/// How QEMU names an export's block backend in permission conflicts.
const UNNAMED: &str = "an unnamed block device";

use crate::daemon::Daemon;
use crate::export::{Context, NodeExport};

/// Where the NBD server listens.
#[derive(Debug, Clone)]
pub enum NbdAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// host, port.
    Inet(String, String),
}

/// One export as QMP sees it.
pub struct ExportRec {
    /// Export id.
    pub id: String,
    /// Name on the wire.
    pub name: String,
    /// Its edge into the graph (follows re-wiring; holds the export's permissions).
    pub root: Arc<Root>,
    /// Bitmaps held busy: (node, bitmap name).
    pub bitmaps: Vec<(NodeRef, String)>,
    /// Deletion requested, clients still connected.
    pub shutting_down: bool,
}

/// Arguments of block-export-add for NBD, already typed.
pub struct ExportArgs {
    /// Export id.
    pub id: String,
    /// Node to export.
    pub node_name: String,
    /// Name on the wire (default: node name).
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Writable.
    pub writable: bool,
    /// Bitmaps: (node or None for the export node, bitmap name).
    pub bitmaps: Vec<(Option<String>, String)>,
    /// Offer qemu:allocation-depth.
    pub allocation_depth: bool,
}

impl Daemon {
    /// nbd-server-start.
    /// `handshake_max_seconds`: QEMU's option (default 10; 0: no limit).
    pub async fn nbd_server_start(
        &self,
        addr: NbdAddr,
        max_connections: Option<u32>,
        handshake_max_seconds: Option<u32>,
    ) -> Result<()> {
        if self.nbd().is_some() {
            return Err(Error::generic("NBD server already running"));
        }
        let handshake_timeout = match handshake_max_seconds {
            Some(0) => None,
            Some(n) => Some(std::time::Duration::from_secs(n.into())),
            None => nbd::ServerOptions::default().handshake_timeout,
        };
        let server = nbd::NbdServer::with_options(nbd::ServerOptions {
            max_connections,
            handshake_timeout,
        });
        let bound = match &addr {
            NbdAddr::Unix(p) => server.listen_unix(p).await.map(|_| ()),
            NbdAddr::Inet(h, p) => server.listen_tcp(h, p).await.map(|_| ()),
        };
        if let Err(e) = bound {
            let what = match &addr {
                NbdAddr::Unix(p) => format!("Failed to bind socket to {}", p.display()),
                NbdAddr::Inet(h, p) => format!("Failed to bind socket to {h}:{p}"),
            };
            server.stop().await;
            return Err(Error::io(what, &e));
        }
        *self.nbd_slot() = Some(server);
        Ok(())
    }

    /// nbd-server-stop: removes every NBD export too.
    pub async fn nbd_server_stop(&self) -> Result<()> {
        let Some(server) = self.nbd_slot().take() else {
            return Err(Error::generic("NBD server not running"));
        };
        server.stop().await;
        let gone: Vec<ExportRec> = std::mem::take(&mut *self.exports());
        for rec in gone {
            self.release_export(&rec);
        }
        Ok(())
    }

    fn find_bitmap_node(&self, start: &NodeRef, name: &str) -> Option<NodeRef> {
        let mut cur = Some(start.clone());
        while let Some(n) = cur {
            if n.bitmaps().get(name).is_some() {
                return Some(n);
            }
            // snapshot-access is no filter: QEMU does not look below it.
            if n.driver_name() == "snapshot-access" {
                return None;
            }
            cur = n.child("backing").or_else(|| n.child("file"));
        }
        None
    }

    /// block-export-add (type nbd).
    pub fn export_add(&self, args: ExportArgs) -> Result<()> {
        // QEMU checks the id before anything else (even whether the NBD server runs).
        if !id_wellformed(&args.id) {
            return Err(Error::generic("Invalid block export id"));
        }
        let Some(server) = self.nbd() else {
            return Err(Error::generic("NBD server not running"));
        };
        if self.exports().iter().any(|e| e.id == args.id) {
            return Err(Error::generic(format!(
                "Block export id '{}' is already in use",
                args.id
            )));
        }
        // Held from the lookup until the root is attached: a concurrent blockdev-del waits,
        // then finds the export (or took the node out first, and this finds nothing).
        let hold = self.hold_lookup(&args.node_name).map_err(|_| {
            Error::generic(format!(
                "Cannot find device='' nor node-name='{}'",
                args.node_name
            ))
        })?;
        let node: NodeRef = (*hold).clone();
        let name = args.name.clone().unwrap_or_else(|| args.node_name.clone());
        if name.len() > 4096 {
            return Err(Error::generic(format!("export name '{name}' too long")));
        }
        if let Some(d) = &args.description {
            if d.len() > 4096 {
                return Err(Error::generic(format!("description '{d}' too long")));
            }
        }
        if args.writable && node.read_only() {
            return Err(Error::generic("Cannot export read-only node as writable"));
        }
        let mut contexts = vec![Context::Allocation];
        if args.allocation_depth {
            contexts.push(Context::Depth);
        }
        let mut held: Vec<(NodeRef, String)> = Vec::new();
        let result = (|| {
            for (bnode, bname) in &args.bitmaps {
                let holder = match bnode {
                    Some(n) => {
                        let n = self.lookup_node(n)?;
                        let found = n.bitmaps().get(bname).is_some();
                        found.then_some(n)
                    }
                    None => self.find_bitmap_node(&node, bname),
                }
                .ok_or_else(|| Error::generic(format!("Bitmap '{bname}' is not found")))?;
                {
                    let list = holder.bitmaps();
                    if let Some(b) = list.get(bname) {
                        // A recording bitmap could change under a read-only export, unless
                        // the node itself is read-only (QEMU: bdrv_is_writable).
                        if b.recording && !args.writable && !node.read_only() {
                            return Err(Error::generic(format!(
                                "Enabled bitmap '{bname}' incompatible with readonly export"
                            )));
                        }
                    }
                }
                bitmap_ops::acquire(&holder, bname)?;
                held.push((holder.clone(), bname.clone()));
                contexts.push(Context::Bitmap {
                    node: holder,
                    name: bname.clone(),
                    alias: bname.clone(),
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (n, b) in &held {
                bitmap_ops::release(n, b);
            }
            return Err(e);
        }
        // The export's edge holds its permissions before it is visible; attached sharing
        // everything, then narrowed to not sharing resize, as QEMU's NBD export does (so a
        // conflict names the same side QEMU names).
        let who = format!("export '{}'", args.id);
        let perm = if args.writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        };
        let root = Root::new(who, UNNAMED.to_string(), node.clone(), perm, Perm::ALL);
        let attached = {
            let mut graph = self.graph();
            let attached = graph.attach_root(&root).and_then(|_| {
                root.set_perms(perm, Perm::ALL & !Perm::RESIZE);
                graph.refresh_perms()
            });
            if attached.is_err() {
                graph.detach_root(&root);
            }
            attached
        };
        drop(hold);
        if let Err(e) = attached {
            for (n, b) in &held {
                bitmap_ops::release(n, b);
            }
            return Err(e);
        }
        let backend = Arc::new(NodeExport::new(root.clone(), contexts));
        let mut cfg = nbd::ExportConfig::new(name.clone(), args.writable, backend);
        cfg.description = args.description.clone();
        if let Err(e) = server.add_export(cfg) {
            self.graph().detach_root(&root);
            for (n, b) in &held {
                bitmap_ops::release(n, b);
            }
            return Err(Error::generic(e.to_string()));
        }
        self.exports().push(ExportRec {
            id: args.id,
            name,
            root,
            bitmaps: held,
            shutting_down: false,
        });
        Ok(())
    }

    /// block-export-del; `hard` closes connections now. Emits BLOCK_EXPORT_DELETED when done.
    pub fn export_del(self: &Arc<Self>, id: &str, hard: bool) -> Result<()> {
        let name = {
            let mut exports = self.exports();
            let Some(rec) = exports.iter_mut().find(|e| e.id == id) else {
                return Err(Error::generic(format!("Export '{id}' is not found")));
            };
            if rec.shutting_down {
                return Err(Error::generic(format!(
                    "Export '{id}' is already shutting down"
                )));
            }
            rec.name.clone()
        };
        let Some(server) = self.nbd() else {
            return Err(Error::generic("NBD server not running"));
        };
        let done = if hard {
            server.remove_export(&name, true)
        } else {
            server.remove_export_if_unused(&name)
        }
        .map_err(|e| match e.kind() {
            nbd::ErrorKind::ExportInUse => Error::generic(format!("export '{id}' still in use")),
            _ => Error::generic(e.to_string()),
        })?;
        if let Some(rec) = self.exports().iter_mut().find(|e| e.id == id) {
            rec.shutting_down = true;
        }
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let _ = done.await;
            let rec = {
                let mut exports = this.exports();
                exports
                    .iter()
                    .position(|e| e.id == id)
                    .map(|i| exports.remove(i))
            };
            if let Some(rec) = rec {
                this.release_export(&rec);
            }
        });
        Ok(())
    }

    fn release_export(&self, rec: &ExportRec) {
        for (n, b) in &rec.bitmaps {
            bitmap_ops::release(n, b);
        }
        self.graph().detach_root(&rec.root);
        let deleted = qapi::types::BlockExportDeleted { id: rec.id.clone() };
        crate::wire::emit(
            &self.events,
            qapi::types::Event::BlockExportDeleted(deleted),
        );
    }

    /// query-block-exports.
    pub fn query_exports(&self) -> Result<Value> {
        let exports = self.exports();
        let infos = exports.iter().rev();
        // The node the export's root points at now: it follows re-wiring (a snapshot moves
        // it onto the overlay), as QEMU reports the backend's current node.
        let infos = infos.map(|e| {
            let node = e.root.node();
            crate::wire::export_info(&e.id, node.name(), e.shutting_down)
        });
        Ok(Value::Array(infos.collect::<Result<_>>()?))
    }
}

/// QEMU's rule for ids (`id_wellformed`): an ASCII letter, then ASCII letters, digits, `-`,
/// `.` and `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}
