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
//!
//! The previous sums are used only if their digest is the previous point's recorded content
//! digest: a damaged object would otherwise give its wrong hashes to every chunk the new file
//! does not hold, and to every later point. Sums that do not match are not used (the point is
//! hashed whole through its chain) and the caller says so ([`Staged::rejected`]).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::chain::{self, HashAlgo};
use crate::error::{Error, Result};
use crate::store::Store;

/// The previous point's sums object and what they must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevSums {
    /// The object's name.
    pub name: String,
    /// The previous point's recorded content digest (hex, [`chain::digest`] of its sums).
    pub digest: String,
    /// The algorithm of that digest and of the sums.
    pub algo: HashAlgo,
}

/// One disk's sums object, prepared.
pub struct Staged {
    /// The object's name.
    name: String,
    /// The previous point's `n` sums, if they could be read (else the point is hashed whole).
    pub prev: Option<Vec<[u8; 32]>>,
    /// The object's file, holding `n * 32` bytes already (None: preparing it failed, so it is
    /// written from scratch at the end).
    file: Option<File>,
    /// Why the previous point's sums were not used although its manifest names them (missing,
    /// another length, or their digest is not the recorded one): for a warning.
    pub rejected: Option<String>,
}

/// Prepare object `name` for `n` sums: read `prev` (exactly `n * 32` bytes whose digest is
/// the recorded one, else it is not used) and write it (or zeros) as the new object's
/// content. Never fails: a step that fails is done at the end instead.
pub fn stage(store: &dyn Store, name: &str, prev: Option<&PrevSums>, n: usize) -> Staged {
    let mut sums = vec![[0u8; 32]; n];
    let mut rejected = None;
    let ok = match prev {
        None => false,
        Some(p) => match check(store, p, &mut sums) {
            Ok(()) => true,
            Err(why) => {
                rejected = Some(format!(
                    "previous sums {} not used ({why}): the point is hashed through its chain",
                    p.name
                ));
                sums.fill([0u8; 32]);
                false
            }
        },
    };
    let file = store.local_path(name).ok().and_then(|path| {
        let f = File::create(path).ok()?;
        f.write_all_at(sums.as_flattened(), 0).ok()?;
        Some(f)
    });
    Staged {
        name: name.to_string(),
        prev: ok.then_some(sums),
        file,
        rejected,
    }
}

/// Read `p` into `sums` (its length must be `sums`' exactly) and check it hashes to its
/// recorded digest; else why not.
fn check(
    store: &dyn Store,
    p: &PrevSums,
    sums: &mut [[u8; 32]],
) -> std::result::Result<(), String> {
    match store.get_exact(&p.name, sums.as_flattened_mut()) {
        Ok(true) => {}
        Ok(false) => return Err("its length is not the disk's".into()),
        Err(e) => return Err(format!("unreadable: {e}")),
    }
    if chain::digest(p.algo, sums) != p.digest {
        return Err("damaged: its digest is not the recorded content digest".into());
    }
    Ok(())
}

