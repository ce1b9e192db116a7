//! CKKS contexts, packing, weighted sums, key files and malformed bytes.

use std::sync::OnceLock;

use fedcore_he::{
    CkksContext, CkksParams, EncryptedVector, Form, HeError, KeyAuthority, Public, Secret,
    SlotPacking, slot_packing_of,
};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Key generation costs a few hundred milliseconds: one key pair for the file.
fn hospital() -> &'static CkksContext<Secret> {
    static CTX: OnceLock<CkksContext<Secret>> = OnceLock::new();
    CTX.get_or_init(|| CkksContext::generate(CkksParams::default()).expect("keygen"))
}

fn uniform(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Encrypts each client's values as a hospital uploads them, and loads them
/// as the server does.
fn uploads(
    h: &CkksContext<Secret>,
    s: &CkksContext<Public>,
    values: &[Vec<f64>],
) -> Vec<EncryptedVector> {
    values
        .iter()
        .map(|v| {
            let bytes = h.encrypt_compact(v).expect("encrypt");
            s.load(&bytes, Form::Fresh).expect("load")
        })
        .collect()
}

fn check_weighted_sum(clients: usize, len: usize, lo: f64, hi: f64, tol: f64) -> f64 {
    let h = hospital();
    let s = h.public();
    let values: Vec<Vec<f64>> = (0..clients)
        .map(|i| uniform(len, lo, hi, 100 + i as u64))
        .collect();
    let raw = uniform(clients, 0.1, 1.0, 7);
    let total: f64 = raw.iter().sum();
    let weights: Vec<f64> = raw.iter().map(|w| w / total).collect();
    let expected: Vec<f64> = (0..len)
        .map(|j| (0..clients).map(|i| weights[i] * values[i][j]).sum())
        .collect();
    let parts = uploads(h, &s, &values);
    let refs: Vec<&EncryptedVector> = parts.iter().collect();
    let sum = s.weighted_sum(&refs, &weights).expect("sum");
    let down = h
        .load(&sum.to_bytes().expect("bytes"), Form::Sum)
        .expect("load sum");
    let got = h.decrypt(&down).expect("decrypt");
    let err = max_abs_diff(&got, &expected);
    assert!(
        err < tol,
        "{clients} clients, {len} values in [{lo}, {hi}]: max error {err:e}"
    );
    err
}

#[test]
fn weighted_sum_of_3_and_10_clients_is_within_1e6_for_values_in_unit_range() {
    // The DenseNet-121 head: 1024 x 14 + 14 values.
    let e3 = check_weighted_sum(3, 14_350, -1.0, 1.0, 1e-6);
    let e10 = check_weighted_sum(10, 14_350, -1.0, 1.0, 1e-6);
    eprintln!("max abs error: 3 clients {e3:e}, 10 clients {e10:e}");
}

#[test]
fn weighted_sum_error_for_larger_values_stays_within_the_documented_bound() {
    // Weight rounding contributes at most sum_i |v_i| 2^-31 (< 10 * 1000 *
    // 4.7e-10 = 4.7e-6 here); encryption noise stays around 1e-9.
    check_weighted_sum(10, 5_000, -1000.0, 1000.0, 1e-5);
}

#[test]
fn accumulate_adds_the_weighted_sum_to_the_global() {
    let h = hospital();
    let s = h.public();
    let global = uniform(9_000, -1.0, 1.0, 1);
    let deltas = [uniform(9_000, -0.1, 0.1, 2), uniform(9_000, -0.1, 0.1, 3)];
    let g = s.encrypt_public(&global).expect("public encryption");
    let parts = uploads(h, &s, &deltas);
    let next = s
        .accumulate(&g, &[&parts[0], &parts[1]], &[0.3, 0.7])
        .expect("accumulate");
    // A second round on top of the first: the scale does not grow.
    let next = s
        .accumulate(&next, &[&parts[1]], &[1.0])
        .expect("second round");
    let expected: Vec<f64> = (0..global.len())
        .map(|j| global[j] + 0.3 * deltas[0][j] + 0.7 * deltas[1][j] + deltas[1][j])
        .collect();
    let got = h.decrypt(&next).expect("decrypt");
    assert!(max_abs_diff(&got, &expected) < 1e-6);
}

#[test]
fn packing_round_trips_any_length() {
    let h = hospital();
    let slots = h.slots();
    assert_eq!(slots, 4096);
    for len in [0, 1, slots - 1, slots, slots + 1, 1_000_000] {
        let values = uniform(len, -1.0, 1.0, len as u64);
        let bytes = h.encrypt_compact(&values).expect("encrypt");
        let v = h.load(&bytes, Form::Fresh).expect("load");
        assert_eq!(v.len(), len);
        assert_eq!(v.ciphertexts(), len.div_ceil(slots));
        let back = h.decrypt(&v).expect("decrypt");
        assert_eq!(back.len(), len);
        if len > 0 {
            assert!(max_abs_diff(&back, &values) < 1e-6, "length {len}");
        }
    }
}

#[test]
fn compact_upload_is_about_half_of_a_plain_one() {
    let h = hospital();
    let values = uniform(14_350, -1.0, 1.0, 9);
    let compact = h.encrypt_compact(&values).expect("compact").len();
    let plain = h
        .encrypt(&values)
        .expect("plain")
        .to_bytes()
        .expect("bytes")
        .len();
    let ratio = compact as f64 / plain as f64;
    eprintln!("14,350 values: compact {compact} B, unseeded {plain} B ({ratio:.3})");
    assert!(ratio < 0.6, "seeded upload is {ratio:.3} of unseeded");
    // Two 60 + 40-bit polynomials per 4096 values would be 204,800 B
    // uncompressed; a seeded one is one polynomial plus a seed.
    assert!(compact < 4 * 120_000, "{compact} B for 4 ciphertexts");
}

#[test]
fn packed_uploads_hold_each_coefficient_in_its_prime_s_bits() {
    let h = hospital();
    let values = uniform(14_350, -1.0, 1.0, 10);
    let packed = h.encrypt_compact(&values).expect("compact");
    let deflated = fedcore_he::fuzzing::encrypt_compact_deflated(h, &values).expect("deflated");
    eprintln!(
        "14,350 values: packed {} B ({:.1} B/value), deflated {} B ({:.1} B/value)",
        packed.len(),
        packed.len() as f64 / 14_350.0,
        deflated.len(),
        deflated.len() as f64 / 14_350.0
    );
    // Four ciphertexts of one polynomial: 8192 coefficients of 60 + 40 bits
    // (102,400 B), the PRNG type and seed (65 B) and a length; a 35-byte
    // header.
    assert_eq!(packed.len(), 35 + 4 * (4 + 8192 * 100 / 8 + 65));
    assert!(packed.len() < deflated.len());
    // Both formats load and decrypt to the values.
    for bytes in [&packed, &deflated] {
        let v = h.load(bytes, Form::Fresh).expect("load");
        assert!(max_abs_diff(&h.decrypt(&v).expect("decrypt"), &values) < 1e-6);
    }
    // A sum (two polynomials, not seeded) is rounded: of each coefficient's
    // 100 bits (modulo the level's 100-bit modulus), 68 and 72 are kept
    // (`a_sum_sent_back_is_rounded_below_its_noise`).
    let sum = h
        .public()
        .weighted_sum(&[&h.load(&packed, Form::Fresh).expect("load")], &[1.0])
        .expect("sum")
        .to_bytes()
        .expect("bytes");
    assert_eq!(sum.len(), 35 + 4 * (4 + 2 + 8192 * (68 + 72) / 8));
    let back = h.load(&sum, Form::Sum).expect("load sum");
    assert!(max_abs_diff(&h.decrypt(&back).expect("decrypt"), &values) < 1e-6);

    // A coefficient at or above its prime is refused with the place named:
    // the first 60 bits of the first ciphertext all ones (the 60-bit prime
    // is below 2^60).
    let mut bad = packed.clone();
    let at = 35 + 4;
    bad[at..at + 7].fill(0xFF);
    bad[at + 7] |= 0x0F;
    let e = h.load(&bad, Form::Fresh).unwrap_err();
    assert!(matches!(e, HeError::Malformed(_)), "{e}");
    assert!(
        e.to_string()
            .contains("ciphertext 0: polynomial 0: coefficient 0 of prime 0 is not reduced"),
        "{e}"
    );
    // An unknown PRNG type in the seed (the byte after the first
    // ciphertext's coefficients).
    let mut bad = packed.clone();
    bad[at + 8192 * 100 / 8] = 7;
    let e = h.load(&bad, Form::Fresh).unwrap_err();
    assert!(e.to_string().contains("unknown PRNG type 7"), "{e}");
    // A seeded flag on a sum's bytes, or none on an upload's, is a length
    // error, not a misread.
    let mut flagged = sum.clone();
    flagged[6] = 1;
    assert!(matches!(
        h.load(&flagged, Form::Sum),
        Err(HeError::Malformed(_))
    ));
    let mut unflagged = packed.clone();
    unflagged[6] = 0;
    assert!(matches!(
        h.load(&unflagged, Form::Fresh),
        Err(HeError::Malformed(_))
    ));
}

#[test]
fn complex_slots_hold_two_values_each_at_the_same_precision() {
    let real = hospital();
    let h = real.clone().with_slot_packing(SlotPacking::Complex);
    let s = h.public();
    assert_eq!(h.values_per_ciphertext(SlotPacking::Complex), 8192);
    // Lengths around the ciphertext boundaries, odd and even.
    for (i, len) in [1, 2, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 8192 + 1]
        .into_iter()
        .enumerate()
    {
        let values = uniform(len, -1.0, 1.0, 40 + i as u64);
        let bytes = h.encrypt_compact(&values).expect("compact");
        assert_eq!(
            slot_packing_of(&bytes).expect("header"),
            SlotPacking::Complex
        );
        // Any context loads it: the packing is in the bytes.
        let v = real.load(&bytes, Form::Fresh).expect("load");
        assert_eq!(v.slot_packing(), SlotPacking::Complex);
        assert_eq!(v.ciphertexts(), len.div_ceil(8192), "{len} values");
        let err = max_abs_diff(&real.decrypt(&v).expect("decrypt"), &values);
        assert!(err < 1e-6, "{len} values: max error {err:e}");
    }
    // The head: two ciphertexts instead of four, 14.3 bytes per value.
    let values = uniform(14_350, -1.0, 1.0, 11);
    let bytes = h.encrypt_compact(&values).expect("compact");
    assert_eq!(bytes.len(), 35 + 2 * (4 + 8192 * 100 / 8 + 65));
    // A weighted sum of three uploads and a global: within 1e-6, as with
    // one value per slot, and half the bytes going back (rounded, 68 + 72
    // bits per coefficient).
    let clients: Vec<Vec<f64>> = (0..3).map(|i| uniform(14_350, -1.0, 1.0, 50 + i)).collect();
    let parts: Vec<EncryptedVector> = clients
        .iter()
        .map(|v| {
            s.load(&h.encrypt_compact(v).expect("encrypt"), Form::Fresh)
                .expect("load")
        })
        .collect();
    let refs: Vec<&EncryptedVector> = parts.iter().collect();
    let weights = [0.5, 0.3, 0.2];
    let start = uniform(14_350, -1.0, 1.0, 60);
    let global = s.encrypt_public(&start).expect("global");
    assert_eq!(global.slot_packing(), SlotPacking::Complex);
    let next = s.accumulate(&global, &refs, &weights).expect("accumulate");
    let down = next.to_bytes().expect("bytes");
    assert_eq!(down.len(), 35 + 2 * (4 + 2 + 8192 * (68 + 72) / 8));
    let got = h
        .decrypt(&h.load(&down, Form::Sum).expect("load"))
        .expect("decrypt");
    let expected: Vec<f64> = (0..14_350)
        .map(|j| start[j] + (0..3).map(|i| weights[i] * clients[i][j]).sum::<f64>())
        .collect();
    let err = max_abs_diff(&got, &expected);
    assert!(err < 1e-6, "max error {err:e}");

    // One value per slot and two do not mix: a clear mismatch, not noise.
    let one = real.public();
    let real_part = one
        .load(
            &real.encrypt_compact(&clients[0]).expect("encrypt"),
            Form::Fresh,
        )
        .expect("load");
    for e in [
        s.weighted_sum(&[&parts[0], &real_part], &[0.5, 0.5])
            .unwrap_err(),
        s.accumulate(&global, &[&real_part], &[1.0]).unwrap_err(),
        s.add(&parts[0], &real_part).unwrap_err(),
    ] {
        assert!(matches!(e, HeError::Mismatch(_)), "{e}");
        assert!(e.to_string().contains("per slot"), "{e}");
    }
    assert_eq!(
        slot_packing_of(&real.encrypt_compact(&[1.0]).expect("encrypt")).expect("header"),
        SlotPacking::Real
    );

    // The bound: a slot's magnitude is what must stay below the modulus.
    assert_eq!(h.sum_bound(), 2f64.powi(28) / 2f64.sqrt());
    let e = h.encrypt_compact(&[0.0, 2f64.powi(28) * 0.75]).unwrap_err();
    assert!(matches!(e, HeError::OutOfRange(_)), "{e}");
    assert!(real.encrypt_compact(&[0.0, 2f64.powi(28) * 0.75]).is_ok());

    // Unknown flag bits are refused; format 1 never had the packing bit.
    let mut bad = bytes.clone();
    bad[6] |= 4;
    let e = real.load(&bad, Form::Fresh).unwrap_err();
    assert!(e.to_string().contains("flags"), "{e}");
    let mut old = fedcore_he::fuzzing::encrypt_compact_deflated(real, &[1.0]).expect("format 1");
    old[6] |= 2;
    let e = real.load(&old, Form::Fresh).unwrap_err();
    assert!(matches!(e, HeError::Malformed(_)), "{e}");
    // The header alone: an unknown version is refused there too.
    let mut future = bytes.clone();
    future[4] = 9;
    assert!(slot_packing_of(&future).is_err());
    assert!(slot_packing_of(&bytes[..5]).is_err());
    // Format 1 cannot say two values per slot, so it is not written.
    let e = fedcore_he::fuzzing::to_deflated_bytes(&global).unwrap_err();
    assert!(e.to_string().contains("one value per slot"), "{e}");
    // Clearing the packing bit of a complex upload: its ciphertext count no
    // longer matches its length.
    let mut cleared = bytes.clone();
    cleared[6] &= !2;
    assert!(matches!(
        real.load(&cleared, Form::Fresh),
        Err(HeError::Malformed(_))
    ));
}

/// Standard deviation of `a - b`.
fn std_of_diff(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n;
    (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn a_sum_sent_back_is_rounded_below_its_noise() {
    let real = hospital();
    for packing in [SlotPacking::Complex, SlotPacking::Real] {
        let h = real.clone().with_slot_packing(packing);
        let s = h.public();
        let values = uniform(14_350, -1.0, 1.0, 70);
        let global = s.encrypt_public(&values).expect("global");
        let bytes = global.to_bytes().expect("bytes");
        // Of each coefficient's 100 bits, 68 (first polynomial) and 72
        // (second) are written: 19.98 B/value for the head two per slot.
        let cts = 14_350usize.div_ceil(h.values_per_ciphertext(packing));
        assert_eq!(bytes.len(), 35 + cts * (4 + 2 + 8192 * (68 + 72) / 8));
        let unrounded = fedcore_he::fuzzing::to_unrounded_bytes(&global).expect("exact");
        assert_eq!(unrounded.len(), 35 + cts * (4 + 2 * 8192 * 100 / 8));
        eprintln!(
            "{packing:?}: the head's sum sent back {} B ({:.2} B/value), unrounded {} B ({:.2})",
            bytes.len(),
            bytes.len() as f64 / 14_350.0,
            unrounded.len(),
            unrounded.len() as f64 / 14_350.0
        );

        // The rounding's own error: the rounded sum against the same sum
        // decrypted unrounded. The bound in `SUM_ROUNDING_PRECISION_BITS`
        // (about 2^-31 standard deviation), and not zero: bits were dropped.
        let exact = h.decrypt(&global).expect("decrypt");
        let loaded = h.load(&bytes, Form::Sum).expect("load");
        let rounded = h.decrypt(&loaded).expect("decrypt");
        let (std, max) = (
            std_of_diff(&rounded, &exact),
            max_abs_diff(&rounded, &exact),
        );
        let fresh = h
            .decrypt(
                &h.load(&h.encrypt_compact(&values).expect("enc"), Form::Fresh)
                    .expect("load"),
            )
            .expect("decrypt");
        eprintln!(
            "{packing:?}: rounding error std {std:.2e}, max {max:.2e}; a fresh upload's noise std {:.2e}",
            std_of_diff(&fresh, &values)
        );
        assert!(
            std > 2f64.powi(-34) && std < 2f64.powi(-30),
            "rounding error std {std:e}"
        );
        // Its tail is heavier than a Gaussian's (each slot's error is the
        // rounding's times the secret key's value there): 2.1-2.6e-9 at
        // most over these 14,350 values.
        assert!(max < 1e-8, "rounding error max {max:e}");
        // The unrounded form still loads (saved before rounding) and
        // decrypts exactly as the vector in memory.
        let old = h.load(&unrounded, Form::Sum).expect("load unrounded");
        assert_eq!(h.decrypt(&old).expect("decrypt"), exact);
        // Writing what was read gives the same bytes: a resumed server's
        // global does not drift by being saved again.
        assert_eq!(loaded.to_bytes().expect("bytes"), bytes);
        // A round on a rounded global stays within 1e-6 of the plaintext.
        let part = s
            .load(&h.encrypt_compact(&values).expect("enc"), Form::Fresh)
            .expect("load");
        let next = s.accumulate(&loaded, &[&part], &[0.5]).expect("round");
        let back = h
            .decrypt(
                &h.load(&next.to_bytes().expect("bytes"), Form::Sum)
                    .expect("load"),
            )
            .expect("decrypt");
        let want: Vec<f64> = values.iter().map(|v| 1.5 * v).collect();
        let err = max_abs_diff(&back, &want);
        assert!(err < 1e-6, "max error {err:e}");
    }

    // Malformed rounded bytes are typed errors naming the place.
    let s = real.public().with_slot_packing(SlotPacking::Complex);
    let bytes = s
        .encrypt_public(&[0.25; 100])
        .expect("global")
        .to_bytes()
        .expect("bytes");
    // The first coefficient all ones (after the two bytes of bits
    // dropped): at or above the modulus.
    let mut bad = bytes.clone();
    bad[35 + 4 + 2..35 + 4 + 2 + 9].fill(0xFF);
    let e = real.load(&bad, Form::Sum).unwrap_err();
    assert!(
        e.to_string()
            .contains("ciphertext 0: polynomial 0: coefficient 0 is not below the modulus"),
        "{e}"
    );
    // Bits dropped out of range for the level, or more than the bytes
    // hold.
    for drops in [[0, 28], [99, 28], [32, 60]] {
        let mut bad = bytes.clone();
        bad[35 + 4..35 + 4 + 2].copy_from_slice(&drops);
        let e = real.load(&bad, Form::Sum).unwrap_err();
        assert!(matches!(e, HeError::Malformed(_)), "{drops:?}: {e}");
    }
    // Truncated, or a byte more: the length is exact.
    for cut in [
        bytes[..bytes.len() - 1].to_vec(),
        [&bytes[..], &[0]].concat(),
    ] {
        assert!(matches!(
            real.load(&cut, Form::Sum),
            Err(HeError::Malformed(_))
        ));
    }
    // The rounded flag on an upload, or with the seeded flag, is refused.
    let mut upload = real.encrypt_compact(&[0.25; 100]).expect("upload");
    upload[6] = 4;
    let e = real.load(&upload, Form::Fresh).unwrap_err();
    assert!(e.to_string().contains("rounded Fresh"), "{e}");
    let mut both = bytes.clone();
    both[6] |= 1;
    let e = real.load(&both, Form::Sum).unwrap_err();
    assert!(e.to_string().contains("flags"), "{e}");
    // The multiparty parameters' 140-bit level (the global under the
    // output key) is rounded too, through 192-bit integers: 62 + 58 of 140
    // bits, within the same noise.
    let wide = CkksContext::generate(CkksParams::multiparty())
        .expect("keygen")
        .with_slot_packing(SlotPacking::Complex);
    let values = uniform(8192, -1.0, 1.0, 72);
    let sum = wide.public().encrypt_public(&values).expect("global");
    let bytes = sum.to_bytes().expect("bytes");
    assert_eq!(bytes.len(), 35 + 4 + 2 + 8192 * (58 + 62) / 8);
    let exact = wide.decrypt(&sum).expect("decrypt");
    let got = wide
        .decrypt(&wide.load(&bytes, Form::Sum).expect("load"))
        .expect("decrypt");
    let std = std_of_diff(&got, &exact);
    assert!(std > 2f64.powi(-34) && std < 2f64.powi(-30), "{std:e}");
    // A rounded flag on a sum written exactly is a malformed length.
    let mut flagged = fedcore_he::fuzzing::to_unrounded_bytes(&sum).expect("bytes");
    flagged[6] |= 4;
    let e = wide.load(&flagged, Form::Sum).unwrap_err();
    assert!(matches!(e, HeError::Malformed(_)), "{e}");
}

#[test]
fn sums_are_written_as_precisely_as_the_writer_asks_and_read_either_way() {
    let h = hospital().clone().with_slot_packing(SlotPacking::Complex);
    let values = uniform(8192, -1.0, 1.0, 71);
    let global = h.public().encrypt_public(&values).expect("global");
    let exact = h.decrypt(&global).expect("decrypt");
    assert_eq!(
        h.sum_rounding(),
        Some(fedcore_he::SUM_ROUNDING_PRECISION_BITS)
    );
    let mut last = 0;
    // Coarser to finer, then exact: more bytes, less rounding error (less
    // than 20 bits counts as 20: noise about 1e-6). The reader's own
    // setting does not matter: the bits dropped travel with the sum.
    for bits in [Some(2), Some(25), Some(31), Some(40), None] {
        let writer = h.public().with_sum_rounding(bits);
        let v = writer
            .load(
                &fedcore_he::fuzzing::to_unrounded_bytes(&global).expect("bytes"),
                Form::Sum,
            )
            .expect("load");
        let bytes = v.to_bytes().expect("bytes");
        assert!(bytes.len() > last, "{bits:?}: {} B", bytes.len());
        last = bytes.len();
        assert_eq!(bytes[6] & 4 != 0, bits.is_some());
        let got = h
            .clone()
            .with_sum_rounding(None)
            .decrypt(&h.load(&bytes, Form::Sum).expect("load"))
            .expect("decrypt");
        let std = std_of_diff(&got, &exact);
        eprintln!("{bits:?}: {} B, rounding error std {std:.2e}", bytes.len());
        match bits.map(|b| b.max(fedcore_he::SUM_ROUNDING_MIN_BITS)) {
            // About 2^-bits, and not nothing.
            Some(b) => assert!(
                std < 2f64.powi(-(b as i32) + 1) && std > 2f64.powi(-(b as i32) - 2),
                "{b}: {std:e}"
            ),
            None => assert_eq!(got, exact),
        }
    }
    assert_eq!(last, 35 + 4 + 2 * 8192 * 100 / 8);
}

#[test]
fn insecure_parameters_are_refused_unless_dangerous() {
    let e = CkksParams::new(8192, &[60, 60, 60, 60], 40).unwrap_err();
    assert!(matches!(e, HeError::Insecure(_)), "{e}");
    let e = CkksParams::new(4096, &[40, 40, 40, 40], 40).unwrap_err();
    assert!(matches!(e, HeError::Insecure(_)), "{e}");
    let p = CkksParams::dangerous()
        .insecure(4096, &[40, 40, 40, 40], 40)
        .expect("allowed when asked for");
    assert!(!p.is_secure());
    let ctx = CkksContext::generate(p).expect("an insecure context still works");
    let bytes = ctx.encrypt_compact(&[0.5, -0.25]).expect("encrypt");
    let back = ctx
        .decrypt(&ctx.load(&bytes, Form::Fresh).expect("load"))
        .expect("decrypt");
    assert!(max_abs_diff(&back, &[0.5, -0.25]) < 1e-6);
    // Secure defaults, and structural errors whatever the security.
    assert!(CkksParams::default().is_secure());
    assert!(CkksParams::new(8192, &[60, 40, 40, 60], 40).is_ok());
    assert!(matches!(
        CkksParams::new(8192, &[60, 60], 40),
        Err(HeError::InvalidParameters(_))
    ));
    assert!(matches!(
        CkksParams::dangerous().insecure(3000, &[60, 40, 60], 40),
        Err(HeError::InvalidParameters(_))
    ));
}

#[test]
fn sum_bound_and_out_of_range_values() {
    let h = hospital();
    assert_eq!(h.sum_bound(), 2f64.powi(28));
    for bad in [f64::NAN, f64::INFINITY, 2f64.powi(28)] {
        let e = h.encrypt_compact(&[0.0, bad]).unwrap_err();
        assert!(matches!(e, HeError::OutOfRange(_)), "{e}");
    }
    let s = h.public();
    let v = uploads(h, &s, &[vec![1.0, 2.0]]);
    for w in [f64::NAN, 1e7] {
        assert!(matches!(
            s.weighted_sum(&[&v[0]], &[w]),
            Err(HeError::OutOfRange(_))
        ));
    }
    // A weight that rounds to zero is skipped; all of them zero is an error.
    assert!(s.weighted_sum(&[&v[0]], &[1e-12]).is_err());
    assert!(s.weighted_sum(&[&v[0], &v[0]], &[0.0]).is_err());
}

#[test]
fn key_files_keep_their_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kit = dir.path().join("kit");
    let (ctx, files) = KeyAuthority::write(CkksParams::default(), &kit).expect("write keys");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [&files.secret, &files.public] {
            let mode = std::fs::metadata(f).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
    }
    let hospital = CkksContext::<Secret>::from_file(&files.secret).expect("secret loads");
    let server = CkksContext::<Public>::from_file(&files.public).expect("public loads");
    assert_eq!(hospital.key_id(), ctx.key_id());
    assert_eq!(server.key_id(), ctx.key_id());

    // Each role refuses the other's file.
    let e = CkksContext::<Public>::from_file(&files.secret).unwrap_err();
    assert!(
        matches!(
            e,
            HeError::WrongRole {
                expected: "public",
                found: "secret",
                ..
            }
        ),
        "{e}"
    );
    let e = CkksContext::<Secret>::from_file(&files.public).unwrap_err();
    assert!(
        matches!(
            e,
            HeError::WrongRole {
                expected: "secret",
                found: "public",
                ..
            }
        ),
        "{e}"
    );

    // Keys are created once: an existing kit is not overwritten.
    assert!(matches!(
        KeyAuthority::write(CkksParams::default(), &kit),
        Err(HeError::KeyFile { .. })
    ));

    // The loaded contexts interoperate: upload from the loaded hospital,
    // sum on the loaded server, decrypt with the original.
    let up = hospital.encrypt_compact(&[0.25, -0.5]).expect("encrypt");
    let v = server.load(&up, Form::Fresh).expect("load");
    let sum = server.weighted_sum(&[&v], &[2.0]).expect("sum");
    let back = ctx.decrypt(&sum).expect("decrypt");
    assert!(max_abs_diff(&back, &[0.5, -1.0]) < 1e-6);

    // A secret key readable by others is refused; a damaged file is an error.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&files.secret, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let e = CkksContext::<Secret>::from_file(&files.secret).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&files.secret, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let mut bytes = std::fs::read(&files.public).expect("read");
    bytes.truncate(bytes.len() / 2);
    let cut = dir.path().join("cut.key");
    std::fs::write(&cut, &bytes).expect("write");
    assert!(matches!(
        CkksContext::<Public>::from_file(&cut),
        Err(HeError::KeyFile { .. })
    ));
}

#[test]
fn vectors_from_other_keys_parameters_or_forms_are_refused() {
    let h = hospital();
    let upload = h
        .encrypt_compact(&uniform(5000, -1.0, 1.0, 3))
        .expect("encrypt");

    // Another key pair with the same parameters.
    let other = CkksContext::generate(CkksParams::default()).expect("keygen");
    assert!(matches!(
        other.load(&upload, Form::Fresh),
        Err(HeError::Mismatch(_))
    ));
    // Other parameters.
    let small = CkksContext::generate(
        CkksParams::dangerous()
            .insecure(4096, &[40, 40, 40, 40], 30)
            .expect("params"),
    )
    .expect("keygen");
    assert!(small.load(&upload, Form::Fresh).is_err());
    // An upload is not a sum, and the reverse.
    assert!(matches!(
        h.load(&upload, Form::Sum),
        Err(HeError::Mismatch(_))
    ));
    let sum = h.encrypt(&[1.0]).expect("e");
    let sum = h.public().weighted_sum(&[&sum], &[1.0]).expect("sum");
    assert!(matches!(
        h.load(&sum.to_bytes().expect("bytes"), Form::Fresh),
        Err(HeError::Mismatch(_))
    ));
}

#[test]
fn truncated_random_and_bomb_bytes_are_typed_errors() {
    let h = hospital();
    let upload = h
        .encrypt_compact(&uniform(5000, -1.0, 1.0, 4))
        .expect("encrypt");
    for cut in [0, 3, 10, 40, 45, upload.len() / 2, upload.len() - 1] {
        assert!(h.load(&upload[..cut], Form::Fresh).is_err(), "cut at {cut}");
    }
    let mut longer = upload.clone();
    longer.push(0);
    assert!(h.load(&longer, Form::Fresh).is_err());
    let random = uniform(4096, 0.0, 256.0, 5)
        .into_iter()
        .map(|x| x as u8)
        .collect::<Vec<u8>>();
    assert!(h.load(&random, Form::Fresh).is_err());

    // A valid header of the deflated format (version 1, still read)
    // followed by a deflate bomb: 64 MB of zeros compress to a few KB;
    // decompression stops at the largest valid ciphertext.
    let header_len = fedcore_he::fuzzing::ENVELOPE_HEADER;
    let mut bomb = upload[..header_len].to_vec();
    bomb[4] = 1;
    bomb[header_len - 12..header_len - 4].copy_from_slice(&1u64.to_le_bytes());
    bomb[header_len - 4..].copy_from_slice(&1u32.to_le_bytes());
    let zeros = fedcore_he::fuzzing::deflate(&vec![0u8; 64 << 20]).expect("compress");
    bomb.extend_from_slice(&(zeros.len() as u32).to_le_bytes());
    bomb.extend_from_slice(&zeros);
    let e = h.load(&bomb, Form::Fresh).unwrap_err();
    assert!(e.to_string().contains("decompression"), "{e}");

    // Valid compression of bytes that are not a SEAL ciphertext.
    let mut junk = upload[..header_len].to_vec();
    junk[4] = 1;
    junk[header_len - 12..header_len - 4].copy_from_slice(&1u64.to_le_bytes());
    junk[header_len - 4..].copy_from_slice(&1u32.to_le_bytes());
    let z = fedcore_he::fuzzing::deflate(&random).expect("compress");
    junk.extend_from_slice(&(z.len() as u32).to_le_bytes());
    junk.extend_from_slice(&z);
    assert!(matches!(
        h.load(&junk, Form::Fresh),
        Err(HeError::Malformed(_))
    ));
}

/// The old format's SEAL bytes are parsed before SEAL sees them: a SEAL
/// header (the ciphertext's, its coefficients' or its seed record's) that
/// claims compression and a huge size would make SEAL allocate that size
/// (and abort when it cannot); each is refused with a reason instead.
#[test]
fn format_1_headers_asking_seal_to_allocate_are_refused() {
    let h = hospital();
    let (_, raw) = small_upload();
    assert!(
        h.load(&fedcore_he::fuzzing::wrap(h, raw, Form::Fresh), Form::Fresh)
            .is_ok()
    );
    let seed_header = raw.len() - 81;
    let nested_header = 16 + 32 + 1 + 5 * 8;
    for at in [0, nested_header, seed_header] {
        let mut bad = raw.clone();
        bad[at + 5] = 2; // zstd
        bad[at + 8..at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = h
            .load(
                &fedcore_he::fuzzing::wrap(h, &bad, Form::Fresh),
                Form::Fresh,
            )
            .unwrap_err();
        assert!(matches!(e, HeError::Malformed(_)), "{e}");
        assert!(e.to_string().contains("compressed"), "header at {at}: {e}");
    }
    // An unreduced coefficient in the old format is refused as in the new
    // one (the first residue, after the headers and metadata, all ones).
    let mut bad = raw.clone();
    let first = nested_header + 16 + 8;
    bad[first..first + 7].fill(0xFF);
    bad[first + 7] |= 0x0F;
    let e = h
        .load(
            &fedcore_he::fuzzing::wrap(h, &bad, Form::Fresh),
            Form::Fresh,
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("coefficient 0 of prime 0 is not reduced"),
        "{e}"
    );
}

/// A small upload, and the SEAL bytes inside its first ciphertext, for the
/// mutation tests.
fn small_upload() -> &'static (Vec<u8>, Vec<u8>) {
    static U: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    U.get_or_init(|| {
        let h = hospital();
        let upload = h.encrypt_compact(&[0.5; 100]).expect("encrypt");
        let raw = fedcore_he::fuzzing::first_seal_bytes(h, &upload).expect("raw");
        (upload, raw)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random byte changes anywhere in an upload: loading returns an error
    /// or a vector that still decrypts; never a panic or an abort.
    #[test]
    fn mutated_uploads_fail_cleanly(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let h = hospital();
        let (upload, _) = small_upload();
        let mut bytes = upload.clone();
        for (at, b) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= b | 1;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        if let Ok(v) = h.load(&bytes, Form::Fresh) {
            prop_assert!(h.decrypt(&v).is_ok());
        }
    }

    /// The same for a rounded sum (what the server sends back), half of the
    /// flips in the header (flags, length, count) and the first fields.
    #[test]
    fn mutated_rounded_sums_fail_cleanly(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        static SUM: OnceLock<Vec<u8>> = OnceLock::new();
        let h = hospital();
        let sum = SUM.get_or_init(|| {
            let s = h.public().with_slot_packing(SlotPacking::Complex);
            s.encrypt_public(&[0.5; 100]).expect("global").to_bytes().expect("bytes")
        });
        let mut bytes = sum.clone();
        for (at, b) in &flips {
            let i = if b & 0x80 == 0 { at.index(64) } else { at.index(bytes.len()) };
            bytes[i] ^= b | 1;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        if let Ok(v) = h.load(&bytes, Form::Sum) {
            prop_assert!(h.decrypt(&v).is_ok());
        }
    }

    /// The same inside SEAL's own bytes (past our envelope and deflate): SEAL's
    /// header, metadata, seed and coefficients.
    #[test]
    fn mutated_seal_bytes_fail_cleanly(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let h = hospital();
        let (_, raw) = small_upload();
        let mut raw = raw.clone();
        for (at, b) in &flips {
            // Most of the bytes are coefficients: aim half of the flips at
            // the first 128 bytes (headers and metadata).
            let i = if b & 0x80 == 0 { at.index(raw.len().min(128)) } else { at.index(raw.len()) };
            raw[i] ^= b | 1;
        }
        if let Some(c) = cut {
            raw.truncate(c.index(raw.len()));
        }
        if let Ok(v) = h.load(&fedcore_he::fuzzing::wrap(h, &raw, Form::Fresh), Form::Fresh) {
            prop_assert!(h.decrypt(&v).is_ok());
        }
    }
}
