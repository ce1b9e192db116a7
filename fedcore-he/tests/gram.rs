//! The encrypted Gram matrix and the geometric median computed from it: the
//! server holds only ciphertexts and the decrypted inner products, and gets
//! the plaintext geometric median's estimate, weights and distances.

use std::sync::OnceLock;

use fedcore_he::{
    CkksContext, CkksParams, EncryptedVector, Form, HeError, Pairs, Public, Secret, SlotPacking,
};
use fedcore_robust::{GeometricMedianParams, GramSlack, Method};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A key pair and its evaluation keys (generating them takes a second).
fn keys() -> &'static (CkksContext<Secret>, Vec<u8>) {
    static KEYS: OnceLock<(CkksContext<Secret>, Vec<u8>)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let h = CkksContext::generate(CkksParams::default()).expect("keygen");
        let eval = h.evaluation_keys().expect("evaluation keys");
        (h, eval)
    })
}

/// What decrypted entries may be off by: CKKS noise, about 1e-7 here.
fn slack() -> GramSlack {
    GramSlack::new(1e-6, 1e-6).expect("slack")
}

/// The server: the public key and the evaluation keys, nothing else.
fn server() -> CkksContext<Public> {
    let (h, eval) = keys();
    h.public()
        .with_evaluation_keys(eval)
        .expect("load evaluation keys")
}

/// `n` hospitals' updates of `len` values: honest ones near a common
/// direction, the first `byzantine` sign-flipped or scaled.
fn updates(n: usize, byzantine: usize, len: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let common: Vec<f64> = (0..len).map(|_| rng.random_range(-0.01..0.01)).collect();
    (0..n)
        .map(|i| {
            let honest: Vec<f64> = common
                .iter()
                .map(|c| c + rng.random_range(-0.004..0.004))
                .collect();
            match i {
                i if i < byzantine && i % 2 == 0 => honest.iter().map(|v| -4.0 * v).collect(),
                i if i < byzantine => honest.iter().map(|v| 10.0 * v).collect(),
                _ => honest,
            }
        })
        .collect()
}

fn plain_gram(x: &[Vec<f64>]) -> Vec<f64> {
    let n = x.len();
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            g[i * n + j] = x[i].iter().zip(&x[j]).map(|(a, b)| a * b).sum();
        }
    }
    g
}

fn upload_all(s: &CkksContext<Public>, x: &[Vec<f64>]) -> Vec<EncryptedVector> {
    let (h, _) = keys();
    x.iter()
        .map(|v| {
            let bytes = h.encrypt_compact(v).expect("encrypt");
            s.load(&bytes, Form::Fresh).expect("load")
        })
        .collect()
}

