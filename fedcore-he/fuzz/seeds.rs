//! Writes the seed corpora of this crate's targets under the folder given as
//! the first argument (default `seeds`): key files of both roles (small,
//! insecure parameters, as the targets use), encrypted uploads, evaluation
//! keys and an encrypted Gram matrix.

use fedcore_he::{CkksContext, CkksParams, Form, KeyAuthority};

fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    let params = CkksParams::dangerous()
        .insecure(4096, &[40, 40, 40, 40], 30)
        .expect("params");
    let tmp = std::env::temp_dir().join(format!("fedcore-he-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp folder");
    let (hospital, files) = KeyAuthority::write(params, &tmp).expect("keys");
    let keys = root.join("key_file");
    std::fs::create_dir_all(&keys).expect("seed folder");
    std::fs::copy(&files.public, keys.join("public")).expect("public key");
    std::fs::copy(&files.secret, keys.join("secret")).expect("secret key");
    let vectors = root.join("load_vector");
    std::fs::create_dir_all(&vectors).expect("seed folder");
    let fresh = hospital
        .encrypt_compact(&[1.0, -2.0, 3.5])
        .expect("encrypt");
    std::fs::write(vectors.join("fresh"), &fresh).expect("seed");
    // The same upload in the deflated format 1 (before 0.2), which still loads.
    let deflated = fedcore_he::fuzzing::encrypt_compact_deflated(&hospital, &[1.0, -2.0, 3.5])
        .expect("encrypt");
    std::fs::write(vectors.join("fresh-deflated"), &deflated).expect("seed");
    // Two values per slot, as `CkksSum` seals by default.
    let two = hospital
        .clone()
        .with_slot_packing(fedcore_he::SlotPacking::Complex)
        .encrypt_compact(&[1.0, -2.0, 3.5])
        .expect("encrypt");
    std::fs::write(vectors.join("fresh-two-per-slot"), &two).expect("seed");
    let server = hospital.public();
    let a = server.load(&fresh, Form::Fresh).expect("load");
    let sum = server.weighted_sum(&[&a, &a], &[0.5, 0.5]).expect("sum");
    // A sum is written rounded (flag bit 2); unrounded, as before, it still loads.
    std::fs::write(vectors.join("sum"), sum.to_bytes().expect("bytes")).expect("seed");
    let exact = fedcore_he::fuzzing::to_unrounded_bytes(&sum).expect("bytes");
    std::fs::write(vectors.join("sum-unrounded"), exact).expect("seed");
    // Evaluation keys and an encrypted Gram matrix of two uploads.
    let eval = hospital.evaluation_keys().expect("evaluation keys");
    let dir = root.join("eval_keys");
    std::fs::create_dir_all(&dir).expect("seed folder");
    std::fs::write(dir.join("keys"), &eval).expect("seed");
    let with = server.with_evaluation_keys(&eval).expect("load keys");
    let b = hospital.encrypt_compact(&[0.5, 2.0, -1.0]).expect("encrypt");
    let b = server.load(&b, Form::Fresh).expect("load");
    let dir = root.join("load_gram");
    std::fs::create_dir_all(&dir).expect("seed folder");
    let gram = with.inner_products(&[&a, &b]).expect("inner products");
    std::fs::write(dir.join("gram"), gram.to_bytes().expect("bytes")).expect("seed");
    let distances = with.squared_distances(&[&a, &b]).expect("distances");
    std::fs::write(dir.join("distances"), distances.to_bytes().expect("bytes")).expect("seed");
    let _ = CkksContext::<fedcore_he::Public>::from_file(&files.public).expect("reads back");
    let _ = std::fs::remove_dir_all(&tmp);
    println!("seeds written under {}", root.display());
}
