//! Dirty bitmaps: which writes mark them, counts, and the commands with QEMU's refusals.

use block::bitmap::default_granularity;
use block::bitmap_ops;
use block::graph::DriverOptions;
use block::{Graph, NodeRef};

use crate::common::*;

const MIB: u64 = 1 << 20;
const G64K: u64 = 65536;

/// A raw node over a 1 MiB file with bitmap "b" (64 KiB granularity) on the raw node.
fn disk_with_bitmap(discard_unmap: bool) -> (tempfile::NamedTempFile, Graph, NodeRef) {
    let img = image(MIB as usize, 0);
    let mut graph = Graph::new();
    let mut opts = raw_inline_opts("disk", &path(&img));
    if discard_unmap {
        opts = with_unmap(opts);
    }
    let raw = graph.add(&opts).unwrap();
    bitmap_ops::add(&raw, "b", Some(G64K), false, false).unwrap();
    (img, graph, raw)
}

#[test]
fn write_marks_recording_bitmap() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    raw.write(G64K, &[1; 512]).unwrap();

    assert!(dirty_at(&raw, "b", G64K));
    assert_eq!(count(&raw, "b"), G64K);
}

#[test]
fn write_zeroes_marks_recording_bitmap() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    raw.write_zeroes(2 * G64K, G64K, true).unwrap();

    assert!(dirty_at(&raw, "b", 2 * G64K));
    assert_eq!(count(&raw, "b"), G64K);
}

#[test]
fn discard_with_unmap_marks_recording_bitmap() {
    let (_img, _graph, raw) = disk_with_bitmap(true);

    raw.discard(3 * G64K, 2 * G64K).unwrap();

    assert_eq!(count(&raw, "b"), 2 * G64K);
    assert!(dirty_at(&raw, "b", 4 * G64K));
}

#[test]
fn discard_without_unmap_marks_nothing() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    raw.discard(0, G64K).unwrap();

    assert_eq!(count(&raw, "b"), 0);
}

#[test]
fn read_marks_nothing() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    let mut buf = [0u8; 4096];

    raw.read(0, &mut buf).unwrap();

    assert_eq!(count(&raw, "b"), 0);
}

#[test]
fn refused_write_marks_nothing() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    raw.write(MIB, &[1; 512]).unwrap_err();

    assert_eq!(count(&raw, "b"), 0);
}

#[test]
fn disabled_bitmap_is_not_marked_while_recording_one_is() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::add(&raw, "off", Some(G64K), false, true).unwrap();

    raw.write(0, &[1; 512]).unwrap();

    assert_eq!(count(&raw, "off"), 0);
    assert_eq!(count(&raw, "b"), G64K);
}

#[test]
fn disabling_bitmap_stops_marking() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    let was = bitmap_ops::set_recording(&raw, "b", false).unwrap();
    raw.write(0, &[1; 512]).unwrap();
    raw.write_zeroes(G64K, 512, false).unwrap();

    assert!(was);
    assert_eq!(count(&raw, "b"), 0);
}

#[test]
fn enabling_disabled_bitmap_resumes_marking() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::add(&raw, "off", Some(G64K), false, true).unwrap();

    let was = bitmap_ops::set_recording(&raw, "off", true).unwrap();
    raw.write(0, &[1; 512]).unwrap();

    assert!(!was);
    assert_eq!(count(&raw, "off"), G64K);
}

#[test]
fn write_through_raw_marks_raw_and_file_bitmaps_separately() {
    let img = image(MIB as usize, 0);
    let mut graph = Graph::new();
    let mut opts = raw_inline_opts("disk", &path(&img));
    if let DriverOptions::Raw { offset, .. } = &mut opts.driver {
        *offset = Some(G64K);
    }
    let raw = graph.add(&opts).unwrap();
    let file = raw.child("file").unwrap().clone();
    bitmap_ops::add(&raw, "rb", Some(G64K), false, false).unwrap();
    bitmap_ops::add(&file, "fb", Some(4096), false, false).unwrap();

    raw.write(0, &[1; 512]).unwrap();

    // The raw bitmap sees node offset 0; the file bitmap sees file offset 64 KiB.
    assert_eq!(count(&raw, "rb"), G64K);
    assert!(dirty_at(&raw, "rb", 0));
    assert_eq!(count(&file, "fb"), 4096);
    assert!(dirty_at(&file, "fb", G64K));
    assert!(!dirty_at(&file, "fb", 0));
}

