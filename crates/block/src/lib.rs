//! block: the block-graph core (nodes, drivers, bitmaps, jobs). Knows nothing of JSON.
//!
//! # Layout
//! - [`error`]: the one error type (kind + message), QEMU's wording.
//! - [`driver`]: the `Driver` trait every node implementation provides; [`drivers`]: file, raw,
//!   null-co, qcow2.
//! - [`node`]: a node (driver + children + bitmaps + write hooks) and the checked I/O path that
//!   marks dirty bitmaps.
//! - [`graph`]: the node-name table: create from options (children's permissions before the
//!   parent reads them, nothing written until every lock of the new tree is held), look up,
//!   delete, close; re-wiring (`replace_node`, `insert_above`, `remove_filter`, `set_child`)
//!   in drained sections (stopped under the graph lock, waited for without it where the
//!   caller has the lock's mutex: `Graph::drained_staged`); read-only reopen.
//! - [`perm`]: QEMU's permissions on edges (needs, shared, child roles, conflict texts).
//! - [`edge`]: re-wirable child edges and roots (exports', devices' handles, with a drain gate).
//! - [`tracking`]: requests in flight per node, serialising overlapping ones for jobs.
//! - [`testing`]: a driver for tests that holds, delays, fails and logs requests.
//! - [`bitmap`], [`bitmap_ops`]: named dirty bitmaps and the commands on them.
//! - [`job`]: the job state machine shared by every job type; [`backup`]: backup jobs.
//!
//! ```text
//!   Graph ──owns names──> Node ──driver──> Driver (raw, qcow2 ...) ──child──> Node (file) ──> FileDriver
//!                          │
//!                          └── Mutex<BitmapList>: marked after every write, write-zeroes, discard
//! ```

pub mod backup;
pub mod bitmap;
pub mod bitmap_ops;
pub mod create;
pub mod driver;
pub mod drivers;
pub mod edge;
pub mod error;
pub mod graph;
pub mod internal_snapshot;
pub mod job;
pub mod node;
pub mod perm;
pub mod testing;
pub mod tracking;
pub mod transaction;

pub use error::{Error, ErrorKind, Result};
pub use graph::Graph;
pub use node::{Node, NodeRef};
