//! Persistent bitmaps interoperate with qemu-img / qemu-io.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use qcow2::{CreateOptions, FileStorage, OpenOptions, Qcow2, StoreBitmap};

/// The bitmaps listed by `qemu-img info -U`: (name, granularity, flags).
fn qemu_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = qemu_img(&["info", "-U", "--output=json", path.to_str().expect("p")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let list = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .map(|f| f.as_str().expect("s").to_string())
                .collect();
            (
                b["name"].as_str().expect("name").to_string(),
                b["granularity"].as_u64().expect("g"),
                flags,
            )
        })
        .collect()
}

/// A fresh qemu-made image with bitmaps b1 (auto, 64K) and b2 (disabled, 128K), dirtied by
/// qemu-io at 0+4K and 1M+64K.
fn qemu_image_with_bitmaps(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path("b.qcow2");
    let p = path.to_str().expect("p");
    qemu_create(&path, "", "64M");
    qemu_img(&["bitmap", "--add", p, "b1"]);
    qemu_img(&["bitmap", "--add", "-g", "128K", "--disable", p, "b2"]);
    qemu_io(&path, &["write 0 4k", "write 1M 64k"]);
    path
}

/// Our own image of `size` with some data.
fn our_image(path: &Path, size: u64) -> Qcow2 {
    let st = Arc::new(FileStorage::create(path).expect("create"));
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size,
            ..Default::default()
        },
    )
    .expect("create");
    Qcow2::open(st, OpenOptions::default()).expect("open")
}

/// Bitmap data with the given bits set.
fn bits(len: usize, set: &[usize]) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for &i in set {
        d[i / 8] |= 1 << (i % 8);
    }
    d
}

#[test]
fn qemu_bitmaps_load_with_flags_and_data() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-load");
    let path = qemu_image_with_bitmaps(&dir);
    let img = open(&path, false);
    let info = img.bitmaps();
    assert_eq!(info.len(), 2);
    assert_eq!(
        (
            info[0].name.as_str(),
            info[0].granularity,
            info[0].auto,
            info[0].in_use
        ),
        ("b1", 65536, true, false)
    );
    assert_eq!(
        (
            info[1].name.as_str(),
            info[1].granularity,
            info[1].auto,
            info[1].in_use
        ),
        ("b2", 131072, false, false)
    );
    let loaded = img.load_bitmaps().expect("load");
    // 64 MiB / 64 KiB = 1024 bits = 128 bytes; writes dirtied granules 0 and 16.
    assert_eq!(loaded[0].data, bits(128, &[0, 16]));
    assert!(!loaded[0].inconsistent);
    assert_eq!(
        loaded[1].data,
        vec![0u8; 64],
        "disabled bitmap records nothing"
    );
}

#[test]
fn read_only_load_does_not_touch_the_file() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-ro");
    let path = qemu_image_with_bitmaps(&dir);
    let before = std::fs::read(&path).expect("read");
    open(&path, false).load_bitmaps().expect("load");
    assert!(std::fs::read(&path).expect("read") == before);
}

#[test]
fn writable_load_sets_in_use_visible_to_qemu_img_info() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-inuse");
    let path = qemu_image_with_bitmaps(&dir);
    let img = open(&path, true);
    img.load_bitmaps().expect("load");
    let listed = qemu_bitmaps(&path);
    assert!(
        listed
            .iter()
            .all(|(_, _, f)| f.contains(&"in-use".to_string())),
        "{listed:?}"
    );
    assert!(img.bitmaps().iter().all(|b| b.in_use));
}

#[test]
fn clean_store_clears_in_use_and_passes_check() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-clean");
    let path = qemu_image_with_bitmaps(&dir);
    let img = open(&path, true);
    let loaded = img.load_bitmaps().expect("load");
    img.write_at(&[1u8; 512], 5 << 20).expect("write");
    let store: Vec<StoreBitmap> = loaded
        .iter()
        .map(|b| StoreBitmap {
            name: b.name.clone(),
            granularity: b.granularity,
            auto: b.auto,
            inconsistent_keep_in_use: false,
            data: b.data.clone(),
        })
        .collect();
    img.store_bitmaps(&store, false).expect("store");
    img.close().expect("close");
    assert_check_clean(&path);
    let listed = qemu_bitmaps(&path);
    assert_eq!(
        listed,
        vec![
            ("b1".to_string(), 65536, vec!["auto".to_string()]),
            ("b2".to_string(), 131072, vec![])
        ]
    );
}

