//! block: the block-graph core (nodes, drivers, bitmaps, jobs). Knows nothing of JSON.
//!
//! # Layout
//! - [`error`]: the one error type (kind + message), QEMU's wording.
//! - [`driver`]: the `Driver` trait every node implementation provides; [`drivers`]: file, raw,
//!   null-co, qcow2.
//! - [`node`]: a node (driver + children + bitmaps + write hooks) and the checked I/O path that
//!   marks dirty bitmaps.
//! - [`graph`]: the node-name table: create from options, look up, delete, close.
//! - [`bitmap`], [`bitmap_ops`]: named dirty bitmaps and the commands on them.
//! - [`job`]: the job state machine shared by every job type.
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
pub mod error;
pub mod graph;
pub mod job;
pub mod transaction;
pub mod node;

pub use error::{Error, ErrorKind, Result};
pub use graph::Graph;
pub use node::{Node, NodeRef};
