//! Property tests: every operation against a plain `Vec<bool>` model (one bool per
//! granule), with small chunks (64 and 256 granules) as well as the production size so
//! chunk, summary and word edges all come up with small models.

use proptest::prelude::*;

use crate::HBitmap;

/// Granularities drawn by every property.
const GRANULARITIES: [u64; 5] = [512, 4096, 65536, 1 << 20, 1 << 31];

/// The model: one bool per granule, byte-range semantics written the obvious way.
#[derive(Clone, Debug)]
pub(crate) struct Model {
    pub(crate) size: u64,
    pub(crate) gran: u64,
    pub(crate) bits: Vec<bool>,
}

impl Model {
    pub(crate) fn new(size: u64, gran: u64) -> Model {
        Model {
            size,
            gran,
            bits: vec![false; size.div_ceil(gran) as usize],
        }
    }

    fn span(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || off >= self.size {
            return 0..0;
        }
        let end = off.saturating_add(len).min(self.size);
        (off / self.gran) as usize..((end - 1) / self.gran + 1) as usize
    }

    pub(crate) fn assign(&mut self, off: u64, len: u64, value: bool) {
        let span = self.span(off, len);
        self.bits[span].fill(value);
    }

    fn get(&self, off: u64) -> bool {
        off < self.size && self.bits[(off / self.gran) as usize]
    }

    pub(crate) fn dirty(&self) -> u64 {
        self.bits.iter().filter(|b| **b).count() as u64
    }

    /// First byte in `off..end` whose granule equals `want`.
    fn next(&self, off: u64, end: u64, want: bool) -> Option<u64> {
        let end = end.min(self.size);
        (off / self.gran..self.bits.len() as u64)
            .find(|&g| off < end && self.bits[g as usize] == want)
            .map(|g| off.max(g * self.gran))
            .filter(|&b| b < end)
    }

    /// Maximal dirty byte runs inside `off..end`, built granule by granule.
    fn ranges(&self, off: u64, end: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (g, _) in self.bits.iter().enumerate().filter(|(_, b)| **b) {
            let lo = (g as u64 * self.gran).max(off);
            let hi = ((g as u64 + 1) * self.gran).min(end);
            if lo >= hi {
                continue;
            }
            match out.last_mut() {
                Some((s, l)) if *s + *l == lo => *l += hi - lo,
                _ => out.push((lo, hi - lo)),
            }
        }
        out
    }

    fn bit(&self, g: u64) -> bool {
        self.bits.get(g as usize).copied().unwrap_or(false)
    }

    pub(crate) fn bytes(&self, start: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|k| {
                (0..8).fold(0u8, |acc, i| {
                    acc | (u8::from(self.bit(start + 8 * k + i)) << i)
                })
            })
            .collect()
    }
}

/// A bitmap shape: size, granularity, log2 granules per chunk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) size: u64,
    pub(crate) gran: u64,
    pub(crate) chunk_shift: u32,
}

/// One mutation.
#[derive(Clone, Debug)]
enum Op {
    Set(u64, u64),
    Reset(u64, u64),
    SetAll,
    ResetAll,
}

/// Granule counts: tiny, a few words, several chunks/summary words, more than 64 chunks.
fn granule_count() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0u64..=3,
        3 => 60u64..=300,
        3 => 1000u64..=9000,
        1 => 16_300u64..=17_000,
    ]
}

fn shape_with(gran: u64) -> impl Strategy<Value = Shape> {
    (
        granule_count(),
        any::<u64>(),
        any::<bool>(),
        prop::sample::select(vec![6u32, 8, 18]),
    )
        .prop_map(move |(n, sub, exact, chunk_shift)| Shape {
            size: if n == 0 || exact {
                n * gran
            } else {
                n * gran - sub % gran
            },
            gran,
            chunk_shift,
        })
}

pub(crate) fn shape() -> impl Strategy<Value = Shape> {
    prop::sample::select(GRANULARITIES.to_vec()).prop_flat_map(shape_with)
}

/// A byte offset near granule boundaries (often word or chunk aligned), sometimes past
/// the end.
pub(crate) fn pick_offset(s: Shape, a: u64, b: u64) -> u64 {
    let granules = s.size.div_ceil(s.gran);
    let g = a % (granules + 2);
    match b % 6 {
        0 => g * s.gran,
        1 => (g & !63) * s.gran,
        2 => (g & !255) * s.gran,
        _ => g * s.gran + b / 6 % s.gran,
    }
}

/// A length: usually a few granules or words, sometimes most of the disk or "to infinity".
pub(crate) fn pick_len(s: Shape, c: u64, d: u64) -> u64 {
    let granules = s.size.div_ceil(s.gran);
    let sub = if d.is_multiple_of(3) { 0 } else { d % s.gran };
    match c % 10 {
        0 => u64::MAX,
        1..=2 => (c / 10 % (granules + 2)) * s.gran + sub,
        3 => 0,
        4..=5 => (c / 10 % 5) * 64 * s.gran,
        _ => (c / 10 % 4) * s.gran + sub,
    }
}

