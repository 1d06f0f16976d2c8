//! The repository's storage: named objects behind a small interface, so an object-store
//! backend can replace the directory one. Names are `/`-separated relative paths
//! (`vm1/backups/ID.json`, `vm1/disks/d0/ID.qcow2`).
//!
//! Small objects (manifests) go through [`Store::put`]/[`Store::get`]. Disk images are large
//! and written in place by the qcow2 writer, so a backend also says where an object lives (or
//! is staged) on the local file system ([`Store::local_path`]) and makes it durable
//! ([`Store::commit_object`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};

/// Named objects with atomic small writes.
pub trait Store: Send + Sync {
    /// Write `data` as object `name`, atomically: readers see the old object or the new one.
    fn put(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Read object `name`.
    fn get(&self, name: &str) -> Result<Vec<u8>>;
    /// Read object `name` into `buf` if it is exactly `buf.len()` bytes long (`false`: it has
    /// another length, nothing was read). Large objects of a known size are read straight into
    /// their final place, with no copy and no allocation sized by the object.
    fn get_exact(&self, name: &str, buf: &mut [u8]) -> Result<bool> {
        let data = self.get(name)?;
        if data.len() != buf.len() {
            return Ok(false);
        }
        buf.copy_from_slice(&data);
        Ok(true)
    }
    /// Names of the objects whose name starts with `prefix` (a folder ending in `/`), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Rename an object atomically (replacing `to`). Part of the interface an object-store
    /// backend implements; the directory backend's own `put` renames internally.
    #[allow(dead_code)]
    fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Remove an object; removing a missing object is not an error.
    fn remove(&self, name: &str) -> Result<()>;
    /// Whether `name` exists.
    fn exists(&self, name: &str) -> bool;
    /// Where object `name` can be read and written as a local file (parents created).
    fn local_path(&self, name: &str) -> Result<PathBuf>;
    /// Make a large object written through [`Store::local_path`] durable.
    fn commit_object(&self, name: &str) -> Result<()>;
}

/// A directory on the local file system.
#[derive(Debug, Clone)]
pub struct DirStore {
    /// The repository's root directory.
    root: PathBuf,
}

/// Reject names that could leave the root.
fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Error::new(
            Kind::Repository,
            format!("invalid object name '{name}'"),
        ));
    }
    Ok(())
}

/// fsync a directory so a rename or create in it is durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(e, format!("syncing directory {}", dir.display())))
}

impl DirStore {
    /// Open (creating if needed) a repository directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<DirStore> {
        let root = root.into();
        fs::create_dir_all(&root)
            .map_err(|e| Error::io(e, format!("creating repository {}", root.display())))?;
        Ok(DirStore { root })
    }

    /// The full path of an object.
    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    /// Create the parent directory of `p`.
    fn parent_dir(p: &Path) -> Result<PathBuf> {
        let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(&parent)
            .map_err(|e| Error::io(e, format!("creating {}", parent.display())))?;
        Ok(parent)
    }

    /// Collect file names under `dir` (relative to the root) into `out`.
    fn walk(&self, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(e, format!("listing {}", dir.display()))),
        };
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(e, format!("listing {}", dir.display())))?;
            let p = ent.path();
            if p.is_dir() {
                self.walk(&p, out)?;
            } else if let Ok(rel) = p.strip_prefix(&self.root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
}

impl Store for DirStore {
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        let p = self.path(name)?;
        let parent = Self::parent_dir(&p)?;
        let tmp = p.with_extension(format!("tmp-{}", std::process::id()));
        let res = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &p)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(e, format!("writing {}", p.display())));
        }
        sync_dir(&parent)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let p = self.path(name)?;
        fs::read(&p).map_err(|e| Error::io(e, format!("reading {}", p.display())))
    }

    fn get_exact(&self, name: &str, buf: &mut [u8]) -> Result<bool> {
        use std::io::Read;
        let p = self.path(name)?;
        (|| -> std::io::Result<bool> {
            let mut f = fs::File::open(&p)?;
            if f.metadata()?.len() != buf.len() as u64 {
                return Ok(false);
            }
            f.read_exact(buf)?;
            Ok(true)
        })()
        .map_err(|e| Error::io(e, format!("reading {}", p.display())))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix.trim_end_matches('/'))?
        };
        let mut out = Vec::new();
        self.walk(&dir, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (a, b) = (self.path(from)?, self.path(to)?);
        let parent = Self::parent_dir(&b)?;
        fs::rename(&a, &b)
            .map_err(|e| Error::io(e, format!("renaming {} to {}", a.display(), b.display())))?;
        sync_dir(&parent)
    }

    fn remove(&self, name: &str) -> Result<()> {
        let p = self.path(name)?;
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(e, format!("removing {}", p.display()))),
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.path(name).map(|p| p.exists()).unwrap_or(false)
    }

    fn local_path(&self, name: &str) -> Result<PathBuf> {
        let p = self.path(name)?;
        Self::parent_dir(&p)?;
        Ok(p)
    }

    fn commit_object(&self, name: &str) -> Result<()> {
        let p = self.path(name)?;
        File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(e, format!("syncing {}", p.display())))?;
        sync_dir(p.parent().unwrap_or(Path::new(".")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_rename_remove_round_trip() {
        let dir = std::env::temp_dir().join(format!("bb-store-{}", std::process::id()));
        let s = DirStore::open(&dir).unwrap();
        s.put("m/a.json", b"1").unwrap();
        s.put("m/sub/b.json", b"2").unwrap();
        assert_eq!(s.get("m/a.json").unwrap(), b"1");
        assert_eq!(s.list("m/").unwrap(), vec!["m/a.json", "m/sub/b.json"]);
        s.rename("m/a.json", "m/c.json").unwrap();
        assert!(!s.exists("m/a.json") && s.exists("m/c.json"));
        s.remove("m/c.json").unwrap();
        s.remove("m/c.json").unwrap();
        assert_eq!(s.list("m/").unwrap(), vec!["m/sub/b.json"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_leaving_the_root_are_refused() {
        let s = DirStore::open(std::env::temp_dir()).unwrap();
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
            assert!(s.put(bad, b"x").is_err(), "{bad}");
        }
    }
}
