//! What a client reads from the server: length-delimited `ServerMessage`s,
//! a task header and its chunks, decoded into a task. Any bytes must give
//! `Ok` or a typed error: no panic, no allocation past the payload limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // 1 MiB: larger declared payloads must be refused before allocating.
    let _ = fedcore::net::fuzzing::task_from_frames(data, 1 << 20);
});
