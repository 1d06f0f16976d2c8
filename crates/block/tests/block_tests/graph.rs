//! The node-name table: adding, naming, deleting and closing nodes.

use std::sync::Arc;

use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::perm::Perm;
use block::{ErrorKind, Graph};

use crate::common::*;

#[test]
fn adding_file_node_registers_it_with_file_driver_and_file_size() {
    let img = image(4096, 0);
    let mut graph = Graph::new();

    let node = graph.add(&file_opts(Some("f"), &path(&img))).unwrap();

    assert_eq!(node.driver_name(), "file");
    assert_eq!(node.size(), 4096);
    assert!(!node.auto_named());
    assert_eq!(names(&graph), ["f"]);
}

#[test]
fn adding_raw_over_named_file_links_child_in_file_role() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    let file = graph.add(&file_opts(Some("f"), &path(&img))).unwrap();

    let raw = graph
        .add(&raw_opts("r", ChildRef::Name("f".into())))
        .unwrap();

    assert_eq!(raw.driver_name(), "raw");
    assert!(Arc::ptr_eq(&raw.child("file").unwrap(), &file));
    let parents = graph.parents(&file);
    assert_eq!(parents.len(), 1);
    assert_eq!(parents[0].0.name(), "r");
    assert_eq!(parents[0].1, "file");
}

#[test]
fn adding_null_node_reports_given_size_and_reads_zeros() {
    let mut graph = Graph::new();

    let node = graph.add(&null_opts("n", 1 << 20)).unwrap();

    assert_eq!(node.driver_name(), "null-co");
    assert_eq!(node.size(), 1 << 20);
    let mut buf = [0xffu8; 512];
    node.read(4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn duplicate_node_name_is_refused_with_qemu_text() {
    let mut graph = Graph::new();
    graph.add(&null_opts("n", 4096)).unwrap();

    let err = graph.add(&null_opts("n", 8192)).refused();

    assert_eq!(err.message(), "Duplicate nodes with node-name='n'");
    assert_eq!(err.kind(), ErrorKind::Generic);
    assert_eq!(graph.nodes().len(), 1);
    assert_eq!(graph.get("n").unwrap().size(), 4096);
}

#[test]
fn malformed_node_names_are_refused_with_qemu_text() {
    let mut graph = Graph::new();

    for bad in ["1abc", "a b", "#block123", "", "a/b", "é"] {
        let err = graph.add(&null_opts(bad, 4096)).refused();

        assert_eq!(err.message(), format!("Invalid node-name: '{bad}'"));
    }
    assert!(graph.nodes().is_empty());
}

#[test]
fn node_name_of_32_bytes_is_refused_as_too_long_and_31_accepted() {
    let mut graph = Graph::new();
    let long = "a".repeat(32);
    let fits = "b".repeat(31);

    let err = graph.add(&null_opts(&long, 4096)).refused();
    let ok = graph.add(&null_opts(&fits, 4096));

    assert_eq!(err.message(), "Node name too long");
    assert!(ok.is_ok());
}

#[test]
fn root_node_without_name_is_refused() {
    let mut graph = Graph::new();
    let mut opts = null_opts("x", 4096);
    opts.node_name = None;

    let err = graph.add(&opts).refused();

    assert_eq!(
        err.message(),
        "'node-name' must be specified for the root node"
    );
    assert!(graph.nodes().is_empty());
}

#[test]
fn unsupported_driver_is_refused() {
    let mut graph = Graph::new();
    let opts = NodeOptions {
        node_name: Some("x".into()),
        driver: DriverOptions::Unsupported,
        ..NodeOptions::default()
    };

    let err = graph.add(&opts).refused();

    assert_eq!(err.message(), "Driver is not supported by blockd");
}

#[test]
fn missing_file_is_refused_with_strerror_text() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let missing = missing.to_str().unwrap();
    let mut graph = Graph::new();

    let err = graph.add(&file_opts(Some("f"), missing)).refused();

    assert_eq!(
        err.message(),
        format!("Could not open '{missing}': No such file or directory")
    );
}

#[test]
fn inline_child_gets_generated_block_name() {
    let img = image(4096, 0);
    let mut graph = Graph::new();

    let raw = graph.add(&raw_inline_opts("r", &path(&img))).unwrap();

    let child = raw.child("file").unwrap();
    assert!(child.auto_named());
    let suffix = child.name().strip_prefix("#block").unwrap();
    assert!(!suffix.is_empty() && suffix.chars().all(|c| c.is_ascii_digit()));
    assert!(graph.get(child.name()).is_some());
}

#[test]
fn generated_names_differ_between_inline_children() {
    let a = image(4096, 0);
    let b = image(4096, 0);
    let mut graph = Graph::new();

    let ra = graph.add(&raw_inline_opts("ra", &path(&a))).unwrap();
    let rb = graph.add(&raw_inline_opts("rb", &path(&b))).unwrap();

    assert_ne!(
        ra.child("file").unwrap().name(),
        rb.child("file").unwrap().name()
    );
}

#[test]
fn inline_child_inherits_read_only_from_parent() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    let mut opts = raw_inline_opts("r", &path(&img));
    opts.read_only = true;

    let raw = graph.add(&opts).unwrap();

    assert!(raw.read_only());
    assert!(raw.child("file").unwrap().read_only());
}

