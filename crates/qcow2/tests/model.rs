//! Random operation sequences on an in-memory image checked against a shadow model, with a
//! reopen at the end (no qemu needed).

mod common;

use std::sync::Arc;

use proptest::prelude::*;
use qcow2::{CreateOptions, MemStorage, OpenOptions, Qcow2};

/// One guest operation.
#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

const SIZE: u64 = 1 << 20;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(20_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        1 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn image_matches_shadow_model(
        ops in proptest::collection::vec(op(), 1..40),
        cluster_bits in 9u32..=16,
        version in 2u32..=3,
    ) {
        let mem = Arc::new(MemStorage::new());
        let opts = CreateOptions { size: SIZE, cluster_size: 1 << cluster_bits, version, ..Default::default() };
        Qcow2::create(mem.as_ref(), &opts).expect("create");
        let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open");
        let cs = 1u64 << cluster_bits;
        let mut shadow = vec![0u8; SIZE as usize];
        for op in &ops {
            match *op {
                Op::Write { off, len, byte } => {
                    img.write_at(&vec![byte; len as usize], off).expect("write");
                    shadow[off as usize..(off + len) as usize].fill(byte);
                }
                Op::Zero { off, len, unmap } => {
                    img.write_zeroes(off, len, unmap).expect("zero");
                    shadow[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    img.discard(off, len).expect("discard");
                    let (a, b) = (off.next_multiple_of(cs), (off + len) / cs * cs);
                    if b > a {
                        shadow[a as usize..b as usize].fill(0);
                    }
                }
                Op::Flush => img.flush().expect("flush"),
            }
        }
        prop_assert!(common::read_all(&img, 65536) == shadow);
        img.close().expect("close");
        let again = Qcow2::open(mem, OpenOptions { read_only: true }).expect("reopen");
        prop_assert!(common::read_all(&again, 65536) == shadow);
    }
}
