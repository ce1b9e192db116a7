//! Cost of the encrypted geometric median's distances under multiparty keys
//! (the collective relinearization key and the collective decryption of the
//! squared distances) next to today's single key, in one run:
//!
//! ```text
//! cargo run --release -p fedcore-he --example multiparty_median -- [HOSPITALS] [VALUES]
//! cargo run --release -p fedcore-he --example multiparty_median -- 3 7000000
//! ```
//!
//! Hospitals make updates around a common direction (values about 1e-2).
//! Single key (`CkksParams::default()`, the key authority's evaluation
//! keys): compact uploads, the server's encrypted squared distances (slot
//! sums by rotation), one hospital's decryption. Multiparty
//! (`CkksParams::multiparty_median()`): each hospital's secret share, key
//! share and both rounds of the relinearization key; the server combines
//! them; uploads under the collective key; the server's distances; every
//! hospital's share of their decryption; the server combines the shares.
//! Times are wall-clock on all cores; "per hospital" is one hospital's work
//! (the hospitals run one after another here).

use std::time::Instant;

use fedcore_he::multiparty::{
    CollectiveKey, Crs, DEFAULT_DISTANCE_BOUND, DistanceRequest, DistanceShare, KeyShare, PartyKey,
    RelinShare, distance_error,
};
use fedcore_he::{CkksContext, CkksParams, EncryptedVector, Form};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn updates(n: usize, len: usize) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let common: Vec<f64> = (0..len).map(|_| rng.random_range(-1e-2..1e-2)).collect();
    (0..n)
        .map(|_| {
            common
                .iter()
                .map(|c| c + rng.random_range(-4e-3..4e-3))
                .collect()
        })
        .collect()
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn plain_distances(x: &[Vec<f64>]) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..x.len() {
        for j in i + 1..x.len() {
            out.push(x[i].iter().zip(&x[j]).map(|(a, b)| (a - b) * (a - b)).sum());
        }
    }
    out
}

/// Each hospital's upload: encrypted by `encrypt` (the time per hospital
/// and the bytes per value printed under `label`), loaded by `load` as the
/// server does.
fn upload(
    label: &str,
    x: &[Vec<f64>],
    encrypt: impl Fn(&[f64]) -> fedcore_he::Result<Vec<u8>>,
    load: impl Fn(&[u8]) -> fedcore_he::Result<EncryptedVector>,
) -> fedcore_he::Result<Vec<EncryptedVector>> {
    let t = Instant::now();
    let bytes: Vec<Vec<u8>> = x.iter().map(|v| encrypt(v)).collect::<Result<_, _>>()?;
    println!(
        "{label}: upload {:.2} s per hospital, {:.1} B/value",
        secs(t) / x.len() as f64,
        bytes[0].len() as f64 / x[0].len() as f64
    );
    bytes.iter().map(|b| load(b)).collect()
}

