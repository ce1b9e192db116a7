//! Federated MNIST with sample-level differential privacy.
//!
//! `--clients` hospitals (`client1`, `client2`, ...) each hold an equal IID
//! share of MNIST and train a small model (`--model`: a CNN on the pixels,
//! or a linear model on the images' scattering coefficients) with DP-SGD (per-sample clipping,
//! Gaussian noise, Poisson-sampled batches); the server averages with FedAvg.
//! For each target epsilon the noise multiplier is calibrated so that all
//! rounds fit the budget at delta = 1e-5; every round prints test accuracy
//! and the epsilon each client has spent. With several targets the final
//! numbers go into a markdown table.
//!
//! ```text
//! cargo run --release -p mnist-dp -- --epsilons 3                 # one run
//! cargo run --release -p mnist-dp -- --epsilons none,1,3,8 --out docs
//! cargo run --release -p mnist-dp -- --epsilons none,1,8 --audit-canaries 1000
//! ```
//!
//! `--audit-canaries M` checks the guarantee empirically: it reserves M
//! training images as canaries (negated, with random labels), puts each into client 1's
//! data with probability 1/2, and after the run guesses which were trained
//! on from the global model's loss on them ([`fedcore_dp::one_run_audit`]):
//! the right guesses give a lower bound on epsilon, next to the
//! accountant's.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fedcore::data::mnist::MnistSplit;
use fedcore::data::{Batch, DataSplit, ImageDataset, Mnist, Targets};
use fedcore::memory::InMemoryTransport;
use fedcore::models::{
    Activation, Device, Network, ScatterLinear, Scattering, SmallCnn, Task, TchModel, Trace,
};
use fedcore::{
    FedAvg, LrSchedule, Model, ModelClient, Optimizer, Server, ServerConfig, ServerEvent,
    TrainConfig,
};
use fedcore_dp::{Accounting, AuditOutcome, Budget, DpSgd, DpSgdConfig, Noise, one_run_audit};
use rand::{RngExt, SeedableRng};

#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Folder with the MNIST IDX files (gz or raw).
    #[arg(long, default_value = "../shared/data/mnist")]
    data: PathBuf,
    /// Target epsilons at delta = 1e-5, `none` for training without DP.
    #[arg(long, value_delimiter = ',', default_value = "3")]
    epsilons: Vec<String>,
    #[arg(long, default_value_t = 3)]
    clients: usize,
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Expected batch size (Poisson sampling rate = batch / client examples).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Per-sample clipping norm.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Learning rate of DP-SGD.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// How the learning rate changes over the rounds: `constant` or
    /// `cosine:FLOOR` (down to FLOOR times it in the last round).
    #[arg(long, value_parser = parse_schedule, default_value = "constant")]
    lr_schedule: LrSchedule,
    /// What the server makes of the round's aggregate: sgd (FedAvg),
    /// momentum (FedAvgM), adagrad, adam, yogi (Reddi et al. 2021).
    #[arg(long, default_value = "sgd")]
    server_opt: fedcore::ServerOpt,
    /// The server's learning rate (1 with sgd is plain FedAvg; the adaptive
    /// optimizers want about 0.01-0.1: 1 moves every coordinate by up to 1
    /// per round).
    #[arg(long, default_value_t = 1.0)]
    server_lr: f32,
    /// SGD momentum of DP-SGD.
    #[arg(long, default_value_t = 0.5)]
    momentum: f64,
    /// Learning rate without DP (SGD, momentum 0.9).
    #[arg(long, default_value_t = 0.05)]
    lr_no_dp: f64,
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// The accountant that calibrates the noise: `rdp` or `pld` (tighter:
    /// less noise for the same epsilon).
    #[arg(long, default_value = "rdp")]
    accounting: Accounting,
    /// Training images used (the first N of the 60 000), split among clients.
    #[arg(long, default_value_t = 60_000)]
    train_images: usize,
    #[arg(long, default_value_t = 10_000)]
    test_images: usize,
    /// Seeded, reproducible noise. Not private: anyone with the seed can
    /// remove it. Without it the noise comes from the operating system.
    #[arg(long)]
    seed: Option<u64>,
    /// Where mnist-dp.md goes when more than one epsilon runs.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The model: `compact` (Papernot et al.'s and Opacus' 26,010-parameter
    /// CNN, tanh), `wide` (two 5x5 convolutions, 215,370 parameters, ReLU)
    /// or `scatter` (Tramèr and Boneh's ScatterNet + linear: a linear model,
    /// 39,700 parameters, on the images' scattering coefficients, J = 2,
    /// L = 8, computed once before training; they cost no privacy).
    #[arg(long, value_parser = ["compact", "wide", "scatter"], default_value = "compact")]
    model: String,
    /// GroupNorm groups over the 81 scattering maps (`--model scatter`).
    #[arg(long, default_value_t = 27)]
    scatter_groups: usize,
    /// The CNN's activation instead of its own: `relu` or `tanh` (a
    /// tempered sigmoid, which suits DP-SGD).
    #[arg(long, value_parser = parse_activation)]
    activation: Option<Activation>,
    /// Audit with this many canaries (0: no audit): the last M training
    /// images, negated and with a random label, each go into client 1's
    /// data with probability 1/2.
    #[arg(long, default_value_t = 0)]
    audit_canaries: usize,
    /// Report the accuracy of the mean of the last K rounds' global models
    /// (tail averaging of the iterates; post-processing of what the
    /// clients released, so it costs no privacy), next to each round's
    /// own. 1: the last global model. The audit scores the last round's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    average_last: u64,
}

