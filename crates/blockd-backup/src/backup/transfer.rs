//! The middle of a run: the daemon copies (push: wait for its jobs) or the tool copies
//! (pull: export each disk's point in time, copy its extents).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;

use super::{Made, Names, Run};
use crate::chain::HashAlgo;
use crate::copy::{self, Job};
use crate::error::{Context, Error, Kind, Result};
use crate::fleece::{self, NbdServer};
use crate::follow;
use crate::plan::Plan;

impl Run<'_, '_> {
    /// Push: wait for the jobs, dismiss them and close their targets. Pull: export each disk's
    /// point in time and copy its extents into `files` (the content hashes of the chunks read
    /// whole go to `known`). `copied`: bytes per disk.
    pub(super) fn transfer(
        &mut self,
        files: &[(String, PathBuf, Option<Arc<qcow2::Qcow2>>)],
        copied: &mut [u64],
        known: &mut [Option<copy::KnownHashes>],
        followed: &mut [Option<follow::Followed>],
    ) -> Result<()> {
        if self.opts.push {
            let ids: Vec<String> = (0..self.plans.len())
                .map(|i| Names::new(&self.opts.tag, &self.id, i).job)
                .collect();
            // The new files are hashed while the jobs write them, where that is possible.
            let targets = std::mem::take(&mut self.follow);
            let stop = AtomicBool::new(false);
            let (waited, got) = std::thread::scope(|s| {
                let follower = (!targets.is_empty()).then(|| {
                    let stop = &stop;
                    s.spawn(move || follow::follow(targets, stop))
                });
                let waited = fleece::wait_push_jobs(self.q, &ids, self.progress);
                stop.store(true, Ordering::Release);
                (waited, follower.map(|h| h.join()))
            });
            // The exports go first: a target stays in use while it is exported. One that does
            // not go stays listed for the teardown; the job's own error comes first.
            let mut del_err = None;
            for id in std::mem::take(&mut self.made.exports) {
                if let Err(e) = fleece::del_export(self.q, &id) {
                    self.made.exports.push(id);
                    del_err.get_or_insert(e);
                }
            }
            waited?;
            if let Some(e) = del_err {
                return Err(e);
            }
            if let Some(got) = got {
                let got = got
                    .map_err(|_| Error::new(Kind::Io, "the thread following the jobs panicked"))?;
                let mut got = got.into_iter();
                for (i, p) in self.plans.iter().enumerate() {
                    if p.estimate >= follow::min_bytes() {
                        followed[i] = got.next().flatten();
                        let n = followed[i].as_ref().map_or(0, |f| f.bytes);
                        follow::debug(&format!("disk {}: {n} bytes hashed during the job", p.disk));
                    }
                }
            }
            // The concluded jobs dismissed and their targets closed, in one round trip (a
            // target is in use until its job is dismissed, so the order in the write counts).
            let targets: Vec<String> = (0..self.plans.len())
                .map(|i| Names::new(&self.opts.tag, &self.id, i).target)
                .collect();
            let cmds: Vec<(&str, serde_json::Value)> = ids
                .iter()
                .map(|id| ("job-dismiss", json!({"id": id})))
                .chain(
                    targets
                        .iter()
                        .map(|t| ("blockdev-del", json!({"node-name": t}))),
                )
                .collect();
            let mut replies = self.q.execute_many(&cmds)?.into_iter();
            for (i, (cmd, _)) in cmds.iter().enumerate() {
                let name = if i < ids.len() {
                    &ids[i]
                } else {
                    &targets[i - ids.len()]
                };
                match replies.next() {
                    Some(Ok(_)) if i < ids.len() => Made::gone(&mut self.made.jobs, name),
                    Some(Ok(_)) => Made::gone(&mut self.made.nodes, name),
                    Some(Err(e)) => return Err(e.context(format!("{cmd} {name}"))),
                    None => return Err(Error::new(Kind::Daemon, format!("no reply to {cmd}"))),
                }
            }
            for (i, p) in self.plans.iter().enumerate() {
                copied[i] = p.estimate;
            }
        } else {
            let node = self
                .plans
                .first()
                .map(|p| p.node.clone())
                .unwrap_or_default();
            self.ensure_server(&node)?;
            for (i, p) in self.plans.clone().iter().enumerate() {
                let img = files[i]
                    .2
                    .clone()
                    .ok_or_else(|| Error::new(Kind::Io, "no image"))?;
                let (n, sums) = self
                    .pull_disk(i, p, img)
                    .ctx(|| format!("copying disk '{}'", p.disk))?;
                copied[i] = n;
                known[i] = Some(sums);
            }
        }
        Ok(())
    }

