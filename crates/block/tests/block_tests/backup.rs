//! Backup jobs and the job core underneath them, over an in-memory test driver that can fail
//! requests: point in time under concurrent writers, exact progress, bitmaps after success,
//! failure and cancel, error policies, the shared rate limiter, cancel waiting for the body,
//! a panicking body.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::backup::{self, BackupEnv, BackupParams, BitmapMode, Perf, SyncMode};
use block::bitmap_ops;
use block::driver::{BlockStatus, Driver, ImageFacts};
use block::job::{Job, JobBody, JobCtx, JobEvent, JobManager, JobSpec, JobStatus, OnError};
use block::node::{Node, NodeFlags, NodeRef};

use crate::common::wait_status;

const MIB: usize = 1 << 20;

/// An in-memory disk whose reads or writes can be made to fail.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    fail_writes: AtomicU32,
    fail_reads: AtomicU32,
    errno: i32,
    write_delay: Duration,
}

impl MemDisk {
    fn node(name: &str, data: Vec<u8>, errno: i32) -> (NodeRef, Arc<MemDiskHandle>) {
        let disk = Arc::new(MemDisk {
            data: Mutex::new(data),
            fail_writes: AtomicU32::new(0),
            fail_reads: AtomicU32::new(0),
            errno,
            write_delay: Duration::ZERO,
        });
        let node = Arc::new(Node::new(
            name.to_string(),
            false,
            Box::new(MemDiskHandle(disk.clone())),
            Vec::new(),
            false,
            NodeFlags::default(),
        ));
        (node, Arc::new(MemDiskHandle(disk)))
    }
}

struct MemDiskHandle(Arc<MemDisk>);

impl MemDiskHandle {
    fn contents(&self) -> Vec<u8> {
        self.0.data.lock().unwrap().clone()
    }
    fn fail_writes(&self, n: u32) {
        self.0.fail_writes.store(n, Ordering::SeqCst);
    }
    fn fail_reads(&self, n: u32) {
        self.0.fail_reads.store(n, Ordering::SeqCst);
    }
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Driver for MemDiskHandle {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.0.data.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if take(&self.0.fail_reads) {
            return Err(io::Error::from_raw_os_error(self.0.errno));
        }
        let d = self.0.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if take(&self.0.fail_writes) {
            return Err(io::Error::from_raw_os_error(self.0.errno));
        }
        std::thread::sleep(self.0.write_delay);
        let mut d = self.0.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.write(offset, &vec![0; len as usize])
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Data, len))
    }
    fn facts(&self) -> ImageFacts {
        ImageFacts::default()
    }
}

#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<JobEvent>>>);

impl Events {
    fn trace(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                JobEvent::StatusChange { status, .. } => status.as_str().to_string(),
                JobEvent::Completed { error: None, .. } => "COMPLETED".to_string(),
                JobEvent::Completed { error: Some(e), .. } => format!("COMPLETED({e})"),
                JobEvent::Cancelled { .. } => "CANCELLED".to_string(),
                JobEvent::Pending { .. } => "PENDING".to_string(),
                JobEvent::IoError {
                    operation, action, ..
                } => format!("ERROR({operation},{action})"),
            })
            .collect()
    }
}

fn manager() -> (Arc<JobManager>, Events) {
    let events = Events::default();
    let sink = events.clone();
    (
        JobManager::new(Arc::new(move |e| sink.0.lock().unwrap().push(e))),
        events,
    )
}

fn pattern(size: usize, seed: u8) -> Vec<u8> {
    (0..size).map(|i| (i / 4096) as u8 ^ seed).collect()
}

fn params(id: &str, source: &NodeRef, target: &NodeRef, sync: SyncMode) -> BackupParams {
    BackupParams {
        job_id: id.to_string(),
        source: source.clone(),
        target: target.clone(),
        sync,
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
        perf: Perf::default(),
    }
}

