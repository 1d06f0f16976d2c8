//! Unit tests of the public behaviour, one behaviour each.

use crate::sha256::sha256;
use crate::{Error, HBitmap, MAX_GRANULES};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

fn bitmap(size: u64, granularity: u64) -> HBitmap {
    HBitmap::new(size, granularity).expect("valid bitmap")
}

fn ranges(b: &HBitmap) -> Vec<(u64, u64)> {
    b.dirty_ranges(0, u64::MAX).collect()
}

#[test]
fn new_rejects_granularity_that_is_not_a_power_of_two() {
    assert_eq!(
        HBitmap::new(MIB, 3 * 512).unwrap_err(),
        Error::BadGranularity(1536)
    );
}

#[test]
fn new_rejects_granularity_below_512() {
    assert_eq!(
        HBitmap::new(MIB, 256).unwrap_err(),
        Error::BadGranularity(256)
    );
}

#[test]
fn new_rejects_granularity_above_2_gib() {
    assert_eq!(
        HBitmap::new(MIB, 1 << 32).unwrap_err(),
        Error::BadGranularity(1 << 32)
    );
}

#[test]
fn new_accepts_extreme_granularities() {
    assert_eq!(bitmap(MIB, 512).granules(), 2048);
    assert_eq!(bitmap(MIB, 1 << 31).granules(), 1);
}

#[test]
fn new_rejects_more_than_max_granules() {
    let err = HBitmap::new(u64::MAX, 512).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }));
    assert!(HBitmap::new(MAX_GRANULES * 512, 512).is_ok());
}

#[test]
fn granules_round_up_a_partial_last_granule() {
    let b = bitmap(64 * KIB + 1, 64 * KIB);
    assert_eq!(b.granules(), 2);
    assert_eq!(b.size(), 64 * KIB + 1);
    assert_eq!(b.granularity(), 64 * KIB);
}

#[test]
fn zero_size_bitmap_ignores_every_operation() {
    let mut b = bitmap(0, 65536);
    b.set(0, 100);
    b.set_all();
    assert!(b.is_empty());
    assert_eq!(b.next_clean(0, u64::MAX), None);
    assert_eq!(b.serialized_len(), 0);
    assert_eq!(b.qemu_hash_bytes(), vec![0u8; 8]);
}

#[test]
fn one_byte_write_counts_a_whole_granule() {
    let mut b = bitmap(GIB, 64 * KIB);
    b.set(0, 1);
    assert_eq!(b.count(), 64 * KIB);
    assert_eq!(b.dirty_granules(), 1);
}

#[test]
fn two_byte_write_across_a_boundary_dirties_both_granules() {
    let mut b = bitmap(GIB, 64 * KIB);
    b.set(64 * KIB - 1, 2);
    assert_eq!(ranges(&b), [(0, 128 * KIB)]);
}

#[test]
fn count_of_partial_last_granule_is_a_full_granule() {
    let mut b = bitmap(64 * KIB + 512, 64 * KIB);
    b.set(64 * KIB, 1);
    assert_eq!(b.count(), 64 * KIB);
}

#[test]
fn set_past_the_end_does_nothing() {
    let mut b = bitmap(MIB, 4096);
    b.set(MIB, 4096);
    b.set(5, 0);
    assert!(b.is_empty());
}

#[test]
fn set_with_overflowing_length_clips_to_the_disk() {
    let mut b = bitmap(MIB, 4096);
    b.set(4096, u64::MAX);
    assert_eq!(ranges(&b), [(4096, MIB - 4096)]);
}

#[test]
fn reset_of_one_byte_cleans_the_whole_granule() {
    let mut b = bitmap(MIB, 4096);
    b.set(0, MIB);
    b.reset(4097, 1);
    assert_eq!(ranges(&b), [(0, 4096), (8192, MIB - 8192)]);
}