#[test]
fn bitmap_on_file_only_is_marked_by_writes_through_raw() {
    let img = image(MIB as usize, 0);
    let (_graph, raw) = raw_graph(&path(&img));
    let file = raw.child("file").unwrap().clone();
    bitmap_ops::add(&file, "fb", Some(G64K), false, false).unwrap();

    raw.write_zeroes(5 * G64K, 10, false).unwrap();

    assert!(dirty_at(&file, "fb", 5 * G64K));
    assert_eq!(count(&file, "fb"), G64K);
}

#[test]
fn unaligned_write_counts_every_touched_granule_in_full() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    raw.write(G64K - 1, &[1; 2]).unwrap();

    assert_eq!(count(&raw, "b"), 2 * G64K);
    assert!(dirty_at(&raw, "b", 0));
    assert!(dirty_at(&raw, "b", G64K));
    assert!(!dirty_at(&raw, "b", 2 * G64K));
}

#[test]
fn write_into_last_partial_granule_counts_a_full_granule() {
    // 100000 bytes: the last 64 KiB granule covers only 34464 bytes of the disk.
    let img = image(100_000, 0);
    let (_graph, raw) = raw_graph(&path(&img));
    bitmap_ops::add(&raw, "b", Some(G64K), false, false).unwrap();

    raw.write(99_999, &[1]).unwrap();

    assert_eq!(count(&raw, "b"), G64K);
    assert!(dirty_at(&raw, "b", 99_999));
}

#[test]
fn fully_dirty_unaligned_disk_counts_more_than_its_size() {
    let img = image(100_000, 0);
    let (_graph, raw) = raw_graph(&path(&img));
    bitmap_ops::add(&raw, "b", Some(G64K), false, false).unwrap();

    raw.write_zeroes(0, 100_000, false).unwrap();

    assert_eq!(count(&raw, "b"), 2 * G64K);
}

#[test]
fn write_past_end_of_growable_file_marks_only_the_bitmap_range() {
    let img = image(G64K as usize, 0);
    let mut graph = Graph::new();
    let file = graph.add(&file_opts(Some("f"), &path(&img))).unwrap();
    bitmap_ops::add(&file, "b", Some(4096), false, false).unwrap();

    file.write(G64K - 512, &[1; 8192]).unwrap();

    assert_eq!(count(&file, "b"), 4096);
}

#[test]
fn clear_empties_bitmap_and_returns_old_bits() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    raw.write(0, &[1; 512]).unwrap();

    let old = bitmap_ops::clear(&raw, "b").unwrap();

    assert_eq!(count(&raw, "b"), 0);
    assert_eq!(old.count(), G64K);
}

#[test]
fn restore_puts_back_bits_saved_by_clear() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    raw.write(0, &[1; 512]).unwrap();
    let old = bitmap_ops::clear(&raw, "b").unwrap();

    bitmap_ops::restore(&raw, "b", old);

    assert_eq!(count(&raw, "b"), G64K);
}

#[test]
fn merge_across_nodes_and_granularities_marks_covering_granules() {
    let a = image(MIB as usize, 0);
    let b = image(MIB as usize, 0);
    let mut graph = Graph::new();
    let na = graph.add(&raw_inline_opts("a", &path(&a))).unwrap();
    let nb = graph.add(&raw_inline_opts("b", &path(&b))).unwrap();
    bitmap_ops::add(&na, "target", Some(G64K), false, false).unwrap();
    bitmap_ops::add(&nb, "src", Some(4096), false, false).unwrap();
    nb.write(3 * G64K + 8192, &[1; 512]).unwrap();

    let old = bitmap_ops::merge(&na, "target", &[(nb.clone(), "src".into())]).unwrap();

    assert_eq!(old.count(), 0);
    assert_eq!(count(&na, "target"), G64K);
    assert!(dirty_at(&na, "target", 3 * G64K));
    assert_eq!(count(&nb, "src"), 4096);
}