#[test]
fn inline_child_inherits_discard_unmap_from_parent() {
    let img = image(4096, 0);
    let mut graph = Graph::new();

    let raw = graph
        .add(&with_unmap(raw_inline_opts("r", &path(&img))))
        .unwrap();

    assert!(raw.child("file").unwrap().flags().discard_unmap);
}

#[test]
fn deleting_parent_removes_its_inline_child() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    graph.add(&raw_inline_opts("r", &path(&img))).unwrap();

    graph.del("r").unwrap();

    assert!(graph.nodes().is_empty());
}

#[test]
fn deleting_parent_keeps_its_named_child() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    graph.add(&file_opts(Some("f"), &path(&img))).unwrap();
    graph
        .add(&raw_opts("r", ChildRef::Name("f".into())))
        .unwrap();

    graph.del("r").unwrap();

    assert_eq!(names(&graph), ["f"]);
}

#[test]
fn deleting_node_with_parent_is_refused_as_in_use() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    graph.add(&file_opts(Some("f"), &path(&img))).unwrap();
    graph
        .add(&raw_opts("r", ChildRef::Name("f".into())))
        .unwrap();

    let err = graph.del("f").refused();

    assert_eq!(err.message(), "Block device f is in use");
    assert_eq!(graph.nodes().len(), 2);
}

#[test]
fn deleting_node_with_user_is_refused_as_qemu_does() {
    let mut graph = Graph::new();
    let node = graph.add(&null_opts("n", 4096)).unwrap();
    node.add_user("export 'e'".into());

    let err = graph.del("n").refused();

    assert_eq!(err.message(), "Node n is in use");
    assert!(graph.get("n").is_some());
}

#[test]
fn deleting_a_job_node_is_refused_as_busy_after_exports() {
    let mut graph = Graph::new();
    let node = graph.add(&null_opts("n", 4096)).unwrap();
    node.add_user("block job: backup".into());
    node.add_user("export 'e'".into());

    assert_eq!(graph.del("n").refused().message(), "Node n is in use");
    node.remove_user("export 'e'");
    assert_eq!(
        graph.del("n").refused().message(),
        "Node 'n' is busy: block device is in use by block job: backup"
    );
    assert!(graph.get("n").is_some());
}

#[test]
fn deleting_node_succeeds_once_its_user_is_gone() {
    let mut graph = Graph::new();
    let node = graph.add(&null_opts("n", 4096)).unwrap();
    node.add_user("export 'e'".into());
    node.remove_user("export 'e'");

    graph.del("n").unwrap();

    assert!(graph.nodes().is_empty());
}

#[test]
fn deleting_generated_child_is_refused_as_not_owned_by_monitor() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    let raw = graph.add(&raw_inline_opts("r", &path(&img))).unwrap();
    let child = raw.child("file").unwrap().name().to_string();

    let err = graph.del(&child).refused();

    assert_eq!(
        err.message(),
        format!("Node {child} is not owned by the monitor")
    );
}