#[test]
fn get_reports_the_granule_of_the_offset() {
    let mut b = bitmap(MIB, 4096);
    b.set(8192, 1);
    assert!(b.get(8192 + 4095));
    assert!(!b.get(8191));
    assert!(!b.get(MIB + 8192));
}

#[test]
fn a_chunk_grows_with_its_dirty_words_and_never_beyond_its_dense_size() {
    let mut b = bitmap(TIB, 64 * KIB);
    b.set(0, 4096);
    let first = b.memory_usage();
    let mut last = first;
    for i in 1..(1 << 18) {
        b.set(i * 64 * KIB, 4096);
        if i % 4096 == 0 {
            let now = b.memory_usage();
            assert!(now >= last, "memory shrank while dirtying");
            last = now;
        }
    }
    assert_eq!(b.allocated_chunks(), 1);
    // Fully dirty: the dense leaf (32 KiB) plus the fixed part; never more.
    assert!(b.memory_usage() - first <= 32 * KIB as usize + 4096);
}

#[test]
fn scattered_dirtying_costs_memory_by_dirty_words_not_disk_size() {
    // 1 GiB of 64 KiB writes spread over 1 TiB: 16384 granules, 1 in 1024.
    let mut b = bitmap(TIB, 64 * KIB);
    for i in 0..16384u64 {
        b.set(i * 1024 * 64 * KIB + (i % 7) * 64 * KIB, 64 * KIB);
    }
    assert_eq!(b.dirty_granules(), 16384);
    assert_eq!(b.allocated_chunks(), 64);
    let dense = 64 * 32 * KIB as usize;
    assert!(
        b.memory_usage() < dense / 4,
        "{} bytes for 16384 scattered granules",
        b.memory_usage()
    );
    let back = HBitmap::from_bytes(TIB, 64 * KIB, &b.to_bytes()).expect("round trip");
    assert_eq!(
        back.dirty_ranges(0, TIB).collect::<Vec<_>>(),
        b.dirty_ranges(0, TIB).collect::<Vec<_>>()
    );
}

#[test]
fn reset_frees_a_chunk_that_becomes_clean() {
    let mut b = bitmap(TIB, 64 * KIB);
    b.set(100 * GIB, 4096);
    b.set(100 * GIB + MIB, 4096);
    b.reset(100 * GIB, 4096);
    assert_eq!(b.allocated_chunks(), 1);
    b.reset(100 * GIB + MIB, 1);
    assert_eq!(b.allocated_chunks(), 0);
}

#[test]
fn clean_64_tib_bitmap_costs_little_memory() {
    let b = bitmap(64 * TIB, 64 * KIB);
    assert!(b.memory_usage() < 64 * KIB as usize, "{}", b.memory_usage());
}

#[test]
fn full_64_gib_bitmap_costs_about_one_bit_per_granule() {
    let mut b = bitmap(64 * GIB, 64 * KIB);
    b.set_all();
    let leaf = 128 * KIB as usize;
    assert!(b.memory_usage() >= leaf && b.memory_usage() < leaf + leaf / 16);
}

#[test]
fn next_dirty_returns_the_offset_inside_a_dirty_granule() {
    let mut b = bitmap(MIB, 4096);
    b.set(8192, 1);
    assert_eq!(b.next_dirty(8200, MIB), Some(8200));
    assert_eq!(b.next_dirty(0, MIB), Some(8192));
}

#[test]
fn next_dirty_finds_a_granule_far_away_in_a_huge_disk() {
    let mut b = bitmap(64 * TIB, 64 * KIB);
    b.set(63 * TIB + 12345, 1);
    assert_eq!(b.next_dirty(1, u64::MAX), Some(63 * TIB));
    assert_eq!(b.next_dirty(63 * TIB + 64 * KIB, u64::MAX), None);
}

