//! qcow2 chain files through our own format library (crates/qcow2): create an incremental
//! backed by its parent, write extents, open a whole chain to read a point in time, hash.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{CreateOptions, FileStorage, ImageStorage, OpenOptions, Qcow2};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Cluster size of the chain files (matches the default bitmap granularity).
pub const CLUSTER: u64 = 64 << 10;

/// Create an empty qcow2 at `path` of `size` bytes, backed by `backing` (a file name in the
/// same folder, recorded relative so the repository can move) and open it for writing with
/// that backing attached (partial clusters copy from it).
pub fn create(path: &Path, size: u64, backing: Option<&Path>) -> Result<Arc<Qcow2>> {
    let st = FileStorage::create(path)
        .map_err(|e| Error::io(e, format!("creating {}", path.display())))?;
    let rel = backing.map(|b| {
        b.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let opts = CreateOptions {
        size,
        cluster_size: CLUSTER,
        backing_file: rel.clone(),
        backing_fmt: rel.as_ref().map(|_| "qcow2".to_string()),
        ..CreateOptions::default()
    };
    Qcow2::create(&st, &opts)?;
    let img = Qcow2::open(Arc::new(st), OpenOptions::default())?;
    if let Some(b) = backing {
        let parent = open_image(b, None)?;
        img.set_backing(Some(Arc::new(ImageStorage(parent))));
    }
    Ok(Arc::new(img))
}

/// Open one image read-only with an optional (already opened) backing image.
fn open_image(path: &Path, backing: Option<Arc<Qcow2>>) -> Result<Arc<Qcow2>> {
    let st = FileStorage::open(path, false)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let img = Qcow2::open(Arc::new(st), OpenOptions { read_only: true })
        .map_err(|e| Error::from(e).context(format!("opening {}", path.display())))?;
    if let Some(b) = backing {
        img.set_backing(Some(Arc::new(ImageStorage(b))));
    }
    Ok(Arc::new(img))
}

/// Open a chain (base first) read-only; the returned image reads the last point.
pub fn open_chain(files: &[PathBuf]) -> Result<Arc<Qcow2>> {
    let mut top: Option<Arc<Qcow2>> = None;
    for f in files {
        top = Some(open_image(f, top.take())?);
    }
    top.ok_or_else(|| Error::new(crate::error::Kind::Repository, "empty chain"))
}

/// Read the whole guest view of `img` in order, calling `f` with each piece.
pub fn read_all(img: &Qcow2, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], off)?;
        f(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// SHA-256 of the guest view (what a raw restore of the point hashes to).
pub fn content_sha256(img: &Qcow2) -> Result<String> {
    let mut h = Sha256::new();
    read_all(img, |_, b| {
        h.update(b);
        Ok(())
    })?;
    Ok(hex(&h.finalize()))
}

/// SHA-256 and length of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&h.finalize()), total))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