#[test]
fn deleting_unknown_node_reports_failed_to_find() {
    let mut graph = Graph::new();

    let err = graph.del("ghost").refused();

    assert_eq!(err.message(), "Failed to find node with node-name='ghost'");
}

#[test]
fn lookup_of_unknown_node_uses_cannot_find_text() {
    let graph = Graph::new();

    let err = graph.lookup("ghost").refused();

    assert_eq!(
        err.message(),
        "Cannot find device='ghost' nor node-name='ghost'"
    );
}

#[test]
fn raw_over_unknown_child_name_is_refused_with_cannot_find_text() {
    let mut graph = Graph::new();

    let err = graph
        .add(&raw_opts("r", ChildRef::Name("ghost".into())))
        .refused();

    assert_eq!(
        err.message(),
        "Cannot find device='ghost' nor node-name='ghost'"
    );
    assert!(graph.nodes().is_empty());
}

#[test]
fn failed_raw_add_removes_its_inline_file_child() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    let mut opts = raw_inline_opts("r", &path(&img));
    if let DriverOptions::Raw { offset, .. } = &mut opts.driver {
        *offset = Some(8192);
    }

    let err = graph.add(&opts).refused();

    assert!(err.message().starts_with("The sum of offset (8192)"));
    assert!(graph.nodes().is_empty());
}

#[test]
fn failed_add_leaves_existing_nodes_alone() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    graph.add(&null_opts("n", 4096)).unwrap();
    let mut opts = raw_inline_opts("r", &path(&img));
    if let DriverOptions::Raw { size, .. } = &mut opts.driver {
        *size = Some(1000);
    }

    graph.add(&opts).refused();

    assert_eq!(names(&graph), ["n"]);
}

fn locked_raw(name: &str, filename: &str) -> NodeOptions {
    let mut file = file_opts(None, filename);
    file.driver = DriverOptions::File {
        filename: filename.to_string(),
        locking: true,
    };
    raw_opts(name, ChildRef::Inline(Box::new(file)))
}

#[test]
fn raw_nodes_without_users_take_no_locks_as_in_qemu() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    graph.add(&locked_raw("r1", &path(&img))).unwrap();

    graph.add(&locked_raw("r2", &path(&img))).unwrap();

    assert_eq!(graph.nodes().len(), 4);
}

#[test]
fn second_exclusive_writer_on_locked_image_is_refused_and_changes_nothing() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    let r1 = graph.add(&locked_raw("r1", &path(&img))).unwrap();
    let rw = Perm::CONSISTENT_READ | Perm::WRITE;
    r1.attach_user(
        "a".into(),
        "an unnamed block device".into(),
        rw,
        Perm::CONSISTENT_READ,
    );
    graph.refresh_perms().unwrap();
    let r2 = graph.add(&locked_raw("r2", &path(&img))).unwrap();

    r2.attach_user("b".into(), "an unnamed block device".into(), rw, Perm::ALL);
    let err = graph.refresh_perms().unwrap_err();

    assert_eq!(err.message(), "Failed to get \"write\" lock");
    r2.remove_user("b");
    graph.refresh_perms().unwrap();
    let r2_file = r2.child("file").unwrap().clone();
    assert_eq!(r2_file.applied_needs(), block::perm::Needs::default());
}

#[test]
fn deleting_the_writer_releases_its_image_lock() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    graph.add(&locked_raw("r1", &path(&img))).unwrap();

    graph.del("r1").unwrap();
    let second = graph.add(&locked_raw("r2", &path(&img)));

    assert!(second.is_ok());
}

#[test]
fn close_all_empties_graph_and_closed_nodes_refuse_writes() {
    let img = image(4096, 0);
    let mut graph = Graph::new();
    let raw = graph.add(&raw_inline_opts("r", &path(&img))).unwrap();
    let file = raw.child("file").unwrap().clone();
    let null = graph.add(&null_opts("n", 4096)).unwrap();

    graph.close_all();

    assert!(graph.nodes().is_empty());
    for node in [&raw, &file, &null] {
        let err = node.write(0, &[1; 512]).unwrap_err();
        assert_eq!(errno(err), libc::EIO, "node {}", node.name());
    }
}