    /// The NBD server to export through: the user's (`--nbd-socket`), else one started on a
    /// fixed socket in the work folder (a server a killed run left there is recognised as
    /// ours through a probe export of `node`).
    fn ensure_server(&mut self, node: &str) -> Result<()> {
        if self.server.is_none() {
            let own = self.opts.work_dir.join("bb-nbd.sock");
            self.server = Some(NbdServer::start(
                self.q,
                self.opts.nbd_socket.as_deref(),
                &own,
                &self.opts.tag,
                node,
            )?);
        }
        Ok(())
    }

    /// Push, before the jobs start: export each target worth following read-only and start
    /// connecting to it; a disk that cannot be followed (no NBD server, a refused export) is
    /// simply hashed after its job. Returns the targets in plan order, of the disks that copy
    /// at least [`follow::min_bytes`] (the same selection `transfer` pairs the results with),
    /// or none.
    pub(super) fn follow_targets(
        &mut self,
        files: &[(String, PathBuf, Option<Arc<qcow2::Qcow2>>)],
    ) -> Vec<follow::Target> {
        let chosen: Vec<usize> = (0..self.plans.len())
            .filter(|&i| self.plans[i].estimate >= follow::min_bytes())
            .collect();
        if chosen.is_empty() || std::env::var_os("BLOCKD_BACKUP_NO_FOLLOW").is_some() {
            return Vec::new();
        }
        match self.export_targets(&chosen, files) {
            Ok(t) => t,
            Err(e) => {
                follow::debug(&format!("push targets not followed: {e}"));
                Vec::new()
            }
        }
    }

    fn export_targets(
        &mut self,
        chosen: &[usize],
        files: &[(String, PathBuf, Option<Arc<qcow2::Qcow2>>)],
    ) -> Result<Vec<follow::Target>> {
        let node = self.plans[chosen[0]].node.clone();
        self.ensure_server(&node)?;
        let sock = self
            .server
            .as_ref()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        let names: Vec<Names> = chosen
            .iter()
            .map(|&i| Names::new(&self.opts.tag, &self.id, i))
            .collect();
        let cmds: Vec<(&str, serde_json::Value)> = names
            .iter()
            .map(|n| {
                let ex = json!({"type": "nbd", "id": n.export, "node-name": n.target,
                                "name": n.export});
                ("block-export-add", ex)
            })
            .collect();
        let mut failed = None;
        for (r, n) in self.q.execute_many(&cmds)?.into_iter().zip(&names) {
            match r {
                Ok(_) => self.made.exports.push(n.export.clone()),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        chosen
            .iter()
            .zip(&names)
            .map(|(&i, n)| {
                Ok(follow::Target {
                    path: files[i].1.clone(),
                    flusher: Box::new(follow::NbdFlusher::new(&sock, &n.export)),
                    size: self.plans[i].size,
                })
            })
            .collect()
    }

    /// Pull one disk: export its point in time and copy the extents to read.
    fn pull_disk(
        &mut self,
        i: usize,
        p: &Plan,
        img: Arc<qcow2::Qcow2>,
    ) -> Result<(u64, copy::KnownHashes)> {
        let n = Names::new(&self.opts.tag, &self.id, i);
        let mut cmds = Vec::new();
        let export_node = if self.opts.live {
            cmds.push((
                "blockdev-add",
                json!({"driver": "snapshot-access", "node-name": n.access, "file": n.filter}),
            ));
            n.access.clone()
        } else {
            p.node.clone()
        };
        let mut ex =
            json!({"type": "nbd", "id": n.export, "node-name": export_node, "name": n.export});
        if p.src_bitmap.is_some() {
            ex["bitmaps"] = if self.opts.live {
                json!([{"node": p.node, "name": n.frozen}])
            } else {
                json!([n.frozen])
            };
        }
        cmds.push(("block-export-add", ex));
        // The view and its export in one round trip; each recorded as made once it is.
        for (r, (cmd, _)) in self.q.execute_many(&cmds)?.into_iter().zip(&cmds) {
            r?;
            if *cmd == "blockdev-add" {
                self.made.nodes.push(n.access.clone());
            } else {
                self.made.exports.push(n.export.clone());
            }
        }
        let sock = self
            .server
            .as_ref()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        let job = Job {
            socket: sock,
            export: n.export.clone(),
            context: if p.src_bitmap.is_some() {
                Some(format!("qemu:dirty-bitmap:{}", n.frozen))
            } else {
                None
            },
            connections: self.opts.connections.max(1),
            incremental: p.src_bitmap.is_some(),
            algo: HashAlgo::NEW,
        };
        let copied = copy::run(&job, &img, self.progress)?;
        fleece::del_export(self.q, &n.export)?;
        Made::gone(&mut self.made.exports, &n.export);
        Ok(copied)
    }
}
