//! `prune --keep N`, crash-safe and self-repairing.
//!
//! A prune changes files that kept points still name: it merges the oldest kept point's lower
//! files into the chain's base (`qemu-img commit`) and re-points their children at the base
//! (`qemu-img rebase -u`), so the base's and the children's checksums change. To survive a kill
//! at any instant it first writes its whole plan as a journal object (`MACHINE/prune.json`,
//! atomically like a manifest), then:
//!
//! 1. removes the pruned points' manifests (the plan is decided; their files stay for now);
//! 2. runs the merges in order, recording in the journal after each one that it is done;
//! 3. rewrites every manifest that names a merged or changed file (merged files dropped from
//!    the chains, changed files checksummed anew), each atomically;
//! 4. removes the files no manifest names any more, then the journal.
//!
//! Every step can be run again: a merge that the journal does not record as done is redone
//! from the start, which is exact because the merged file is never changed (`commit -d`) and
//! the next merge starts only after the journal records this one (so a redo never writes an
//! older file's data over a newer one's); a rebase only rewrites a header; step 3 recomputes
//! checksums from the files as they are. A later `prune` (whatever its `--keep`) and the start
//! of every backup run ([`finish_pending`]) complete a pending journal before anything else, so
//! no manifest is left naming a file whose recorded checksum is wrong, and no file is removed
//! while a manifest names it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::backup::die_at;
use crate::error::{Context, Error, Kind, Result};
use crate::filesum;
use crate::manifest::{Lock, Manifest, Repo};
use crate::progress::Progress;

/// Journal format version.
const JOURNAL_VERSION: u32 = 1;

/// One merge: `child` (the second file of every kept chain that starts at `base`) is
/// committed into `base`, then the `grandchildren` (files backed by `child`) are re-pointed
/// at `base`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Step {
    disk: String,
    base: String,
    child: String,
    grandchildren: Vec<String>,
}

/// A prune's plan and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Journal {
    version: u32,
    /// Ids of the points the prune removes.
    removed: Vec<String>,
    /// Ids of the points that stay.
    kept: Vec<String>,
    /// The merges, in the order they run.
    steps: Vec<Step>,
    /// How many of `steps` are finished (commit and rebases done).
    done: usize,
}

/// Object name of the machine's prune journal.
fn journal_name(repo: &Repo<'_>) -> String {
    format!("{}/prune.json", repo.machine)
}

/// Whether an interrupted prune is waiting to be finished (its journal exists).
pub fn pending(repo: &Repo<'_>) -> bool {
    repo.store.exists(&journal_name(repo))
}

/// The note `list` and `verify` print while a prune is pending.
pub const PENDING_NOTE: &str =
    "an interrupted prune is pending (its merged files' checksums may be stale until it is \
     finished); the next prune or backup of this machine finishes it";

fn write_journal(repo: &Repo<'_>, j: &Journal) -> Result<()> {
    let data = serde_json::to_vec_pretty(j)
        .map_err(|e| Error::caused(Kind::Repository, "serialising the prune journal", e))?;
    repo.store.put(&journal_name(repo), &data)
}

fn read_journal(repo: &Repo<'_>) -> Result<Option<Journal>> {
    let name = journal_name(repo);
    if !repo.store.exists(&name) {
        return Ok(None);
    }
    let data = repo.store.get(&name)?;
    let j: Journal = serde_json::from_slice(&data)
        .map_err(|e| Error::caused(Kind::Repository, format!("parsing {name}"), e))?;
    if j.version != JOURNAL_VERSION || j.done > j.steps.len() {
        return Err(Error::new(
            Kind::Repository,
            format!("{name}: unknown version {} or bad progress", j.version),
        ));
    }
    Ok(Some(j))
}

