//! Compressing one cluster the way QEMU's qcow2 does: a raw deflate stream (no zlib header)
//! with a 4 KiB window (QEMU inflates with window bits -12, so longer back-references would
//! be unreadable there), default level.

use flate2::{Compress, Compression, FlushCompress, Status};

/// QEMU's window: 2^12 bytes.
const WINDOW_BITS: u8 = 12;

/// Deflate `input` into at most `limit` bytes; `None` when the stream does not fit (the
/// caller then stores the data uncompressed) or the compressor fails.
pub fn deflate_raw(input: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, WINDOW_BITS);
    let mut out = vec![0u8; limit];
    match c.compress(input, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => {
            let n = usize::try_from(c.total_out()).ok()?;
            out.truncate(n);
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflate::inflate;

    #[test]
    fn round_trips_through_our_inflater() {
        let input: Vec<u8> = (0..65536u32)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let z = deflate_raw(&input, input.len() - 1).expect("compressible");
        assert!(z.len() < input.len() / 4);
        let mut out = vec![0u8; input.len()];
        inflate(&z, &mut out).expect("inflates");
        assert_eq!(out, input);
    }

    #[test]
    fn incompressible_data_does_not_fit() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let input: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(deflate_raw(&input, input.len() - 1).is_none());
    }
}
