//! The MNIST IDX reader: the first two bytes give the image file's length,
//! the rest is split into the image and label files.
#![no_main]

use fedcore::data::mnist::Mnist;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (n, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let (images, labels) = rest.split_at(n.min(rest.len()));
    let _ = Mnist::from_idx(images, labels);
});
