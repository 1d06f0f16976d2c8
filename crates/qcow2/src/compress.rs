//! Writing compressed clusters, as QEMU's qcow2 driver does (`write -c`, backup
//! `compress: true`, `qemu-img convert -c`).
//!
//! Rules (shared/reference/qcow2-compressed.md):
//! * whole clusters only: the offset must be cluster-aligned and the length a multiple of the
//!   cluster size, except a last partial cluster ending exactly at the virtual disk end (it is
//!   zero-padded before compressing); otherwise EINVAL;
//! * a zero-length request pads the image file to a 512-byte boundary;
//! * each cluster is deflated (raw, 4 KiB window); if that does not make it smaller than a
//!   cluster it is written as a normal cluster instead;
//! * compression never overwrites: a cluster that already has a host offset (data,
//!   compressed, preallocated zero) fails with EIO; unallocated and plain zero clusters are fine;
//! * host space is handed out byte by byte, packing streams back to back in a host cluster
//!   (a stream may run into the next host cluster if that one is allocated right after it);
//!   every stream adds one reference to each host cluster it touches;
//! * unlike QEMU, the data is written before the L2 entry points at it, so a failed data write
//!   leaves the cluster as it was (QEMU leaves an entry pointing at garbage).
//!
//! Requests of several clusters are split per cluster and are not atomic (as in QEMU).

use crate::deflate::deflate_raw;
use crate::error::{Error, ErrorKind, Result};
use crate::mapping::{L2Entry, COMPRESSED};
use crate::meta::Meta;
use crate::types::GuestCluster;
use crate::{gate_poisoned, Qcow2};

impl Qcow2 {
    /// Write `data` at guest `offset` as compressed clusters (see the module rules).
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return self.pad_file_to_sector();
        }
        let cs = self.geo.cluster_size();
        let end = offset + data.len() as u64;
        if !offset.is_multiple_of(cs) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("compressed write at {offset:#x} is not cluster aligned"),
            ));
        }
        if !(data.len() as u64).is_multiple_of(cs) && end != self.virtual_size() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "compressed write of {:#x} bytes is not a multiple of the cluster size",
                    data.len()
                ),
            ));
        }
        self.claim_bitmaps()?;
        self.log_modification(offset, data.len() as u64)?;
        for (i, chunk) in data.chunks(cs as usize).enumerate() {
            let guest = offset + i as u64 * cs;
            self.write_one_compressed(guest, chunk)?;
        }
        Ok(())
    }

    /// One cluster (possibly the short last one).
    fn write_one_compressed(&self, guest: u64, chunk: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size() as usize;
        let stream = if chunk.len() == cs {
            deflate_raw(chunk, cs - 1)
        } else {
            let mut padded = vec![0u8; cs];
            padded[..chunk.len()].copy_from_slice(chunk);
            deflate_raw(&padded, cs - 1)
        };
        let Some(stream) = stream else {
            // Does not shrink: stored as a normal cluster.
            return self.write_at(chunk, guest);
        };
        let gc = GuestCluster(guest / cs as u64);
        let _shared = self.gate.read().map_err(|_| gate_poisoned())?;
        let host = {
            let mut m = self.lock()?;
            while m.inflight.contains(&gc.0) {
                m = self.alloc_done.wait(m).map_err(|_| gate_poisoned())?;
            }
            match m.l2_entry(gc)? {
                L2Entry::Unallocated | L2Entry::Zero { prealloc: None } => {}
                _ => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "guest cluster {} is allocated: compressed writes never overwrite",
                            gc.0
                        ),
                    ))
                }
            }
            m.ensure_l2(gc)?;
            self.file.debug_event("cluster_alloc_bytes");
            let host = m.alloc_bytes(stream.len() as u64)?;
            m.inflight.insert(gc.0);
            host
        };
        // QEMU updates the L2 entry before writing the data; its events fire in that order.
        self.file.debug_event("l2_update_compressed");
        self.file.debug_event("write_compressed");
        let io = self
            .file
            .write_at(&stream, host)
            .map_err(|e| Error::io(e, format!("writing compressed cluster at {guest:#x}")));
        let mut m = self.lock()?;
        let len = stream.len() as u64;
        let result = match io {
            Ok(()) => {
                m.file_len = m.file_len.max(host + len);
                m.set_l2_raw(gc, compressed_descriptor(host, len, self.geo.cluster_bits))
            }
            Err(e) => {
                m.release_bytes(host, len);
                Err(e)
            }
        };
        m.inflight.remove(&gc.0);
        self.alloc_done.notify_all();
        drop(m);
        if let Ok(mut z) = self.zcache.lock() {
            *z = None;
        }
        result
    }

    /// The zero-length compressed write: round the image file up to a 512-byte boundary.
    fn pad_file_to_sector(&self) -> Result<()> {
        let len = self
            .file
            .size()
            .map_err(|e| Error::io(e, "getting the image size"))?;
        let padded = len.next_multiple_of(512);
        if padded != len {
            self.file
                .truncate(padded)
                .map_err(|e| Error::io(e, "padding the image file to a sector"))?;
            self.lock()?.file_len = padded;
        }
        Ok(())
    }
}

/// The L2 entry of a compressed cluster: host byte offset in the low bits, the number of
/// 512-byte sectors after the one holding the offset above them, bit 62 set.
pub fn compressed_descriptor(host: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let extra = (host + len - 1) / 512 - host / 512;
    COMPRESSED | (extra << x) | host
}

impl Meta {
    /// Hand out `size` bytes (less than a cluster) for a compressed stream, packing it after
    /// the previous one; adds a reference to every host cluster the bytes touch.
    pub fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let max_refcount = self.geo.max_refcount();
        let mut off = self.compressed_tail;
        if off != 0 && self.refcount(off / cs)? >= max_refcount {
            off = 0;
        }
        let free = if off == 0 { 0 } else { cs - off % cs };
        let mut fresh = None;
        if off == 0 || free < size {
            let c = self.alloc_clusters(1)?;
            fresh = Some(c);
            if off == 0 || off.next_multiple_of(cs) != c * cs {
                off = c * cs;
            }
        }
        let limit = 1u64 << (62 - (self.geo.cluster_bits - 8));
        if off + size > limit {
            if let Some(c) = fresh {
                let _ = self.decref(c);
            }
            self.compressed_tail = 0;
            return Err(Error::new(
                ErrorKind::NoSpace,
                "compressed data would lie beyond the descriptor's offset limit",
            ));
        }
        for c in off / cs..=(off + size - 1) / cs {
            if Some(c) == fresh {
                continue; // allocated with its first reference
            }
            let rc = self.refcount(c)?;
            self.set_refcount(c, rc + 1)?;
        }
        self.compressed_tail = (off + size) % cs;
        if self.compressed_tail != 0 {
            self.compressed_tail = off + size;
        }
        Ok(off)
    }

    /// Undo [`Meta::alloc_bytes`] after a failed data write.
    pub fn release_bytes(&mut self, off: u64, size: u64) {
        let cs = self.geo.cluster_size();
        for c in off / cs..=(off + size - 1) / cs {
            let _ = self.decref(c);
        }
        // Do not pack into space whose cluster may just have been freed.
        self.compressed_tail = 0;
    }
}

#[cfg(test)]
#[path = "compress_tests.rs"]
mod tests;
