//! A point's chunk-sums object (the content hash of every 64 KiB of the disk, 32 bytes each:
//! 1 MiB per 2 GiB), prepared while the daemon copies and finished after the hashing pass.
//!
//! It is written like a chain file: in place at its final name (through
//! [`Store::local_path`]), made durable by [`Store::commit_object`] before the manifest names
//! it; until then it is unrecorded, and a run that dies leaves it to the next run's removal of
//! unrecorded files (`Repo::orphans_of`). Preparing it means reading the previous point's sums
//! (which an incremental keeps for the chunks it did not change) and writing them as the new
//! object's bytes, so the file's pages or blocks exist before the final write: on this
//! repository's tmpfs a fresh page costs far more than overwriting one, and the preparation
//! runs while the tool only waits for the daemon's job (push) or for NBD replies (pull).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::store::Store;

/// One disk's sums object, prepared.
pub struct Staged {
    /// The object's name.
    name: String,
    /// The previous point's `n` sums, if they could be read (else the point is hashed whole).
    pub prev: Option<Vec<[u8; 32]>>,
    /// The object's file, holding `n * 32` bytes already (None: preparing it failed, so it is
    /// written from scratch at the end).
    file: Option<File>,
}

/// Prepare object `name` for `n` sums: read `prev_name` (exactly `n * 32` bytes, else it is
/// not used) and write it (or zeros) as the new object's content. Never fails: a step that
/// fails is done at the end instead.
pub fn stage(store: &dyn Store, name: &str, prev_name: Option<&str>, n: usize) -> Staged {
    let mut sums = vec![[0u8; 32]; n];
    let prev = prev_name
        .and_then(|p| store.get_exact(p, sums.as_flattened_mut()).ok())
        .unwrap_or(false);
    let file = store.local_path(name).ok().and_then(|path| {
        let f = File::create(path).ok()?;
        f.write_all_at(sums.as_flattened(), 0).ok()?;
        Some(f)
    });
    Staged {
        name: name.to_string(),
        prev: prev.then_some(sums),
        file,
    }
}

impl Staged {
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Write the final `sums` and make the object durable.
    pub fn finish(self, store: &dyn Store, sums: &[[u8; 32]]) -> Result<()> {
        let bytes = sums.as_flattened();
        match self.file {
            Some(f) => {
                f.write_all_at(bytes, 0)
                    .and_then(|()| f.set_len(bytes.len() as u64))
                    .map_err(|e| Error::io(e, format!("writing {}", self.name)))?;
                drop(f);
                store.commit_object(&self.name)
            }
            None => store.put(&self.name, bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DirStore;

    #[test]
    fn staged_sums_end_as_exactly_the_final_ones() {
        let dir = std::env::temp_dir().join(format!("bb-sums-{}", std::process::id()));
        let s = DirStore::open(&dir).unwrap();
        let prev: Vec<[u8; 32]> = (0..100u8).map(|i| [i; 32]).collect();
        s.put("m/sums/d/a.bin", prev.as_flattened()).unwrap();
        // The previous sums are read, and the object already holds them.
        let st = stage(&s, "m/sums/d/b.bin", Some("m/sums/d/a.bin"), 100);
        assert_eq!(st.prev.as_deref(), Some(&prev[..]));
        assert_eq!(s.get("m/sums/d/b.bin").unwrap(), prev.as_flattened());
        let mut new = prev.clone();
        new[7] = [0xee; 32];
        st.finish(&s, &new).unwrap();
        assert_eq!(s.get("m/sums/d/b.bin").unwrap(), new.as_flattened());
        // Sums of another length (another disk size) are not used; a missing object neither.
        let st = stage(&s, "m/sums/d/c.bin", Some("m/sums/d/a.bin"), 99);
        assert!(st.prev.is_none());
        st.finish(&s, &new[..99]).unwrap();
        assert_eq!(s.get("m/sums/d/c.bin").unwrap(), new[..99].as_flattened());
        assert!(stage(&s, "m/sums/d/e.bin", Some("m/sums/d/x.bin"), 100)
            .prev
            .is_none());
        // A shorter final list than the staged bytes leaves no stale tail.
        let st = stage(&s, "m/sums/d/f.bin", Some("m/sums/d/a.bin"), 100);
        st.finish(&s, &new[..10]).unwrap();
        assert_eq!(s.get("m/sums/d/f.bin").unwrap(), new[..10].as_flattened());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