/// The mean of the last `k` global models, updated each round: what
/// `--average-last` evaluates.
struct TailAverage {
    k: usize,
    last: std::collections::VecDeque<fedcore::Parameters>,
}

impl TailAverage {
    fn new(k: u64) -> Self {
        Self {
            k: k as usize,
            last: std::collections::VecDeque::new(),
        }
    }

    /// Adds this round's global model; returns the mean of the last `k`.
    fn push(&mut self, global: &fedcore::Parameters) -> fedcore::Result<fedcore::Parameters> {
        if self.last.len() == self.k {
            self.last.pop_front();
        }
        self.last.push_back(global.clone());
        let mut mean = global.clone();
        mean.scale(0.0);
        for p in &self.last {
            mean.axpy(1.0, p)?;
        }
        mean.scale(1.0 / self.last.len() as f32);
        Ok(mean)
    }
}

/// An equal IID share per client: client `k` gets items `k, k + n, ...`.
fn iid_shares(items: usize, clients: usize) -> Vec<Vec<usize>> {
    (0..clients)
        .map(|k| (k..items).step_by(clients).collect())
        .collect()
}

fn parse_target(s: &str) -> Result<Option<f64>> {
    if s == "none" {
        return Ok(None);
    }
    let e: f64 = s.parse().with_context(|| format!("epsilon `{s}`"))?;
    if !(e.is_finite() && e > 0.0) {
        bail!("epsilon must be positive, got {s}");
    }
    Ok(Some(e))
}

struct Outcome {
    target: Option<f64>,
    sigma: Option<f64>,
    accuracy: f64,
    epsilon: Option<f64>,
    seconds: f64,
    audit: Option<AuditOutcome>,
}

/// MNIST with some images made canaries: random dots (a fifth of the
/// pixels at full ink, at MNIST's normalized values), out of the data's
/// distribution, so that nothing but having trained on one makes a model
/// sure of its random label.
struct Relabeled {
    inner: Arc<dyn ImageDataset>,
    labels: std::collections::HashMap<usize, i64>,
}

impl ImageDataset for Relabeled {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        self.inner.image_shape()
    }

    fn batch(&self, indices: &[usize]) -> fedcore::Result<Batch> {
        let mut b = self.inner.batch(indices)?;
        let per: usize = b.shape[1..].iter().product();
        if let Targets::Classes(t) = &mut b.targets {
            for (k, (slot, i)) in t.iter_mut().zip(indices).enumerate() {
                if let Some(&l) = self.labels.get(i) {
                    *slot = l;
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(*i as u64);
                    for v in &mut b.images[k * per..(k + 1) * per] {
                        *v = if rng.random_bool(0.2) { 2.8 } else { -0.42 };
                    }
                }
            }
        }
        Ok(b)
    }
}

/// A client's model that keeps a copy of what it releases after each fit
/// (its trained parameters, which its update is the difference to): what
/// the audit scores for client 1.
struct Released<M> {
    inner: M,
    last: Arc<std::sync::Mutex<Option<fedcore::Parameters>>>,
}

impl<M: Model> Model for Released<M> {
    type Data = M::Data;

