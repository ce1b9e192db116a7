//! The CKKS key files a hospital and the server load: any bytes must give a
//! context or a typed error (a C++ exception escaping SEAL aborts, which
//! libFuzzer reports as a crash). A leading 0xFF byte wraps the rest in a
//! valid header with small parameters so that the fuzzer reaches SEAL's key
//! parsers quickly.
#![no_main]

use fedcore_he::{CkksContext, Public, Secret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&0xFF, rest)) = data.split_first() {
        let wrapped = fedcore_he::fuzzing::key_file(rest);
        let _ = CkksContext::<Public>::from_key_bytes(&wrapped);
        let _ = CkksContext::<Secret>::from_key_bytes(&wrapped);
        return;
    }
    let _ = CkksContext::<Public>::from_key_bytes(data);
    let _ = CkksContext::<Secret>::from_key_bytes(data);
});