/// The whole round for `n` hospitals, 30 % of them Byzantine: the encrypted
/// Gram matrix matches the plaintext one, and the median the server forms
/// from it (an encrypted weighted sum) decrypts to the plaintext geometric
/// median of the same updates, with the same weights and distances.
fn encrypted_median_matches_plaintext(n: usize, len: usize, kind: Pairs) {
    let byzantine = (n * 3).div_ceil(10);
    let x = updates(n, byzantine, len, 40 + n as u64);
    let (h, _) = keys();
    let s = server();
    let parts = upload_all(&s, &x);
    let refs: Vec<&EncryptedVector> = parts.iter().collect();

    // Server: the Gram (or distance) matrix under encryption; a hospital
    // opens it.
    let sealed = match kind {
        Pairs::InnerProducts => s.inner_products(&refs),
        Pairs::SquaredDistances => s.squared_distances(&refs),
    }
    .expect("pairwise products");
    assert_eq!((sealed.points(), sealed.kind()), (n, kind));
    let bytes = sealed.to_bytes().expect("bytes");
    let gram = h
        .decrypt_gram(&h.load_gram(&bytes, n).expect("hospital loads"))
        .expect("decrypt");
    let g = plain_gram(&x);
    let exact: Vec<f64> = match kind {
        Pairs::InnerProducts => g,
        _ => (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                g[i * n + i] + g[j * n + j] - 2.0 * g[k]
            })
            .collect(),
    };
    let scale = exact.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (k, (a, b)) in gram.iter().zip(&exact).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * scale,
            "entry {k}: {a} vs {b} (scale {scale})"
        );
    }

    // Server: Weiszfeld on the decrypted numbers, the estimate as an
    // encrypted weighted sum.
    let gm = GeometricMedianParams::new()
        .method(Method::Gram)
        .check()
        .expect("params");
    let alpha = vec![1.0; n];
    let on_gram = match kind {
        Pairs::InnerProducts => gm.compute_on_gram(&gram, &alpha, slack()),
        _ => gm.compute_on_distances(&gram, &alpha, slack()),
    }
    .expect("a Gram or distance matrix");
    let median = s
        .weighted_sum(&refs, &on_gram.coefficients)
        .expect("weighted sum");
    let median = h
        .decrypt(
            &h.load(&median.to_bytes().expect("bytes"), Form::Sum)
                .expect("load"),
        )
        .expect("decrypt");

    // The plaintext geometric median of the same updates.
    let points: Vec<Vec<f32>> = x
        .iter()
        .map(|v| v.iter().map(|&a| a as f32).collect())
        .collect();
    let refs32: Vec<&[f32]> = points.iter().map(Vec::as_slice).collect();
    let plain = gm.compute(&refs32, &alpha);
    let top = plain
        .median
        .iter()
        .fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    for (k, (e, p)) in median.iter().zip(&plain.median).enumerate() {
        assert!(
            (e - f64::from(*p)).abs() <= 1e-4 * top,
            "coordinate {k}: encrypted {e} vs plaintext {p} (largest {top})"
        );
    }
    for (a, b) in on_gram.weights.iter().zip(&plain.weights) {
        assert!((a - b).abs() <= 1e-4, "weight {a} vs {b}");
    }
    for (a, b) in on_gram.distances.iter().zip(&plain.distances) {
        assert!((a - b).abs() <= 1e-4 * b.max(1e-3), "distance {a} vs {b}");
    }
    // The Byzantine hospitals pull least.
    let least_honest = on_gram.weights[byzantine..]
        .iter()
        .fold(f64::INFINITY, |m, &w| m.min(w));
    assert!(
        on_gram.weights[..byzantine]
            .iter()
            .all(|&w| w < least_honest),
        "weights {:?}",
        on_gram.weights
    );
}

#[test]
fn the_encrypted_median_of_3_hospitals_is_the_plaintext_one() {
    encrypted_median_matches_plaintext(3, 10_000, Pairs::InnerProducts);
}

#[test]
fn from_encrypted_distances_alone_the_median_of_3_hospitals_is_the_plaintext_one() {
    encrypted_median_matches_plaintext(3, 10_000, Pairs::SquaredDistances);
}

#[test]
fn the_encrypted_median_of_10_hospitals_is_the_plaintext_one() {
    encrypted_median_matches_plaintext(10, 5_000, Pairs::InnerProducts);
}