    fn parameters(&self) -> fedcore::Parameters {
        self.inner.parameters()
    }

    fn set_parameters(&mut self, p: &fedcore::Parameters) -> fedcore::Result<()> {
        self.inner.set_parameters(p)
    }

    fn fit(&mut self, data: &M::Data, config: &TrainConfig) -> fedcore::Result<fedcore::FitOutput> {
        let out = self.inner.fit(data, config)?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(self.inner.parameters());
        }
        Ok(out)
    }

    fn fit_corrected(
        &mut self,
        data: &M::Data,
        config: &TrainConfig,
        correction: &fedcore::Parameters,
    ) -> fedcore::Result<fedcore::FitOutput> {
        let out = self.inner.fit_corrected(data, config, correction)?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(self.inner.parameters());
        }
        Ok(out)
    }

    fn evaluate(&mut self, data: &M::Data) -> fedcore::Result<fedcore::Evaluation> {
        self.inner.evaluate(data)
    }
}

/// The audit's canaries: indices into the training set, their wrong
/// labels, and whether each is in client 1's data.
struct Canaries {
    indices: Vec<usize>,
    source: Arc<dyn ImageDataset>,
    included: Vec<bool>,
}

impl Canaries {
    /// The last `m` of the first `total` training images. The coins are
    /// drawn once from a fixed seed: the model never sees them.
    fn new(train: &Arc<dyn ImageDataset>, total: usize, m: usize) -> Result<Self> {
        let indices: Vec<usize> = (total - m..total).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x00ca_4a41);
        let labels = indices
            .iter()
            .map(|&i| (i, rng.random_range(0..10i64)))
            .collect();
        let included = (0..m).map(|_| rng.random_bool(0.5)).collect();
        Ok(Self {
            indices,
            source: Arc::new(Relabeled {
                inner: train.clone(),
                labels,
            }),
            included,
        })
    }

    /// Client 1's data: its share and the canaries that are in.
    fn with_share(&self, share: Vec<usize>) -> Result<DataSplit> {
        let mut all = share;
        all.extend(
            self.indices
                .iter()
                .zip(&self.included)
                .filter(|(_, inside)| **inside)
                .map(|(i, _)| *i),
        );
        Ok(DataSplit::subset(self.source.clone(), all)?)
    }

    /// Scores each canary by the log-probability the model gives its
    /// label, and audits: guesses for the best and worst tenth.
    fn audit(&self, model: &mut TchModel<Net>) -> Result<AuditOutcome> {
        let split = DataSplit::subset(self.source.clone(), self.indices.clone())?;
        let p = model.predict(&split, 256)?;
        let Targets::Classes(labels) = &p.targets else {
            bail!("MNIST has class targets");
        };
        let scores: Vec<f64> = p
            .logits
            .chunks(10)
            .zip(labels)
            .map(|(row, &l)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
                f64::from(row[l as usize] - lse)
            })
            .collect();
        Ok(one_run_audit(
            &scores,
            &self.included,
            self.indices.len() / 5,
            0.95,
        )?)
    }
}

/// The model `--model` names: one of the CNNs on the images, or the
/// linear model on their scattering coefficients.
#[derive(Debug)]
enum Net {
    Cnn(SmallCnn),
    Scatter(ScatterLinear),
}

impl Net {
    fn inner(&self) -> &dyn Network {
        match self {
            Net::Cnn(n) => n,
            Net::Scatter(n) => n,
        }
    }
}

impl Network for Net {
    fn forward(&self, xs: &tch::Tensor, train: bool) -> tch::Tensor {
        self.inner().forward(xs, train)
    }

    fn task(&self) -> Task {
        self.inner().task()
    }

    fn check_input(&self, shape: [usize; 3]) -> fedcore::Result<()> {
        self.inner().check_input(shape)
    }

    fn has_batch_norm(&self) -> bool {
        self.inner().has_batch_norm()
    }

    fn head_patterns(&self) -> Vec<String> {
        self.inner().head_patterns()
    }

    fn forward_traced(&self, xs: &tch::Tensor, trace: &mut Trace) -> Option<tch::Tensor> {
        self.inner().forward_traced(xs, trace)
    }
}

