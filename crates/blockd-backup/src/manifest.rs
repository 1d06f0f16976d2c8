//! The repository's layout on top of a [`Store`]: one folder per machine, a manifest per
//! backup, a chain of qcow2 files per disk.
//!
//! ```text
//! MACHINE/backups/ID.json          manifest (written last, atomically: the backup exists iff it does)
//! MACHINE/disks/DISK/ID.qcow2      the file this backup added to DISK's chain (backed by its parent)
//! MACHINE/lock                     held by a running backup/prune (pid inside)
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Kind, Result};
use crate::store::Store;

/// Manifest format version: 3 records new files' checksums as BLAKE3 block lists (file `hash`
/// `"blake3-blocks"`, see [`crate::filesum::FileHash`]); 2 named its checksums' algorithm
/// (`hash`, flat BLAKE3 of files); version 1 was SHA-256 throughout, in fields `sha256` /
/// `content_sha256`. All are read; a file keeps the format it was recorded with.
pub const MANIFEST_VERSION: u32 = 3;

/// How one disk was backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    /// Everything; the file has no backing.
    Full,
    /// Changes since the previous backup; backed by its file.
    Inc,
    /// Changes since the last full; backed by the full's file.
    Diff,
}

impl DiskKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskKind::Full => "full",
            DiskKind::Inc => "inc",
            DiskKind::Diff => "diff",
        }
    }
}

/// One file of a chain with its content checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Object name in the store.
    pub name: String,
    /// Length of the file in bytes.
    pub size: u64,
    /// Checksum of the file's bytes (algorithm `hash`), hex.
    #[serde(rename = "checksum", alias = "sha256")]
    pub checksum: String,
    /// How `checksum` is computed: a file keeps the format it was recorded with, also in the
    /// manifests of later backups whose chains it is part of (absent: SHA-256, version 1).
    #[serde(default)]
    pub hash: crate::filesum::FileHash,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The disk's name in the repository (the node name or device name it was taken from).
    pub name: String,
    /// The node that was read.
    pub node: String,
    /// Full, incremental or differential.
    pub kind: DiskKind,
    /// Why a full was taken when incremental was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Virtual size of the disk in bytes.
    pub size: u64,
    /// Bytes read from the disk for this backup.
    pub copied: u64,
    /// The chain from the base (first) to this backup's file (last).
    pub chain: Vec<FileRecord>,
    /// The bitmap started at this backup's instant (records changes since it).
    pub bitmap: String,
    /// The bitmap started at the last full backup (records changes since it, for `diff`).
    pub full_bitmap: String,
    /// Content digest of the disk at this point (see `chain::ContentHasher`, the manifest's
    /// `hash`): what a restore of the point must hash to.
    #[serde(rename = "content_digest", alias = "content_sha256")]
    pub content_digest: String,
    /// Object holding the per-chunk hashes behind `content_digest` (speeds up the next backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sums: Option<String>,
}

impl DiskRecord {
    /// This backup's own file.
    pub fn file(&self) -> Option<&FileRecord> {
        self.chain.last()
    }
}

/// A backup: one instant of one or more disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// The algorithm of the content digests and chunk sums (absent in version 1: SHA-256);
    /// each file's checksum names its own.
    #[serde(default)]
    pub hash: crate::chain::HashAlgo,
    /// Backup id (sortable by time).
    pub id: String,
    /// Machine name.
    pub machine: String,
    /// Seconds since the epoch at the backup's instant.
    pub time: u64,
    /// "pull" or "push".
    pub mode: String,
    /// The disks, all from one instant.
    pub disks: Vec<DiskRecord>,
}

