//! Cost of multiparty keys (collective key generation and the per-round key
//! switch) next to today's single-key sum, in one run:
//!
//! ```text
//! cargo run --release -p fedcore-he --example multiparty -- [HOSPITALS] [VALUES...]
//! cargo run --release -p fedcore-he --example multiparty -- 3 14350 7000000
//! ```
//!
//! For each length: hospitals make updates in [-1, 1); with today's single
//! key they upload `encrypt_compact`, the server loads and adds them, sends
//! the sum back and a hospital decrypts it. With multiparty keys each
//! hospital uploads a public-key encryption under the collective key, the
//! server adds them, every hospital answers the key switch of the sum to the
//! hospitals' output key, the server combines the answers and a hospital
//! decrypts. Then the same with threshold keys (t = n - 1): every hospital
//! deals Shamir shares of its secret to the others, the last hospital drops
//! out, and the others answer the switch. Every length runs with one value
//! per CKKS slot and with two (`SlotPacking::Complex`, the default of
//! `CkksSum` and `KeySwitchSum`). Times are wall-clock on all cores; "per
//! hospital" times are one hospital's work (the hospitals run one after
//! another here).

use std::time::Instant;

use fedcore_he::multiparty::{
    CollectiveKey, Crs, Deal, KeyShare, PartyKey, Roster, SwitchShare, ThresholdKey,
};
use fedcore_he::{CkksContext, CkksParams, EncryptedVector, Form, SlotPacking};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn updates(n: usize, len: usize) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect()
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn max_error(got: &[f64], plain: &[Vec<f64>], w: &[f64]) -> f64 {
    got.iter()
        .enumerate()
        .map(|(j, g)| {
            let want: f64 = plain.iter().zip(w).map(|(v, w)| v[j] * w).sum();
            (g - want).abs()
        })
        .fold(0.0, f64::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let lens: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let lens = if lens.is_empty() { vec![14_350] } else { lens };
    let weights: Vec<f64> = vec![1.0 / n as f64; n];

    println!("hospitals: {n}");
    println!(
        "\n## Key generation (multiparty parameters: degree 8192, primes [60, 50, 30, 60], scale 2^90)"
    );
    let params = CkksParams::multiparty();
    let t = Instant::now();
    let parties: Vec<PartyKey> = (1..=n as u32)
        .map(|i| PartyKey::generate(params.clone(), i))
        .collect::<Result<_, _>>()?;
    let generate = ms(t) / n as f64;
    let crs = Crs::random()?;
    let t = Instant::now();
    let shares: Vec<Vec<u8>> = parties
        .iter()
        .map(|p| p.key_share(&crs).map(|s| s.to_bytes()))
        .collect::<Result<_, _>>()?;
    let share_time = ms(t) / n as f64;
    let t = Instant::now();
    let shares: Vec<KeyShare> = shares
        .iter()
        .map(|b| KeyShare::from_bytes(&params, b))
        .collect::<Result<_, _>>()?;
    let collective = CollectiveKey::combine(&params, &crs, &shares)?;
    let combine = ms(t);
    let output = CkksContext::generate(params.clone())?;
    // Threshold: t = n - 1, every hospital deals to every other.
    let t_of = n.saturating_sub(1).max(1);
    let roster = Roster::new(
        t_of,
        parties
            .iter()
            .map(|p| (p.party(), p.transport_key()))
            .collect(),
    )?;
    let t = Instant::now();
    let deals: Vec<Vec<u8>> = parties
        .iter()
        .map(|p| p.deal(&roster, &crs))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .map(|d| d.to_bytes())
        .collect();
    let deal_time = ms(t) / n as f64;
    let deal_bytes = deals.iter().map(Vec::len).sum::<usize>() / n;
    let deals: Vec<Deal> = deals
        .iter()
        .map(|b| Deal::from_bytes(&params, b))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    let keys: Vec<ThresholdKey> = parties
        .iter()
        .map(|p| {
            let mine = Deal::addressed_to(&deals, p.party());
            p.threshold_key(&roster, &crs, &mine)
        })
        .collect::<Result<_, _>>()?;
    let open_time = ms(t) / n as f64;
    drop(deals);
    let threshold = collective.clone().with_roster(roster)?;
    println!(
        "per hospital: secret share {generate:.1} ms, key share {share_time:.1} ms, {} bytes",
        shares[0].to_bytes().len()
    );
    println!("server: combine {n} key shares {combine:.1} ms");
    println!(
        "threshold {t_of} of {n}, per hospital: deal {deal_time:.1} ms, {deal_bytes} B sent (all its deals); open its deals {open_time:.1} ms"
    );

    for &len in &lens {
        let plain = updates(n, len);
        println!("\n## {len} values");

        for packing in [SlotPacking::Real, SlotPacking::Complex] {
            println!(
                "### {packing:?} slots ({} per slot)",
                packing.values_per_slot()
            );
            // Today: one key, compact symmetric uploads.
            let single = CkksContext::generate(CkksParams::default())?.with_slot_packing(packing);
            let server = single.public();
            let t = Instant::now();
            let up = single.encrypt_compact(&plain[0])?;
            let enc1 = ms(t);
            let up_bytes = up.len();
            let mut loaded = vec![server.load(&up, Form::Fresh)?];
            drop(up);
            for v in &plain[1..] {
                loaded.push(server.load(&single.encrypt_compact(v)?, Form::Fresh)?);
            }
            let refs: Vec<&EncryptedVector> = loaded.iter().collect();
            let t = Instant::now();
            let sum = server.weighted_sum(&refs, &weights)?;
            let sum1 = ms(t);
            drop(loaded);
            let t = Instant::now();
            let sum_bytes = sum.to_bytes()?;
            let ser1 = ms(t);
            let t = Instant::now();
            let got = single.decrypt(&single.load(&sum_bytes, Form::Sum)?)?;
            let dec1 = ms(t);
            println!(
                "single key: upload {enc1:.1} ms, {up_bytes} B ({:.1} B/value); server sum {sum1:.1} ms; \
                 sum sent back (rounded) {} B ({:.2} B/value), written in {ser1:.1} ms; load + decrypt {dec1:.1} ms; max error {:.1e}",
                up_bytes as f64 / len as f64,
                sum_bytes.len(),
                sum_bytes.len() as f64 / len as f64,
                max_error(&got, &plain, &weights)
            );
            drop(sum_bytes);
            // The same sum unrounded, as written before the rounded form.
            let t = Instant::now();
            let exact = fedcore_he::fuzzing::to_unrounded_bytes(&sum)?;
            let ser0 = ms(t);
            let t = Instant::now();
            let got = single.decrypt(&single.load(&exact, Form::Sum)?)?;
            let dec0 = ms(t);
            println!(
                "single key, unrounded: sum {} B ({:.2} B/value), written in {ser0:.1} ms; load + decrypt {dec0:.1} ms; max error {:.1e}",
                exact.len(),
                exact.len() as f64 / len as f64,
                max_error(&got, &plain, &weights)
            );
            drop((exact, sum));

            // Multiparty: uploads under the collective key, a key switch.
            let server = collective.context().clone().with_slot_packing(packing);
            let t = Instant::now();
            let up = server.encrypt_upload(&plain[0])?.to_bytes()?;
            let enc = ms(t);
            let up_bytes = up.len();
            let mut loaded = vec![server.load(&up, Form::Fresh)?];
            drop(up);
            for v in &plain[1..] {
                loaded.push(server.load(&server.encrypt_upload(v)?.to_bytes()?, Form::Fresh)?);
            }
            let refs: Vec<&EncryptedVector> = loaded.iter().collect();
            let t = Instant::now();
            let sum = server.weighted_sum(&refs, &weights)?;
            let summed = ms(t);
            drop(loaded);
            let out = output.public();
            let t = Instant::now();
            let mut answers = Vec::with_capacity(n);
            let mut share_bytes = 0;
            for p in &parties {
                let b = p.switch_share(&collective, &sum, &out)?.to_bytes();
                share_bytes = b.len();
                answers.push(b);
            }
            let answer = ms(t) / n as f64;
            let t = Instant::now();
            let answers: Vec<SwitchShare> = answers
                .iter()
                .map(|b| SwitchShare::from_bytes(&collective, b))
                .collect::<Result<_, _>>()?;
            let switched = collective.switch(&sum, &out, &answers)?.to_bytes()?;
            let switched_len = switched.len();
            let combine = ms(t);
            drop(answers);
            let t = Instant::now();
            let got = output.decrypt(&output.load(&switched, Form::Sum)?)?;
            let dec = ms(t);
            drop(switched);
            let error = max_error(&got, &plain, &weights);
            // Threshold: the last hospital has dropped out; the others sign.
            let signers: Vec<u32> = (1..=t_of as u32).collect();
            let t = Instant::now();
            let mut answers = Vec::with_capacity(t_of);
            for k in keys.iter().filter(|k| signers.contains(&k.party())) {
                answers.push(k.switch_share(&threshold, &sum, &out, &signers)?.to_bytes());
            }
            let t_answer = ms(t) / t_of as f64;
            let t_bytes = answers[0].len();
            let t = Instant::now();
            let answers: Vec<SwitchShare> = answers
                .iter()
                .map(|b| SwitchShare::from_bytes(&threshold, b))
                .collect::<Result<_, _>>()?;
            let t_switched = threshold.switch(&sum, &out, &answers)?.to_bytes()?;
            let t_combine = ms(t);
            drop(answers);
            let t_got = output.decrypt(&output.load(&t_switched, Form::Sum)?)?;
            println!(
                "multiparty: upload {enc:.1} ms, {up_bytes} B ({:.1} B/value); server sum {summed:.1} ms; key switch per hospital {answer:.1} ms, {share_bytes} B ({:.1} B/value); server combine (and save) {combine:.1} ms; switched sum {} B; load + decrypt {dec:.1} ms; max error {:.1e}",
                up_bytes as f64 / len as f64,
                share_bytes as f64 / len as f64,
                switched_len,
                error
            );
            println!(
                "threshold {t_of} of {n} (hospital {n} dropped): key switch per signer {t_answer:.1} ms, {t_bytes} B; server combine (and save) {t_combine:.1} ms; max error {:.1e}",
                max_error(&t_got, &plain, &weights)
            );
        }
    }
    Ok(())
}
