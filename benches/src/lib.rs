//! Criterion benches for the fedcore workspace live in `benches/`; this library is empty.
