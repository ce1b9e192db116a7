//! The ChestX-ray14 metadata reader (`Data_Entry_2017*.csv`) and the
//! findings field parser.
#![no_main]

use std::path::Path;

use fedcore::data::chestxray::{parse_entries, parse_findings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_entries(data, Path::new("fuzz.csv"));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_findings(text);
    }
});
