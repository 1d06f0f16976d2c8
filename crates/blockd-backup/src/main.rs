//! `blockd-backup`: incremental backups, restores and verification of disks served by blockd,
//! qemu-storage-daemon or QEMU, over QMP and NBD.
//!
//! # Layout
//! - [`store`]: the repository's storage interface (named objects) and its directory backend.
//! - [`manifest`]: the repository layout on top of it: manifests, chains, ids, the lock.
//! - [`qmp`], [`nbd`]: small synchronous clients.
//! - [`chain`]: qcow2 chain files through crates/qcow2 (create, write, open a point, hash).
//! - [`filesum`]: file checksums; [`blocksum`]: a new file and its point hashed in one pass;
//!   [`sums`]: a point's chunk-sums object, prepared while the daemon copies.
//! - [`fleece`]: the daemon side (cleanup, transaction, fleecing, exports, push jobs).
//! - [`backup`]: one backup run; [`copy`]: the multi-connection copy loop.
//! - [`ops`]: list, verify, restore, mount; [`prune`]: crash-safe prune; [`daemon`]: starting our own daemon.
//! - [`progress`]: bars and JSON lines.

mod backup;
mod blocksum;
mod chain;
mod copy;
mod daemon;
mod error;
mod filesum;
mod fleece;
mod follow;
mod manifest;
mod nbd;
mod ops;
mod plan;
mod progress;
mod prune;
mod qmp;
mod store;
mod sums;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backup::Want;
use crate::error::{Error, Kind, Result};
use crate::manifest::Repo;
use crate::progress::Progress;
use crate::store::DirStore;