#[test]
fn stored_bitmaps_are_accepted_by_qemu_merge_and_convert() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-store");
    let path = dir.path("ours.qcow2");
    let img = our_image(&path, 100 << 20);
    img.can_store_bitmap("a", 65536).expect("can store");
    // 100 MiB at 64 KiB = 1600 bits = 200 bytes; at 512 B = 204800 bits = 25600 bytes (several
    // data clusters, some all-zero).
    let a = bits(200, &[0, 7, 8, 1599]);
    let b = bits(25600, &[1, 100_000, 204_799]);
    let list = vec![
        StoreBitmap {
            name: "a".into(),
            granularity: 65536,
            auto: true,
            inconsistent_keep_in_use: false,
            data: a.clone(),
        },
        StoreBitmap {
            name: "b".into(),
            granularity: 512,
            auto: false,
            inconsistent_keep_in_use: false,
            data: b.clone(),
        },
    ];
    img.store_bitmaps(&list, false).expect("store");
    img.close().expect("close");
    assert_check_clean(&path);
    let listed = qemu_bitmaps(&path);
    assert_eq!(
        listed,
        vec![
            ("a".to_string(), 65536, vec!["auto".to_string()]),
            ("b".to_string(), 512, vec![])
        ]
    );
    // qemu-img merges our bitmap into a new one, and converts with bitmaps.
    let p = path.to_str().expect("p");
    qemu_img(&["bitmap", "--add", "-g", "65536", p, "m"]);
    qemu_img(&["bitmap", "--merge", "a", p, "m"]);
    let copy = dir.path("copy.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "--bitmaps",
        "-O",
        "qcow2",
        p,
        copy.to_str().expect("p"),
    ]);
    assert_check_clean(&path);
    assert_check_clean(&copy);
    let reread = open(&copy, false).load_bitmaps().expect("load");
    let find = |n: &str| {
        reread
            .iter()
            .find(|x| x.name == n)
            .expect("bitmap")
            .data
            .clone()
    };
    assert_eq!(find("a"), a);
    assert_eq!(find("b"), b);
    assert_eq!(find("m"), a, "merge of a into empty m equals a");
}

#[test]
fn unclean_stop_without_a_valid_log_makes_bitmaps_inconsistent_and_they_stay_in_use() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-crash");
    let path = qemu_image_with_bitmaps(&dir);
    {
        let img = open(&path, true);
        img.load_bitmaps().expect("load");
        // Dropped without storing: like a crash.
    }
    // A writable open by QEMU clears the dirty-region log's autoclear bit (see crash_images.rs
    // for the recovery with a valid log).
    qemu_io(&path, &["flush"]);
    let img = open(&path, true);
    let loaded = img.load_bitmaps().expect("load");
    assert!(loaded.iter().all(|b| b.inconsistent));
    let keep: Vec<StoreBitmap> = loaded
        .iter()
        .map(|b| StoreBitmap {
            name: b.name.clone(),
            granularity: b.granularity,
            auto: b.auto,
            inconsistent_keep_in_use: true,
            data: Vec::new(),
        })
        .collect();
    img.store_bitmaps(&keep, false).expect("store");
    img.close().expect("close");
    assert_check_clean(&path);
    assert!(qemu_bitmaps(&path)
        .iter()
        .all(|(_, _, f)| f.contains(&"in-use".to_string())));
}

#[test]
fn write_back_while_open_is_on_disk_flagged_in_use() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-periodic");
    let path = dir.path("ours.qcow2");
    let img = our_image(&path, 16 << 20);
    let data = bits(32, &[3]);
    let bm = StoreBitmap {
        name: "x".into(),
        granularity: 65536,
        auto: true,
        inconsistent_keep_in_use: false,
        data: data.clone(),
    };
    img.store_bitmaps(std::slice::from_ref(&bm), true)
        .expect("store");
    img.flush().expect("flush");
    assert_eq!(
        qemu_bitmaps(&path),
        vec![(
            "x".to_string(),
            65536,
            vec!["in-use".to_string(), "auto".to_string()]
        )]
    );
    drop(img);
    let again = open(&path, false).load_bitmaps().expect("load");
    assert!(again[0].inconsistent);
    assert_eq!(again[0].data, data);
}

