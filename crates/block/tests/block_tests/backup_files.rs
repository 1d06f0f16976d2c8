//! Backups between real image files, where the data moves in the kernel (`splice`): many
//! workers and the copy-before-write hook write one target file at once, taking turns; every
//! byte must land where it belongs (read back through the node and by `qemu-img compare`).

use std::process::Command;
use std::sync::Arc;

use block::backup::{self, BackupEnv, BackupParams, Perf, SyncMode};
use block::job::{JobManager, JobStatus, OnError};
use block::Graph;

use crate::common::*;

const MIB: u64 = 1 << 20;

fn pattern(size: u64) -> Vec<u8> {
    (0..size).map(|i| ((i / 4096) as u8) ^ (i as u8)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_workers_and_guest_writes_land_the_point_in_time_in_one_target_file() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let (sp, tp) = (dir.path().join("src.qcow2"), dir.path().join("tgt.qcow2"));
    create_qcow2(&sp, size, None);
    create_qcow2(&tp, size, None);
    let mut graph = Graph::new();
    let src = graph
        .add(&qcow2_opts("src", &sp, false, Some(None)))
        .unwrap();
    let tgt = graph
        .add(&qcow2_opts("tgt", &tp, false, Some(None)))
        .unwrap();
    let reference = pattern(size);
    src.write(0, &reference).unwrap();
    // The point in time, for qemu-img compare.
    let raw = dir.path().join("ref.raw");
    std::fs::write(&raw, &reference).unwrap();

    let jobs = JobManager::new(Arc::new(|_| {}));
    let params = BackupParams {
        job_id: "j".into(),
        source: src.clone(),
        target: tgt.clone(),
        sync: SyncMode::Full,
        bitmap: None,
        bitmap_mode: None,
        speed: 0,
        compress: false,
        on_source_error: OnError::Report,
        on_target_error: OnError::Report,
        auto_finalize: true,
        auto_dismiss: false,
        filter_node_name: None,
        discard_source: false,
        // Many workers with small requests: the most writers into the target file at once.
        perf: Perf {
            max_workers: Some(16),
            max_chunk: 256 << 10,
            ..Perf::default()
        },
    };
    let taken = |_: &str| false;
    let env = BackupEnv {
        name_taken: &taken,
        on_clean: None,
        source_quiesced: false,
        host: None,
    };
    let job = backup::start(&jobs, params, env).unwrap();
    // Guest writes all over the source meanwhile: each copies its clusters to the target
    // first (the hook), beside the workers.
    let (s, j) = (src.clone(), job.clone());
    let during = tokio::task::spawn_blocking(move || {
        let mut x: u64 = 99;
        let mut during = 0;
        for i in 0..400u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 16) % (size - 300_000);
            let len = 1 + (x >> 40) % 300_000;
            let running = j.snapshot().status == JobStatus::Running;
            s.write(off, &vec![(i % 250) as u8 + 1; len as usize])
                .unwrap();
            during += u32::from(running);
        }
        during
    })
    .await
    .unwrap();
    wait_status(&job, JobStatus::Concluded).await;
    assert!(during > 0, "no guest write happened while the job ran");
    let info = job.snapshot();
    assert_eq!((info.current, info.total, info.error), (size, size, None));

    let mut back = vec![0u8; size as usize];
    tgt.read(0, &mut back).unwrap();
    assert!(
        back == reference,
        "the target differs from the point in time"
    );
    graph.close_all();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&tp)
        .arg(&raw)
        .output()
        .expect("qemu-img is needed for this test");
    assert!(out.status.success(), "qemu-img compare: {out:?}");
}
