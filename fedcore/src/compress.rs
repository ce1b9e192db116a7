//! Compressed updates: how a client's update values travel to the server.
//!
//! The server asks for an [`Encoding`] in every fit request
//! ([`TrainConfig::upload`](crate::TrainConfig::upload)); a client encodes
//! the values of its update with it after its privacy mechanisms ran, so
//! compression is post-processing of what DP released and costs no privacy.
//! The server decodes and aggregates the decoded values, so robust rules and
//! central DP see exactly what the client's encoding let through.
//!
//! | encoding | bytes per value | what is lost |
//! |---|---:|---|
//! | `f32` | 4 | nothing |
//! | `f16` | 2 | mantissa below 2^-11 relative; values beyond 65,504 saturate |
//! | `bf16` | 2 | mantissa below 2^-8 relative |
//! | `int8` | 1 + 4 per tensor | values rounded to 255 levels of the tensor's largest magnitude |
//! | `top-k:F` | 8 F | all but the fraction F of each tensor's values of largest magnitude |
//!
//! Every lossy encoding runs with error feedback ([`ErrorFeedback`], Seide
//! et al. 2014; Karimireddy et al. 2019): what a round's encoding dropped is
//! kept at the client and added to its next update, so nothing is lost, only
//! delayed. The encoded size of a layout is fixed by the encoding alone
//! (top-k keeps `ceil(F n)` values of a tensor of `n`), so the receiving
//! side knows how many bytes to expect before any arrive and refuses a
//! payload of any other size.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::{Layout, Parameters};

/// How the values of an update are encoded for the upload.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Encoding {
    /// Little-endian float32, as computed (lossless).
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest; values beyond its range
    /// saturate at +-65,504 (error feedback carries the rest).
    F16,
    /// bfloat16 (float32's range, 8 bits of mantissa), rounded to nearest.
    Bf16,
    /// Per tensor a float32 scale `max |v| / 127` and each value as the
    /// nearest integer multiple of it in [-127, 127].
    Int8,
    /// Per tensor the `ceil(fraction * n)` values of largest magnitude (at
    /// least one), as u32 indices (ascending) then float32 values.
    TopK {
        /// The share of each tensor's values kept, in (0, 1].
        fraction: f64,
    },
}

