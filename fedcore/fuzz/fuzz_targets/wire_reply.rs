//! What the server reads from a client: length-delimited `ClientMessage`s,
//! a reply header and its chunks, decoded into an update, an evaluation or
//! a step answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedcore::net::fuzzing::reply_from_frames(data, 1 << 20);
});
