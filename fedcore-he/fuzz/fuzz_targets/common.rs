//! What every target shares: one key pair with small (insecure) parameters,
//! made once per process, so that each run is fast; the decoders' paths are
//! the same at every size.

use std::sync::OnceLock;

use fedcore_he::{CkksContext, CkksParams, Secret};

pub fn ctx() -> &'static CkksContext<Secret> {
    static CTX: OnceLock<CkksContext<Secret>> = OnceLock::new();
    CTX.get_or_init(|| {
        let p = CkksParams::dangerous()
            .insecure(4096, &[40, 40, 40, 40], 30)
            .expect("params");
        CkksContext::generate(p).expect("keygen")
    })
}

/// `data` with this key's id at `at..at + 16`, where the format's header
/// has it: seeds written under another key would otherwise stop at the key
/// check, and this lets the rest reach SEAL's parsers.
pub fn with_key_id(data: &[u8], at: usize) -> Vec<u8> {
    let mut data = data.to_vec();
    if data.len() >= at + 16 {
        data[at..at + 16].copy_from_slice(&ctx().key_id());
    }
    data
}
