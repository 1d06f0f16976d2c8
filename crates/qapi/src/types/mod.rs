//! Typed commands, replies and events.
