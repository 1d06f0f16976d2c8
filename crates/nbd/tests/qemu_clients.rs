//! Real QEMU clients (qemu-io, qemu-img; QEMU 10 negotiates extended headers) against an
//! in-process server with an in-memory export.

mod common;

use common::{pattern, run, TestServer, CLUSTER};

const SIZE: u64 = 4 << 20;

fn image_opts(t: &TestServer, export: &str, extra: &str) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},export={export}{extra}",
        t.sock.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_back_a_pattern() {
    let t = TestServer::start(SIZE).await;
    let url = t.url("disk");

    let r = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    )
    .await;

    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("wrote 65536/65536 bytes at offset 0"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("read 65536/65536 bytes at offset 0"),
        "{}",
        r.stdout
    );
    assert!(
        !r.stdout.contains("Pattern verification failed"),
        "{}",
        r.stdout
    );
    assert!(t.backend.contents()[..65536].iter().all(|&b| b == 0x5a));
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_unaligned_write_at_the_last_byte_lands() {
    let t = TestServer::start(SIZE).await;

    let last = format!("write -P 0x11 {} 1", SIZE - 1);
    let r = run("qemu-io", &["-f", "raw", &t.url("disk"), "-c", &last]).await;

    assert!(
        r.ok && r.stdout.contains("wrote 1/1 bytes"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(t.backend.contents()[SIZE as usize - 1], 0x11);
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_zeroes_and_discard_read_back_as_zeros() {
    let t = TestServer::start(SIZE).await;
    t.backend.fill(0, &pattern(4 * CLUSTER as usize, 3));

    let r = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &t.url("disk"),
            "-c",
            "write -z 0 64k",
            "-c",
            "write -z -u 64k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "read -P 0 0 128k",
            "-c",
            "flush",
        ],
    )
    .await;

    assert!(r.ok, "{}", r.stderr);
    assert!(!r.stdout.contains("failed"), "{}", r.stdout);
    let data = t.backend.contents();
    assert!(data[..3 * CLUSTER as usize].iter().all(|&b| b == 0));
    assert_eq!(
        data[3 * CLUSTER as usize..4 * CLUSTER as usize],
        pattern(4 * CLUSTER as usize, 3)[3 * CLUSTER as usize..]
    );
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_cannot_open_read_only_export_for_writing() {
    let t = TestServer::start(SIZE).await;

    let r = run(
        "qemu-io",
        &["-f", "raw", &t.url("ro"), "-c", "write -P 1 0 512"],
    )
    .await;

    assert!(!r.ok);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
    assert!(t.backend.contents()[..512].iter().all(|&b| b == 0));
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_reads_read_only_export() {
    let t = TestServer::start(SIZE).await;
    t.backend.fill(0, &[0x77; 4096]);

    let r = run(
        "qemu-io",
        &["-r", "-f", "raw", &t.url("ro"), "-c", "read -P 0x77 0 4k"],
    )
    .await;

    assert!(
        r.ok && r.stdout.contains("read 4096/4096"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_reports_backend_allocation() {
    let t = TestServer::start(SIZE).await;
    t.backend.fill(CLUSTER, &pattern(CLUSTER as usize, 1));

    let r = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &t.url("disk")],
    )
    .await;

    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(
        lines[0].contains(r#""start": 0, "length": 65536"#),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(r#""zero": true, "data": false"#),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(r#""start": 65536, "length": 65536"#),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains(r#""zero": false, "data": true"#),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains(r#""start": 131072, "length": 4063232"#),
        "{}",
        lines[2]
    );
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_of_dirty_bitmap_shows_dirty_extents_as_not_data() {
    let t = TestServer::start(SIZE).await;
    t.backend.fill(2 * CLUSTER, &[1; 10]);
    t.backend.fill(SIZE - CLUSTER, &[1; 10]);
    let opts = image_opts(&t, "ro", ",x-dirty-bitmap=qemu:dirty-bitmap:b0");

    let r = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]).await;

    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    // QEMU's client inverts the bitmap view: dirty reads as "data": false.
    assert!(
        lines[0].contains(r#""start": 0, "length": 131072"#)
            && lines[0].contains(r#""data": true"#)
    );
    assert!(
        lines[1].contains(r#""start": 131072, "length": 65536"#)
            && lines[1].contains(r#""data": false"#)
    );
    assert!(
        lines[3].contains(r#""start": 4128768, "length": 65536"#)
            && lines[3].contains(r#""data": false"#)
    );
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_export_to_a_file() {
    let t = TestServer::start(SIZE).await;
    let data = pattern(3 * CLUSTER as usize, 9);
    t.backend.fill(CLUSTER, &data);
    let out = t.dir.path("copy.raw");
    let out_s = out.to_str().unwrap();

    let r = run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &t.url("ro"), out_s],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &t.url("ro"), out_s],
    )
    .await;

    assert!(
        cmp.ok && cmp.stdout.contains("Images are identical"),
        "{} {}",
        cmp.stdout,
        cmp.stderr
    );
    assert_eq!(std::fs::read(&out).unwrap(), t.backend.contents());
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_writes_a_file_into_the_export() {
    let t = TestServer::start(SIZE).await;
    let src = t.dir.path("src.raw");
    let mut image = vec![0u8; SIZE as usize];
    image[5 * CLUSTER as usize..7 * CLUSTER as usize]
        .copy_from_slice(&pattern(2 * CLUSTER as usize, 4));
    image[SIZE as usize - 100..].copy_from_slice(&[0xee; 100]);
    std::fs::write(&src, &image).unwrap();

    let r = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &t.url("disk"),
        ],
    )
    .await;

    assert!(r.ok, "{}", r.stderr);
    assert!(t.backend.contents() == image);
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_compare_finds_a_difference() {
    let t = TestServer::start(SIZE).await;
    let other = t.dir.path("other.raw");
    let mut image = vec![0u8; SIZE as usize];
    image[123_456] = 1;
    std::fs::write(&other, &image).unwrap();

    let r = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &t.url("disk"),
            other.to_str().unwrap(),
        ],
    )
    .await;

    // qemu-img reports the 512-byte sector holding the first difference.
    assert!(!r.ok);
    assert!(
        r.stdout.contains("Content mismatch at offset 123392"),
        "{}",
        r.stdout
    );
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_works_over_tcp() {
    let t = TestServer::start(SIZE).await;
    let addrs = t.server.listen_tcp("127.0.0.1", "0").await.unwrap();
    let url = format!("nbd://127.0.0.1:{}/disk", addrs[0].port());

    let r = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0x33 1m 64k",
            "-c",
            "read -P 0x33 1m 64k",
        ],
    )
    .await;

    assert!(
        r.ok && r.stdout.contains("read 65536/65536"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    assert!(t.backend.contents()[1 << 20..(1 << 20) + 65536]
        .iter()
        .all(|&b| b == 0x33));
    t.server.stop().await;
}
