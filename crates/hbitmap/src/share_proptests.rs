//! Property tests for chunks shared between bitmaps: several bitmaps of one disk (and
//! copies kept aside, as a job's frozen copy or a transaction's undo) under random
//! operations, each compared bit for bit with its own independent `Vec<bool>` model after
//! every step. Whatever is shared, no operation on one bitmap may show in another.

use proptest::prelude::*;

use crate::proptests::{pick_len, pick_offset, shape, Model, Shape};
use crate::{HBitmap, MAX_GRANULARITY};

/// One bitmap of the set and its model.
struct Item {
    bits: HBitmap,
    model: Model,
    /// Marked by [`Op::MarkAll`] (QEMU: enabled).
    recording: bool,
}

fn recording(item: &mut Item) -> Option<&mut HBitmap> {
    item.recording.then_some(&mut item.bits)
}

/// One step. Indices are taken modulo the current number of items / copies.
#[derive(Clone, Debug)]
enum Op {
    /// A guest write: mark every recording bitmap at once.
    MarkAll(u64, u64),
    Set(usize, u64, u64),
    Reset(usize, u64, u64),
    Clear(usize),
    SetAll(usize),
    /// `items[a] |= items[b]`.
    Merge(usize, usize),
    /// `items[a] |= copies[b]`.
    MergeCopy(usize, usize),
    /// Keep a clone aside (frozen copy, undo copy).
    Freeze(usize),
    DropCopy(usize),
    /// Change a kept copy (a successor being merged back, say).
    SetCopy(usize, u64, u64),
    /// Put a kept copy back (transaction abort).
    Restore(usize, usize),
    Toggle(usize),
    Deserialize(usize, u64, Vec<u8>),
    ShareIdentical,
}

fn op(s: Shape) -> impl Strategy<Value = Op> {
    let raw = (
        0u8..32,
        any::<usize>(),
        any::<usize>(),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        prop::collection::vec(any::<u8>(), 0..40),
    );
    raw.prop_map(move |(kind, a, b, (p, q, r, t), data)| {
        let (off, len) = (pick_offset(s, p, q), pick_len(s, r, t));
        match kind {
            0..=11 => Op::MarkAll(off, len),
            12..=13 => Op::Set(a, off, len),
            14..=16 => Op::Reset(a, off, len),
            17 => Op::Clear(a),
            18 => Op::SetAll(a),
            19..=20 => Op::Merge(a, b),
            21 => Op::MergeCopy(a, b),
            22..=23 => Op::Freeze(a),
            24 => Op::DropCopy(a),
            25 => Op::SetCopy(a, off, len),
            26 => Op::Restore(a, b),
            27..=28 => Op::Toggle(a),
            29..=30 => Op::Deserialize(a, p % (s.size.div_ceil(s.gran) + 80), data),
            _ => Op::ShareIdentical,
        }
    })
}

/// Checks a bitmap against its model: invariants, every bit, the count, the hash.
fn same(b: &HBitmap, m: &Model) -> Result<(), TestCaseError> {
    b.check();
    prop_assert_eq!(b.dirty_granules(), m.dirty());
    prop_assert_eq!(b.to_bytes(), m.bytes(0, b.serialized_len()));
    Ok(())
}

/// Runs `ops` on `n` bitmaps over shape `s`; bitmap 0 may have another granularity.
fn run(s: Shape, n: usize, odd_gran: Option<u64>, ops: &[Op]) -> Result<(), TestCaseError> {
    let new = |gran: u64| -> Item {
        Item {
            bits: HBitmap::with_chunk_shift(s.size, gran, s.chunk_shift).expect("valid shape"),
            model: Model::new(s.size, gran),
            recording: true,
        }
    };
    let mut items: Vec<Item> = (0..n)
        .map(|k| {
            new(if k == 0 {
                odd_gran.unwrap_or(s.gran)
            } else {
                s.gran
            })
        })
        .collect();
    let mut copies: Vec<(HBitmap, Model)> = Vec::new();
    for op in ops {
        apply(&mut items, &mut copies, op);
        for item in &items {
            same(&item.bits, &item.model)?;
        }
        for (b, m) in &copies {
            same(b, m)?;
        }
    }
    for item in &items {
        let words = item.model.bits.len().div_ceil(64).max(1);
        let expected = crate::sha256::sha256(&item.model.bytes(0, words * 8));
        prop_assert_eq!(item.bits.qemu_sha256(), expected);
    }
    Ok(())
}