#[test]
fn merge_of_several_sources_unions_them_into_target() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::add(&raw, "s1", Some(G64K), false, false).unwrap();
    raw.write(0, &[1; 1]).unwrap();
    bitmap_ops::add(&raw, "s2", Some(G64K), false, false).unwrap();
    bitmap_ops::set_recording(&raw, "s1", false).unwrap();
    raw.write(5 * G64K, &[1; 1]).unwrap();
    bitmap_ops::add(&raw, "t", Some(G64K), false, true).unwrap();

    bitmap_ops::merge(
        &raw,
        "t",
        &[(raw.clone(), "s1".into()), (raw.clone(), "s2".into())],
    )
    .unwrap();

    assert_eq!(count(&raw, "t"), 2 * G64K);
    assert!(dirty_at(&raw, "t", 0));
    assert!(dirty_at(&raw, "t", 5 * G64K));
}

#[test]
fn merge_of_bitmap_into_itself_keeps_it() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    raw.write(0, &[1; 1]).unwrap();

    bitmap_ops::merge(&raw, "b", &[(raw.clone(), "b".into())]).unwrap();

    assert_eq!(count(&raw, "b"), G64K);
}

#[test]
fn merge_of_different_sizes_is_refused_with_qemu_text_and_target_unchanged() {
    let a = image(MIB as usize, 0);
    let b = image(2 * MIB as usize, 0);
    let mut graph = Graph::new();
    let na = graph.add(&raw_inline_opts("a", &path(&a))).unwrap();
    let nb = graph.add(&raw_inline_opts("b", &path(&b))).unwrap();
    bitmap_ops::add(&na, "t", Some(G64K), false, false).unwrap();
    bitmap_ops::add(&nb, "s", Some(G64K), false, false).unwrap();
    nb.write(0, &[1; 1]).unwrap();

    let err = bitmap_ops::merge(&na, "t", &[(nb.clone(), "s".into())]).unwrap_err();

    assert_eq!(
        err.message(),
        "Bitmaps are of different sizes (destination size is 1048576, source size is 2097152) and can't be merged"
    );
    assert_eq!(count(&na, "t"), 0);
}

#[test]
fn merge_from_unknown_source_reports_not_found() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    let err = bitmap_ops::merge(&raw, "b", &[(raw.clone(), "ghost".into())]).unwrap_err();

    assert_eq!(err.message(), "Dirty bitmap 'ghost' not found");
}

#[test]
fn command_on_unknown_bitmap_reports_not_found() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    let clear = bitmap_ops::clear(&raw, "ghost").unwrap_err();
    let remove = bitmap_ops::remove(&raw, "ghost").unwrap_err();
    let hash = bitmap_ops::sha256(&raw, "ghost").unwrap_err();

    for err in [clear, remove, hash] {
        assert_eq!(err.message(), "Dirty bitmap 'ghost' not found");
    }
}

#[test]
fn remove_deletes_bitmap_and_stops_marking() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    bitmap_ops::remove(&raw, "b").unwrap();
    raw.write(0, &[1; 1]).unwrap();

    assert!(raw.bitmaps().get("b").is_none());
    assert_eq!(raw.bitmaps().recording_count(), 0);
}

const BUSY: &str = "Bitmap 'b' is currently in use by another operation and cannot be used";

#[test]
fn busy_bitmap_refuses_clear() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::acquire(&raw, "b").unwrap();

    let err = bitmap_ops::clear(&raw, "b").unwrap_err();

    assert_eq!(err.message(), BUSY);
}

#[test]
fn busy_bitmap_refuses_enable_and_disable() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::acquire(&raw, "b").unwrap();

    let disable = bitmap_ops::set_recording(&raw, "b", false).unwrap_err();
    let enable = bitmap_ops::set_recording(&raw, "b", true).unwrap_err();

    assert_eq!(disable.message(), BUSY);
    assert_eq!(enable.message(), BUSY);
}

#[test]
fn busy_bitmap_refuses_remove() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::acquire(&raw, "b").unwrap();

    let err = bitmap_ops::remove(&raw, "b").unwrap_err();

    assert_eq!(err.message(), BUSY);
    assert!(raw.bitmaps().get("b").is_some());
}

#[test]
fn busy_bitmap_refuses_to_be_merged_into_or_from() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::add(&raw, "other", Some(G64K), false, false).unwrap();
    bitmap_ops::acquire(&raw, "b").unwrap();

    let into = bitmap_ops::merge(&raw, "b", &[(raw.clone(), "other".into())]).unwrap_err();
    let from = bitmap_ops::merge(&raw, "other", &[(raw.clone(), "b".into())]).unwrap_err();

    assert_eq!(into.message(), BUSY);
    assert_eq!(from.message(), BUSY);
}