fn build_model(args: &Args) -> Result<TchModel<Net>> {
    Ok(TchModel::build(Device::Cpu, 0, |b| {
        if args.model == "scatter" {
            let shape = Scattering::shape_for([1, 28, 28], 2, 8);
            return Ok(Net::Scatter(ScatterLinear::build(
                b,
                shape,
                args.scatter_groups,
                10,
            )?));
        }
        let net = match args.model.as_str() {
            "wide" => SmallCnn::build(b, 1, 28, 10)?,
            _ => SmallCnn::compact(b, 1, 28, 10)?,
        };
        Ok(Net::Cnn(match args.activation {
            Some(a) => net.with_activation(a),
            None => net,
        }))
    })?)
}

/// The first `len` images of a data set.
struct First {
    inner: Arc<dyn ImageDataset>,
    len: usize,
}

impl ImageDataset for First {
    fn len(&self) -> usize {
        self.len.min(self.inner.len())
    }

    fn image_shape(&self) -> [usize; 3] {
        self.inner.image_shape()
    }

    fn batch(&self, indices: &[usize]) -> fedcore::Result<Batch> {
        if let Some(i) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(fedcore::Error::InvalidInput(format!(
                "image {i} out of range ({} images)",
                self.len()
            )));
        }
        self.inner.batch(indices)
    }
}

/// What every run trains and tests on: MNIST (with the audit's canaries
/// when there are any), or its scattering coefficients for `--model
/// scatter`, computed once for all runs.
struct Prepared {
    train: Arc<dyn ImageDataset>,
    test: DataSplit,
    canaries: Option<Canaries>,
}

impl Prepared {
    fn new(args: &Args, train: Arc<dyn ImageDataset>, test: DataSplit) -> Result<Self> {
        let total = args.train_images.min(train.len());
        let mut canaries = match args.audit_canaries {
            0 => None,
            m if m * 2 > total => bail!("{m} canaries are too many for {total} training images"),
            m => Some(Canaries::new(&train, total, m)?),
        };
        // The canaries' source differs from MNIST only at the canaries,
        // which no other client draws: every client can draw from it.
        let source = canaries.as_ref().map_or(train, |c| c.source.clone());
        if args.model != "scatter" {
            return Ok(Self {
                train: source,
                test,
                canaries,
            });
        }
        if args.activation.is_some() {
            bail!("--activation is for the CNNs; the scattering model is linear");
        }
        let start = Instant::now();
        let s = Scattering::mnist()?;
        // Only the images the run uses (the clients' shares and the
        // canaries are all among the first `total`).
        let used = First {
            inner: source,
            len: total,
        };
        let train: Arc<dyn ImageDataset> = Arc::new(s.features(&used, 200)?);
        // The test split is the first `--test-images` of the test set.
        let tested = First {
            inner: test.source().clone(),
            len: test.indices().iter().max().map_or(0, |i| i + 1),
        };
        let test_features: Arc<dyn ImageDataset> = Arc::new(s.features(&tested, 200)?);
        let test = DataSplit::subset(test_features, test.indices().to_vec())?;
        if let Some(c) = &mut canaries {
            c.source = train.clone();
        }
        println!(
            "scattering coefficients (J = 2, L = 8: {:?} per image) of {} training and {} test images in {:.0} s",
            s.output_shape(),
            train.len(),
            test.source().len(),
            start.elapsed().as_secs_f64()
        );
        Ok(Self {
            train,
            test,
            canaries,
        })
    }
}