#[test]
fn remove_bitmap_deletes_it_from_the_file_at_once() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-rm");
    let path = qemu_image_with_bitmaps(&dir);
    let img = open(&path, true);
    img.remove_bitmap("b1").expect("remove");
    let listed = qemu_bitmaps(&path);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "b2");
    img.remove_bitmap("b2").expect("remove");
    img.close().expect("close");
    assert_check_clean(&path);
    assert!(qemu_bitmaps(&path).is_empty());
    let err = open(&path, true).remove_bitmap("b2").expect_err("gone");
    assert_eq!(err.kind(), qcow2::ErrorKind::NotFound);
}

#[test]
fn can_store_bitmap_refuses_name_collisions_and_bad_granularity() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-can");
    let path = qemu_image_with_bitmaps(&dir);
    let img = open(&path, true);
    assert_eq!(
        img.can_store_bitmap("b1", 65536)
            .expect_err("exists")
            .kind(),
        qcow2::ErrorKind::Exists
    );
    assert_eq!(
        img.can_store_bitmap("n", 1000).expect_err("bad").kind(),
        qcow2::ErrorKind::InvalidArgument
    );
    assert_eq!(
        img.can_store_bitmap("", 65536).expect_err("bad").kind(),
        qcow2::ErrorKind::InvalidArgument
    );
    assert_eq!(
        img.can_store_bitmap(&"n".repeat(1024), 65536)
            .expect_err("bad")
            .kind(),
        qcow2::ErrorKind::InvalidArgument
    );
    img.can_store_bitmap("new", 65536).expect("fine");
}

#[test]
fn can_store_bitmap_refuses_v2_images() {
    let st = Arc::new(qcow2::MemStorage::new());
    Qcow2::create(
        st.as_ref(),
        &CreateOptions {
            size: 1 << 20,
            version: 2,
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(st, OpenOptions::default()).expect("open");
    assert_eq!(
        img.can_store_bitmap("a", 65536).expect_err("v2").kind(),
        qcow2::ErrorKind::Unsupported
    );
}

#[test]
fn first_write_without_load_marks_bitmaps_in_use() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-claim");
    let path = qemu_image_with_bitmaps(&dir);
    let img = open(&path, true);
    img.write_at(&[9u8; 4096], 0).expect("write");
    img.close().expect("close");
    assert!(qemu_bitmaps(&path)
        .iter()
        .all(|(_, _, f)| f.contains(&"in-use".to_string())));
    assert_check_clean(&path);
}

#[test]
fn storing_an_empty_set_clears_the_extension() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-empty");
    let path = qemu_image_with_bitmaps(&dir);
    let img = open(&path, true);
    img.store_bitmaps(&[], false).expect("store");
    img.close().expect("close");
    assert!(qemu_bitmaps(&path).is_empty());
    assert_check_clean(&path);
    let raw = std::fs::read(&path).expect("read");
    assert_eq!(raw[95] & 1, 0, "autoclear bit 0 cleared");
}

#[test]
fn bitmaps_survive_qemu_io_after_we_store_them() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("bm-qemu-after");
    let path = dir.path("ours.qcow2");
    let img = our_image(&path, 8 << 20);
    let bm = StoreBitmap {
        name: "x".into(),
        granularity: 65536,
        auto: true,
        inconsistent_keep_in_use: false,
        data: bits(16, &[1]),
    };
    img.store_bitmaps(&[bm], false).expect("store");
    img.close().expect("close");
    // qemu-io loads the auto bitmap, records the write, stores it back.
    qemu_io(&path, &["write 4M 4k"]);
    let loaded = open(&path, false).load_bitmaps().expect("load");
    assert_eq!(loaded[0].data, bits(16, &[1, 64]));
    assert!(!loaded[0].inconsistent);
}
