//! Cost and accuracy of the encrypted geometric median on whole updates,
//! side by side with the plaintext geometric median and with today's
//! head-only encryption, in one run:
//!
//! ```text
//! cargo run --release -p fedcore-he --example encrypted_median -- [VALUES] [HOSPITALS...]
//! cargo run --release -p fedcore-he --example encrypted_median -- 7000000 3 10
//! ```
//!
//! Per round and hospital count: hospitals encrypt their updates (30 % of
//! them Byzantine: sign-flipped or scaled), the server loads them, computes
//! the Gram matrix under encryption, a hospital decrypts it, the server runs
//! Weiszfeld on it and forms the median as an encrypted weighted sum, a
//! hospital decrypts that. The median is compared with the plaintext
//! geometric median of the same updates (same nu, same stopping rules), as
//! is the median formed from the encrypted squared distances instead.
//!
//! Then the same updates go through one real round of the orchestrator
//! (`fedcore::Server`, in-memory transport) with the round strategy
//! `EncryptedMedian`: hospitals seal their whole update, decrypt and flood
//! the distances; the server forms the median under encryption. Its time is
//! the whole round (hospitals' encryption and decryption included, on the
//! same cores), beside a plaintext geometric-median round of the same
//! updates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedcore::memory::InMemoryTransport;
use fedcore::{
    Evaluation, FitOutput, Model, ModelClient, Parameters, Server, ServerConfig, Strategy,
    TrainConfig,
};
use fedcore_he::{
    CkksContext, CkksParams, CkksSealer, DistanceDecryptor, EncryptedMedian, EncryptedVector, Form,
    Public, Secret,
};
use fedcore_robust::{GeometricMedian, GeometricMedianParams, GramSlack, Method};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The classifier head of the hospital app's DenseNet-121 (1024 x 14 + 14).
const HEAD_VALUES: usize = 14_350;

