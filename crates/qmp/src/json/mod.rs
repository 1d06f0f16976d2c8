//! QEMU's JSON dialect: an incremental, byte-level reader and a writer.
//!
//! ```text
//!  bytes ──> lexer ──tokens──> streamer ──> parser ──> Parsed::Value / Parsed::Error
//!            (state machine)   (message bounds,   (explicit stack,
//!                               limits, recovery)   QEMU error words)
//!
//!  Value ──> writer (QDict member order, QEMU escapes, %.17g floats) ──> text
//! ```
//!
//! Nothing here knows about QMP; [`crate::protocol`] interprets the values.

pub mod lexer;
pub mod parser;
pub mod qdict;
pub mod streamer;
pub mod writer;

pub use streamer::{Limits, Parsed, Streamer};
pub use writer::to_string;
