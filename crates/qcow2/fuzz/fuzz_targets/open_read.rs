//! Fuzz header and metadata parsing: open arbitrary bytes as an image and read from it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qcow2::fuzzing::open_and_read(data);
});
