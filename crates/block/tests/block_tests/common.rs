//! Helpers shared by the tests: temporary images and node options.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use block::edge::Root;
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::job::{Job, JobStatus};
use block::node::NodeFlags;
use block::perm::Perm;
use block::{Graph, NodeRef};
use qcow2::{CreateOptions, FileStorage, Qcow2};
use tempfile::NamedTempFile;

/// A temporary file of `size` bytes, every byte `fill`.
pub fn image(size: usize, fill: u8) -> NamedTempFile {
    let mut f = NamedTempFile::new().expect("create temp file");
    f.write_all(&vec![fill; size]).expect("fill temp file");
    f.flush().expect("flush temp file");
    f
}

/// The path of a temporary file as a string.
pub fn path(f: &NamedTempFile) -> String {
    f.path().to_str().expect("utf-8 temp path").to_string()
}

/// The whole contents of a temporary file, read with std::fs.
pub fn contents(f: &NamedTempFile) -> Vec<u8> {
    std::fs::read(f.path()).expect("read temp file")
}

/// Options for a `file` node without locking.
pub fn file_opts(name: Option<&str>, filename: &str) -> NodeOptions {
    NodeOptions {
        node_name: name.map(str::to_string),
        driver: DriverOptions::File {
            filename: filename.to_string(),
            locking: false,
        },
        ..NodeOptions::default()
    }
}

/// Options for a `raw` node over `file`, whole child.
pub fn raw_opts(name: &str, file: ChildRef) -> NodeOptions {
    NodeOptions {
        node_name: Some(name.to_string()),
        driver: DriverOptions::Raw {
            file,
            offset: None,
            size: None,
        },
        ..NodeOptions::default()
    }
}

/// Options for a `raw` node over an inline `file` child of `filename`.
pub fn raw_inline_opts(name: &str, filename: &str) -> NodeOptions {
    raw_opts(name, ChildRef::Inline(Box::new(file_opts(None, filename))))
}

/// Options for a `null-co` node.
pub fn null_opts(name: &str, size: u64) -> NodeOptions {
    NodeOptions {
        node_name: Some(name.to_string()),
        driver: DriverOptions::Null {
            size,
            read_zeroes: true,
        },
        ..NodeOptions::default()
    }
}

/// `opts` with `discard=unmap`.
pub fn with_unmap(mut opts: NodeOptions) -> NodeOptions {
    opts.flags = NodeFlags {
        discard_unmap: true,
        ..opts.flags
    };
    opts
}

/// A graph with a raw node "disk" over an inline file child of `filename`.
pub fn raw_graph(filename: &str) -> (Graph, NodeRef) {
    let mut graph = Graph::new();
    let node = graph
        .add(&raw_inline_opts("disk", filename))
        .expect("add raw node");
    (graph, node)
}

/// The errno carried by an I/O error.
pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().expect("errno in I/O error")
}

/// Names of the graph's nodes, oldest first.
pub fn names(graph: &Graph) -> Vec<String> {
    graph.nodes().iter().map(|n| n.name().to_string()).collect()
}

/// Dirty byte count of bitmap `name` on `node` (QEMU's `count`).
pub fn count(node: &NodeRef, name: &str) -> u64 {
    node.bitmaps()
        .find(name)
        .expect("bitmap exists")
        .bits
        .count()
}

/// Whether the granule of bitmap `name` holding byte `offset` is dirty.
pub fn dirty_at(node: &NodeRef, name: &str, offset: u64) -> bool {
    node.bitmaps()
        .find(name)
        .expect("bitmap exists")
        .bits
        .get(offset)
}

/// `unwrap_err` for core results whose success type is not `Debug` (nodes, jobs).
pub trait Refused {
    /// The error; panics if the call succeeded.
    fn refused(self) -> block::Error;
}

impl<T> Refused for block::Result<T> {
    fn refused(self) -> block::Error {
        match self {
            Ok(_) => panic!("expected the call to be refused"),
            Err(e) => e,
        }
    }
}

/// A new qcow2 image of `size` bytes at `path`, over the qcow2 file `backing` if given.
pub fn create_qcow2(path: &Path, size: u64, backing: Option<&str>) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create image file");
    let opts = CreateOptions {
        size,
        backing_file: backing.map(str::to_string),
        backing_fmt: backing.map(|_| "qcow2".to_string()),
        ..CreateOptions::default()
    };
    Qcow2::create(&FileStorage::new(file), &opts).expect("create qcow2");
}

/// Options for a `qcow2` node over an inline locking `file` child of `path`.
pub fn qcow2_opts(
    name: &str,
    path: &Path,
    read_only: bool,
    backing: Option<Option<ChildRef>>,
) -> NodeOptions {
    let file = NodeOptions {
        driver: DriverOptions::File {
            filename: path.to_str().expect("utf-8 path").to_string(),
            locking: true,
        },
        ..NodeOptions::default()
    };
    NodeOptions {
        node_name: Some(name.to_string()),
        read_only,
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Inline(Box::new(file)),
            backing,
            cache: Default::default(),
        },
        ..NodeOptions::default()
    }
}

/// A root writing through `node` as an export does, not attached yet.
pub fn export_root(node: &NodeRef) -> Arc<Root> {
    Root::new(
        "export 'e'".into(),
        "an unnamed block device".into(),
        node.clone(),
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::ALL & !Perm::RESIZE,
    )
}

/// A root writing through `node` as an export does, attached to `graph`.
pub fn writer_root(graph: &mut Graph, node: &NodeRef) -> Arc<Root> {
    let root = export_root(node);
    graph.attach_root(&root).expect("attach root");
    root
}

/// Wait (in virtual or real time, about 10 s at most) until the job reaches `status`.
pub async fn wait_status(job: &Arc<Job>, status: JobStatus) {
    for _ in 0..2000 {
        if job.snapshot().status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "job {} stuck in {:?}, wanted {:?}",
        job.id,
        job.snapshot().status,
        status
    );
}

/// Runs `f` on another thread; the receiver gets its result. A test waits for it with
/// `recv_timeout`, so a lock held where it must not be fails the test instead of hanging it.
pub fn meanwhile<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// The graph's guard, past a poisoned lock (a failed test thread must not hide the others).
pub fn lock(g: &std::sync::Mutex<Graph>) -> std::sync::MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wait until `n` requests are held in `ctl`'s driver (bounded, so a bug fails the test).
pub fn held(ctl: &block::testing::Controls, n: usize) {
    let start = std::time::Instant::now();
    while ctl.waiting() < n {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the request never reached the driver"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A qcow2 image at `path` with its "corrupt" incompatible bit set (QEMU opens it read-only
/// only).
pub fn create_corrupt_qcow2(path: &std::path::Path) {
    create_qcow2(path, 1 << 20, None);
    let mut img = std::fs::read(path).expect("read");
    let inc = u64::from_be_bytes(img[72..80].try_into().expect("8 bytes")) | 0x2;
    img[72..80].copy_from_slice(&inc.to_be_bytes());
    std::fs::write(path, &img).expect("mark corrupt");
}