/// Backups of blockd / qemu-storage-daemon / QEMU disks: full, incremental, differential,
/// with verification, restore, instant mount and pruning.
#[derive(Parser, Debug)]
#[command(
    name = "blockd-backup",
    version,
    after_help = "Exit codes: 0 ok, 1 other error, 2 usage, \
3 repository, 4 daemon (QMP), 5 NBD, 6 local I/O (e.g. repository disk full), 7 verification failed, \
130 interrupted."
)]
struct Cli {
    /// The repository directory.
    #[arg(long, global = true)]
    repo: Option<PathBuf>,
    /// The machine's name in the repository (default: the image's name, else "default").
    #[arg(long, global = true)]
    machine: Option<String>,
    /// Print JSON lines (progress and events) on stdout instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the disks are and how to take them.
#[derive(Args, Debug, Clone)]
struct Source {
    /// QMP socket of a running blockd, qemu-storage-daemon or QEMU.
    #[arg(long, conflicts_with = "image")]
    qmp: Option<PathBuf>,
    /// A stopped disk: an image file; blockd is started on it (its persistent bitmaps are used).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Node (or device) to back up; repeat for several disks (taken at one instant).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Push mode: the daemon writes into the repository with blockdev-backup.
    #[arg(long)]
    push: bool,
    /// Nothing writes to the disks during the backup: no fleecing, no transaction needed.
    #[arg(long)]
    offline: bool,
    /// Most NBD connections per disk (one per 64 MiB to copy, up to this many).
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Socket of an NBD server the daemon already runs (else the tool starts one).
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Only print how many bytes the backup would read (from the bitmaps' counts).
    #[arg(long)]
    estimate: bool,
}

/// Format of a restored file.
#[derive(ValueEnum, Debug, Clone, Copy)]
enum Format {
    /// Raw (sparse).
    Raw,
    /// Standalone qcow2.
    Qcow2,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Full backup of every disk.
    Full(Source),
    /// Incremental backup (changes since the previous backup); fails if a disk cannot.
    Inc(Source),
    /// Differential backup (changes since the last full); fails if a disk cannot.
    Diff(Source),
    /// Incremental where the chain and bitmap are usable, else a full of that disk (reason printed).
    Auto(Source),
    /// List the backups of the machine.
    List,
    /// Check checksums and chunk sums, run qemu-img check, and restore the point hashed against
    /// its checksum.
    Verify {
        /// The point: an id (or prefix), "latest", or -N.
        #[arg(long = "at", default_value = "latest")]
        at: String,
    },
    /// Restore a point to a raw or qcow2 file, or onto a live node over NBD.
    Restore {
        /// The point: an id (or prefix), "latest", or -N.
        #[arg(long = "at", default_value = "latest")]
        at: String,
        /// The disk (needed when the backup has several).
        #[arg(long)]
        disk: Option<String>,
        /// Output file.
        #[arg(long, required_unless_present = "nbd_socket")]
        to: Option<PathBuf>,
        /// Output format for --to.
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
        /// Restore onto a live export (its chain's checksums are checked before anything is
        /// written): the NBD server's socket ...
        #[arg(long, requires = "export")]
        nbd_socket: Option<PathBuf>,
        /// ... and the export name.
        #[arg(long)]
        export: Option<String>,
    },
    /// Serve a point read-only over NBD through blockd until interrupted (instant restore).
    Mount {
        /// The point: an id (or prefix), "latest", or -N.
        #[arg(long = "at", default_value = "latest")]
        at: String,
        /// The disk (needed when the backup has several).
        #[arg(long)]
        disk: Option<String>,
        /// NBD socket to serve on.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Keep the newest N backups, merging older incrementals into the base.
    Prune {
        /// How many backups to keep.
        #[arg(long)]
        keep: usize,
    },
}

/// Set by SIGINT/SIGTERM while `mount` serves.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Disks to back up when none were named: the devices' nodes (`query-block`).
fn default_disks(q: &mut qmp::Qmp) -> Result<Vec<String>> {
    let v = q.execute("query-block", serde_json::json!({}))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["inserted"]["node-name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// The repository root as an absolute path: paths under it go to the daemon, which resolves
/// a relative one against its own working directory.
fn repo_root(cli: &Cli) -> Result<PathBuf> {
    let root = cli
        .repo
        .clone()
        .ok_or_else(|| Error::new(Kind::Usage, "--repo is required"))?;
    std::path::absolute(&root).map_err(|e| {
        Error::io(
            e,
            format!("resolving the repository path {}", root.display()),
        )
    })
}

/// A backup command.
fn run_backup(cli: &Cli, src: &Source, want: Want, progress: &Progress) -> Result<()> {
    let root = repo_root(cli)?;
    let machine = cli
        .machine
        .clone()
        .or_else(|| src.image.as_ref().map(|i| daemon::disk_name_for(i)))
        .unwrap_or_else(|| "default".into());
    let store = DirStore::open(&root)?;
    let repo = Repo::new(&store, &machine)?;
    let work_dir = backup::default_work_dir(&root, &machine);
    let mut opts = backup::Options {
        want,
        disks: src.disks.clone(),
        push: src.push,
        live: !src.offline,
        connections: src.connections,
        nbd_socket: src.nbd_socket.clone(),
        estimate: src.estimate,
        work_dir: work_dir.clone(),
        tag: backup::repo_tag(&root, &machine),
    };
    if let Some(image) = &src.image {
        let name = src
            .disks
            .first()
            .cloned()
            .unwrap_or_else(|| daemon::disk_name_for(image));
        opts.disks = vec![name.clone()];
        opts.live = false;
        for what in daemon::Daemon::reap_leftovers(&work_dir) {
            progress.event(
                "cleanup",
                &format!("quit leftover {what}"),
                serde_json::json!({"what": what}),
            );
        }
        let (d, mut q) = daemon::Daemon::on_image(&work_dir, image, &name, false)?;
        let res = backup::run(&mut q, &repo, &opts, progress);
        let quit = d.quit(Some(&mut q));
        res?;
        return quit;
    }
    let sock = src.qmp.clone().ok_or_else(|| {
        Error::new(
            Kind::Usage,
            "give --qmp SOCKET (running disks) or --image FILE (stopped disk)",
        )
    })?;
    let mut q = qmp::Qmp::connect(&sock, Duration::from_secs(5))?;
    if opts.disks.is_empty() {
        opts.disks = default_disks(&mut q)?;
    }
    backup::run(&mut q, &repo, &opts, progress)?;
    Ok(())
}

/// Run the command line.
fn run(cli: &Cli) -> Result<()> {
    let progress = Progress::new(cli.json);
    let want = match &cli.cmd {
        Cmd::Full(s) => Some((s, Want::Full)),
        Cmd::Inc(s) => Some((s, Want::Inc)),
        Cmd::Diff(s) => Some((s, Want::Diff)),
        Cmd::Auto(s) => Some((s, Want::Auto)),
        _ => None,
    };
    if let Some((src, want)) = want {
        return run_backup(cli, src, want, &progress);
    }
    let root = repo_root(cli)?;
    let machine = cli.machine.clone().unwrap_or_else(|| "default".into());
    let store = DirStore::open(&root)?;
    let repo = Repo::new(&store, &machine)?;
    match &cli.cmd {
        Cmd::List => ops::list(&repo, cli.json),
        Cmd::Verify { at } => ops::verify(&repo, at, &progress),
        Cmd::Restore {
            at,
            disk,
            to,
            format,
            nbd_socket,
            export,
        } => {
            let target = match (to, nbd_socket, export) {
                (Some(p), _, _) => match format {
                    Format::Raw => ops::Target::Raw(p.clone()),
                    Format::Qcow2 => ops::Target::Qcow2(p.clone()),
                },
                (None, Some(s), Some(e)) => ops::Target::Nbd(s.clone(), e.clone()),
                _ => {
                    return Err(Error::new(
                        Kind::Usage,
                        "give --to FILE or --nbd-socket S --export E",
                    ))
                }
            };
            ops::restore(&repo, at, disk.as_deref(), &target, &progress)
        }
        Cmd::Mount { at, disk, socket } => {
            // SAFETY: the handler only stores to an atomic.
            unsafe {
                libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            }
            let work = backup::default_work_dir(&root, &machine);
            ops::mount(
                &repo,
                at,
                disk.as_deref(),
                socket,
                &work,
                &|| STOP.load(Ordering::SeqCst),
                &progress,
            )
        }
        Cmd::Prune { keep } => prune::prune(&repo, *keep, &progress),
        _ => Ok(()),
    }
}

fn main() {
    backup::mark("start");
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        if cli.json {
            println!(
                "{}",
                serde_json::json!({"event": "error", "message": e.to_string(), "exit": e.kind.exit_code()})
            );
        }
        eprintln!("blockd-backup: {e}");
        std::process::exit(e.kind.exit_code());
    }
    backup::mark("end");
}