fn worst_relative(got: &[f64], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w)
        .fold(0.0, f64::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let len: usize = args.next().map_or(Ok(7_000_000), |a| a.parse())?;
    let x = updates(n, len);
    let want = plain_distances(&x);
    println!(
        "{n} hospitals, {len} values each; squared distances about {:.1}",
        want[0]
    );

    // Single key.
    let t = Instant::now();
    let secret = CkksContext::generate(CkksParams::default())?;
    let eval = secret.evaluation_keys()?;
    let server = secret.public().with_evaluation_keys(&eval)?;
    println!(
        "single key: key authority {:.2} s, evaluation keys {:.1} MB",
        secs(t),
        eval.len() as f64 / 1e6
    );
    let parts = upload(
        "single key",
        &x,
        |v| secret.encrypt_compact(v),
        |b| server.load(b, Form::Fresh),
    )?;
    let refs: Vec<&EncryptedVector> = parts.iter().collect();
    let t = Instant::now();
    let gram = server.squared_distances(&refs)?;
    let server_s = secs(t);
    let gram_bytes = gram.to_bytes()?;
    let t = Instant::now();
    let got = secret.decrypt_gram(&secret.load_gram(&gram_bytes, n)?)?;
    let decrypt_ms = secs(t) * 1e3;
    let got: Vec<f64> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .map(|(i, j)| got[i * n + j])
        .collect();
    println!(
        "single key: server distances {server_s:.2} s, sent {:.2} MB; a hospital decrypts in {decrypt_ms:.1} ms; worst relative error {:.1e} (before flooding)",
        gram_bytes.len() as f64 / 1e6,
        worst_relative(&got, &want)
    );
    drop(refs);
    drop(parts);

    // Multiparty keys.
    let params = CkksParams::multiparty_median();
    let crs = Crs::random()?;
    let t = Instant::now();
    let parties: Vec<PartyKey> = (1..=n as u32)
        .map(|i| PartyKey::generate(params.clone(), i))
        .collect::<Result<_, _>>()?;
    let generate = secs(t) / n as f64;
    let t = Instant::now();
    let shares: Vec<KeyShare> = parties
        .iter()
        .map(|p| p.key_share(&crs))
        .collect::<Result<_, _>>()?;
    let key_share = secs(t) / n as f64;
    let t = Instant::now();
    let collective = CollectiveKey::combine(&params, &crs, &shares)?;
    let combine = secs(t);
    let t = Instant::now();
    let round1: Vec<RelinShare> = parties
        .iter()
        .map(|p| p.relin_round1(&collective))
        .collect::<Result<_, _>>()?;
    let r1 = secs(t) / n as f64;
    let t = Instant::now();
    let round2: Vec<RelinShare> = parties
        .iter()
        .map(|p| p.relin_round2(&collective, &round1))
        .collect::<Result<_, _>>()?;
    let r2 = secs(t) / n as f64;
    let share_mb = round1[0].to_bytes().len() as f64 / 1e6;
    let t = Instant::now();
    let collective = collective.with_relinearization(&round1, &round2)?;
    let relin = secs(t);
    println!(
        "multiparty: per hospital secret share {:.0} ms, key share {:.0} ms, relinearization round 1 {:.0} ms and round 2 {:.0} ms ({share_mb:.1} MB sent each round); server: combine {:.0} ms, relinearization key {:.0} ms",
        generate * 1e3,
        key_share * 1e3,
        r1 * 1e3,
        r2 * 1e3,
        combine * 1e3,
        relin * 1e3
    );
    let ctx = collective.context();
    let parts = upload(
        "multiparty",
        &x,
        |v| ctx.encrypt_upload(v).and_then(|c| c.to_bytes()),
        |b| ctx.load(b, Form::Fresh),
    )?;
    let refs: Vec<&EncryptedVector> = parts.iter().collect();
    let t = Instant::now();
    let distances = collective.distances(&refs, DEFAULT_DISTANCE_BOUND)?;
    let server_s = secs(t);
    drop(refs);
    drop(parts);
    let request = distances.request().to_bytes();
    let t = Instant::now();
    let answers: Vec<Vec<u8>> = parties
        .iter()
        .map(|p| {
            let r = DistanceRequest::from_bytes(&collective, &request, n)?;
            Ok(p.distance_share(&collective, &r)?.to_bytes())
        })
        .collect::<Result<_, fedcore_he::HeError>>()?;
    let share_ms = secs(t) * 1e3 / n as f64;
    let t = Instant::now();
    let shares: Vec<DistanceShare> = answers
        .iter()
        .map(|b| DistanceShare::from_bytes(&collective, b))
        .collect::<Result<_, _>>()?;
    let got = distances.combine(&collective, &shares)?;
    let combine_ms = secs(t) * 1e3;
    println!(
        "multiparty: server distances {server_s:.2} s, sent {:.2} MB to each hospital; a hospital's share {share_ms:.1} ms, {} bytes back; server combines in {combine_ms:.1} ms; worst relative error {:.1e} (smudging's deviation {:.1e} absolute)",
        request.len() as f64 / 1e6,
        answers[0].len(),
        worst_relative(&got, &want),
        distance_error(&params, n, n, DEFAULT_DISTANCE_BOUND)
    );
    Ok(())
}