/// The merges that bring the oldest of `kept` (oldest first) down to one file per disk where
/// that keeps every kept chain valid: per disk, while the base's only child in all kept chains
/// is the next file of the oldest kept chain, merge it.
fn plan(kept: &[Manifest]) -> Vec<Step> {
    let mut kept: Vec<Manifest> = kept.to_vec();
    let mut steps = Vec::new();
    let mut seen = HashSet::new();
    let disks: Vec<String> = kept
        .iter()
        .flat_map(|m| m.disks.iter().map(|d| d.name.clone()))
        .filter(|d| seen.insert(d.clone()))
        .collect();
    for disk in disks {
        while let Some(oldest) = kept.iter().find_map(|m| m.disk(&disk)) {
            if oldest.chain.len() < 2 {
                break;
            }
            let base = oldest.chain[0].name.clone();
            let child = oldest.chain[1].name.clone();
            let chains: Vec<_> = kept.iter().filter_map(|m| m.disk(&disk)).collect();
            let only_child = chains
                .iter()
                .all(|d| d.chain.len() < 2 || d.chain[0].name != base || d.chain[1].name == child);
            if !only_child {
                break;
            }
            let grandchildren: BTreeSet<String> = chains
                .iter()
                .filter(|d| d.chain.len() > 2 && d.chain[1].name == child)
                .map(|d| d.chain[2].name.clone())
                .collect();
            for m in kept.iter_mut() {
                for d in m.disks.iter_mut().filter(|d| d.name == disk) {
                    if d.chain.len() >= 2 && d.chain[1].name == child {
                        d.chain.remove(1);
                    }
                }
            }
            steps.push(Step {
                disk: disk.clone(),
                base,
                child,
                grandchildren: grandchildren.into_iter().collect(),
            });
        }
    }
    steps
}

