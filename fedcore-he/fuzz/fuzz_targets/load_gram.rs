//! The encrypted-Gram-matrix decoder on arbitrary bytes (what a hospital
//! loads before decrypting for the server; 2 points, as the seed has): `Ok`
//! or a typed error, never a panic or an abort; a matrix that loads is
//! decrypted.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

use common::ctx;

fuzz_target!(|data: &[u8]| {
    let ctx = ctx();
    // Seeds come from another key: put this one's id in the header.
    let data = common::with_key_id(data, 5);
    let data = data.as_slice();
    if let Ok(g) = ctx.load_gram(data, 2) {
        let _ = ctx.decrypt_gram(&g);
    }
});
