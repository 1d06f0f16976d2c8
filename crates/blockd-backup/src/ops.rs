//! Commands on the repository: list, verify, restore, mount, prune.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::chain;
use crate::daemon::Daemon;
use crate::error::{Context, Error, Kind, Result};
use crate::filesum;
use crate::manifest::{DiskRecord, FileRecord, Lock, Manifest, Repo};
use crate::nbd::NbdClient;
use crate::progress::Progress;

/// The record of `disk` in `m` (the only disk when `disk` is None).
pub fn pick_disk<'m>(m: &'m Manifest, disk: Option<&str>) -> Result<&'m DiskRecord> {
    match disk {
        Some(d) => m
            .disk(d)
            .ok_or_else(|| Error::new(Kind::Usage, format!("backup {} has no disk '{d}'", m.id))),
        None if m.disks.len() == 1 => Ok(&m.disks[0]),
        None => Err(Error::new(
            Kind::Usage,
            format!("backup {} has several disks; pick one with --disk", m.id),
        )),
    }
}

/// Local paths of a disk's chain.
fn chain_paths(repo: &Repo<'_>, d: &DiskRecord) -> Result<Vec<PathBuf>> {
    d.chain
        .iter()
        .map(|f| repo.store.local_path(&f.name))
        .collect()
}

/// `list`: one line per backup (or a JSON array).
pub fn list(repo: &Repo<'_>, json_out: bool) -> Result<()> {
    let all = repo.backups()?;
    let mut out = std::io::stdout().lock();
    if json_out {
        let v = serde_json::to_string(&all)
            .map_err(|e| Error::caused(Kind::Repository, "serialising", e))?;
        let _ = writeln!(out, "{v}");
        return Ok(());
    }
    for m in &all {
        let disks: Vec<String> = m
            .disks
            .iter()
            .map(|d| {
                format!(
                    "{}:{}({} B copied, chain {})",
                    d.name,
                    d.kind.as_str(),
                    d.copied,
                    d.chain.len()
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{}  {}  {}  {}",
            m.id,
            crate::manifest::utc_stamp(m.time),
            m.mode,
            disks.join(" ")
        );
    }
    Ok(())
}

/// Check one chain file's recorded checksum (and length).
fn check_checksum(repo: &Repo<'_>, f: &FileRecord) -> Result<PathBuf> {
    let p = repo.store.local_path(&f.name)?;
    let (sum, len) = filesum::file_checksum(&p, f.hash)?;
    if sum != f.checksum || len != f.size {
        return Err(Error::new(
            Kind::Verify,
            format!("{}: checksum mismatch (file changed or damaged)", f.name),
        ));
    }
    Ok(p)
}

/// Check one chain file's recorded checksum and run `qemu-img check` on it.
fn verify_file(repo: &Repo<'_>, f: &FileRecord) -> Result<()> {
    let p = check_checksum(repo, f)?;
    let out = Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&p)
        .output()
        .map_err(|e| {
            Error::caused(
                Kind::Verify,
                "running qemu-img check (is qemu-img installed?)",
                e,
            )
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        return Err(Error::new(
            Kind::Verify,
            format!("{}: qemu-img check failed: {msg}", f.name),
        ));
    }
    Ok(())
}

/// `verify`: checksums and `qemu-img check` of every file of the point's chains, the
/// point's chunk-sums object against its content digest, then a restore of the point hashed
/// against the recorded content checksum.
pub fn verify(repo: &Repo<'_>, point: &str, progress: &Progress) -> Result<()> {
    let m = repo.find(point)?;
    for d in &m.disks {
        for f in &d.chain {
            verify_file(repo, f).ctx(|| format!("verifying {} of backup {}", d.name, m.id))?;
        }
        if let Some(name) = &d.sums {
            crate::sums::verify(repo.store, name, d.size, m.hash, &d.content_digest)
                .ctx(|| format!("verifying {} of backup {}", d.name, m.id))?;
        }
        let img = chain::open_chain(&chain_paths(repo, d)?)?;
        progress.start(&format!("verify {}", d.name), d.size);
        let mut h = chain::ContentHasher::new(m.hash);
        chain::read_all(&img, |_, b| {
            h.update(b);
            progress.add(b.len() as u64);
            Ok(())
        })?;
        progress.finish();
        if h.finish().0 != d.content_digest {
            return Err(Error::new(
                Kind::Verify,
                format!(
                    "backup {} disk {}: restored content does not match the recorded checksum",
                    m.id, d.name
                ),
            ));
        }
        progress.event(
            "verified",
            &format!("{} {}: ok", m.id, d.name),
            json!({"id": m.id, "disk": d.name}),
        );
    }
    Ok(())
}

/// Where `restore` writes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A raw file (sparse).
    Raw(PathBuf),
    /// A new standalone qcow2 file.
    Qcow2(PathBuf),
    /// A live node over NBD: socket and export name.
    Nbd(PathBuf, String),
}

/// `restore`: write the point to `target`; the content is hashed on the way and must match.
pub fn restore(
    repo: &Repo<'_>,
    point: &str,
    disk: Option<&str>,
    target: &Target,
    progress: &Progress,
) -> Result<()> {
    let m = repo.find(point)?;
    let d = pick_disk(&m, disk)?;
    let img = chain::open_chain(&chain_paths(repo, d)?)?;
    let mut h = chain::ContentHasher::new(m.hash);
    progress.start(&format!("restore {}", d.name), d.size);
    match target {
        Target::Raw(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| Error::io(e, format!("creating {}", p.display())))?;
            f.set_len(d.size)
                .map_err(|e| Error::io(e, format!("sizing {}", p.display())))?;
            use std::os::unix::fs::FileExt;
            chain::read_all(&img, |off, b| {
                h.update(b);
                if !b.iter().all(|&x| x == 0) {
                    f.write_all_at(b, off)
                        .map_err(|e| Error::io(e, format!("writing {}", p.display())))?;
                }
                progress.add(b.len() as u64);
                Ok(())
            })?;
            f.sync_all()
                .map_err(|e| Error::io(e, format!("syncing {}", p.display())))?;
        }
        Target::Qcow2(p) => {
            let out = chain::create(p, d.size, None, chain::Durability::Flushes)?;
            chain::read_all(&img, |off, b| {
                h.update(b);
                if !b.iter().all(|&x| x == 0) {
                    out.write_at(b, off)?;
                }
                progress.add(b.len() as u64);
                Ok(())
            })?;
            out.flush()?;
            out.close()?;
        }
        Target::Nbd(sock, name) => {
            // A live disk is overwritten: every file of the chain must be the recorded one
            // before the first byte is written (a file target is new, so it is checked after).
            for f in &d.chain {
                check_checksum(repo, f).ctx(|| {
                    format!(
                        "checking {} of backup {} before writing onto a live node (nothing written)",
                        d.name, m.id
                    )
                })?;
            }
            let mut c = NbdClient::connect(sock, name, &[])?;
            if c.size != d.size {
                return Err(Error::new(
                    Kind::Usage,
                    format!("NBD export is {} bytes, the disk {}", c.size, d.size),
                ));
            }
            chain::read_all(&img, |off, b| {
                h.update(b);
                if b.iter().all(|&x| x == 0) {
                    c.write_zeroes(off, b.len() as u32)?;
                } else {
                    c.write(off, b)?;
                }
                progress.add(b.len() as u64);
                Ok(())
            })?;
            c.flush()?;
            c.disconnect();
        }
    }
    progress.finish();
    if h.finish().0 != d.content_digest {
        return Err(Error::new(
            Kind::Verify,
            "restored content does not match the recorded checksum",
        ));
    }
    progress.event(
        "restored",
        &format!("restored {} {} (checksum ok)", m.id, d.name),
        json!({"id": m.id}),
    );
    Ok(())
}