#[test]
fn next_dirty_respects_the_end() {
    let mut b = bitmap(MIB, 4096);
    b.set(8192, 1);
    assert_eq!(b.next_dirty(0, 8192), None);
    assert_eq!(b.next_dirty(0, 8193), Some(8192));
}

#[test]
fn next_clean_skips_a_fully_dirty_huge_disk() {
    let mut b = bitmap(4 * TIB, 64 * KIB);
    b.set_all();
    assert_eq!(b.next_clean(0, u64::MAX), None);
    b.reset(3 * TIB + 1, 1);
    assert_eq!(b.next_clean(0, u64::MAX), Some(3 * TIB));
}

#[test]
fn next_clean_in_a_clean_area_returns_the_offset() {
    let b = bitmap(MIB, 4096);
    assert_eq!(b.next_clean(777, MIB), Some(777));
}

#[test]
fn next_dirty_area_stops_at_max_len() {
    let mut b = bitmap(MIB, 4096);
    b.set(4096, 64 * KIB);
    assert_eq!(b.next_dirty_area(0, MIB, 10_000), Some((4096, 10_000)));
}

#[test]
fn next_dirty_area_stops_at_end_and_at_clean_granule() {
    let mut b = bitmap(MIB, 4096);
    b.set(4096, 64 * KIB);
    assert_eq!(
        b.next_dirty_area(5000, 20_000, u64::MAX),
        Some((5000, 15_000))
    );
    assert_eq!(b.next_dirty_area(0, MIB, u64::MAX), Some((4096, 64 * KIB)));
}

#[test]
fn next_dirty_area_with_zero_max_len_is_none() {
    let mut b = bitmap(MIB, 4096);
    b.set_all();
    assert_eq!(b.next_dirty_area(0, MIB, 0), None);
}

#[test]
fn dirty_ranges_join_granules_across_chunks() {
    let mut b = bitmap(TIB, 512);
    let chunk_bytes = (1u64 << 18) * 512;
    b.set(chunk_bytes - 512, 1024);
    assert_eq!(b.allocated_chunks(), 2);
    assert_eq!(ranges(&b), [(chunk_bytes - 512, 1024)]);
}

#[test]
fn dirty_ranges_clip_the_last_granule_to_the_disk() {
    let mut b = bitmap(MIB + 100, 4096);
    b.set(MIB, 1);
    assert_eq!(ranges(&b), [(MIB, 100)]);
    assert_eq!(
        b.dirty_ranges(MIB + 50, u64::MAX).collect::<Vec<_>>(),
        [(MIB + 50, 50)]
    );
}

#[test]
fn merge_rejects_bitmaps_of_different_sizes() {
    let mut a = bitmap(MIB, 4096);
    let b = bitmap(2 * MIB, 4096);
    assert_eq!(
        a.merge(&b).unwrap_err(),
        Error::SizeMismatch {
            target: MIB,
            source: 2 * MIB
        }
    );
}

#[test]
fn merge_of_finer_source_dirties_each_intersecting_granule() {
    let mut target = bitmap(GIB, 64 * KIB);
    let mut src = bitmap(GIB, 512);
    src.set(64 * KIB - 512, 1024);
    target.merge(&src).unwrap();
    assert_eq!(ranges(&target), [(0, 128 * KIB)]);
}

#[test]
fn merge_of_coarser_source_dirties_every_covered_granule() {
    let mut target = bitmap(GIB, 4096);
    let mut src = bitmap(GIB, 64 * KIB);
    src.set(64 * KIB, 1);
    target.merge(&src).unwrap();
    assert_eq!(target.dirty_granules(), 16);
    assert_eq!(ranges(&target), [(64 * KIB, 64 * KIB)]);
}

#[test]
fn merge_of_same_granularity_unions_bits() {
    let mut a = bitmap(TIB, 64 * KIB);
    let mut b = bitmap(TIB, 64 * KIB);
    a.set(0, 1);
    b.set(64 * KIB, 1);
    b.set(500 * GIB, 1);
    a.merge(&b).unwrap();
    assert_eq!(ranges(&a), [(0, 128 * KIB), (500 * GIB, 64 * KIB)]);
    assert_eq!(a.dirty_granules(), 3);
}

