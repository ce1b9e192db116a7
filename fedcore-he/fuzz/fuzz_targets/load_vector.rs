//! The encrypted-vector decoder on arbitrary bytes: it must return `Ok` or
//! a typed error, never panic or abort (a C++ exception escaping SEAL would
//! abort the process, which libFuzzer reports as a crash).
//!
//! Seeds: `seeds.rs` writes an upload and a sum (see
//! fedcore-he/fuzz/README.md); their key id is replaced by this run's.
#![no_main]

#[path = "common.rs"]
mod common;

use fedcore_he::Form;
use libfuzzer_sys::fuzz_target;

use common::ctx;

fuzz_target!(|data: &[u8]| {
    let ctx = ctx();
    // Let the fuzzer reach SEAL's parser quickly: with a leading 0xFF byte,
    // the rest is SEAL bytes wrapped in a valid envelope for this key.
    if let Some((&0xFF, rest)) = data.split_first() {
        let wrapped = fedcore_he::fuzzing::wrap(ctx, rest, Form::Fresh);
        if let Ok(v) = ctx.load(&wrapped, Form::Fresh) {
            let _ = ctx.decrypt(&v);
        }
        return;
    }
    // Seeds come from another key: put this one's id in the header.
    let data = common::with_key_id(data, 7);
    for form in [Form::Fresh, Form::Sum] {
        if let Ok(v) = ctx.load(&data, form) {
            let _ = ctx.decrypt(&v);
        }
    }
});
