//! The evaluation-key decoder on arbitrary bytes (what a server loads from
//! its kit): `Ok` or a typed error, never a panic or an abort; keys that
//! load must work in an inner product.
#![no_main]

#[path = "common.rs"]
mod common;

use fedcore_he::Form;
use libfuzzer_sys::fuzz_target;

use common::ctx;

fuzz_target!(|data: &[u8]| {
    let ctx = ctx();
    // With a leading 0xFF byte, the rest is raw SEAL bytes (split in two:
    // relinearization and Galois keys) in a valid envelope for this key, so
    // the fuzzer reaches the layout check and SEAL's parser directly.
    if let Some((&0xFF, rest)) = data.split_first() {
        let (relin, galois) = rest.split_at(rest.len() / 2);
        let _ = ctx
            .public()
            .with_evaluation_keys(&fedcore_he::fuzzing::eval_keys(ctx, relin, galois));
        return;
    }
    // Seeds come from another key: put this one's id in the header.
    let data = common::with_key_id(data, 5);
    let data = data.as_slice();
    if let Ok(with) = ctx.public().with_evaluation_keys(data) {
        let up = ctx.encrypt_compact(&[1.0, 2.0]).expect("encrypt");
        let v = with.load(&up, Form::Fresh).expect("load");
        let _ = with.inner_products(&[&v, &v]);
    }
});