fn apply(items: &mut [Item], copies: &mut Vec<(HBitmap, Model)>, op: &Op) {
    let n = items.len();
    match op {
        Op::MarkAll(off, len) => {
            HBitmap::set_in_all(items, recording, *off, *len);
            for item in items.iter_mut().filter(|i| i.recording) {
                item.model.assign(*off, *len, true);
            }
        }
        Op::Set(a, off, len) => {
            items[a % n].bits.set(*off, *len);
            items[a % n].model.assign(*off, *len, true);
        }
        Op::Reset(a, off, len) => {
            items[a % n].bits.reset(*off, *len);
            items[a % n].model.assign(*off, *len, false);
        }
        Op::Clear(a) => {
            items[a % n].bits.reset_all();
            items[a % n].model.bits.fill(false);
        }
        Op::SetAll(a) => {
            items[a % n].bits.set_all();
            items[a % n].model.bits.fill(true);
        }
        Op::Merge(a, b) => {
            let src = items[b % n].bits.clone();
            let src_model = items[b % n].model.clone();
            merge(&mut items[a % n], &src, &src_model);
        }
        Op::MergeCopy(a, b) if !copies.is_empty() => {
            let (src, src_model) = copies[b % copies.len()].clone();
            merge(&mut items[a % n], &src, &src_model);
        }
        Op::Freeze(a) => copies.push((items[a % n].bits.clone(), items[a % n].model.clone())),
        Op::DropCopy(a) if !copies.is_empty() => {
            let k = a % copies.len();
            copies.remove(k);
        }
        Op::SetCopy(a, off, len) if !copies.is_empty() => {
            let k = a % copies.len();
            copies[k].0.set(*off, *len);
            copies[k].1.assign(*off, *len, true);
        }
        Op::Restore(a, b) if !copies.is_empty() => {
            let (bits, model) = copies[b % copies.len()].clone();
            let item = &mut items[a % n];
            if bits.granularity() == item.bits.granularity() {
                item.bits = bits;
                item.model = model;
            }
        }
        Op::Toggle(a) => items[a % n].recording ^= true,
        Op::Deserialize(a, start, data) => {
            let item = &mut items[a % n];
            item.bits.deserialize_part(*start, data);
            for (k, byte) in data.iter().enumerate() {
                for i in 0..8 {
                    let g = start + 8 * k as u64 + i;
                    if let Some(bit) = item.model.bits.get_mut(g as usize) {
                        *bit = (byte >> i) & 1 != 0;
                    }
                }
            }
        }
        Op::ShareIdentical => HBitmap::share_identical(items, |i: &mut Item| Some(&mut i.bits)),
        Op::MergeCopy(..) | Op::DropCopy(_) | Op::SetCopy(..) | Op::Restore(..) => {}
    }
}

/// `item |= src`, the model by byte ranges (granularities may differ).
fn merge(item: &mut Item, src: &HBitmap, src_model: &Model) {
    item.bits.merge(src).expect("same size");
    for (g, _) in src_model.bits.iter().enumerate().filter(|(_, b)| **b) {
        let off = g as u64 * src_model.gran;
        item.model.assign(off, src_model.gran, true);
    }
}

fn cfg() -> ProptestConfig {
    ProptestConfig::with_cases(crate::proptests::cases(256))
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn shared_bitmaps_match_their_own_models(
        (s, n, odd, ops) in shape().prop_flat_map(|s| (
            Just(s),
            2usize..=6,
            // A coarser granularity for bitmap 0 (a finer one would make huge models).
            prop::option::weighted(0.2, 1u32..=3).prop_map(move |k| {
                k.map(|k| (s.gran << k).min(MAX_GRANULARITY))
            }),
            prop::collection::vec(op(s), 0..40),
        ))
    ) {
        run(s, n, odd, &ops)?;
    }
}
