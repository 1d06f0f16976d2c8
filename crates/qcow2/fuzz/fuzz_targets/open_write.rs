//! Fuzz the write path on arbitrary images: open writable, write, zero, discard, flush.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qcow2::fuzzing::open_and_write(data);
});
