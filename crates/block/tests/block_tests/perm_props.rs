//! Property tests of the permission logic: random graphs built and changed by random
//! operations (add file/raw/qcow2 nodes, users with random permissions, read-only reopen,
//! delete). After every operation, accepted or refused:
//! - each node holds exactly the union of its edges' needs,
//! - no edge needs what another edge into the same node does not share,
//! - the lock bytes other processes see on each image are exactly that union,
//! - a refused operation changed no node's permissions and no node list.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use block::drivers::lock::held_by_others;
use block::graph::{ChildRef, DriverOptions, NodeOptions};
use block::perm::{Needs, Perm};
use block::Graph;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    File { img: usize },
    Raw { over: usize, window: bool, ro: bool },
    Qcow2 { over: usize, ro: bool },
    User { node: usize, perm: u8, shared: u8 },
    DropUser { node: usize },
    Reopen { node: usize, ro: bool },
    Del { node: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize).prop_map(|img| Op::File { img }),
        (any::<usize>(), any::<bool>(), any::<bool>()).prop_map(|(over, window, ro)| Op::Raw {
            over,
            window,
            ro
        }),
        (any::<usize>(), any::<bool>()).prop_map(|(over, ro)| Op::Qcow2 { over, ro }),
        (any::<usize>(), 0..16u8, 0..16u8).prop_map(|(node, perm, shared)| Op::User {
            node,
            perm,
            shared
        }),
        any::<usize>().prop_map(|node| Op::DropUser { node }),
        (any::<usize>(), any::<bool>()).prop_map(|(node, ro)| Op::Reopen { node, ro }),
        any::<usize>().prop_map(|node| Op::Del { node }),
    ]
}

struct World {
    _dir: tempfile::TempDir,
    images: Vec<PathBuf>,
    graph: Graph,
    counter: usize,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let images: Vec<PathBuf> = (0..2)
            .map(|i| dir.path().join(format!("{i}.qcow2")))
            .collect();
        for p in &images {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .expect("create");
            let opts = qcow2::CreateOptions {
                size: 1 << 20,
                ..qcow2::CreateOptions::default()
            };
            qcow2::Qcow2::create(&qcow2::FileStorage::new(f), &opts).expect("create qcow2");
        }
        World {
            _dir: dir,
            images,
            graph: Graph::new(),
            counter: 0,
        }
    }

    fn pick(&self, i: usize) -> Option<block::NodeRef> {
        let nodes = self.graph.nodes();
        (!nodes.is_empty()).then(|| nodes[i % nodes.len()].clone())
    }

    fn name(&mut self) -> String {
        self.counter += 1;
        format!("n{}", self.counter)
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let e = |e: block::Error| e.message().to_string();
        match *op {
            Op::File { img } => {
                let opts = NodeOptions {
                    node_name: Some(self.name()),
                    driver: DriverOptions::File {
                        filename: self.images[img].to_str().unwrap_or_default().to_string(),
                        locking: true,
                    },
                    ..NodeOptions::default()
                };
                self.graph.add(&opts).map(|_| ()).map_err(e)
            }
            Op::Raw { over, window, ro } => {
                let Some(child) = self.pick(over) else {
                    return Ok(());
                };
                let opts = NodeOptions {
                    node_name: Some(self.name()),
                    read_only: ro,
                    driver: DriverOptions::Raw {
                        file: ChildRef::Name(child.name().to_string()),
                        offset: None,
                        size: window.then_some(512),
                    },
                    ..NodeOptions::default()
                };
                self.graph.add(&opts).map(|_| ()).map_err(e)
            }
            Op::Qcow2 { over, ro } => {
                let Some(child) = self.pick(over) else {
                    return Ok(());
                };
                let opts = NodeOptions {
                    node_name: Some(self.name()),
                    read_only: ro,
                    driver: DriverOptions::Qcow2 {
                        file: ChildRef::Name(child.name().to_string()),
                        backing: Some(None),
                        cache: Default::default(),
                    },
                    ..NodeOptions::default()
                };
                self.graph.add(&opts).map(|_| ()).map_err(e)
            }
            Op::User { node, perm, shared } => {
                let Some(n) = self.pick(node) else {
                    return Ok(());
                };
                let who = format!("u{}", self.name());
                let (perm, shared) = (Perm::from_bits(perm), Perm::from_bits(shared));
                n.attach_user(who.clone(), format!("user {who}"), perm, shared);
                self.graph.refresh_perms().map_err(|err| {
                    n.remove_user(&who);
                    let restored = self.graph.refresh_perms();
                    assert!(restored.is_ok(), "restoring after a refused user failed");
                    e(err)
                })
            }
            Op::DropUser { node } => {
                let Some(n) = self.pick(node) else {
                    return Ok(());
                };
                if let Some(u) = n.users().first() {
                    n.remove_user(&u.who);
                }
                self.graph.refresh_perms().map_err(e)
            }
            Op::Reopen { node, ro } => {
                let Some(n) = self.pick(node) else {
                    return Ok(());
                };
                self.graph.reopen_read_only(&n, ro).map_err(e)
            }
            Op::Del { node } => {
                let Some(n) = self.pick(node) else {
                    return Ok(());
                };
                let name = n.name().to_string();
                self.graph.del(&name).map_err(e)
            }
        }
    }

    fn state(&self) -> Vec<(String, Needs, bool)> {
        self.graph
            .nodes()
            .iter()
            .map(|n| (n.name().to_string(), n.applied_needs(), n.read_only()))
            .collect()
    }

    fn check(&self) {
        for n in self.graph.nodes() {
            let edges = self.graph.edges_into(n);
            let mut union = Needs::default();
            for e in &edges {
                union.add(e.perm, e.shared);
            }
            assert_eq!(
                n.applied_needs(),
                union,
                "node {} holds its edges' union",
                n.name()
            );
            for a in &edges {
                for b in &edges {
                    if !std::ptr::eq(a, b) {
                        assert!(
                            a.shared.contains(b.perm),
                            "{} needs {:?} that {} does not share on {}",
                            b.who,
                            b.perm,
                            a.who,
                            n.name()
                        );
                    }
                }
            }
        }
        for path in &self.images {
            let mut perm = 0u32;
            let mut unshared = 0u32;
            for n in self.graph.nodes() {
                if n.driver_name() == "file" && n.facts().filename == path.to_str().unwrap_or("") {
                    let a = n.applied_needs();
                    perm |= u32::from(a.perm.bits()) & 0xf;
                    unshared |= u32::from((!a.shared).bits()) & 0xf;
                }
            }
            let probe = File::open(path).expect("open image");
            assert_eq!(
                held_by_others(&probe),
                (perm, unshared),
                "lock bytes of {}",
                path.display()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn permissions_stay_consistent_under_random_changes(ops in proptest::collection::vec(op(), 1..24)) {
        let mut w = World::new();
        for op in &ops {
            let before = w.state();
            let result = w.apply(op);
            if result.is_err() {
                prop_assert_eq!(&w.state(), &before, "refused {:?} changed something", op);
            }
            w.check();
        }
    }
}
