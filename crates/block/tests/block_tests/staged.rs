//! A staged blockdev-add ([`Graph::add_staged`]) does not hold the graph lock while it opens
//! files: an open stalled in the middle of its tree (a backing file that is a FIFO nobody
//! writes to yet) leaves queries, other adds and deletes running, keeps its own name reserved
//! and the existing node it names pinned, and on success or failure ends as a plain add would.

use std::fs::OpenOptions;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::{Graph, NodeRef, Result};

use crate::common::{create_qcow2, file_opts, meanwhile, names, null_opts};

const WAIT: Duration = Duration::from_secs(20);

/// qcow2 "slow" over the existing node `file`, its backing an inline `fmt` node over a FIFO.
fn slow_opts(fifo: &str, fmt: &str) -> NodeOptions {
    let file = ChildRef::Inline(Box::new(file_opts(None, fifo)));
    let backing = match fmt {
        "raw" => DriverOptions::Raw {
            file,
            offset: None,
            size: None,
        },
        _ => DriverOptions::Qcow2 {
            file,
            backing: Some(None),
            cache: Default::default(),
        },
    };
    let backing = NodeOptions {
        read_only: true,
        driver: backing,
        ..NodeOptions::default()
    };
    NodeOptions {
        node_name: Some("slow".to_string()),
        read_only: true,
        driver: DriverOptions::Qcow2 {
            file: ChildRef::Name("file".to_string()),
            backing: Some(Some(ChildRef::Inline(Box::new(backing)))),
            cache: Default::default(),
        },
        ..NodeOptions::default()
    }
}

fn lock(g: &Mutex<Graph>) -> std::sync::MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run the stalled add with a backing of format `fmt`; check what others can do meanwhile;
/// release the FIFO and return the add's result.
/// The stalled add's graph and result, the image under "file", its bytes before, its dir.
type Stalled = (
    Arc<Mutex<Graph>>,
    Result<NodeRef>,
    std::path::PathBuf,
    Vec<u8>,
    tempfile::TempDir,
);

fn stalled_add(fmt: &str) -> Stalled {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("top.qcow2");
    create_qcow2(&image, 1 << 20, None);
    let before = std::fs::read(&image).expect("read image");
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let fifo = fifo.to_str().expect("utf-8 path").to_string();

    let graph = Arc::new(Mutex::new(Graph::new()));
    let file = file_opts(Some("file"), image.to_str().expect("utf-8 path"));
    lock(&graph).add(&file).expect("add file node");
    lock(&graph)
        .add(&null_opts("other", 4096))
        .expect("add other");

    let g = graph.clone();
    let opts = slow_opts(&fifo, fmt);
    let adder = thread::spawn(move || Graph::add_staged(&g, &opts));

    // Wait until the add holds its reservation and its edge onto "file".
    let start = Instant::now();
    loop {
        // try_lock: an add holding the lock over its open must fail this test, not hang it.
        if let Ok(g) = graph.try_lock() {
            let file = g.get("file").expect("file node");
            if g.edges_into(&file).iter().any(|e| e.who == "node 'slow'") {
                break;
            }
        }
        if start.elapsed() > WAIT {
            // Unstick the add so the test ends.
            drop(
                OpenOptions::new()
                    .write(true)
                    .open(&fifo)
                    .expect("open FIFO writer"),
            );
            panic!("the add never attached to 'file' without holding the graph lock");
        }
        thread::sleep(Duration::from_millis(10));
    }

    // Meanwhile, on another thread (so a held lock fails the test instead of hanging it).
    let g = graph.clone();
    let rx = meanwhile(move || {
        let listed = names(&lock(&g));
        let dup = Graph::add_staged(&g, &null_opts("slow", 512)).map(|_| ());
        let added = Graph::add_staged(&g, &null_opts("n2", 512)).map(|_| ());
        let del_other = lock(&g).del("other");
        let del_file = lock(&g).del("file");
        (listed, dup, added, del_other, del_file)
    });
    let got = rx.recv_timeout(WAIT);

    // Let the stalled open go on: a writer that writes nothing (the FIFO reads as empty).
    drop(
        OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open FIFO writer"),
    );
    let result = adder.join().expect("add thread");

    let (listed, dup, added, del_other, del_file) =
        got.expect("graph commands waited for the stalled blockdev-add");
    assert_eq!(listed, ["file", "other"]);
    let dup = dup.expect_err("a reserved name is taken");
    assert_eq!(dup.to_string(), "Duplicate nodes with node-name='slow'");
    added.expect("an unrelated add runs");
    del_other.expect("an unrelated del runs");
    let refused = del_file.expect_err("a node the add names is pinned");
    assert_eq!(refused.to_string(), "Node file is in use");
    (graph, result, image, before, dir)
}

#[test]
fn staged_add_does_not_block_the_graph_and_succeeds() {
    let (graph, result, ..) = stalled_add("raw");
    let slow = result.expect("open over an empty raw backing");
    let g = lock(&graph);
    assert_eq!(slow.children().len(), 2);
    let backing = &slow.children()[1].node;
    assert!(backing.auto_named());
    let mut listed = names(&g);
    listed.sort();
    let mut want = vec![
        "file".to_string(),
        "n2".to_string(),
        "slow".to_string(),
        backing.name().to_string(),
        slow.children()[1].node.children()[0]
            .node
            .name()
            .to_string(),
    ];
    want.sort();
    assert_eq!(listed, want);
    // The node is a real member: its file cannot go, it can.
    let busy = g.get("file").expect("file");
    assert!(g.edges_into(&busy).iter().any(|e| e.who == "node 'slow'"));
    drop(g);
    assert!(lock(&graph).del("file").is_err());
    lock(&graph).del("slow").expect("del slow");
    lock(&graph).del("file").expect("del file after slow");
    assert_eq!(names(&lock(&graph)), ["n2"]);
}

#[test]
fn staged_add_failing_late_gives_everything_back() {
    let (graph, result, image, before, _dir) = stalled_add("qcow2");
    assert!(result.is_err(), "an empty qcow2 backing cannot open");
    let mut g = lock(&graph);
    assert_eq!(names(&g), ["file", "n2"]);
    let file = g.get("file").expect("file");
    assert!(g.edges_into(&file).is_empty(), "the add's edge is gone");
    assert_eq!(
        std::fs::read(&image).expect("read image"),
        before,
        "the image is byte-identical"
    );
    // Reservation and pin are gone: the name is free and the node deletable.
    g.del("file").expect("del file");
    g.add(&null_opts("slow", 512))
        .expect("the name is free again");
}