/// `mount`: serve the point read-only over NBD through our own daemon until interrupted.
pub fn mount(
    repo: &Repo<'_>,
    point: &str,
    disk: Option<&str>,
    socket: &Path,
    work: &Path,
    stop: &dyn Fn() -> bool,
    progress: &Progress,
) -> Result<()> {
    let m = repo.find(point)?;
    let d = pick_disk(&m, disk)?;
    let top = repo
        .store
        .local_path(&d.file().map(|f| f.name.clone()).unwrap_or_default())?;
    let file = json!({"driver": "file", "node-name": "bbfile", "filename": top.to_string_lossy(), "read-only": true});
    let node =
        json!({"driver": "qcow2", "node-name": "bbmount", "file": "bbfile", "read-only": true});
    // A stale socket is replaced; anything else at that path is the user's and stays.
    match std::fs::symlink_metadata(socket) {
        Ok(md) if md.file_type().is_socket() => {
            let _ = std::fs::remove_file(socket);
        }
        Ok(_) => {
            return Err(Error::new(
                Kind::Usage,
                format!("{} exists and is not a socket", socket.display()),
            ))
        }
        Err(_) => {}
    }
    let extra = vec![
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", socket.display()),
        "--export".to_string(),
        format!("type=nbd,id=bbmount,node-name=bbmount,name={}", d.name),
    ];
    let (mut daemon, mut q) = Daemon::start(work, &[file, node], &extra)?;
    let uri = format!("nbd+unix:///{}?socket={}", d.name, socket.display());
    progress.event(
        "mounted",
        &format!("serving {} {} read-only at {uri}", m.id, d.name),
        json!({"uri": uri}),
    );
    daemon.wait_until(stop)?;
    daemon.quit(Some(&mut q))
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

/// `prune --keep N`: drop all but the newest N backups; per disk, merge the files below the
/// oldest kept point into the base (`qemu-img commit` + unsafe rebase of the children, which is
/// exact because the base then holds that point), so every kept chain stays valid at every step.
pub fn prune(repo: &Repo<'_>, keep: usize, progress: &Progress) -> Result<()> {
    if keep == 0 {
        return Err(Error::new(Kind::Usage, "--keep must be at least 1"));
    }
    let _lock = Lock::take(repo)?;
    let all = repo.backups()?;
    if all.len() <= keep {
        progress.event("prune", "nothing to prune", json!({}));
        return Ok(());
    }
    let (old, kept) = all.split_at(all.len() - keep);
    let mut kept: Vec<Manifest> = kept.to_vec();
    // 1. The pruned points disappear first (their files still back the kept ones).
    for m in old {
        repo.store.remove(&repo.manifest_name(&m.id))?;
        for d in &m.disks {
            if let Some(s) = &d.sums {
                repo.store.remove(s)?;
            }
        }
        progress.event(
            "prune",
            &format!("removed backup {}", m.id),
            json!({"id": m.id}),
        );
    }
    // 2. Merge per disk while the base's only kept child is the next file of the oldest kept chain.
    let mut changed: std::collections::HashSet<String> = Default::default();
    let disks: Vec<String> = kept
        .iter()
        .flat_map(|m| m.disks.iter().map(|d| d.name.clone()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for disk in disks.into_iter().filter(|d| seen.insert(d.clone())) {
        while let Some(oldest) = kept.iter().find_map(|m| m.disk(&disk)) {
            if oldest.chain.len() < 2 {
                break;
            }
            let base = oldest.chain[0].name.clone();
            let child = oldest.chain[1].name.clone();
            let kept_chains: Vec<&DiskRecord> = kept.iter().filter_map(|m| m.disk(&disk)).collect();
            let only_child = kept_chains
                .iter()
                .all(|d| d.chain.len() < 2 || d.chain[0].name != base || d.chain[1].name == child);
            if !only_child {
                break;
            }
            // Children of `child` in any kept chain must be rebased onto the base afterwards.
            let grandchildren: Vec<String> = kept_chains
                .iter()
                .filter(|d| d.chain.len() > 2 && d.chain[1].name == child)
                .map(|d| d.chain[2].name.clone())
                .collect();
            let base_p = repo.store.local_path(&base)?;
            let child_p = repo.store.local_path(&child)?;
            qemu_img(&["commit", "-q", "-d", &child_p.to_string_lossy()])?;
            let base_file = base_p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for g in grandchildren
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
            {
                let gp = repo.store.local_path(g)?;
                qemu_img(&[
                    "rebase",
                    "-u",
                    "-F",
                    "qcow2",
                    "-b",
                    &base_file,
                    &gp.to_string_lossy(),
                ])?;
                changed.insert(g.clone());
            }
            changed.insert(base.clone());
            for m in kept.iter_mut() {
                for d in m.disks.iter_mut().filter(|d| d.name == disk) {
                    if d.chain.len() >= 2 && d.chain[1].name == child {
                        d.chain.remove(1);
                    }
                }
            }
            progress.event(
                "prune",
                &format!("merged {child} into {base}"),
                json!({"merged": child, "into": base}),
            );
        }
    }
    // 3. New checksums of changed files, manifests rewritten, unreferenced files removed.
    // A changed file is checksummed anew in the format new backups use.
    let algo = filesum::FileHash::NEW;
    let mut sums = std::collections::HashMap::new();
    for m in kept.iter_mut() {
        for d in m.disks.iter_mut() {
            for f in d.chain.iter_mut().filter(|f| changed.contains(&f.name)) {
                let key = f.name.clone();
                if !sums.contains_key(&key) {
                    let sum = filesum::file_checksum(&repo.store.local_path(&f.name)?, algo)?;
                    sums.insert(key.clone(), sum);
                }
                if let Some((sum, len)) = sums.get(&key) {
                    f.checksum = sum.clone();
                    f.size = *len;
                    f.hash = algo;
                }
            }
        }
        // Written in the current format (the algorithm named), whatever version it was read as.
        m.version = crate::manifest::MANIFEST_VERSION;
        repo.write_manifest(m)?;
    }
    for f in repo.orphans()? {
        repo.store.remove(&f)?;
    }
    Ok(())
}
