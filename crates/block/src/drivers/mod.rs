//! The drivers: `file` (host files), `raw` (a window on a child), `null-co`, `qcow2`,
//! `blkdebug` (fault injection).

pub mod blkdebug;
pub mod file;
pub mod lock;
pub mod null;
pub mod qcow2;
pub mod qcow2_cache;
pub mod raw;