fn ops(s: Shape) -> impl Strategy<Value = Vec<Op>> {
    let op = (
        0u8..20,
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(move |(kind, a, b, c, d)| {
            let (off, len) = (pick_offset(s, a, b), pick_len(s, c, d));
            match kind {
                0 => Op::SetAll,
                1 => Op::ResetAll,
                2..=11 => Op::Set(off, len),
                _ => Op::Reset(off, len),
            }
        });
    prop::collection::vec(op, 0..12)
}

/// A bitmap and its model after a random sequence of operations (each checked).
fn build(s: Shape, ops: &[Op]) -> (HBitmap, Model) {
    let mut b = HBitmap::with_chunk_shift(s.size, s.gran, s.chunk_shift).expect("valid shape");
    let mut m = Model::new(s.size, s.gran);
    for op in ops {
        match *op {
            Op::Set(off, len) => {
                b.set(off, len);
                m.assign(off, len, true);
            }
            Op::Reset(off, len) => {
                b.reset(off, len);
                m.assign(off, len, false);
            }
            Op::SetAll => {
                b.set_all();
                m.bits.fill(true);
            }
            Op::ResetAll => {
                b.reset_all();
                m.bits.fill(false);
            }
        }
        b.check();
    }
    (b, m)
}

fn populated() -> impl Strategy<Value = (Shape, Vec<Op>)> {
    shape().prop_flat_map(|s| (Just(s), ops(s)))
}

/// Raw material for one probe: an offset, an end and a length are picked from it.
type Probe = (u64, u64, u64, u64);

/// A populated bitmap plus `n` probes.
fn probed(n: usize) -> impl Strategy<Value = (Shape, Vec<Op>, Vec<Probe>)> {
    populated().prop_flat_map(move |(s, o)| {
        let probe = (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>());
        (Just(s), Just(o), prop::collection::vec(probe, 1..=n))
    })
}

/// `(offset, end)` of a probe.
fn probe_bounds(s: Shape, p: Probe) -> (u64, u64) {
    let off = pick_offset(s, p.0, p.1);
    let end = match p.2 % 4 {
        0 => u64::MAX,
        _ => off.saturating_add(pick_len(s, p.2 / 4, p.3)),
    };
    (off, end)
}

/// `n` cases, or `PROPTEST_CASES` when set (an explicit count would override it).
pub(crate) fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n)
}

