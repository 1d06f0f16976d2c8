//! qcow2: the qcow2 image format over a small storage trait (no QMP, no graph).
