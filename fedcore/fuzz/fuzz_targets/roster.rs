//! The roster the server re-reads whenever the file changes: parsed, then
//! asked to admit and list sites.
#![no_main]

use fedcore::net::provision::Roster;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut roster) = Roster::from_json(data) {
        let _ = roster.admit("site-1", "00");
        let _ = roster.active();
        let _ = roster.revoke("site-1");
    }
});