fn cfg() -> ProptestConfig {
    ProptestConfig::with_cases(cases(128))
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn set_and_reset_sequences_match_model((s, o) in populated()) {
        let (b, m) = build(s, &o);
        prop_assert_eq!(b.dirty_granules(), m.dirty());
        prop_assert_eq!(b.count(), m.dirty() * s.gran);
        prop_assert_eq!(b.is_empty(), m.dirty() == 0);
        prop_assert_eq!(b.to_bytes(), m.bytes(0, b.serialized_len()));
    }

    #[test]
    fn get_matches_model((s, o, probes) in probed(16)) {
        let (b, m) = build(s, &o);
        for p in probes {
            let (off, _) = probe_bounds(s, p);
            prop_assert_eq!(b.get(off), m.get(off), "offset {}", off);
        }
    }

    #[test]
    fn next_dirty_matches_model((s, o, probes) in probed(16)) {
        let (b, m) = build(s, &o);
        for p in probes {
            let (off, end) = probe_bounds(s, p);
            prop_assert_eq!(b.next_dirty(off, end), m.next(off, end, true), "{}..{}", off, end);
        }
        // From the end of each dirty run: the search must skip the clean gap after it.
        for (start, len) in m.ranges(0, u64::MAX).into_iter().take(8) {
            let off = start + len;
            prop_assert_eq!(b.next_dirty(off, u64::MAX), m.next(off, u64::MAX, true), "{}", off);
        }
    }

    #[test]
    fn next_clean_matches_model((s, o, probes) in probed(16)) {
        let (b, m) = build(s, &o);
        for p in probes {
            let (off, end) = probe_bounds(s, p);
            prop_assert_eq!(b.next_clean(off, end), m.next(off, end, false), "{}..{}", off, end);
        }
        // From the start of each dirty run: the search must skip the run.
        for (off, _) in m.ranges(0, u64::MAX).into_iter().take(8) {
            prop_assert_eq!(b.next_clean(off, u64::MAX), m.next(off, u64::MAX, false), "{}", off);
        }
    }

    #[test]
    fn next_dirty_area_is_a_prefix_of_the_model_run((s, o, probes) in probed(16)) {
        let (b, m) = build(s, &o);
        for p in probes {
            let (off, end) = probe_bounds(s, p);
            let max_len = pick_len(s, p.3, p.2).max(1);
            let expected = m.ranges(off, end).first().map(|&(st, l)| (st, l.min(max_len)));
            prop_assert_eq!(b.next_dirty_area(off, end, max_len), expected,
                "{}..{} max {}", off, end, max_len);
        }
    }

    #[test]
    fn dirty_ranges_match_model((s, o, probes) in probed(4)) {
        let (b, m) = build(s, &o);
        prop_assert_eq!(b.dirty_ranges(0, u64::MAX).collect::<Vec<_>>(), m.ranges(0, u64::MAX));
        for p in probes {
            let (off, end) = probe_bounds(s, p);
            prop_assert_eq!(b.dirty_ranges(off, end).collect::<Vec<_>>(), m.ranges(off, end),
                "{}..{}", off, end);
        }
    }

    #[test]
    fn merge_matches_byte_range_model(
        (target_shape, target_ops, src_shape, src_ops) in merge_pair()
    ) {
        let (mut target, mut model) = build(target_shape, &target_ops);
        let (src, src_model) = build(src_shape, &src_ops);
        target.merge(&src).expect("same size");
        target.check();
        for (h, _) in src_model.bits.iter().enumerate().filter(|(_, b)| **b) {
            model.assign(h as u64 * src_shape.gran, src_shape.gran, true);
        }
        prop_assert_eq!(target.to_bytes(), model.bytes(0, target.serialized_len()));
        prop_assert_eq!(target.dirty_granules(), model.dirty());
    }

    #[test]
    fn serialize_part_matches_model((s, o, probes) in probed(6)) {
        let (b, m) = build(s, &o);
        for p in probes {
            let start = (p.0 % (b.granules() + 80)) & !if p.1 % 4 == 0 { 0 } else { 7 };
            let len = (p.2 % 40) as usize;
            let mut buf = vec![0x5a; len];
            b.serialize_part(start, &mut buf);
            prop_assert_eq!(buf, m.bytes(start, len), "start {}", start);
        }
    }

    #[test]
    fn deserialize_part_overwrites_exactly_the_covered_granules(
        (s, o, start, data) in populated().prop_flat_map(|(s, o)| {
            let granules = s.size.div_ceil(s.gran);
            (Just(s), Just(o), 0..granules + 80, prop::collection::vec(any::<u8>(), 0..48))
        })
    ) {
        let (mut b, mut m) = build(s, &o);
        b.deserialize_part(start, &data);
        b.check();
        for (k, byte) in data.iter().enumerate() {
            for i in 0..8 {
                let g = start + 8 * k as u64 + i;
                if let Some(bit) = m.bits.get_mut(g as usize) {
                    *bit = (byte >> i) & 1 != 0;
                }
            }
        }
        prop_assert_eq!(b.to_bytes(), m.bytes(0, b.serialized_len()));
        prop_assert_eq!(b.dirty_granules(), m.dirty());
    }

    #[test]
    fn serialisation_round_trips((s, o) in populated()) {
        let (b, _) = build(s, &o);
        let bytes = b.to_bytes();
        prop_assert_eq!(bytes.len() as u64, s.size.div_ceil(s.gran).div_ceil(8));
        let mut copy = HBitmap::with_chunk_shift(s.size, s.gran, s.chunk_shift).unwrap();
        copy.deserialize_part(0, &bytes);
        copy.check();
        prop_assert!(copy == b);
        let loaded = HBitmap::from_bytes(s.size, s.gran, &bytes).unwrap();
        loaded.check();
        prop_assert_eq!(loaded.to_bytes(), bytes);
    }

    #[test]
    fn hash_bytes_are_the_padded_leaf_words((s, o) in populated()) {
        let (b, m) = build(s, &o);
        let words = s.size.div_ceil(s.gran).div_ceil(64).max(1) as usize;
        prop_assert_eq!(b.qemu_hash_bytes(), m.bytes(0, words * 8));
        prop_assert_eq!(b.qemu_sha256(), crate::sha256::sha256(&b.qemu_hash_bytes()));
    }

    #[test]
    fn resize_keeps_common_granules_and_cleans_new_ones(
        (s, o, new) in populated().prop_flat_map(|(s, o)| (Just(s), Just(o), shape_with(s.gran)))
    ) {
        let (mut b, m) = build(s, &o);
        b.resize(new.size).unwrap();
        b.check();
        let mut expected = Model::new(new.size, s.gran);
        let common = expected.bits.len().min(m.bits.len());
        expected.bits[..common].copy_from_slice(&m.bits[..common]);
        prop_assert_eq!(b.size(), new.size);
        prop_assert_eq!(b.to_bytes(), expected.bytes(0, b.serialized_len()));
        prop_assert_eq!(b.dirty_granules(), expected.dirty());
    }
}

/// Two populated bitmaps of the same size with independent granularities.
fn merge_pair() -> impl Strategy<Value = (Shape, Vec<Op>, Shape, Vec<Op>)> {
    let grans = prop::sample::select(GRANULARITIES.to_vec());
    (
        grans.clone(),
        grans,
        prop::sample::select(vec![6u32, 8, 18]),
    )
        .prop_flat_map(|(ga, gb, cs)| {
            // Size from the finer granularity keeps both models small.
            shape_with(ga.min(gb)).prop_map(move |fine| {
                let a = Shape { gran: ga, ..fine };
                let b = Shape {
                    gran: gb,
                    chunk_shift: cs,
                    ..fine
                };
                (a, b)
            })
        })
        .prop_flat_map(|(a, b)| (Just(a), ops(a), Just(b), ops(b)))
}