impl Encoding {
    /// Checks the setting (top-k's fraction in (0, 1]).
    pub fn check(&self) -> Result<()> {
        match *self {
            Encoding::TopK { fraction } if !(fraction > 0.0 && fraction <= 1.0) => {
                Err(Error::InvalidConfig(format!(
                    "top-k keeps a fraction in (0, 1] of each tensor, not {fraction}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Every kind's name (`top-k` for any fraction): what a client of
    /// this version can send, as it lists them when it connects.
    pub const KINDS: [&'static str; 5] = ["f32", "f16", "bf16", "int8", "top-k"];

    /// Its kind's name, one of [`Encoding::KINDS`] (`top-k` for any fraction).
    pub fn kind(&self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::Bf16 => "bf16",
            Encoding::Int8 => "int8",
            Encoding::TopK { .. } => "top-k",
        }
    }

    /// True for `f32`, which sends the values as they are.
    pub fn is_lossless(&self) -> bool {
        matches!(self, Encoding::F32)
    }

    /// How many values top-k keeps of a tensor of `n` (all of them for the
    /// other encodings).
    fn kept(&self, n: usize) -> usize {
        match *self {
            Encoding::TopK { fraction } if n > 0 => {
                ((fraction * n as f64).ceil() as usize).clamp(1, n)
            }
            _ => n,
        }
    }

    /// The bytes the values of `layout` take in this encoding.
    pub fn encoded_len(&self, layout: &Layout) -> u64 {
        let per_tensor = |f: &dyn Fn(u64) -> u64| -> u64 {
            layout
                .tensors()
                .iter()
                .map(|t| f(t.numel() as u64))
                .fold(0u64, u64::saturating_add)
        };
        match self {
            Encoding::F32 => (layout.len() as u64).saturating_mul(4),
            Encoding::F16 | Encoding::Bf16 => (layout.len() as u64).saturating_mul(2),
            Encoding::Int8 => per_tensor(&|n| n.saturating_add(4)),
            Encoding::TopK { .. } => {
                per_tensor(&|n| (self.kept(n as usize) as u64).saturating_mul(8))
            }
        }
    }

    /// Encodes `values` (every value finite).
    pub fn encode(&self, values: &Parameters) -> Result<Compressed> {
        self.check()?;
        if let Some(nf) = values.first_non_finite() {
            return Err(Error::InvalidInput(format!(
                "cannot encode {} in `{}`[{}]",
                nf.value, nf.tensor, nf.index
            )));
        }
        let layout = values.layout();
        let mut out = Vec::with_capacity(self.encoded_len(layout) as usize);
        for (spec, v) in values.iter() {
            match *self {
                Encoding::F32 => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
                Encoding::F16 => v.iter().for_each(|x| {
                    let h = f16::from_f32(x.clamp(f16::MIN.to_f32(), f16::MAX.to_f32()));
                    out.extend(h.to_le_bytes())
                }),
                Encoding::Bf16 => v.iter().for_each(|x| {
                    // Within 0.4 % of f32's largest, rounding would give inf.
                    let b = bf16::from_f32(x.clamp(bf16::MIN.to_f32(), bf16::MAX.to_f32()));
                    out.extend(b.to_le_bytes())
                }),
                Encoding::Int8 => {
                    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let scale = max / 127.0;
                    out.extend(scale.to_le_bytes());
                    v.iter().for_each(|x| {
                        let q = if scale > 0.0 {
                            (x / scale).round().clamp(-127.0, 127.0) as i8
                        } else {
                            0
                        };
                        out.push(q as u8)
                    });
                }
                Encoding::TopK { .. } => {
                    if u32::try_from(v.len()).is_err() {
                        return Err(Error::InvalidInput(format!(
                            "top-k indexes a tensor with u32; `{}` has {} values",
                            spec.name,
                            v.len()
                        )));
                    }
                    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
                    let k = self.kept(v.len());
                    // Largest magnitude first; the lower index wins a tie,
                    // so the choice is deterministic.
                    let order = |a: &u32, b: &u32| {
                        v[*b as usize]
                            .abs()
                            .total_cmp(&v[*a as usize].abs())
                            .then(a.cmp(b))
                    };
                    if k < idx.len() {
                        idx.select_nth_unstable_by(k, order);
                        idx.truncate(k);
                    }
                    idx.sort_unstable();
                    idx.iter().for_each(|i| out.extend(i.to_le_bytes()));
                    idx.iter()
                        .for_each(|i| out.extend(v[*i as usize].to_le_bytes()));
                }
            }
        }
        debug_assert_eq!(out.len() as u64, self.encoded_len(layout));
        Ok(Compressed {
            encoding: *self,
            bytes: out,
        })
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encoding::F32 => f.write_str("f32"),
            Encoding::F16 => f.write_str("f16"),
            Encoding::Bf16 => f.write_str("bf16"),
            Encoding::Int8 => f.write_str("int8"),
            Encoding::TopK { fraction } => write!(f, "top-k:{fraction}"),
        }
    }
}

impl FromStr for Encoding {
    type Err = Error;

    /// `f32`, `f16`, `bf16`, `int8` or `top-k:F` with F in (0, 1].
    fn from_str(s: &str) -> Result<Self> {
        let e = match s {
            "f32" => Encoding::F32,
            "f16" => Encoding::F16,
            "bf16" => Encoding::Bf16,
            "int8" => Encoding::Int8,
            _ => match s.strip_prefix("top-k:").map(str::parse::<f64>) {
                Some(Ok(fraction)) => Encoding::TopK { fraction },
                _ => {
                    return Err(Error::InvalidConfig(format!(
                        "unknown encoding `{s}` (f32, f16, bf16, int8 or top-k:F with F in (0, 1])"
                    )));
                }
            },
        };
        e.check()?;
        Ok(e)
    }
}

impl From<Encoding> for String {
    fn from(e: Encoding) -> Self {
        e.to_string()
    }
}

impl TryFrom<String> for Encoding {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

/// Values in an [`Encoding`], as they travel.
#[derive(Debug, Clone, PartialEq)]
pub struct Compressed {
    encoding: Encoding,
    bytes: Vec<u8>,
}

impl Compressed {
    /// Bytes received in `encoding` (checked when decoded).
    pub fn new(encoding: Encoding, bytes: Vec<u8>) -> Self {
        Self { encoding, bytes }
    }

    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes the bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The values, in `layout`. Bytes that do not fit the layout (another
    /// size, a top-k index out of range or out of order, a scale or value
    /// that is not finite) are refused with the reason: the sender is
    /// wrong or lying, and nothing of it is used.
    pub fn decode(&self, layout: Arc<Layout>) -> Result<Parameters> {
        let enc = self.encoding;
        enc.check()?;
        let want = enc.encoded_len(&layout);
        if self.bytes.len() as u64 != want {
            return Err(Error::InvalidInput(format!(
                "{enc} values of this layout take {want} bytes, and {} came",
                self.bytes.len()
            )));
        }
        let bad = |what: String| Err(Error::InvalidInput(format!("{enc} values: {what}")));
        let mut values = vec![0.0f32; layout.len()];
        let mut at = 0usize;
        let mut take = |n: usize| {
            let s = &self.bytes[at..at + n];
            at += n;
            s
        };
        let f32_at = |b: &[u8], i: usize| f32::from_le_bytes(word(b, i));
        for (t, spec) in layout.tensors().iter().enumerate() {
            let out = &mut values[layout.range_at(t)];
            let n = out.len();
            match enc {
                Encoding::F32 => {
                    let b = take(4 * n);
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = f32_at(b, i);
                    }
                }
                Encoding::F16 | Encoding::Bf16 => {
                    let b = take(2 * n);
                    for (i, o) in out.iter_mut().enumerate() {
                        let h = [b[2 * i], b[2 * i + 1]];
                        *o = if enc == Encoding::F16 {
                            f16::from_le_bytes(h).to_f32()
                        } else {
                            bf16::from_le_bytes(h).to_f32()
                        };
                    }
                }
                Encoding::Int8 => {
                    let scale = f32::from_le_bytes(word(take(4), 0));
                    if !(scale.is_finite() && scale >= 0.0) {
                        return bad(format!("the scale of `{}` is {scale}", spec.name));
                    }
                    for (o, q) in out.iter_mut().zip(take(n)) {
                        let q = *q as i8;
                        if q == i8::MIN {
                            return bad(format!(
                                "`{}` holds -128, outside the encoder's [-127, 127]",
                                spec.name
                            ));
                        }
                        *o = f32::from(q) * scale;
                    }
                }
                Encoding::TopK { .. } => {
                    let k = enc.kept(n);
                    let idx = take(4 * k);
                    let vals = take(4 * k);
                    let mut next = 0u64;
                    for j in 0..k {
                        let i = u32::from_le_bytes(word(idx, j));
                        if u64::from(i) < next || i as usize >= n {
                            return bad(format!(
                                "index {i} of `{}` ({n} values) is out of range or out of order",
                                spec.name
                            ));
                        }
                        next = u64::from(i) + 1;
                        out[i as usize] = f32_at(vals, j);
                    }
                }
            }
        }
        let params = Parameters::new(layout, values)?;
        if let Some(nf) = params.first_non_finite() {
            return bad(format!("{} in `{}`[{}]", nf.value, nf.tensor, nf.index));
        }
        Ok(params)
    }
}

/// The `i`-th 4-byte word of `b`.
fn word(b: &[u8], i: usize) -> [u8; 4] {
    let w = &b[4 * i..4 * i + 4];
    [w[0], w[1], w[2], w[3]]
}

/// A client's error-feedback residual: what its lossy encodings dropped so
/// far, added to its next update. Kept in memory for the client's life;
/// dropped when the update's layout changes or a round comes that is not
/// after the last one (a new run, or a server resumed from an earlier
/// checkpoint), so one run's residual never enters another's.
#[derive(Debug, Default, Clone)]
pub struct ErrorFeedback {
    residual: Option<Parameters>,
    round: Option<u64>,
}

impl ErrorFeedback {
    /// An empty residual.
    pub fn new() -> Self {
        Self::default()
    }

    /// The residual carried into the next update, if any.
    pub fn residual(&self) -> Option<&Parameters> {
        self.residual.as_ref()
    }

    /// Starts `round`: a round that is not after the last one started
    /// drops the residual.
    pub fn start_round(&mut self, round: u64) {
        if self.round.is_some_and(|last| round <= last) && self.residual.take().is_some() {
            tracing::debug!(
                "round {round} is not after the last one; the error-feedback residual is dropped"
            );
        }
        self.round = Some(round);
    }

    /// Encodes `values` plus the residual and keeps what the encoding lost;
    /// returns the encoded bytes and the values the server will decode.
    pub fn compress(
        &mut self,
        encoding: &Encoding,
        values: &Parameters,
    ) -> Result<(Compressed, Parameters)> {
        let mut corrected = values.clone();
        if let Some(r) = self.residual.take() {
            if r.layout() == values.layout() {
                corrected.axpy(1.0, &r)?;
            } else {
                tracing::warn!(
                    "the update's layout changed; the error-feedback residual is dropped"
                );
            }
        }
        let compressed = encoding.encode(&corrected)?;
        let sent = compressed.decode(values.layout().clone())?;
        if !encoding.is_lossless() {
            let left = corrected.sub(&sent)?;
            if left.as_slice().iter().any(|v| *v != 0.0) {
                self.residual = Some(left);
            }
        }
        Ok((compressed, sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::TensorSpec;

    fn params(values: Vec<f32>) -> Parameters {
        let n = values.len();
        Parameters::new(
            Arc::new(
                Layout::new([
                    TensorSpec::new("a", vec![2]),
                    TensorSpec::new("b", vec![n - 2]),
                ])
                .unwrap(),
            ),
            values,
        )
        .unwrap()
    }

    #[test]
    fn each_encoding_round_trips_within_its_precision_and_takes_its_size() {
        let p = params(vec![0.5, -1.25, 3.0, -0.001, 0.0, 100.0, 1e-6, -7.5]);
        for (enc, bytes, tol) in [
            (Encoding::F32, 32, 0.0),
            (Encoding::F16, 16, 0.05),
            (Encoding::Bf16, 16, 0.4),
            (Encoding::Int8, 8 + 8, 100.0 / 254.0 + 1e-5),
            (Encoding::TopK { fraction: 0.5 }, 8 * (1 + 3), 0.5),
        ] {
            let c = enc.encode(&p).unwrap();
            assert_eq!(c.bytes().len(), bytes, "{enc}");
            assert_eq!(enc.encoded_len(p.layout()), bytes as u64, "{enc}");
            let back = c.decode(p.layout().clone()).unwrap();
            assert!(back.max_abs_diff(&p).unwrap() <= tol, "{enc}: {back:?}");
            assert_eq!(enc.to_string().parse::<Encoding>().unwrap(), enc);
        }
        // Top-k keeps the largest of each tensor: -1.25 of `a`, 100, -7.5, 3.0 of `b`.
        let top = Encoding::TopK { fraction: 0.5 }.encode(&p).unwrap();
        let back = top.decode(p.layout().clone()).unwrap();
        assert_eq!(
            back.as_slice(),
            &[0.0, -1.25, 3.0, 0.0, 0.0, 100.0, 0.0, -7.5]
        );
    }

    #[test]
    fn bad_bytes_are_refused_with_a_reason() {
        let p = params(vec![1.0, 2.0, 3.0, 4.0]);
        let layout = p.layout().clone();
        let top = Encoding::TopK { fraction: 0.5 };
        let mut c = top.encode(&p).unwrap();
        // `a` keeps one of its two values; say it kept index 5.
        c.bytes[0..4].copy_from_slice(&5u32.to_le_bytes());
        let err = c.decode(layout.clone()).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
        let short = Compressed::new(Encoding::Int8, vec![0; 3]);
        let err = short.decode(layout.clone()).unwrap_err().to_string();
        assert!(err.contains("take 12 bytes, and 3 came"), "{err}");
        let mut nan_scale = Encoding::Int8.encode(&p).unwrap();
        nan_scale.bytes[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = nan_scale.decode(layout.clone()).unwrap_err().to_string();
        assert!(err.contains("scale of `a` is NaN"), "{err}");
        let mut low = Encoding::Int8.encode(&p).unwrap();
        low.bytes[4] = 0x80;
        let err = low.decode(layout.clone()).unwrap_err().to_string();
        assert!(err.contains("-128"), "{err}");
        let inf = Compressed::new(Encoding::F16, [f16::INFINITY.to_le_bytes(); 4].concat());
        let err = inf.decode(layout).unwrap_err().to_string();
        assert!(err.contains("inf"), "{err}");
        assert!("top-k:0".parse::<Encoding>().is_err());
        assert!("top-k:1.5".parse::<Encoding>().is_err());
        assert!("int4".parse::<Encoding>().is_err());
        assert!(
            Encoding::F32
                .encode(&params(vec![1.0, f32::NAN, 0.0]))
                .is_err()
        );
    }

    #[test]
    fn error_feedback_sends_everything_eventually() {
        // A constant update under top-k of one value in four: what is not
        // sent accumulates until it is the largest, so the sum of what was
        // sent over rounds tracks the sum of the updates within one round's
        // residual.
        let p = params(vec![1.0, 0.9, 0.8, 0.7, 0.6, 0.5]);
        let enc = Encoding::TopK { fraction: 0.25 };
        let mut ef = ErrorFeedback::new();
        let mut total = p.zeros_like();
        for round in 1..=40 {
            ef.start_round(round);
            let (c, sent) = ef.compress(&enc, &p).unwrap();
            assert_eq!(c.decode(p.layout().clone()).unwrap(), sent);
            total.axpy(1.0, &sent).unwrap();
            let mut want = p.clone();
            want.scale(round as f32);
            // total + residual = round * p, exactly up to rounding.
            let mut have = total.clone();
            have.axpy(1.0, ef.residual().unwrap_or(&p.zeros_like()))
                .unwrap();
            assert!(have.max_abs_diff(&want).unwrap() < 1e-4, "round {round}");
        }
        let r = ef.residual().unwrap();
        assert!(r.as_slice().iter().all(|v| v.abs() <= 12.0), "{r:?}");
        // A round that is not after the last one (a new run) drops it.
        let mut other = ef.clone();
        other.start_round(41);
        assert!(other.residual().is_some());
        other.start_round(3);
        assert!(other.residual().is_none());
        // A lossless round flushes the residual.
        let (_, sent) = ef.compress(&Encoding::F32, &p).unwrap();
        total.axpy(1.0, &sent).unwrap();
        let mut want = p.clone();
        want.scale(41.0);
        assert!(total.max_abs_diff(&want).unwrap() < 1e-3);
        assert!(ef.residual().is_none());
    }

    proptest::proptest! {
        /// Any finite update of two tensors comes back within its
        /// encoding's precision, in exactly the promised bytes, and the
        /// error-feedback identity (sent + residual = update + old
        /// residual) holds.
        #[test]
        fn any_update_round_trips_within_its_encodings_bound(
            a in proptest::collection::vec(-1e3f32..1e3, 1..40),
            b in proptest::collection::vec(-1e-2f32..1e-2, 1..40),
            fraction in 0.01f64..1.0,
        ) {
            let layout = Arc::new(Layout::new([
                TensorSpec::new("a", vec![a.len()]),
                TensorSpec::new("b", vec![b.len()]),
            ]).unwrap());
            let p = Parameters::new(layout.clone(), [a.clone(), b.clone()].concat()).unwrap();
            let max = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for enc in [Encoding::F32, Encoding::F16, Encoding::Bf16, Encoding::Int8, Encoding::TopK { fraction }] {
                let c = enc.encode(&p).unwrap();
                proptest::prop_assert_eq!(c.bytes().len() as u64, enc.encoded_len(&layout));
                let back = c.decode(layout.clone()).unwrap();
                for (t, v) in [(0usize, &a), (1, &b)] {
                    let got = &back.as_slice()[layout.range_at(t)];
                    let m = max(v);
                    for (x, y) in v.iter().zip(got) {
                        let err = (x - y).abs();
                        let bound = match enc {
                            Encoding::F32 => 0.0,
                            // Half precision: relative 2^-11, or its
                            // subnormal step near zero.
                            Encoding::F16 => x.abs() * 4.9e-4 + 6e-8,
                            Encoding::Bf16 => x.abs() * 3.91e-3,
                            Encoding::Int8 => m / 254.0 * 1.0001,
                            // Top-k drops values no larger than the kept ones.
                            Encoding::TopK { .. } => if *y == 0.0 { m } else { 0.0 },
                        };
                        proptest::prop_assert!(err <= bound, "{} {} -> {} ({})", enc, x, y, bound);
                    }
                }
            }
            let mut ef = ErrorFeedback::new();
            let enc = Encoding::TopK { fraction };
            let (_, first) = ef.compress(&enc, &p).unwrap();
            let old = ef.residual().cloned().unwrap_or_else(|| p.zeros_like());
            let mut want = first.clone();
            want.axpy(1.0, &old).unwrap();
            proptest::prop_assert!(want.max_abs_diff(&p).unwrap() <= 1e-3 * (1.0 + max(&a)));
        }
    }

    #[test]
    fn serde_uses_the_names() {
        let e: Encoding = serde_json::from_str("\"top-k:0.1\"").unwrap();
        assert_eq!(e, Encoding::TopK { fraction: 0.1 });
        assert_eq!(serde_json::to_string(&Encoding::Int8).unwrap(), "\"int8\"");
        assert!(serde_json::from_str::<Encoding>("\"top-k:2\"").is_err());
    }
}
