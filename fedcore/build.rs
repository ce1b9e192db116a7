//! Generates the gRPC code of the `net` feature from `proto/fedcore.proto`
//! (needs `protoc`, Debian's `protobuf-compiler`).

fn main() {
    #[cfg(feature = "net")]
    {
        println!("cargo:rerun-if-changed=proto/fedcore.proto");
        if let Err(e) = tonic_prost_build::configure()
            .bytes(".fedcore.v1.Chunk.data")
            .compile_protos(&["proto/fedcore.proto"], &["proto"])
        {
            panic!(
                "cannot compile proto/fedcore.proto ({e}); the `net` feature needs `protoc` (Debian: apt install protobuf-compiler)"
            );
        }
    }
}
