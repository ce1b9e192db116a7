//! Bakes libtorch's directory into the binary's rpath, so `cargo run` works
//! without `LD_LIBRARY_PATH` (LIBTORCH is set by scripts/env.sh).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