#[test]
fn serialisation_puts_granule_zero_in_the_lowest_bit() {
    let mut b = bitmap(MIB, 4096);
    b.set(0, 1);
    b.set(9 * 4096, 1);
    let bytes = b.to_bytes();
    assert_eq!(bytes.len(), 32);
    assert_eq!(&bytes[..3], &[0b1, 0b10, 0]);
}

#[test]
fn serialize_part_past_the_end_writes_zeros() {
    let mut b = bitmap(10 * 4096, 4096);
    b.set_all();
    let mut buf = [0xaa; 4];
    b.serialize_part(8, &mut buf);
    assert_eq!(buf, [0b11, 0, 0, 0]);
}

#[test]
fn aligned_serialize_part_past_the_end_writes_zeros() {
    let mut b = bitmap(70 * 4096, 4096);
    b.set_all();
    let mut buf = [0xaa; 24];
    b.serialize_part(0, &mut buf);
    assert_eq!(
        &buf[..9],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0b11_1111]
    );
    assert_eq!(&buf[9..], &[0; 15]);
}

#[test]
fn deserialize_part_ignores_bits_past_the_end() {
    let mut b = bitmap(10 * 4096, 4096);
    b.deserialize_part(8, &[0xff, 0xff]);
    assert_eq!(b.dirty_granules(), 2);
    assert_eq!(b.to_bytes(), [0, 0b11]);
}

#[test]
fn deserialize_of_zeros_allocates_nothing() {
    let mut b = bitmap(TIB, 64 * KIB);
    b.deserialize_part(0, &vec![0u8; b.serialized_len()]);
    assert_eq!(b.allocated_chunks(), 0);
}

#[test]
fn from_bytes_rejects_a_short_buffer() {
    let err = HBitmap::from_bytes(MIB, 4096, &[0u8; 31]).unwrap_err();
    assert_eq!(
        err,
        Error::ShortBuffer {
            needed: 32,
            got: 31
        }
    );
}

#[test]
fn from_bytes_ignores_padding_after_the_bitmap() {
    let b = HBitmap::from_bytes(10 * 4096, 4096, &[0xff; 64]).unwrap();
    assert_eq!(b.dirty_granules(), 10);
}

#[test]
fn hash_bytes_of_empty_64_mib_disk_are_128_zero_bytes() {
    let b = bitmap(64 * MIB, 64 * KIB);
    assert_eq!(b.qemu_hash_bytes(), vec![0u8; 128]);
    assert_eq!(b.qemu_sha256(), sha256(&[0u8; 128]));
}

#[test]
fn streamed_sha256_equals_hash_of_hash_bytes() {
    let mut b = bitmap(3 * GIB + 7, 4096);
    b.set(12345, 99999);
    b.set(2 * GIB, 1);
    assert_eq!(b.qemu_sha256(), sha256(&b.qemu_hash_bytes()));
}

#[test]
fn resize_shrinking_drops_granules_past_the_new_end() {
    let mut b = bitmap(MIB, 4096);
    b.set_all();
    b.resize(10 * 4096 + 1).unwrap();
    assert_eq!(b.dirty_granules(), 11);
    b.resize(MIB).unwrap();
    assert_eq!(ranges(&b), [(0, 11 * 4096)]);
}

#[test]
fn resize_growing_keeps_bits_and_leaves_new_area_clean() {
    let mut b = bitmap(GIB, 512);
    b.set(GIB - 512, 512);
    b.resize(TIB).unwrap();
    assert_eq!(ranges(&b), [(GIB - 512, 512)]);
    assert_eq!(b.granules(), TIB / 512);
}

