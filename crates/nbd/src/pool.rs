//! Reusable payload buffers for one connection.
//!
//! A fresh 256 KiB `Vec` per request costs a zero-fill (reads) and, because glibc hands large
//! blocks back to the kernel and takes them again, page faults and `madvise` calls: together
//! about a fifth of the daemon's CPU on streaming reads. Buffers that went out on the socket
//! come back here and serve the next request. A reused buffer holds old payload bytes; that is
//! fine because a read fills all of it before it is sent and a write payload is read over it.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Most buffers kept idle per connection (the in-flight limit: more are never in use at once).
const MAX_IDLE: usize = crate::transmission::MAX_IN_FLIGHT;
/// Most bytes kept idle per connection; larger buffers are freed after use.
const MAX_IDLE_BYTES: usize = 8 * 1024 * 1024;

/// A payload buffer: `len` bytes in use at the front of an initialised `Vec`.
#[derive(Default)]
pub(crate) struct Buf {
    /// Every byte initialised; `len..` is left over from an earlier, longer use.
    vec: Vec<u8>,
    len: usize,
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[..self.len]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[..self.len]
    }
}

/// Idle buffers of one connection. Std mutex: held only to push or pop, never across `.await`.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    /// A buffer of `len` bytes with unspecified contents (zeros or old payload).
    pub(crate) fn take(&self, len: usize) -> Buf {
        let popped = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let v = idle.bufs.pop();
            if let Some(v) = &v {
                idle.bytes -= v.len();
            }
            v
        };
        let mut vec = popped.unwrap_or_default();
        if vec.len() < len {
            // Grows once per buffer to the largest request size seen, then stays.
            vec.resize(len, 0);
        }
        Buf { vec, len }
    }

    /// Give a buffer back for reuse (or free it when the pool is full).
    pub(crate) fn put(&self, buf: Buf) {
        let vec = buf.vec;
        if vec.is_empty() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.bufs.len() < MAX_IDLE && idle.bytes + vec.len() <= MAX_IDLE_BYTES {
            idle.bytes += vec.len();
            idle.bufs.push(vec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_buffer_has_the_asked_length() {
        let pool = Pool::default();
        pool.put(pool.take(4096));
        assert_eq!(pool.take(100).len(), 100);
        assert_eq!(pool.take(8192).len(), 8192);
    }

    #[test]
    fn returned_buffer_is_reused() {
        let pool = Pool::default();
        let mut b = pool.take(4096);
        b[0] = 7;
        let ptr = b.as_ptr();
        pool.put(b);
        let again = pool.take(1024);
        assert_eq!(again.as_ptr(), ptr);
    }

    #[test]
    fn pool_frees_buffers_beyond_its_byte_limit() {
        let pool = Pool::default();
        pool.put(pool.take(MAX_IDLE_BYTES + 1));
        let idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        assert!(idle.bufs.is_empty());
        assert_eq!(idle.bytes, 0);
    }
}