fn run(args: &Args, prepared: &Prepared, target: Option<f64>) -> Result<Outcome> {
    let start = Instant::now();
    let (train, test, canaries) = (&prepared.train, &prepared.test, &prepared.canaries);
    let total = args.train_images.min(train.len());
    let shares = iid_shares(
        total - canaries.as_ref().map_or(0, |c| c.indices.len()),
        args.clients,
    );
    let mut transport = InMemoryTransport::new();
    let mut sigma = None;
    let released: Arc<std::sync::Mutex<Option<fedcore::Parameters>>> = Arc::default();
    for (k, share) in shares.into_iter().enumerate() {
        let id = format!("client{}", k + 1);
        let data = match (&canaries, k) {
            (Some(c), 0) => c.with_share(share)?,
            _ => DataSplit::subset(train.clone(), share)?,
        };
        let n = data.len();
        let slot = if k == 0 {
            released.clone()
        } else {
            Arc::default()
        };
        match target {
            None => {
                let model = Released {
                    inner: build_model(args)?,
                    last: slot,
                };
                transport.add_client(ModelClient::new(id, model, data))?;
            }
            Some(eps) => {
                let budget = Budget::new(eps, args.delta)?.with_accounting(args.accounting);
                let config = DpSgdConfig::calibrated(
                    args.clip,
                    budget,
                    n,
                    args.batch_size,
                    args.epochs,
                    args.rounds,
                )?;
                sigma = Some(config.noise_multiplier);
                let noise = match args.seed {
                    Some(s) => Noise::dangerous().seeded(s.wrapping_add(k as u64)),
                    None => Noise::secure()?,
                };
                let model = DpSgd::new(id.clone(), build_model(args)?, config, noise)?;
                let model = Released {
                    inner: model,
                    last: slot,
                };
                transport.add_client(ModelClient::new(id, model, data))?;
            }
        }
    }
    let (lr, momentum) = match target {
        Some(_) => (args.lr, args.momentum),
        None => (args.lr_no_dp, 0.9),
    };
    let config = ServerConfig {
        rounds: args.rounds,
        min_fit_clients: args.clients,
        min_available_clients: args.clients,
        train: TrainConfig {
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: lr,
            optimizer: Optimizer::Sgd { momentum },
            seed: 0,
            ..TrainConfig::default()
        },
        lr_schedule: args.lr_schedule,
        server_opt: args.server_opt,
        server_learning_rate: args.server_lr,
        ..ServerConfig::default()
    };
    let mut server = Server::new(config, build_model(args)?.parameters(), transport, FedAvg)?;
    let mut evaluator = build_model(args)?;
    let test_eval = test.clone();
    // With --average-last K > 1, `accuracy` is the tail average's (the
    // released model) and `accuracy_last_round` the round's global model's.
    let mut average = TailAverage::new(args.average_last);
    let averaged = args.average_last > 1;
    server.set_evaluator(move |p| {
        if !averaged {
            evaluator.set_parameters(p)?;
            return evaluator.evaluate(&test_eval);
        }
        evaluator.set_parameters(p)?;
        let last = evaluator.evaluate(&test_eval)?;
        evaluator.set_parameters(&average.push(p)?)?;
        let mut mean = evaluator.evaluate(&test_eval)?;
        if let Some(a) = last.metrics.get("accuracy") {
            mean.metrics.insert("accuracy_last_round".into(), *a);
        }
        Ok(mean)
    });
    let label = target.map_or("no DP".to_owned(), |e| format!("epsilon <= {e}"));
    let spent = Arc::new(std::sync::Mutex::new(None::<f64>));
    let spent_in = spent.clone();
    let round_label = label.clone();
    server.subscribe(move |ev: &ServerEvent| {
        if let ServerEvent::RoundFinished { record } = ev {
            let acc = record
                .evaluation
                .as_ref()
                .and_then(|e| e.metrics.get("accuracy").copied())
                .unwrap_or(f64::NAN);
            let eps: Vec<String> = record
                .accepted
                .iter()
                .filter_map(|a| {
                    Some((
                        a.client.as_str().to_owned(),
                        a.provenance.first()?.spent?.epsilon,
                    ))
                })
                .map(|(c, e)| format!("{c} {e:.3}"))
                .collect();
            let max = record
                .accepted
                .iter()
                .filter_map(|a| a.provenance.first()?.spent.map(|s| s.epsilon))
                .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
            if let Ok(mut s) = spent_in.lock() {
                *s = max;
            }
            let last = record
                .evaluation
                .as_ref()
                .and_then(|e| e.metrics.get("accuracy_last_round").copied())
                .map_or(String::new(), |a| {
                    format!(" (tail average; this round's model {:.2} %)", a * 100.0)
                });
            println!(
                "[{round_label}] round {}: test accuracy {:.2} %{last}{}",
                record.round,
                acc * 100.0,
                if eps.is_empty() {
                    String::new()
                } else {
                    format!(", epsilon spent: {}", eps.join(", "))
                }
            );
        }
    });
    server.run()?;
    let accuracy = server
        .history()
        .last()
        .and_then(|r| r.evaluation.as_ref())
        .and_then(|e| e.metrics.get("accuracy").copied())
        .context("no evaluation recorded")?;
    let epsilon = *spent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let seconds = start.elapsed().as_secs_f64();
    // The audit scores what client 1 released last (what its DP protects)
    // and, for comparison, the global model (its release averaged with the
    // others').
    let audit = match &canaries {
        Some(c) => {
            let mut model = build_model(args)?;
            let last = released
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clone()
                .context("client 1 released nothing")?;
            model.set_parameters(&last)?;
            let a = c.audit(&mut model)?;
            model.set_parameters(server.global())?;
            let g = c.audit(&mut model)?;
            println!(
                "[{label}] audit of client 1's release: {} of {} guesses right on {} canaries: epsilon >= {:.2} (95 % confidence); of the global model: {} right, epsilon >= {:.2}",
                a.correct,
                a.guesses,
                a.canaries,
                a.epsilon_lower_bound,
                g.correct,
                g.epsilon_lower_bound
            );
            Some(a)
        }
        None => None,
    };
    Ok(Outcome {
        target,
        sigma,
        accuracy,
        epsilon,
        seconds,
        audit,
    })
}