#[test]
fn resize_too_large_fails_and_keeps_the_bitmap() {
    let mut b = bitmap(MIB, 512);
    b.set(0, 1);
    assert!(matches!(b.resize(u64::MAX), Err(Error::TooLarge { .. })));
    assert_eq!(b.size(), MIB);
    assert_eq!(b.dirty_granules(), 1);
}

#[test]
fn clone_does_not_share_bits() {
    let mut a = bitmap(MIB, 4096);
    a.set(0, 1);
    let b = a.clone();
    a.reset_all();
    assert_eq!(b.dirty_granules(), 1);
}

#[test]
fn equality_ignores_how_the_bits_were_reached() {
    let mut a = bitmap(TIB, 65536);
    let mut b = bitmap(TIB, 65536);
    a.set_all();
    a.reset(0, TIB - 65536);
    b.set(TIB - 1, 1);
    assert_eq!(a, b);
}

#[test]
fn reset_all_frees_every_chunk() {
    let mut b = bitmap(TIB, 65536);
    b.set_all();
    b.reset_all();
    assert_eq!(b.allocated_chunks(), 0);
    assert!(b.is_empty());
    assert_eq!(b.next_dirty(0, u64::MAX), None);
}

#[test]
fn count_saturates_instead_of_overflowing() {
    let mut b = bitmap(u64::MAX, 1 << 31);
    b.set_all();
    assert_eq!(b.count(), u64::MAX);
    assert_eq!(b.dirty_granules(), 1 << 33);
}

#[test]
fn debug_output_is_a_summary() {
    let b = bitmap(MIB, 4096);
    let text = format!("{b:?}");
    assert!(text.contains("granularity: 4096"), "{text}");
}

#[test]
fn bad_granularity_displays_qemu_text() {
    let text = Error::BadGranularity(100).to_string();
    assert_eq!(text, "Granularity must be power of 2 and at least 512");
}

#[test]
fn size_mismatch_displays_qemu_text() {
    let err = Error::SizeMismatch {
        target: 67108864,
        source: 33554432,
    };
    assert_eq!(
        err.to_string(),
        "Bitmaps are of different sizes (destination size is 67108864, \
         source size is 33554432) and can't be merged"
    );
}

/// Writes `0+1, 65535+2, 10M+1M, (64M-1024)+1024` on a 64 MiB disk, hashed by
/// qemu-storage-daemon 10.0.2 (bitmaps recorded by qemu-io into a qcow2 image).
fn qsd_observed_writes(b: &mut HBitmap) {
    b.set(0, 1);
    b.set(65535, 2);
    b.set(10 * MIB, MIB);
    b.set(64 * MIB - 1024, 1024);
}

#[test]
fn sha256_matches_qsd_at_64_kib_granularity() {
    let mut b = bitmap(64 * MIB, 64 * KIB);
    qsd_observed_writes(&mut b);
    assert_eq!(b.count(), 1_245_184);
    assert_eq!(
        crate::sha256::to_hex(&b.qemu_sha256()),
        "69980310824634373280ca6825dcf2886a8cb50a02db272296362adb497688e4"
    );
}

#[test]
fn sha256_matches_qsd_at_512_byte_granularity() {
    let mut b = bitmap(64 * MIB, 512);
    qsd_observed_writes(&mut b);
    assert_eq!(b.count(), 1_051_136);
    assert_eq!(
        crate::sha256::to_hex(&b.qemu_sha256()),
        "f52c911471e88125cc0c0669bb3880aa6ac42f0fdc33c26c74412581987c5359"
    );
}

#[test]
fn sha256_of_empty_bitmap_matches_qsd() {
    let b = bitmap(64 * MIB, 64 * KIB);
    assert_eq!(
        crate::sha256::to_hex(&b.qemu_sha256()),
        "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"
    );
}

#[test]
fn bitmap_and_error_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<HBitmap>();
    assert_send_sync::<Error>();
}