fn updates(n: usize, len: usize, seed: u64) -> Vec<Vec<f64>> {
    let byzantine = (n * 3).div_ceil(10);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let common: Vec<f64> = (0..len).map(|_| rng.random_range(-1e-3..1e-3)).collect();
    (0..n)
        .map(|i| {
            let honest = common.iter().map(|c| c + rng.random_range(-4e-4..4e-4));
            match i {
                i if i < byzantine && i % 2 == 0 => honest.map(|v| -4.0 * v).collect(),
                i if i < byzantine => honest.map(|v| 10.0 * v).collect(),
                _ => honest.collect(),
            }
        })
        .collect()
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// A "model" whose training adds a fixed delta: a hospital that sends the
/// same update every round.
struct Shift {
    params: Parameters,
    delta: Arc<Vec<f32>>,
}

impl Model for Shift {
    type Data = ();

    fn parameters(&self) -> Parameters {
        self.params.clone()
    }

    fn set_parameters(&mut self, p: &Parameters) -> fedcore::Result<()> {
        self.params = p.clone();
        Ok(())
    }

    fn fit(&mut self, _: &(), _: &TrainConfig) -> fedcore::Result<FitOutput> {
        for (v, d) in self.params.as_mut_slice().iter_mut().zip(self.delta.iter()) {
            *v += d;
        }
        Ok(FitOutput {
            num_examples: 100,
            metrics: Default::default(),
            privacy: Vec::new(),
            steps: 1,
        })
    }

    fn evaluate(&mut self, _: &()) -> fedcore::Result<Evaluation> {
        Err(fedcore::Error::Unsupported("no data".into()))
    }
}

/// One round of the orchestrator over `points`: with `keys`, every
/// hospital seals its whole update and the server runs `EncryptedMedian`;
/// without, the plaintext geometric median. Returns the round's seconds
/// and the aggregated delta (decrypted by a key holder when sealed).
fn round(
    points: &[Arc<Vec<f32>>],
    keys: Option<(&CkksContext<Secret>, &CkksContext<Public>)>,
) -> Result<(f64, Vec<f64>), Box<dyn std::error::Error>> {
    let len = points[0].len();
    let initial = Parameters::from_tensors([("w", vec![len], vec![0.0; len])])?;
    let mut transport = InMemoryTransport::new();
    for (i, delta) in points.iter().enumerate() {
        let model = Shift {
            params: initial.clone(),
            delta: delta.clone(),
        };
        let mut client = ModelClient::new(format!("hospital-{i:02}"), model, ());
        if let Some((secret, _)) = keys {
            client = client
                .with_sealer(CkksSealer::new(secret.clone()))
                .with_responder(DistanceDecryptor::new(secret.clone())?);
        }
        transport.add_client(client)?;
    }
    let config = ServerConfig {
        rounds: 1,
        min_fit_clients: points.len(),
        min_available_clients: points.len(),
        round_timeout: Duration::from_secs(3600),
        ..ServerConfig::default()
    };
    fn run<S: Strategy>(
        mut server: Server<InMemoryTransport, S>,
    ) -> fedcore::Result<(f64, Server<InMemoryTransport, S>)> {
        let t = Instant::now();
        let record = server.run_round()?;
        if !record.outcome.is_completed() {
            return Err(fedcore::Error::InvalidInput(format!(
                "round failed: {}",
                record.outcome
            )));
        }
        Ok((secs(t), server))
    }
    Ok(match keys {
        None => {
            let (s, server) = run(Server::new(
                config,
                initial,
                transport,
                GeometricMedian::default(),
            )?)?;
            (
                s,
                server
                    .global()
                    .as_slice()
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect(),
            )
        }
        Some((secret, public)) => {
            let strategy = EncryptedMedian::new(public.clone())?;
            let sum = strategy.sealed_sum();
            let server =
                Server::new(config, initial, transport, strategy)?.with_sealing(&["*"], sum)?;
            let (s, server) = run(server)?;
            let sealed = server.sealed_global().ok_or("nothing sealed")?;
            (s, secret.decrypt(&secret.load(sealed.bytes(), Form::Sum)?)?)
        }
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let len: usize = args.next().map_or(Ok(7_000_000), |a| a.parse())?;
    let mut counts: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    if counts.is_empty() {
        counts = vec![3, 10];
    }
    let t = Instant::now();
    let hospital = CkksContext::generate(CkksParams::default())?;
    let eval = hospital.evaluation_keys()?;
    let server = hospital.public().with_evaluation_keys(&eval)?;
    println!(
        "keys: {:.1} s; evaluation keys {:.1} MB (sent once); {} values per update, {} threads",
        secs(t),
        eval.len() as f64 / 1e6,
        len,
        rayon::current_num_threads()
    );
    let gm = GeometricMedianParams::new().method(Method::Gram).check()?;
    let mut rounds = Vec::new();
    println!(
        "| hospitals | upload B/value | encrypt s (1 hospital) | server load s | encrypted Gram s | Gram bytes | decrypt Gram s | Weiszfeld iterations | encrypted weighted sum s | server total s | plaintext GM s | head-only HE s | max error / max abs | encrypted distances s | max error / max abs (distances) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &counts {
        let x = updates(n, len, 7 + n as u64);
        // Hospitals: compact uploads (timed for the first; each encrypts its own).
        let t = Instant::now();
        let first = hospital.encrypt_compact(&x[0])?;
        let encrypt = secs(t);
        let mut uploads = vec![first];
        for v in &x[1..] {
            uploads.push(hospital.encrypt_compact(v)?);
        }
        let per_value = uploads[0].len() as f64 / len as f64;
        // Server: load, Gram, (hospital decrypts), Weiszfeld, weighted sum.
        let t = Instant::now();
        let parts = uploads
            .iter()
            .map(|u| server.load(u, Form::Fresh))
            .collect::<Result<Vec<_>, _>>()?;
        let load = secs(t);
        drop(uploads);
        let refs: Vec<&EncryptedVector> = parts.iter().collect();
        let t = Instant::now();
        let sealed = server.inner_products(&refs)?;
        let gram_s = secs(t);
        let gram_bytes = sealed.to_bytes()?;
        let t = Instant::now();
        let gram = hospital.decrypt_gram(&hospital.load_gram(&gram_bytes, n)?)?;
        let decrypt = secs(t);
        let alpha = vec![1.0; n];
        let t = Instant::now();
        let w = gm.compute_on_gram(&gram, &alpha, GramSlack::new(1e-6, 1e-6)?)?;
        let weiszfeld = secs(t);
        let t = Instant::now();
        let median = server.weighted_sum(&refs, &w.coefficients)?;
        let wsum = secs(t);
        let median = hospital.decrypt(&median)?;
        // The same from the squared pairwise distances alone (the server
        // then learns how far apart the updates are, not where they are).
        let t = Instant::now();
        let sealed = server.squared_distances(&refs)?;
        let dist_s = secs(t);
        let d = hospital.decrypt_gram(&hospital.load_gram(&sealed.to_bytes()?, n)?)?;
        // CKKS's own error on the decrypted distances (before any flooding),
        // relative to each distance: what DistanceDecryptor's flooding hides.
        let mut decryption_error = 0.0f64;
        for i in 0..n {
            for j in i + 1..n {
                let exact: f64 = x[i].iter().zip(&x[j]).map(|(a, b)| (a - b) * (a - b)).sum();
                decryption_error = decryption_error.max((d[i * n + j] - exact).abs() / exact);
            }
        }
        let wd = gm.compute_on_distances(&d, &alpha, GramSlack::new(1e-6, 1e-6)?)?;
        let median_d = hospital.decrypt(&server.weighted_sum(&refs, &wd.coefficients)?)?;
        drop(parts);
        // The plaintext geometric median of the same updates.
        let points: Vec<Vec<f32>> = x
            .iter()
            .map(|v| v.iter().map(|&a| a as f32).collect())
            .collect();
        drop(x);
        let refs32: Vec<&[f32]> = points.iter().map(Vec::as_slice).collect();
        let t = Instant::now();
        let plain = gm.compute(&refs32, &alpha);
        let plain_s = secs(t);
        let top = plain
            .median
            .iter()
            .fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
        let err_of = |m: &[f64]| {
            m.iter()
                .zip(&plain.median)
                .fold(0.0f64, |acc, (e, p)| acc.max((e - f64::from(*p)).abs()))
                / top.max(f64::MIN_POSITIVE)
        };
        let (err, err_d) = (err_of(&median), err_of(&median_d));
        // Today's head-only encryption: each hospital's head encrypted, the
        // server's weighted sum of them (the body's plaintext median aside).
        let head: Vec<Vec<f64>> = (0..n).map(|i| vec![1e-3 * i as f64; HEAD_VALUES]).collect();
        let t = Instant::now();
        let head_parts = head
            .iter()
            .map(|v| server.load(&hospital.encrypt_compact(v)?, Form::Fresh))
            .collect::<Result<Vec<_>, _>>()?;
        let head_refs: Vec<&EncryptedVector> = head_parts.iter().collect();
        server.weighted_sum(&head_refs, &vec![1.0 / n as f64; n])?;
        let head_s = secs(t);
        let server_total = load + gram_s + weiszfeld + wsum;
        println!(
            "| {n} | {per_value:.1} | {encrypt:.1} | {load:.1} | {gram_s:.1} | {:.1} MB | {decrypt:.2} | {} | {wsum:.1} | {server_total:.1} | {plain_s:.2} | {head_s:.2} | {err:.1e} | {dist_s:.1} | {err_d:.1e} |",
            gram_bytes.len() as f64 / 1e6,
            w.iterations,
        );
        // One round of the orchestrator each way, on the same updates.
        let shared: Vec<Arc<Vec<f32>>> = points.into_iter().map(Arc::new).collect();
        let (plain_round, plain_median) = round(&shared, None)?;
        let (he_round, he_median) = round(&shared, Some((&hospital, &server)))?;
        let round_err = he_median
            .iter()
            .zip(&plain_median)
            .fold(0.0f64, |acc, (e, p)| acc.max((e - p).abs()))
            / top.max(f64::MIN_POSITIVE);
        rounds.push((n, plain_round, he_round, round_err, decryption_error));
    }
    println!(
        "\nOne round of the orchestrator (fedcore::Server, in-memory transport), the same updates:\n"
    );
    println!(
        "| hospitals | plaintext geometric-median round s | EncryptedMedian round s (hospitals' encryption and decryption included) | max error / max abs | CKKS error of the decrypted distances (relative, before flooding) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (n, p, h, e, de) in rounds {
        println!("| {n} | {p:.1} | {h:.1} | {e:.1e} | {de:.1e} |");
    }
    Ok(())
}
