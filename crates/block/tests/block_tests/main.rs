//! Integration tests of the block core: graph, I/O path, bitmaps, concurrency, jobs.
//!
//! One test binary (modules below) so the suite links once. Every test builds its own graph over
//! temporary files; nothing is shared between tests.

mod attach_deleted;
mod backup;
mod backup_files;
mod bitmaps;
mod close;
mod common;
mod compressed;
mod concurrency;
mod drain;
mod graph;
mod hooks;
mod io_path;
mod jobs;
mod open_atomic;
mod perm_props;
mod qcow2_hostile;
mod qcow2_store;
mod reopen_rw;
mod reopen_switch;
mod rewire;
mod snapshot;
mod staged;
mod tracking;