/// Check the sums object `name` of a point of `size` bytes against the point's recorded
/// content `digest` (for `verify`): it must exist, hold one hash per chunk, and hash to it.
pub fn verify(
    store: &dyn Store,
    name: &str,
    size: u64,
    algo: HashAlgo,
    digest: &str,
) -> Result<()> {
    use crate::error::Kind;
    let n = size.div_ceil(chain::HASH_CHUNK) as usize;
    if !store.exists(name) {
        return Err(Error::new(
            Kind::Verify,
            format!("{name}: chunk-sums object missing"),
        ));
    }
    let mut sums = vec![[0u8; 32]; n];
    if !store.get_exact(name, sums.as_flattened_mut())? {
        return Err(Error::new(
            Kind::Verify,
            format!("{name}: chunk-sums object has the wrong length (damaged)"),
        ));
    }
    if chain::digest(algo, &sums) != digest {
        return Err(Error::new(
            Kind::Verify,
            format!("{name}: chunk-sums mismatch (does not hash to the recorded content digest; damaged)"),
        ));
    }
    Ok(())
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

    fn prev(name: &str, sums: &[[u8; 32]]) -> PrevSums {
        PrevSums {
            name: name.into(),
            digest: chain::digest(HashAlgo::NEW, sums),
            algo: HashAlgo::NEW,
        }
    }

    #[test]
    fn staged_sums_end_as_exactly_the_final_ones() {
        let dir = std::env::temp_dir().join(format!("bb-sums-{}", std::process::id()));
        let s = DirStore::open(&dir).unwrap();
        let prev_sums: Vec<[u8; 32]> = (0..100u8).map(|i| [i; 32]).collect();
        s.put("m/sums/d/a.bin", prev_sums.as_flattened()).unwrap();
        let a = prev("m/sums/d/a.bin", &prev_sums);
        // The previous sums are read, and the object already holds them.
        let st = stage(&s, "m/sums/d/b.bin", Some(&a), 100);
        assert_eq!(st.prev.as_deref(), Some(&prev_sums[..]));
        assert!(st.rejected.is_none());
        assert_eq!(s.get("m/sums/d/b.bin").unwrap(), prev_sums.as_flattened());
        let mut new = prev_sums.clone();
        new[7] = [0xee; 32];
        st.finish(&s, &new).unwrap();
        assert_eq!(s.get("m/sums/d/b.bin").unwrap(), new.as_flattened());
        // Sums of another length (another disk size) are not used; a missing object neither.
        let st = stage(&s, "m/sums/d/c.bin", Some(&a), 99);
        assert!(st.prev.is_none() && st.rejected.is_some());
        st.finish(&s, &new[..99]).unwrap();
        assert_eq!(s.get("m/sums/d/c.bin").unwrap(), new[..99].as_flattened());
        let x = PrevSums {
            name: "m/sums/d/x.bin".into(),
            ..a.clone()
        };
        let st = stage(&s, "m/sums/d/e.bin", Some(&x), 100);
        assert!(st.prev.is_none() && st.rejected.is_some());
        // No previous point: nothing to reject.
        let st = stage(&s, "m/sums/d/g.bin", None, 100);
        assert!(st.prev.is_none() && st.rejected.is_none());
        // A shorter final list than the staged bytes leaves no stale tail.
        let st = stage(&s, "m/sums/d/f.bin", Some(&a), 100);
        st.finish(&s, &new[..10]).unwrap();
        assert_eq!(s.get("m/sums/d/f.bin").unwrap(), new[..10].as_flattened());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_previous_sums_are_not_used_and_verify_names_them() {
        let dir = std::env::temp_dir().join(format!("bb-sums-bad-{}", std::process::id()));
        let s = DirStore::open(&dir).unwrap();
        let n = 5;
        let size = n as u64 * chain::HASH_CHUNK - 100;
        let good: Vec<[u8; 32]> = (0..n as u8).map(|i| [i + 1; 32]).collect();
        let a = prev("m/sums/d/a.bin", &good);
        s.put(&a.name, good.as_flattened()).unwrap();
        assert!(verify(&s, &a.name, size, HashAlgo::NEW, &a.digest).is_ok());
        // One flipped bit anywhere: not used, the reason given, and verify fails (exit 7).
        for at in [0, 31, 32 * 3 + 7, 32 * n - 1] {
            let mut bad = good.as_flattened().to_vec();
            bad[at] ^= 0x04;
            s.put(&a.name, &bad).unwrap();
            let st = stage(&s, "m/sums/d/b.bin", Some(&a), n);
            assert!(st.prev.is_none(), "byte {at}");
            let why = st.rejected.as_deref().unwrap();
            assert!(
                why.contains("m/sums/d/a.bin") && why.contains("damaged"),
                "{why}"
            );
            // The new object does not start from the damaged bytes.
            assert_eq!(s.get("m/sums/d/b.bin").unwrap(), vec![0u8; 32 * n]);
            let e = verify(&s, &a.name, size, HashAlgo::NEW, &a.digest).unwrap_err();
            assert_eq!(e.kind.exit_code(), 7);
            assert!(e.to_string().contains("chunk-sums mismatch"), "{e}");
        }
        // Another algorithm's digest of the same sums is not theirs.
        s.put(&a.name, good.as_flattened()).unwrap();
        let sha = PrevSums {
            algo: HashAlgo::Sha256,
            ..a.clone()
        };
        assert!(stage(&s, "m/sums/d/b.bin", Some(&sha), n).prev.is_none());
        // Truncated or missing: verify says which.
        s.put(&a.name, &good.as_flattened()[..32 * (n - 1)])
            .unwrap();
        let e = verify(&s, &a.name, size, HashAlgo::NEW, &a.digest).unwrap_err();
        assert!(e.to_string().contains("wrong length"), "{e}");
        s.remove(&a.name).unwrap();
        let e = verify(&s, &a.name, size, HashAlgo::NEW, &a.digest).unwrap_err();
        assert!(
            e.to_string().contains("missing") && e.kind.exit_code() == 7,
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
