//! Commands on the repository: list, verify, restore, mount (prune: `prune.rs`).

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::chain;
use crate::daemon::Daemon;
use crate::error::{Context, Error, Kind, Result};
use crate::filesum;
use crate::manifest::{DiskRecord, FileRecord, Manifest, Repo};
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
    if crate::prune::pending(repo) {
        eprintln!("note: {}", crate::prune::PENDING_NOTE);
    }
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
    if crate::prune::pending(repo) {
        progress.event(
            "prune",
            crate::prune::PENDING_NOTE,
            json!({"pending": true}),
        );
    }
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
    // Onto a live node: no prune may change the chain between its check and its reads (the
    // data goes onto a disk in use, not into a new file that a later check could reject).
    let _lock = match target {
        Target::Nbd(..) => {
            if crate::prune::pending(repo) {
                return Err(Error::new(
                    Kind::Repository,
                    format!(
                        "{} (refusing to write onto a live node until it is finished)",
                        crate::prune::PENDING_NOTE
                    ),
                ));
            }
            Some(crate::manifest::Lock::take(repo)?)
        }
        _ => None,
    };
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