fn markdown(args: &Args, rows: &[Outcome]) -> Result<String> {
    let parameters = build_model(args)?.parameters().len();
    let mut s = String::new();
    let n = args.train_images.min(60_000) / args.clients;
    let _ = writeln!(s, "# MNIST with DP-SGD: accuracy against epsilon\n");
    let _ = writeln!(
        s,
        "```sh\ncargo run --release -p mnist-dp -- {}\n```\n",
        command_line(std::env::args().skip(1))
    );
    let _ = writeln!(
        s,
        "{} clients with ~{n} MNIST training images each (IID), the {} model \
         ({} parameters{}), FedAvg over {} rounds of {} local epoch(s). DP \
         runs: DP-SGD with per-sample clipping C = {}, Poisson sampling at \
         q = {}/{n}, SGD lr {} ({:?} over the rounds) momentum {}, noise multiplier calibrated by the \
         {} accountant so that all rounds fit epsilon at delta = {:e} (each \
         client's own budget: sample-level DP for its patients). Without DP: \
         SGD lr {} momentum 0.9. Test accuracy on {} MNIST test images of \
         {} after the last round. 2-core VM, CPU.\n",
        args.clients,
        args.model,
        parameters,
        args.activation
            .map_or(String::new(), |a| format!(", activation {a:?}")),
        args.rounds,
        args.epochs,
        args.clip,
        args.batch_size,
        args.lr,
        args.lr_schedule,
        args.momentum,
        match args.accounting {
            Accounting::Pld => "PLD",
            _ => "RDP",
        },
        args.delta,
        args.lr_no_dp,
        args.test_images,
        match args.average_last {
            1 => "the global model".to_owned(),
            k => format!("the mean of the last {k} rounds' global models"),
        }
    );
    let _ = writeln!(
        s,
        "| target | noise multiplier | epsilon spent | test accuracy | time |{}",
        if args.audit_canaries > 0 {
            " audit: right guesses | empirical epsilon lower bound |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|{}",
        if args.audit_canaries > 0 {
            "---:|---:|"
        } else {
            ""
        }
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} % | {:.0} s |{}",
            r.target.map_or("no DP".into(), |e| format!("epsilon {e}")),
            r.sigma.map_or("-".into(), |x| format!("{x:.3}")),
            r.epsilon.map_or("-".into(), |x| format!("{x:.3}")),
            r.accuracy * 100.0,
            r.seconds,
            r.audit.map_or(String::new(), |a| format!(
                " {} / {} | {:.2} |",
                a.correct, a.guesses, a.epsilon_lower_bound
            ))
        );
    }
    let _ = writeln!(
        s,
        "\nPublished anchors (centralized, not federated): Abadi et al. 2016 \
         reached 90 / 95 / 97 % at epsilon 0.5 / 2 / 8; the Opacus MNIST \
         example reports 94.9 % at epsilon 1.16, 96.8 % at 2.91 and 98.9 % \
         without DP."
    );
    Ok(s)
}