#[test]
fn without_evaluation_keys_or_with_another_pair_s_it_is_refused() {
    let (h, eval) = keys();
    let plain_server = h.public();
    assert!(!plain_server.has_evaluation_keys());
    let x = updates(2, 0, 100, 1);
    let parts = upload_all(&plain_server, &x);
    let refs: Vec<&EncryptedVector> = parts.iter().collect();
    let e = plain_server.inner_products(&refs).unwrap_err();
    assert!(matches!(e, HeError::Mismatch(_)), "{e}");
    assert!(e.to_string().contains("evaluation keys"), "{e}");

    // Two values per slot: a product would mix them, so it is refused with
    // the fix named.
    let s = server();
    let complex: Vec<EncryptedVector> = x
        .iter()
        .map(|v| {
            let bytes = h
                .clone()
                .with_slot_packing(SlotPacking::Complex)
                .encrypt_compact(v)
                .expect("encrypt");
            s.load(&bytes, Form::Fresh).expect("load")
        })
        .collect();
    for e in [
        s.inner_products(&complex.iter().collect::<Vec<_>>()),
        s.squared_distances(&complex.iter().collect::<Vec<_>>()),
    ]
    .map(Result::unwrap_err)
    {
        assert!(matches!(e, HeError::Mismatch(_)), "{e}");
        assert!(e.to_string().contains("SlotPacking::Real"), "{e}");
    }

    let other = CkksContext::generate(CkksParams::default()).expect("keygen");
    let e = other.public().with_evaluation_keys(eval).unwrap_err();
    assert!(matches!(e, HeError::Mismatch(_)), "{e}");

    // A Gram matrix of another key pair is refused by a hospital.
    let s = server();
    let sealed = s.inner_products(&upload_all(&s, &x).iter().collect::<Vec<_>>());
    let bytes = sealed.expect("inner products").to_bytes().expect("bytes");
    let other_keys = other.evaluation_keys().expect("evaluation keys");
    assert!(other.with_evaluation_keys(&other_keys).is_ok());
    assert!(matches!(
        other.load_gram(&bytes, 2),
        Err(HeError::Mismatch(_))
    ));
}

#[test]
fn malformed_evaluation_keys_and_gram_bytes_are_typed_errors() {
    let (h, eval) = keys();
    let s = server();
    let x = updates(3, 0, 50, 2);
    let bytes = s
        .inner_products(&upload_all(&s, &x).iter().collect::<Vec<_>>())
        .expect("inner products")
        .to_bytes()
        .expect("bytes");
    let public = h.public();
    for cut in [0, 3, 5, 21, 30, eval.len() / 2, eval.len() - 1] {
        let e = public.with_evaluation_keys(&eval[..cut]).unwrap_err();
        assert!(matches!(e, HeError::Malformed(_)), "cut {cut}: {e}");
    }
    let mut longer = eval.clone();
    longer.push(0);
    assert!(matches!(
        public.with_evaluation_keys(&longer),
        Err(HeError::Malformed(_))
    ));
    // Keys whose compressed bytes are flipped: SEAL or inflate refuses.
    let mut flipped = eval.clone();
    let mid = 4 + 1 + 16 + 8 + 100;
    flipped[mid] ^= 0xff;
    assert!(public.with_evaluation_keys(&flipped).is_err());
    for cut in [0, 4, 20, 25, bytes.len() / 2, bytes.len() - 1] {
        let e = h.load_gram(&bytes[..cut], 3).unwrap_err();
        assert!(matches!(e, HeError::Malformed(_)), "cut {cut}: {e}");
    }
    // A point count other than the one the hospital expects, either way:
    // refused before anything is inflated.
    let mut wrong_n = bytes.clone();
    wrong_n[22..26].copy_from_slice(&4u32.to_le_bytes());
    let e = h.load_gram(&wrong_n, 3).unwrap_err();
    assert!(e.to_string().contains("4 points where 3"), "{e}");
    let e = h.load_gram(&bytes, 4).unwrap_err();
    assert!(e.to_string().contains("3 points where 4"), "{e}");
    let mut zero = bytes.clone();
    zero[22..26].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(h.load_gram(&zero, 0), Err(HeError::Malformed(_))));
    // A fresh upload is not a Gram matrix, and the other way round.
    let upload = h.encrypt_compact(&[1.0; 10]).expect("encrypt");
    assert!(h.load_gram(&upload, 1).is_err());
    assert!(h.load(&bytes, Form::Sum).is_err());
}

