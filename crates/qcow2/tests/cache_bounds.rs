//! The metadata caches stay within their configured bounds and drop idle tables on request.

use std::sync::Arc;

use qcow2::{CreateOptions, MemStorage, OpenOptions, Qcow2};

/// A 64 GiB image with 64 KiB clusters (one L2 table covers 512 MiB).
fn image() -> (Arc<MemStorage>, Qcow2) {
    let mem = Arc::new(MemStorage::new());
    Qcow2::create(
        mem.as_ref(),
        &CreateOptions {
            size: 64 << 30,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(mem.clone(), OpenOptions::default()).expect("open");
    (mem, img)
}

#[test]
fn l2_cache_holds_at_most_its_capacity_and_data_stays_right() {
    let (mem, img) = image();
    img.set_cache_capacity(3, 4).expect("bound");
    // One write in each of 16 L2 tables' ranges.
    for i in 0..16u64 {
        img.write_at(&[i as u8 + 1; 4096], i << 29).expect("write");
        let (l2, rb) = img.cached_tables();
        assert!(
            l2 <= 3 && rb <= 4,
            "cache over its bound: {l2} L2, {rb} refcount"
        );
    }
    img.flush().expect("flush");
    img.close().expect("close");
    let img = Qcow2::open(mem, OpenOptions { read_only: true }).expect("reopen");
    img.set_cache_capacity(2, 2).expect("bound");
    for i in 0..16u64 {
        let mut buf = [0u8; 4096];
        img.read_at(&mut buf, i << 29).expect("read");
        assert!(buf.iter().all(|&b| b == i as u8 + 1), "table {i}");
        assert!(img.cached_tables().0 <= 2);
    }
}

#[test]
fn shrinking_the_cache_writes_dirty_tables_back_first() {
    let (mem, img) = image();
    for i in 0..8u64 {
        img.write_at(&[0x5a; 512], i << 29).expect("write");
    }
    assert_eq!(img.cached_tables().0, 8);
    img.set_cache_capacity(2, 4).expect("shrink");
    assert!(img.cached_tables().0 <= 2);
    img.flush().expect("flush");
    img.close().expect("close");
    let img = Qcow2::open(mem, OpenOptions { read_only: true }).expect("reopen");
    for i in 0..8u64 {
        let mut buf = [0u8; 512];
        img.read_at(&mut buf, i << 29).expect("read");
        assert_eq!(buf, [0x5a; 512], "write in table {i} lost");
    }
}

#[test]
fn cleaning_drops_tables_idle_since_the_previous_cleaning() {
    let (_mem, img) = image();
    for i in 0..4u64 {
        img.write_at(&[1; 512], i << 29).expect("write");
    }
    img.flush().expect("flush: tables clean");
    img.clean_caches();
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 0).expect("touch table 0");
    assert!(
        img.clean_caches() >= 3,
        "the three idle L2 tables are dropped"
    );
    assert_eq!(img.cached_tables().0, 1, "the one used since stays");
}

#[test]
fn scattered_writes_keep_l2_cache_memory_near_the_mapped_data() {
    let (mem, img) = image();
    // 4 writes in each of the 128 L2 tables: 128 tables cached, 4 of 8192 entries each.
    for t in 0..128u64 {
        for k in 0..4u64 {
            img.write_at(&[0x33; 4096], (t << 29) + (k << 20))
                .expect("write");
        }
    }
    img.flush().expect("flush");
    assert_eq!(img.cached_tables().0, 128);
    let l2_dense = 128 * 65536;
    let used = img.cache_memory();
    assert!(
        used < l2_dense / 16,
        "cache holds {used} bytes for 128 nearly empty L2 tables"
    );
    img.close().expect("close");
    let img = Qcow2::open(mem, OpenOptions { read_only: true }).expect("reopen");
    for t in 0..128u64 {
        for k in 0..4u64 {
            let mut buf = [0u8; 4096];
            img.read_at(&mut buf, (t << 29) + (k << 20)).expect("read");
            assert_eq!(buf, [0x33; 4096]);
        }
    }
}

#[test]
fn l2_cache_memory_stays_within_entries_times_entry_size() {
    for slice in [512usize, 4096, 65536] {
        let (mem, img) = image();
        img.set_l2_slice_size(slice).expect("slice size");
        img.set_cache_capacity(6, 4).expect("bound");
        let bound = 6 * slice;
        let check = |what: &str| {
            let (held, used) = (img.cached_tables().0, img.l2_cache_memory());
            assert!(
                held <= 6 && used <= bound,
                "{slice}-byte slices, {what}: {held} entries, {used} bytes > {bound}"
            );
        };
        // Dense runs (every entry mapped), compressed (wide) entries, preallocated zeros and
        // scattered single clusters, in several tables.
        for t in 0..4u64 {
            let base = t << 29;
            img.write_at(&vec![0x11; 8 << 20], base).expect("dense run");
            check("dense");
            for k in 0..16u64 {
                img.write_compressed(base + (16 << 20) + (k << 16), &[k as u8; 65536])
                    .expect("compressed");
            }
            check("compressed");
            img.write_zeroes(base, 1 << 20, false).expect("zeroes");
            check("zeroes");
            for k in 0..64u64 {
                img.write_at(&[0x22; 512], base + (64 << 20) + (k << 21))
                    .expect("scattered");
            }
            check("scattered");
        }
        img.close().expect("close");
        let img = Qcow2::open(mem, OpenOptions { read_only: true }).expect("reopen");
        for t in 0..4u64 {
            let base = t << 29;
            let mut buf = vec![0u8; 65536];
            img.read_at(&mut buf, base).expect("read");
            assert!(buf.iter().all(|&b| b == 0), "zeroed");
            img.read_at(&mut buf, base + (2 << 20)).expect("read");
            assert!(buf.iter().all(|&b| b == 0x11), "dense");
            img.read_at(&mut buf, base + (16 << 20) + (5 << 16))
                .expect("read");
            assert!(buf.iter().all(|&b| b == 5), "compressed");
            img.read_at(&mut buf[..512], base + (64 << 20) + (63 << 21))
                .expect("read");
            assert!(buf[..512].iter().all(|&b| b == 0x22), "scattered");
        }
    }
}