fn start(jobs: &Arc<JobManager>, p: BackupParams) -> Arc<Job> {
    let taken = |_: &str| false;
    backup::start(
        jobs,
        p,
        BackupEnv {
            name_taken: &taken,
            on_clean: None,
            source_quiesced: false,
            host: None,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backup_is_the_point_in_time_under_concurrent_writes() {
    let (jobs, events) = manager();
    let size = 16 * MIB;
    let (src, _) = MemDisk::node("src", pattern(size, 1), libc::EIO);
    let (tgt, tgt_disk) = MemDisk::node("tgt", vec![0; size], libc::EIO);
    let reference = pattern(size, 1);
    let mut p = params("j", &src, &tgt, SyncMode::Full);
    p.speed = 32 * MIB as i64;
    let job = start(&jobs, p);
    // A writer hammers the source, overlapping regions copied and not yet copied.
    let s = src.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut x: u64 = 12345;
        for i in 0..300u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (size as u64 - 200_000);
            let len = 1 + (x >> 8) % 150_000;
            s.write(off, &vec![(i % 250) as u8 + 1; len as usize])
                .unwrap();
        }
    });
    writer.await.unwrap();
    assert_eq!(
        job.snapshot().status,
        JobStatus::Running,
        "job ended before the writes"
    );
    wait_status(&job, JobStatus::Concluded).await;
    assert!(
        tgt_disk.contents() == reference,
        "backup differs from the point in time"
    );
    let info = job.snapshot();
    assert_eq!((info.current, info.total), (size as u64, size as u64));
    assert_eq!(events.trace().last().map(String::as_str), Some("concluded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_copies_dirty_clusters_and_bitmap_follows_mode() {
    for (mode, success) in [
        (BitmapMode::OnSuccess, true),
        (BitmapMode::Never, true),
        (BitmapMode::OnSuccess, false),
        (BitmapMode::Always, false),
    ] {
        let (jobs, events) = manager();
        let size = 4 * MIB;
        let (src, _) = MemDisk::node("src", pattern(size, 3), libc::EIO);
        let (tgt, tgt_disk) = MemDisk::node("tgt", vec![0; size], libc::EIO);
        bitmap_ops::add(&src, "b", Some(65536), false, false).unwrap();
        src.write(0, &[7; 100]).unwrap();
        src.write(2 * MIB as u64, &[8; 200_000]).unwrap();
        let dirty = src.bitmaps().get("b").unwrap().bits.count();
        assert_eq!(dirty, 65536 + 4 * 65536);
        if !success {
            tgt_disk.fail_writes(1000);
        }
        let mut p = params("j", &src, &tgt, SyncMode::Bitmap);
        p.bitmap = Some("b".into());
        p.bitmap_mode = Some(mode);
        let job = start(&jobs, p);
        wait_status(&job, JobStatus::Concluded).await;
        let info = job.snapshot();
        assert_eq!(info.total, dirty, "len is the dirty bytes");
        let after = src.bitmaps().get("b").unwrap().bits.count();
        let list = src.bitmaps();
        assert_eq!(list.items.len(), 1, "successor gone");
        assert!(!list.items[0].busy && !list.items[0].frozen);
        drop(list);
        if success {
            assert_eq!(info.current, dirty);
            let data = tgt_disk.contents();
            assert_eq!(&data[..100], &[7; 100]);
            assert_eq!(
                data[65536..2 * MIB],
                vec![0; 2 * MIB - 65536],
                "clean clusters not copied"
            );
            let expect = if mode == BitmapMode::Never { dirty } else { 0 };
            assert_eq!(after, expect, "{mode:?}");
        } else {
            assert!(events
                .trace()
                .contains(&"COMPLETED(Input/output error)".to_string()));
            assert_eq!(after, dirty, "{mode:?}: no dirty bit lost");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_merges_writes_made_during_the_job_back() {
    let (jobs, events) = manager();
    let size = 8 * MIB;
    let (src, _) = MemDisk::node("src", pattern(size, 5), libc::EIO);
    let (tgt, _) = MemDisk::node("tgt", vec![0; size], libc::EIO);
    bitmap_ops::add(&src, "b", Some(65536), false, false).unwrap();
    src.write(0, &vec![1; 4 * MIB]).unwrap();
    let mut p = params("j", &src, &tgt, SyncMode::Incremental);
    p.bitmap = Some("b".into());
    p.speed = 1;
    let job = start(&jobs, p);
    tokio::time::sleep(Duration::from_millis(50)).await;
    src.write(6 * MIB as u64, &[2; 65536]).unwrap();
    assert_eq!(src.bitmaps().get("b").unwrap().bits.count(), 4 * MIB as u64);
    jobs.cancel(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;
    assert_eq!(
        src.bitmaps().get("b").unwrap().bits.count(),
        4 * MIB as u64 + 65536
    );
    let trace = events.trace();
    assert_eq!(
        trace,
        [
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "CANCELLED",
            "concluded"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_policies_stop_ignore_enospc() {
    // stop: paused with io-status failed; resume retries and completes with the right data.
    let (jobs, events) = manager();
    let size = 2 * MIB;
    let (src, _) = MemDisk::node("src", pattern(size, 9), libc::EIO);
    let (tgt, tgt_disk) = MemDisk::node("tgt", vec![0; size], libc::EIO);
    tgt_disk.fail_writes(1);
    let mut p = params("j", &src, &tgt, SyncMode::Full);
    p.on_target_error = OnError::Stop;
    let job = start(&jobs, p);
    wait_status(&job, JobStatus::Paused).await;
    let info = job.snapshot();
    assert!(info.user_paused);
    assert_eq!(info.io_status, "failed");
    jobs.resume(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;
    assert_eq!(job.snapshot().io_status, "ok");
    assert!(tgt_disk.contents() == pattern(size, 9));
    let t = events.trace();
    assert!(t.contains(&"ERROR(write,stop)".to_string()), "{t:?}");
    assert!(t.contains(&"COMPLETED".to_string()), "{t:?}");

    // ignore: retried later, completes.
    let (jobs, events) = manager();
    let (tgt, tgt_disk) = MemDisk::node("tgt", vec![0; size], libc::EIO);
    tgt_disk.fail_writes(2);
    let mut p = params("j", &src, &tgt, SyncMode::Full);
    p.on_target_error = OnError::Ignore;
    let job = start(&jobs, p);
    wait_status(&job, JobStatus::Concluded).await;
    assert!(tgt_disk.contents() == pattern(size, 9));
    assert!(events.trace().contains(&"ERROR(write,ignore)".to_string()));

    // enospc: ENOSPC stops (nospace); a read error with enospc reports.
    let (jobs, _) = manager();
    let (tgt, tgt_disk) = MemDisk::node("tgt", vec![0; size], libc::ENOSPC);
    tgt_disk.fail_writes(1);
    let mut p = params("j", &src, &tgt, SyncMode::Full);
    p.on_target_error = OnError::Enospc;
    let job = start(&jobs, p);
    wait_status(&job, JobStatus::Paused).await;
    assert_eq!(job.snapshot().io_status, "nospace");
    jobs.cancel(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;

    let (jobs, events) = manager();
    let (src2, src_disk) = MemDisk::node("src", pattern(size, 9), libc::EIO);
    src_disk.fail_reads(1);
    let (tgt, _) = MemDisk::node("tgt", vec![0; size], libc::EIO);
    let mut p = params("j", &src2, &tgt, SyncMode::Full);
    p.on_source_error = OnError::Enospc;
    let job = start(&jobs, p);
    wait_status(&job, JobStatus::Concluded).await;
    let t = events.trace();
    assert!(t.contains(&"ERROR(read,report)".to_string()), "{t:?}");
    assert!(
        t.contains(&"COMPLETED(Input/output error)".to_string()),
        "{t:?}"
    );
}

/// A body for job-core tests.
struct Body {
    kind: &'static str,
    stopped: AtomicBool,
    abort_saw_stopped: AtomicBool,
    bytes: Mutex<(u64, Duration)>,
}

impl JobBody for Body {
    fn run(
        self: Arc<Self>,
        ctx: JobCtx,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        Box::pin(async move {
            match self.kind {
                "panic" => panic!("body exploded"),
                "panic-free" => Ok(()),
                "fail" => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err("Input/output error".to_string())
                }
                "slow-stop" => {
                    while !ctx.is_cancelled() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // I/O still finishing after the cancel.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.stopped.store(true, Ordering::SeqCst);
                    Ok(())
                }
                _ => {
                    let t0 = Instant::now();
                    let mut n = 0;
                    while t0.elapsed() < Duration::from_secs(2) {
                        n += 65536;
                        ctx.rate_limit(65536).await;
                    }
                    *self.bytes.lock().unwrap() = (n, t0.elapsed());
                    Ok(())
                }
            }
        })
    }
    fn abort(&self) {
        self.abort_saw_stopped
            .store(self.stopped.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

fn body(kind: &'static str) -> Arc<Body> {
    Arc::new(Body {
        kind,
        stopped: AtomicBool::new(false),
        abort_saw_stopped: AtomicBool::new(false),
        bytes: Mutex::new((0, Duration::ZERO)),
    })
}

fn spec(id: &str, speed: u64) -> JobSpec {
    JobSpec {
        id: id.to_string(),
        job_type: "backup",
        is_block_job: true,
        auto_finalize: true,
        auto_dismiss: false,
        speed,
        drain_at_start: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_body_concludes_with_an_error() {
    let (jobs, events) = manager();
    let job = jobs.create(spec("p", 0), body("panic")).unwrap();
    jobs.start(&job);
    wait_status(&job, JobStatus::Concluded).await;
    let err = job.snapshot().error.unwrap_or_default();
    assert!(err.contains("body exploded"), "{err}");
    let t = events.trace();
    assert_eq!(t[..3], ["created", "running", "aborting"]);
    assert_eq!(jobs.running_tasks(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_for_the_body_before_abort() {
    let (jobs, _) = manager();
    let b = body("slow-stop");
    let job = jobs.create(spec("c", 0), b.clone()).unwrap();
    jobs.start(&job);
    tokio::time::sleep(Duration::from_millis(20)).await;
    jobs.cancel(&job).unwrap();
    wait_status(&job, JobStatus::Concluded).await;
    assert!(
        b.abort_saw_stopped.load(Ordering::SeqCst),
        "abort ran while the body's I/O ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_within_ten_percent() {
    let (jobs, _) = manager();
    let b = body("rate");
    let speed = 4 * MIB as u64;
    let job = jobs.create(spec("r", speed), b.clone()).unwrap();
    jobs.start(&job);
    wait_status(&job, JobStatus::Concluded).await;
    let (n, t) = *b.bytes.lock().unwrap();
    let rate = n as f64 / t.as_secs_f64();
    assert!(
        (rate - speed as f64).abs() / (speed as f64) < 0.10,
        "rate {rate} vs {speed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_and_waits_for_every_task() {
    let (jobs, _) = manager();
    let b = body("slow-stop");
    let job = jobs.create(spec("s", 0), b.clone()).unwrap();
    jobs.start(&job);
    tokio::time::sleep(Duration::from_millis(20)).await;
    jobs.cancel_all().await;
    assert!(b.stopped.load(Ordering::SeqCst));
    assert_eq!(jobs.running_tasks(), 0);
    assert_eq!(job.snapshot().status, JobStatus::Concluded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_wait_for_each_other_and_abort_together() {
    use block::job::JobGroup;
    // Both succeed: the quick one waits in `waiting` until the slow one is done.
    let (jobs, events) = manager();
    let group = JobGroup::new();
    let fast = jobs.create(spec("fast", 0), body("rate")).unwrap();
    let slow = jobs.create(spec("slow", 0), body("slow-stop")).unwrap();
    group.add(&fast);
    group.add(&slow);
    jobs.start(&fast);
    jobs.start(&slow);
    wait_status(&fast, JobStatus::Waiting).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fast.snapshot().status, JobStatus::Waiting);
    // Cancelling the slow one aborts the waiting one too.
    jobs.cancel(&slow).unwrap();
    wait_status(&slow, JobStatus::Concluded).await;
    wait_status(&fast, JobStatus::Concluded).await;
    assert_eq!(fast.snapshot().error.as_deref(), Some("Operation canceled"));
    let cancelled = events
        .trace()
        .iter()
        .filter(|t| t.as_str() == "CANCELLED")
        .count();
    assert_eq!(cancelled, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_waiting_member_cancels_the_group() {
    use block::job::JobGroup;
    let (jobs, _) = manager();
    let group = JobGroup::new();
    let done = jobs.create(spec("done", 0), body("panic-free")).unwrap();
    let slow = jobs.create(spec("slow", 0), body("slow-stop")).unwrap();
    group.add(&done);
    group.add(&slow);
    jobs.start(&done);
    jobs.start(&slow);
    wait_status(&done, JobStatus::Waiting).await;
    jobs.cancel(&done).unwrap();
    wait_status(&done, JobStatus::Concluded).await;
    wait_status(&slow, JobStatus::Concluded).await;
    assert_eq!(slow.snapshot().error.as_deref(), Some("Operation canceled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_error_event_per_report_or_stop_with_parallel_workers() {
    for policy in [OnError::Report, OnError::Stop] {
        let (jobs, events) = manager();
        let size = 32 * MIB;
        let (src, _) = MemDisk::node("src", pattern(size, 1), libc::EIO);
        let (tgt, tgt_disk) = MemDisk::node("tgt", vec![0; size], libc::EIO);
        tgt_disk.fail_writes(u32::MAX);
        let mut p = params("j", &src, &tgt, SyncMode::Full);
        p.on_target_error = policy;
        p.perf.max_chunk = 1 << 20;
        let job = start(&jobs, p);
        let end = if policy == OnError::Stop {
            JobStatus::Paused
        } else {
            JobStatus::Concluded
        };
        wait_status(&job, end).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let errors = events
            .trace()
            .iter()
            .filter(|t| t.starts_with("ERROR"))
            .count();
        assert_eq!(errors, 1, "{policy:?}: {:?}", events.trace());
        if policy == OnError::Stop {
            jobs.cancel(&job).unwrap();
            wait_status(&job, JobStatus::Concluded).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_ends_in_qemus_order() {
    use block::job::JobGroup;
    // QEMU: the failing job goes to aborting, then the others (newest first) once their work
    // stopped, then every job ends, newest first.
    let (jobs, events) = manager();
    let group = JobGroup::new();
    let a = jobs.create(spec("a", 0), body("slow-stop")).unwrap();
    let b = jobs.create(spec("b", 0), body("fail")).unwrap();
    let c = jobs.create(spec("c", 0), body("slow-stop")).unwrap();
    for j in [&a, &b, &c] {
        group.add(j);
    }
    for j in [&c, &b, &a] {
        jobs.start(j);
    }
    for j in [&a, &b, &c] {
        wait_status(j, JobStatus::Concluded).await;
    }
    let ends: Vec<String> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            JobEvent::StatusChange { id, status }
                if matches!(status, JobStatus::Aborting | JobStatus::Concluded) =>
            {
                Some(format!("{id}:{}", status.as_str()))
            }
            JobEvent::Completed { device, error, .. } => Some(format!(
                "{device}:COMPLETED({})",
                error.clone().unwrap_or_default()
            )),
            JobEvent::Cancelled { device, .. } => Some(format!("{device}:CANCELLED")),
            _ => None,
        })
        .collect();
    assert_eq!(
        ends,
        [
            "b:aborting",
            "c:aborting",
            "a:aborting",
            "c:CANCELLED",
            "c:concluded",
            "b:COMPLETED(Input/output error)",
            "b:concluded",
            "a:CANCELLED",
            "a:concluded",
        ]
    );
}