#[test]
fn an_update_beyond_the_bound_makes_an_inconsistent_row_that_the_check_names() {
    let s = server();
    let bound = s.inner_product_bound();
    assert_eq!(bound, 2f64.powi(19));
    // Hospital 2 sends the honest direction scaled so that its squared norm
    // is 4x the bound: its diagonal entry wraps around the modulus to below
    // the bound, while its inner products with the others do not, so the
    // decrypted matrix breaks Cauchy-Schwarz on row 2.
    let len = 4096;
    let mut x = updates(3, 0, len, 3);
    let norm = x[0].iter().map(|v| v * v).sum::<f64>().sqrt();
    let k = (4.0 * bound).sqrt() / norm;
    x[2] = x[0].iter().map(|v| k * v).collect();
    let (h, _) = keys();
    let parts = upload_all(&s, &x);
    let gram = h
        .decrypt_gram(
            &s.inner_products(&parts.iter().collect::<Vec<_>>())
                .expect("inner products"),
        )
        .expect("decrypt");
    assert!(gram[8].abs() < bound, "the diagonal wrapped: {gram:?}");
    let gm = GeometricMedianParams::new().check().expect("params");
    let e = gm.compute_on_gram(&gram, &[1.0; 3], slack()).unwrap_err();
    assert_eq!(e.row, Some(2), "{e}");
}

/// SEAL's uncompressed key-switching-key layout with `slots` slots, the
/// listed ones holding `keys` keys of `key_bytes` bytes each (header only
/// filled in; enough for the layout check, which runs before SEAL parses).
fn kswitch_raw(slots: u64, filled: &[(usize, u64)], key_bytes: usize) -> Vec<u8> {
    let header = |size: u64| {
        let mut h = vec![0x5E, 0xA1, 16, 4, 0, 0, 0, 0];
        h.extend_from_slice(&size.to_le_bytes());
        h
    };
    let mut body = vec![0u8; 32];
    body.extend_from_slice(&slots.to_le_bytes());
    for slot in 0..slots as usize {
        let keys = filled.iter().find(|(s, _)| *s == slot).map_or(0, |f| f.1);
        body.extend_from_slice(&keys.to_le_bytes());
        for _ in 0..keys {
            let mut key = header(key_bytes as u64);
            key.resize(key_bytes, 0);
            body.extend_from_slice(&key);
        }
    }
    let mut out = header(16 + body.len() as u64);
    out.extend_from_slice(&body);
    out
}

#[test]
fn key_layouts_seal_would_choke_on_are_refused_before_seal_reads_them() {
    let (h, _) = keys();
    let public = h.public();
    let refused = |relin: Vec<u8>| {
        let bytes = fedcore_he::fuzzing::eval_keys(h, &relin, &[]);
        match public.with_evaluation_keys(&bytes) {
            Err(HeError::Malformed(m)) => m,
            other => panic!("accepted or wrong error: {other:?}"),
        }
    };
    // A slot count SEAL would reserve memory for before checking it
    // (2^50 slots: an allocation failure aborts the process).
    let mut huge = kswitch_raw(0, &[], 0);
    huge[48..56].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let m = refused(huge);
    assert!(m.contains("key slots"), "{m}");
    // The relinearization key's slot empty and another filled: SEAL counts
    // one key and calls it valid, then reads the empty slot in a product.
    let m = refused(kswitch_raw(2, &[(1, 3)], 64));
    assert!(m.contains("slot 0 is empty"), "{m}");
    // A slot with a key count other than the decomposition's (3 here).
    let mut many = kswitch_raw(1, &[], 0);
    many[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let m = refused(many);
    assert!(m.contains("holds"), "{m}");
    // A key whose header claims more than a key can be.
    let mut big = kswitch_raw(1, &[(0, 3)], 64);
    big[72..80].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let m = refused(big);
    assert!(m.contains("a key of 1099511627776 bytes"), "{m}");
    // Compressed SEAL objects (SEAL would inflate them without a limit).
    let mut compressed = kswitch_raw(1, &[(0, 3)], 64);
    compressed[5] = 2;
    let m = refused(compressed);
    assert!(m.contains("uncompressed"), "{m}");
}
