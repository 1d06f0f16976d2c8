//! The drivers: `file` (host files), `raw` (a window on a child), `null-co`, `qcow2`,
//! `blkdebug` (fault injection), `copy-before-write` and `snapshot-access` (image fleecing).

pub mod blkdebug;
pub mod cbw;
pub mod file;
pub mod lock;
pub mod null;
pub mod qcow2;
pub mod qcow2_cache;
pub mod raw;
pub mod snapshot_access;
