use super::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn normalized_extents_obey_the_wire_rules(
        raw in proptest::collection::vec((0u64..1 << 34, 0u32..4), 0..40),
        len in 1u64..1 << 36,
        max in 1usize..8,
    ) {
        let covered_by_backend: u64 = raw.iter().map(|e| e.0).sum();
        let out = normalize_extents(raw, len, max);
        let total: u64 = out.iter().map(|e| e.0).sum();
        prop_assert!(out.len() <= max);
        prop_assert!(total <= len);
        prop_assert!(out.iter().all(|e| e.0 > 0));
        prop_assert!(out.windows(2).all(|w| w[0].1 != w[1].1));
        prop_assert_eq!(out.is_empty(), covered_by_backend == 0);
    }

    #[test]
    fn any_request_header_decodes_or_is_refused_without_panic(
        bytes in proptest::collection::vec(any::<u8>(), 32),
        extended in any::<bool>(),
    ) {
        let mode = if extended { HeaderMode::Extended } else { HeaderMode::Structured };
        let _ = proto::decode_request(mode, &bytes[..mode.request_len()]);
    }
}

#[test]
fn normalize_merges_equal_neighbours() {
    let got = normalize_extents(vec![(4096, 3), (4096, 3), (512, 0)], 1 << 20, 10);
    assert_eq!(got, vec![(8192, 3), (512, 0)]);
}

#[test]
fn normalize_clips_to_requested_length() {
    let got = normalize_extents(vec![(4096, 0), (1 << 40, 3)], 8192, 10);
    assert_eq!(got, vec![(4096, 0), (4096, 3)]);
}

#[test]
fn normalize_with_one_extent_clips_it_to_the_request() {
    let got = normalize_extents(vec![(1 << 30, 1)], 65536, 1);
    assert_eq!(got, vec![(65536, 1)]);
}

#[test]
fn normalize_keeps_at_most_max_extents() {
    let raw = (0..10).map(|i| (512, i % 2)).collect();
    let got = normalize_extents(raw, 1 << 20, 3);
    assert_eq!(got, vec![(512, 0), (512, 1), (512, 0)]);
}

#[test]
fn normalize_drops_empty_extents() {
    let got = normalize_extents(vec![(0, 1), (512, 0), (0, 2)], 4096, 4);
    assert_eq!(got, vec![(512, 0)]);
}