/// Run qemu-img with `args`.
fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| Error::caused(Kind::Io, "running qemu-img", e))?;
    if !out.status.success() {
        return Err(Error::new(
            Kind::Io,
            format!(
                "qemu-img {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// One merge; running it again after it was (partly) done gives the same files.
fn merge(repo: &Repo<'_>, s: &Step) -> Result<()> {
    let base_p = repo.store.local_path(&s.base)?;
    let child_p = repo.store.local_path(&s.child)?;
    // `-d`: the child is left as it is, so a redo copies the very same data again.
    qemu_img(&["commit", "-q", "-d", &child_p.to_string_lossy()])?;
    die_at("prune-commit");
    let base_file = base_p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for g in &s.grandchildren {
        let gp = repo.store.local_path(g)?;
        // Unsafe rebase: exact, because the base now holds the child's point.
        qemu_img(&[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            &base_file,
            &gp.to_string_lossy(),
        ])?;
    }
    Ok(())
}

/// Carry out journal `j` from where it stopped (see the module's documentation).
fn run(repo: &Repo<'_>, mut j: Journal, progress: &Progress) -> Result<()> {
    // 1. The pruned points disappear (their files still back the kept ones).
    for id in &j.removed {
        let name = repo.manifest_name(id);
        if repo.store.exists(&name) {
            repo.store.remove(&name)?;
            progress.event("prune", &format!("removed backup {id}"), json!({"id": id}));
        }
    }
    // 2. The merges not yet recorded as done, in order.
    while let Some(s) = j.steps.get(j.done).cloned() {
        merge(repo, &s).ctx(|| format!("merging {} into {}", s.child, s.base))?;
        die_at("prune-step");
        j.done += 1;
        write_journal(repo, &j)?;
        progress.event(
            "prune",
            &format!("merged {} into {}", s.child, s.base),
            json!({"merged": s.child, "into": s.base}),
        );
    }
    // 3. Every manifest naming a merged file drops it; every changed file is checksummed
    // anew (in the format new backups use) from the file as it is now.
    let merged: HashSet<&str> = j.steps.iter().map(|s| s.child.as_str()).collect();
    let changed: HashSet<&str> = j
        .steps
        .iter()
        .flat_map(|s| {
            std::iter::once(s.base.as_str()).chain(s.grandchildren.iter().map(|g| g.as_str()))
        })
        .collect();
    let algo = filesum::FileHash::NEW;
    let mut sums = HashMap::new();
    for old in repo.backups()? {
        let mut m = old.clone();
        for d in m.disks.iter_mut() {
            d.chain.retain(|f| !merged.contains(f.name.as_str()));
            for f in d
                .chain
                .iter_mut()
                .filter(|f| changed.contains(f.name.as_str()))
            {
                if !sums.contains_key(&f.name) {
                    let p = repo.store.local_path(&f.name)?;
                    let sum = filesum::file_checksum(&p, algo)
                        .ctx(|| format!("checksumming {}", f.name))?;
                    sums.insert(f.name.clone(), sum);
                }
                if let Some((sum, len)) = sums.get(&f.name) {
                    f.checksum = sum.clone();
                    f.size = *len;
                    f.hash = algo;
                }
            }
        }
        if m != old {
            // Written in the current format (the algorithm named), whatever version it was.
            m.version = crate::manifest::MANIFEST_VERSION;
            repo.write_manifest(&m)?;
            die_at("prune-manifest");
        }
    }
    // 4. Files no manifest names (merged files, the pruned points' own files and sums).
    for f in repo.orphans()? {
        repo.store.remove(&f)?;
    }
    die_at("prune-cleaned");
    repo.store.remove(&journal_name(repo))
}

/// Finish an interrupted prune of this machine, if there is one. The caller holds the lock.
pub fn finish_pending(repo: &Repo<'_>, progress: &Progress) -> Result<()> {
    let Some(j) = read_journal(repo)? else {
        return Ok(());
    };
    progress.event(
        "prune",
        &format!(
            "finishing an interrupted prune ({} of {} merges done)",
            j.done,
            j.steps.len()
        ),
        json!({"resumed": true, "done": j.done, "steps": j.steps.len()}),
    );
    run(repo, j, progress).ctx(|| "finishing an interrupted prune".into())
}

/// `prune --keep N`: drop all but the newest N backups; per disk, merge the files below the
/// oldest kept point into the base (`qemu-img commit` + unsafe rebase of the children, which is
/// exact because the base then holds that point), so every kept chain stays valid at every step.
/// An interrupted earlier prune is finished first.
pub fn prune(repo: &Repo<'_>, keep: usize, progress: &Progress) -> Result<()> {
    if keep == 0 {
        return Err(Error::new(Kind::Usage, "--keep must be at least 1"));
    }
    let _lock = Lock::take(repo)?;
    finish_pending(repo, progress)?;
    let all = repo.backups()?;
    if all.len() <= keep {
        progress.event("prune", "nothing to prune", json!({}));
        return Ok(());
    }
    let (old, kept) = all.split_at(all.len() - keep);
    let j = Journal {
        version: JOURNAL_VERSION,
        removed: old.iter().map(|m| m.id.clone()).collect(),
        kept: kept.iter().map(|m| m.id.clone()).collect(),
        steps: plan(kept),
        done: 0,
    };
    write_journal(repo, &j)?;
    die_at("prune-planned");
    run(repo, j, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DiskKind, DiskRecord, FileRecord};

    fn point(id: &str, chain: &[&str]) -> Manifest {
        let file = |n: &&str| FileRecord {
            name: n.to_string(),
            size: 0,
            checksum: String::new(),
            hash: filesum::FileHash::NEW,
        };
        Manifest {
            version: crate::manifest::MANIFEST_VERSION,
            hash: Default::default(),
            id: id.into(),
            machine: "vm".into(),
            time: 0,
            mode: "pull".into(),
            disks: vec![DiskRecord {
                name: "d".into(),
                node: "d".into(),
                kind: DiskKind::Inc,
                reason: None,
                size: 0,
                copied: 0,
                chain: chain.iter().map(file).collect(),
                bitmap: String::new(),
                full_bitmap: String::new(),
                content_digest: String::new(),
                sums: None,
            }],
        }
    }

    fn step(base: &str, child: &str, grandchildren: &[&str]) -> Step {
        Step {
            disk: "d".into(),
            base: base.into(),
            child: child.into(),
            grandchildren: grandchildren.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn plan_merges_the_oldest_kept_chain_into_its_base_in_order() {
        let kept = [
            point("3", &["f", "i1", "i2"]),
            point("4", &["f", "i1", "i2", "i3"]),
        ];
        assert_eq!(
            plan(&kept),
            vec![step("f", "i1", &["i2"]), step("f", "i2", &["i3"])]
        );
    }

    #[test]
    fn plan_stops_where_the_base_has_another_kept_child() {
        // A kept differential is a second child of the full: nothing can be merged into it.
        let kept = [point("2", &["f", "i1"]), point("3", &["f", "d"])];
        assert_eq!(plan(&kept), vec![]);
        // A diff with an incremental on top merges, re-pointing the incremental.
        let kept = [point("2", &["f", "d"]), point("3", &["f", "d", "i"])];
        assert_eq!(plan(&kept), vec![step("f", "d", &["i"])]);
        // A new full starts another chain: the old one is left alone.
        let kept = [point("2", &["g"]), point("3", &["g", "i"])];
        assert_eq!(plan(&kept), vec![]);
    }
}