/// The arguments as given, without `--out` and its folder (the table says
/// where it goes).
fn command_line(args: impl Iterator<Item = String>) -> String {
    let mut kept = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) || a.starts_with("--out=") {
            continue;
        }
        if a == "--out" {
            skip = true;
            continue;
        }
        kept.push(a);
    }
    kept.join(" ")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let targets: Vec<Option<f64>> = args
        .epsilons
        .iter()
        .map(|s| parse_target(s))
        .collect::<Result<_>>()?;
    if args.seed.is_some() {
        eprintln!("warning: --seed makes the noise reproducible and therefore not private");
    }
    let train = Mnist::load(&args.data, MnistSplit::Train)
        .with_context(|| format!("MNIST in {}", args.data.display()))?;
    let test = Mnist::load(&args.data, MnistSplit::Test)?;
    let train: Arc<dyn ImageDataset> = Arc::new(train);
    let test = DataSplit::subset(Arc::new(test), (0..args.test_images.min(10_000)).collect())?;
    let prepared = Prepared::new(&args, train, test)?;
    // The clients train at once on the transport's worker threads: one
    // libtorch thread each.
    tch::set_num_threads(1);
    let mut rows = Vec::new();
    for t in targets {
        let o = run(&args, &prepared, t)?;
        println!(
            "=> {}: {:.2} % after {} rounds{} ({:.0} s)",
            o.target
                .map_or("no DP".into(), |e| format!("target epsilon {e}")),
            o.accuracy * 100.0,
            args.rounds,
            o.epsilon
                .map_or(String::new(), |e| format!(", epsilon spent {e:.3}")),
            o.seconds
        );
        rows.push(o);
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        let md = markdown(&args, &rows)?;
        std::fs::write(out.join("mnist-dp.md"), &md)?;
        print!("{md}");
    }
    Ok(())
}

fn parse_activation(s: &str) -> Result<Activation, String> {
    Activation::parse(s).map_err(|e| e.to_string())
}

fn parse_schedule(s: &str) -> Result<LrSchedule, String> {
    LrSchedule::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_disjoint_equal_and_cover_everything() {
        let s = iid_shares(10, 3);
        assert_eq!(s, [vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
    }

    #[test]
    fn canaries_are_dots_with_random_labels_and_half_go_into_client_1() {
        let n = 200;
        let images = vec![0.5f32; n * 28 * 28];
        let targets = Targets::Classes((0..n as i64).map(|i| i % 10).collect());
        let train: Arc<dyn ImageDataset> =
            Arc::new(fedcore::data::InMemoryImages::new(images, [1, 28, 28], targets).unwrap());
        let c = Canaries::new(&train, n, 100).unwrap();
        assert_eq!(c.indices, (100..200).collect::<Vec<_>>());
        let inside = c.included.iter().filter(|i| **i).count();
        assert!((30..=70).contains(&inside), "{inside} of 100 included");
        let b = c.source.batch(&[5, 150]).unwrap();
        // An ordinary image is untouched; a canary is dots.
        assert!(b.images[..784].iter().all(|v| *v == 0.5));
        assert!(b.images[784..].iter().all(|v| *v == 2.8 || *v == -0.42));
        assert!(b.images[784..].contains(&2.8));
        let split = c.with_share((0..10).collect()).unwrap();
        assert_eq!(split.len(), 10 + inside);
    }

    #[test]
    fn the_tail_average_is_the_mean_of_the_last_k_globals() {
        let layout =
            Arc::new(fedcore::Layout::new([fedcore::TensorSpec::new("w", [2])]).expect("layout"));
        let p = |a: f32, b: f32| fedcore::Parameters::new(layout.clone(), vec![a, b]).unwrap();
        let mut avg = TailAverage::new(2);
        assert_eq!(avg.push(&p(1.0, 2.0)).unwrap().as_slice(), [1.0, 2.0]);
        assert_eq!(avg.push(&p(3.0, 6.0)).unwrap().as_slice(), [2.0, 4.0]);
        // The first round's model has left the window.
        assert_eq!(avg.push(&p(5.0, -6.0)).unwrap().as_slice(), [4.0, 0.0]);
        // K = 1 releases the global model itself.
        let mut one = TailAverage::new(1);
        one.push(&p(1.0, 1.0)).unwrap();
        assert_eq!(one.push(&p(7.0, 8.0)).unwrap().as_slice(), [7.0, 8.0]);
    }

    #[test]
    fn the_table_repeats_the_command_without_its_output_folder() {
        let args = ["--epsilons", "1,3", "--out", "docs", "--lr", "2", "--out=x"];
        assert_eq!(
            command_line(args.into_iter().map(String::from)),
            "--epsilons 1,3 --lr 2"
        );
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target("none").unwrap(), None);
        assert_eq!(parse_target("2.5").unwrap(), Some(2.5));
        assert!(parse_target("-1").is_err() && parse_target("x").is_err());
    }
}