#[test]
fn busy_bitmap_cannot_be_acquired_twice() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::acquire(&raw, "b").unwrap();

    let err = bitmap_ops::acquire(&raw, "b").unwrap_err();

    assert_eq!(err.message(), BUSY);
}

#[test]
fn busy_bitmap_still_records_writes() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::acquire(&raw, "b").unwrap();

    raw.write(0, &[1; 1]).unwrap();

    assert_eq!(count(&raw, "b"), G64K);
}

#[test]
fn released_bitmap_is_usable_again() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::acquire(&raw, "b").unwrap();

    bitmap_ops::release(&raw, "b");

    assert!(bitmap_ops::clear(&raw, "b").is_ok());
}

fn make_inconsistent(node: &NodeRef, name: &str) {
    let mut list = node.bitmaps();
    let b = list.get_mut(name).unwrap();
    b.inconsistent = true;
    b.recording = false;
    node.refresh_recording(&list);
}

const INCONSISTENT: &str = "Bitmap 'b' is inconsistent and cannot be used";

#[test]
fn inconsistent_bitmap_refuses_clear() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    make_inconsistent(&raw, "b");

    let err = bitmap_ops::clear(&raw, "b").unwrap_err();

    assert_eq!(err.message(), INCONSISTENT);
}

#[test]
fn inconsistent_bitmap_refuses_enable() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    make_inconsistent(&raw, "b");

    let err = bitmap_ops::set_recording(&raw, "b", true).unwrap_err();

    assert_eq!(err.message(), INCONSISTENT);
}

#[test]
fn inconsistent_bitmap_refuses_to_be_merge_source() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    bitmap_ops::add(&raw, "t", Some(G64K), false, false).unwrap();
    make_inconsistent(&raw, "b");

    let err = bitmap_ops::merge(&raw, "t", &[(raw.clone(), "b".into())]).unwrap_err();

    assert_eq!(err.message(), INCONSISTENT);
}

#[test]
fn inconsistent_bitmap_can_be_removed() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    make_inconsistent(&raw, "b");

    bitmap_ops::remove(&raw, "b").unwrap();

    assert!(raw.bitmaps().get("b").is_none());
}

#[test]
fn readonly_bitmap_refuses_clear() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    raw.bitmaps().get_mut("b").unwrap().readonly = true;

    let err = bitmap_ops::clear(&raw, "b").unwrap_err();

    assert_eq!(
        err.message(),
        "Bitmap 'b' is readonly and cannot be modified"
    );
}

#[test]
fn readonly_bitmap_can_be_merge_source() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    raw.write(0, &[1; 1]).unwrap();
    bitmap_ops::add(&raw, "t", Some(G64K), false, true).unwrap();
    raw.bitmaps().get_mut("b").unwrap().readonly = true;

    bitmap_ops::merge(&raw, "t", &[(raw.clone(), "b".into())]).unwrap();

    assert_eq!(count(&raw, "t"), G64K);
}

#[test]
fn adding_existing_bitmap_name_is_refused() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    let err = bitmap_ops::add(&raw, "b", Some(G64K), false, false).unwrap_err();

    assert_eq!(err.message(), "Bitmap already exists: b");
}

#[test]
fn bad_granularities_are_refused_with_qemu_text() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    for g in [0, 256, 3000, 1 << 32] {
        let err = bitmap_ops::add(&raw, "x", Some(g), false, false).unwrap_err();

        assert_eq!(
            err.message(),
            "Granularity must be power of 2 and at least 512",
            "granularity {g}"
        );
    }
}

#[test]
fn extreme_valid_granularities_are_accepted() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    bitmap_ops::add(&raw, "small", Some(512), false, false).unwrap();
    bitmap_ops::add(&raw, "large", Some(1 << 31), false, false).unwrap();

    assert_eq!(raw.bitmaps().find("small").unwrap().bits.granularity(), 512);
    assert_eq!(
        raw.bitmaps().find("large").unwrap().bits.granularity(),
        1 << 31
    );
}

#[test]
fn empty_bitmap_name_is_refused() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    let err = bitmap_ops::add(&raw, "", None, false, false).unwrap_err();

    assert_eq!(err.message(), "Bitmap name cannot be empty");
}