impl Manifest {
    /// The record of disk `name`.
    pub fn disk(&self, name: &str) -> Option<&DiskRecord> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYYMMDDTHHMMSSZ` of a time in seconds since the epoch (UTC).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A machine's part of the repository.
pub struct Repo<'a> {
    /// The store.
    pub store: &'a dyn Store,
    /// The machine's folder name.
    pub machine: String,
}

impl<'a> Repo<'a> {
    /// The machine `machine` in `store`.
    pub fn new(store: &'a dyn Store, machine: &str) -> Result<Repo<'a>> {
        let ok = !machine.is_empty()
            && machine
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !machine.starts_with('.');
        if !ok {
            return Err(Error::new(
                Kind::Usage,
                format!("invalid machine name '{machine}'"),
            ));
        }
        Ok(Repo {
            store,
            machine: machine.to_string(),
        })
    }

    /// Object name of a backup's manifest.
    pub fn manifest_name(&self, id: &str) -> String {
        format!("{}/backups/{id}.json", self.machine)
    }

    /// Object name of the chunk hashes of a disk at a backup.
    pub fn sums_name(&self, disk: &str, id: &str) -> String {
        format!("{}/sums/{disk}/{id}.bin", self.machine)
    }

    /// Object name of a disk file.
    pub fn disk_file(&self, disk: &str, id: &str) -> String {
        format!("{}/disks/{disk}/{id}.qcow2", self.machine)
    }

    /// All backups, oldest first.
    pub fn backups(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for name in self.store.list(&format!("{}/backups/", self.machine))? {
            if !name.ends_with(".json") {
                continue;
            }
            let data = self.store.get(&name)?;
            let m: Manifest = serde_json::from_slice(&data).map_err(|e| {
                Error::caused(Kind::Repository, format!("parsing manifest {name}"), e)
            })?;
            out.push(m);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The backup `point`: an id, an id prefix, `latest`, or `-N` (N backups before the latest).
    pub fn find(&self, point: &str) -> Result<Manifest> {
        let all = self.backups()?;
        let pick = if point == "latest" {
            all.last().cloned()
        } else if let Some(n) = point
            .strip_prefix('-')
            .and_then(|n| n.parse::<usize>().ok())
        {
            all.len()
                .checked_sub(n + 1)
                .and_then(|i| all.get(i).cloned())
        } else {
            let hits: Vec<_> = all.iter().filter(|m| m.id.starts_with(point)).collect();
            if hits.len() > 1 {
                return Err(Error::new(
                    Kind::Usage,
                    format!("point '{point}' is ambiguous"),
                ));
            }
            hits.first().map(|m| (*m).clone())
        };
        pick.ok_or_else(|| {
            Error::new(
                Kind::Usage,
                format!("no backup '{point}' for machine '{}'", self.machine),
            )
        })
    }

    /// Write a manifest atomically.
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let data = serde_json::to_vec_pretty(m)
            .map_err(|e| Error::caused(Kind::Repository, "serialising manifest", e))?;
        self.store.put(&self.manifest_name(&m.id), &data)
    }

    /// A fresh backup id, later than every one in `all` (this repository's [`Repo::backups`]).
    pub fn new_id(&self, now: u64, all: &[Manifest]) -> Result<String> {
        let stamp = utc_stamp(now);
        let last = all.last().map(|m| m.id.clone()).unwrap_or_default();
        for seq in 0..1000 {
            let id = format!("{stamp}-{seq:03}");
            if id > last && !self.store.exists(&self.manifest_name(&id)) {
                return Ok(id);
            }
        }
        Err(Error::new(
            Kind::Repository,
            "clock is behind the repository's latest backup",
        ))
    }

    /// Files under the machine's disks and sums folders that no manifest references.
    pub fn orphans(&self) -> Result<Vec<String>> {
        self.orphans_of(&self.backups()?)
    }

    /// Files under the machine's disks and sums folders that none of `all` references: chain
    /// files and chunk-sums objects (both written in place before their manifest) of a run
    /// that died, or of a point `prune` removed.
    pub fn orphans_of(&self, all: &[Manifest]) -> Result<Vec<String>> {
        let disks = all.iter().flat_map(|m| m.disks.iter());
        let used: std::collections::HashSet<&str> = disks
            .clone()
            .flat_map(|d| d.chain.iter())
            .map(|f| f.name.as_str())
            .chain(disks.filter_map(|d| d.sums.as_deref()))
            .collect();
        let mut files = self.store.list(&format!("{}/disks/", self.machine))?;
        files.extend(self.store.list(&format!("{}/sums/", self.machine))?);
        Ok(files
            .into_iter()
            .filter(|f| !used.contains(f.as_str()))
            .collect())
    }
}

/// An exclusive lock on a machine's folder: `flock` on its lock file, released when the file
/// closes (on drop, or by the kernel when the process dies, so a dead holder leaves nothing to
/// take over). The file stays: removing it would let a third process lock a new file while a
/// second still holds the old one. It holds the holder's pid, for the message.
pub struct Lock {
    _file: std::fs::File,
}

impl Lock {
    /// Take the lock, or fail naming the process holding it.
    pub fn take(repo: &Repo<'_>) -> Result<Lock> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = repo.store.local_path(&format!("{}/lock", repo.machine))?;
        let io = |e| Error::io(e, format!("locking {}", path.display()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io(e));
            }
            let mut s = String::new();
            let _ = f.take(32).read_to_string(&mut s);
            return Err(Error::new(
                Kind::Repository,
                format!(
                    "machine '{}' is locked by running process {}",
                    repo.machine,
                    s.trim()
                ),
            ));
        }
        f.set_len(0).map_err(io)?;
        f.rewind().map_err(io)?;
        writeln!(f, "{}", std::process::id()).map_err(io)?;
        Ok(Lock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_exclusive_and_a_dead_holders_file_is_no_obstacle() {
        let dir = std::env::temp_dir().join(format!("bb-lock-{}", std::process::id()));
        let store = crate::store::DirStore::open(&dir).unwrap();
        let repo = Repo::new(&store, "m").unwrap();
        let path = store.local_path("m/lock").unwrap();
        // A file left by a dead process (any content) is simply locked again.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "999999999\n").unwrap();
        let held = Lock::take(&repo).unwrap();
        let me = std::process::id().to_string();
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), me);
        // flock conflicts between open file descriptions, in one process too.
        let e = Lock::take(&repo).err().expect("second lock");
        assert!(e.to_string().contains(&me), "{e}");
        drop(held);
        drop(Lock::take(&repo).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn file_records_of_every_version_name_their_checksum_format() {
        use crate::filesum::FileHash;
        let rec = |json: &str| serde_json::from_str::<FileRecord>(json).unwrap();
        let v1 = rec(r#"{"name":"a","size":1,"sha256":"00"}"#);
        let v2 = rec(r#"{"name":"a","size":1,"checksum":"00","hash":"blake3"}"#);
        let v3 = rec(r#"{"name":"a","size":1,"checksum":"00","hash":"blake3-blocks"}"#);
        assert_eq!(
            (v1.hash, v2.hash, v3.hash),
            (FileHash::Sha256, FileHash::Blake3, FileHash::Blake3Blocks)
        );
        assert_eq!(FileHash::NEW, FileHash::Blake3Blocks);
        let out = serde_json::to_value(&v3).unwrap();
        assert_eq!(out["hash"], "blake3-blocks");
        assert_eq!(out["checksum"], "00");
        // An unknown format is refused, not verified as something else.
        assert!(serde_json::from_str::<FileRecord>(
            r#"{"name":"a","size":1,"checksum":"00","hash":"md5"}"#
        )
        .is_err());
    }

    #[test]
    fn utc_stamp_matches_known_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_796_280_000), "20261203T064000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    }
}
