//! A checkpoint folder's files: `state.json` and the model's safetensors.
//! The first two bytes split the input (state length, little-endian); the
//! state is parsed and checked, the rest read as safetensors both whole and
//! into a fixed layout.
#![no_main]

use std::sync::{Arc, OnceLock};

use fedcore::Parameters;
use fedcore::checkpoint::{ExtraTensors, RunState};
use fedcore::{Layout, TensorSpec};
use libfuzzer_sys::fuzz_target;

fn layout() -> &'static Arc<Layout> {
    static L: OnceLock<Arc<Layout>> = OnceLock::new();
    L.get_or_init(|| {
        Arc::new(
            Layout::new(vec![
                TensorSpec::new("a.weight", vec![2, 3]),
                TensorSpec::new("b", vec![]),
            ])
            .expect("layout"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (n, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let (state, model) = rest.split_at(n.min(rest.len()));
    let _ = RunState::from_json(state);
    let _ = Parameters::from_safetensors(model);
    for extra in [ExtraTensors::Refuse, ExtraTensors::Ignore] {
        let _ = Parameters::from_safetensors_in(model, layout(), extra);
    }
});