#[test]
fn bitmap_name_over_1023_bytes_is_refused_and_1023_accepted() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    let long = "x".repeat(1024);

    let err = bitmap_ops::add(&raw, &long, None, false, false).unwrap_err();
    let ok = bitmap_ops::add(&raw, &"y".repeat(1023), None, false, false);

    assert_eq!(err.message(), format!("Bitmap name too long: {long}"));
    assert!(ok.is_ok());
}

#[test]
fn persistent_bitmap_on_file_node_is_refused() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    let err = bitmap_ops::add(&raw, "p", None, true, false).unwrap_err();

    assert_eq!(
        err.message(),
        "Can't store persistent bitmaps to disk: Operation not supported"
    );
}

#[test]
fn bitmap_without_granularity_on_node_without_clusters_gets_64k() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    bitmap_ops::add(&raw, "d", None, false, false).unwrap();

    assert_eq!(raw.bitmaps().find("d").unwrap().bits.granularity(), G64K);
}

#[test]
fn default_granularity_is_64k_without_cluster_size() {
    assert_eq!(default_granularity(None), 65536);
}

#[test]
fn default_granularity_raises_small_clusters_to_4k() {
    assert_eq!(default_granularity(Some(512)), 4096);
    assert_eq!(default_granularity(Some(2048)), 4096);
}

#[test]
fn default_granularity_caps_large_clusters_at_64k() {
    assert_eq!(default_granularity(Some(1 << 21)), 65536);
    assert_eq!(default_granularity(Some(131072)), 65536);
}

#[test]
fn default_granularity_keeps_cluster_sizes_between_4k_and_64k() {
    assert_eq!(default_granularity(Some(4096)), 4096);
    assert_eq!(default_granularity(Some(16384)), 16384);
    assert_eq!(default_granularity(Some(65536)), 65536);
}

#[test]
fn sha256_is_equal_for_equal_bitmaps_on_different_nodes() {
    let a = image(MIB as usize, 0);
    let b = image(MIB as usize, 0);
    let mut graph = Graph::new();
    let na = graph.add(&raw_inline_opts("a", &path(&a))).unwrap();
    let nb = graph.add(&raw_inline_opts("b", &path(&b))).unwrap();
    bitmap_ops::add(&na, "x", Some(G64K), false, false).unwrap();
    bitmap_ops::add(&nb, "y", Some(G64K), false, false).unwrap();

    na.write(G64K, &[1; 10]).unwrap();
    nb.write_zeroes(G64K + 500, 10, false).unwrap();

    let ha = bitmap_ops::sha256(&na, "x").unwrap();
    let hb = bitmap_ops::sha256(&nb, "y").unwrap();
    assert_eq!(ha, hb);
    assert_eq!(ha.len(), 64);
    assert!(ha.chars().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn sha256_changes_when_bitmap_changes() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    let before = bitmap_ops::sha256(&raw, "b").unwrap();

    raw.write(0, &[1; 1]).unwrap();

    assert_ne!(bitmap_ops::sha256(&raw, "b").unwrap(), before);
}

#[test]
fn sha256_of_cleared_bitmap_equals_fresh_bitmap() {
    let (_img, _graph, raw) = disk_with_bitmap(false);
    let fresh = bitmap_ops::sha256(&raw, "b").unwrap();
    raw.write(0, &[1; 1]).unwrap();

    bitmap_ops::clear(&raw, "b").unwrap();

    assert_eq!(bitmap_ops::sha256(&raw, "b").unwrap(), fresh);
}

#[test]
fn sha256_of_empty_bitmap_matches_qemu() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    let hash = bitmap_ops::sha256(&raw, "b").unwrap();

    // qemu-storage-daemon 10.0: empty 64 KiB-granularity bitmap on a 1 MiB node.
    assert_eq!(
        hash,
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    );
}

#[test]
fn sha256_of_dirty_bitmap_matches_qemu() {
    let (_img, _graph, raw) = disk_with_bitmap(false);

    raw.write(65536, &[1; 512]).unwrap();
    raw.write(983040, &[1; 1]).unwrap();

    // qemu-io 'write 65536 512' and 'write 983040 1' on a 1 MiB qcow2 with a 64 KiB
    // bitmap, then hashed by qemu-storage-daemon 10.0.
    assert_eq!(
        bitmap_ops::sha256(&raw, "b").unwrap(),
        "26f20187459707e0f1543928bdd92a9400e163a5856a7a0833ca59e74a1018c8"
    );
}
