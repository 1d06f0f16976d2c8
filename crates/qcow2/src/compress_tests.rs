//! Unit tests of the compressed-cluster descriptor and byte allocation; the interop tests
//! against qemu-img are in tests/compressed_write.rs.

use super::*;
use crate::mapping::L2Entry;
use crate::types::{Geometry, HostOffset};

#[test]
fn descriptor_round_trips_through_the_reader() {
    for bits in [9u32, 12, 16, 21] {
        let cs = 1u64 << bits;
        let g = Geometry {
            cluster_bits: bits,
            refcount_order: 4,
        };
        for (host, len) in [
            (0x50000u64, 79u64),
            (0x5004f, 79),
            (cs * 7 + 500, 30),
            (cs * 3, cs - 1),
        ] {
            let raw = compressed_descriptor(host, len, bits);
            assert_eq!(raw >> 63, 0, "copied never set");
            match L2Entry::decode(raw, g) {
                Ok(L2Entry::Compressed { host: h, len: l }) => {
                    assert_eq!(h, HostOffset(host));
                    // The reader reads to the end of the last sector touched.
                    assert_eq!(l, (host + len).next_multiple_of(512) - host);
                }
                other => panic!("not compressed: {other:?}"),
            }
        }
    }
    // QEMU's observed entry for a 79-byte stream at 0x5004f with 64 KiB clusters.
    assert_eq!(compressed_descriptor(0x5004f, 79, 16), 0x400000000005004f);
    // A stream crossing a sector boundary has one extra sector (bit 54 for 64 KiB).
    assert_eq!(compressed_descriptor(0x501f0, 32, 16), 0x40400000000501f0);
}
