//! The middle of a run: the daemon copies (push: wait for its jobs) or the tool copies
//! (pull: export each disk's point in time, copy its extents).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::{Made, Names, Run};
use crate::chain::HashAlgo;
use crate::copy::{self, Job};
use crate::error::{Context, Error, Kind, Result};
use crate::fleece::{self, NbdServer};
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
    ) -> Result<()> {
        if self.opts.push {
            let ids: Vec<String> = (0..self.plans.len())
                .map(|i| Names::new(&self.opts.tag, &self.id, i).job)
                .collect();
            fleece::wait_push_jobs(self.q, &ids, self.progress)?;
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
            // A fixed name: a server left by a killed run is recognised as ours.
            let own = self.opts.work_dir.join("bb-nbd.sock");
            self.server = Some(NbdServer::start(
                self.q,
                self.opts.nbd_socket.as_deref(),
                &own,
            )?);
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
