//! The encrypted-vector decoder on arbitrary bytes: it must return `Ok` or
//! a typed error, never panic or abort (a C++ exception escaping SEAL would
//! abort the process, which libFuzzer reports as a crash).
//!
//! Seeds: `cargo fuzz run load_vector` starts from nothing; the corpus
//! folder can be seeded with real uploads (see fedcore-he/fuzz/README.md).
#![no_main]

use std::sync::OnceLock;

use fedcore_he::{CkksContext, CkksParams, Form, Secret};
use libfuzzer_sys::fuzz_target;

fn ctx() -> &'static CkksContext<Secret> {
    static CTX: OnceLock<CkksContext<Secret>> = OnceLock::new();
    CTX.get_or_init(|| {
        // Smaller (insecure) parameters keep each run fast; the decoder's
        // paths are the same at every size.
        let p = CkksParams::dangerous()
            .insecure(4096, &[40, 40, 40, 40], 30)
            .expect("params");
        CkksContext::generate(p).expect("keygen")
    })
}

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
    for form in [Form::Fresh, Form::Sum] {
        if let Ok(v) = ctx.load(data, form) {
            let _ = ctx.decrypt(&v);
        }
    }
});
