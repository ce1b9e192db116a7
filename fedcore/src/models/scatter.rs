//! The scattering transform as fixed features for DP-SGD.
//!
//! Tramèr and Boneh (2021, "Differentially private learning needs better
//! features (or much more data)") showed that a linear model trained with
//! DP-SGD on the scattering coefficients of Oyallon and Mallat (a fixed
//! cascade of Morlet wavelet convolutions and moduli, with no learned
//! weights) beats end-to-end CNNs at the same epsilon on MNIST and CIFAR-10:
//! the features cost no privacy, and the model DP-SGD has to train is small
//! and convex. [`Scattering`] computes the coefficients of order 0, 1 and 2
//! with the filters and the algorithm of Kymatio's `Scattering2D` (Andreux et
//! al. 2020), so that features computed here equal Kymatio's (a test checks
//! them against values Kymatio 0.3.0 computed); [`ScatterLinear`] is the
//! linear model on them.
//!
//! The transform has no parameters and looks at one image at a time, so
//! computing it once for a whole data set ([`Scattering::features`]) before
//! training changes nothing in what DP-SGD protects.

use tch::{Kind, Tensor};

use super::layers::{Builder, Linear};
use super::{Network, Task, Trace};
use crate::data::{ImageDataset, InMemoryImages, Targets};
use crate::error::{Error, Result};

/// The 2-D scattering transform of order 2 with `J` scales and `L` angles
/// (Kymatio's `Scattering2D(J, shape, L, max_order=2)`): for images of
/// `[C, H, W]`, `C * K` coefficient maps of `H / 2^J x W / 2^J`, where
/// `K = 1 + J L + L^2 J (J - 1) / 2` (81 for `J = 2, L = 8`), in Kymatio's
/// order (order 0, then order 1 by scale and angle, then order 2 by the
/// first and the second wavelet), channel by channel.
#[derive(Debug)]
pub struct Scattering {
    scales: usize,
    angles: usize,
    input: [usize; 3],
    /// Reflection padding: left, right, top, bottom.
    pad: [i64; 4],
    /// `psi[j][res]`: the `L` wavelets of scale `j` in Fourier, real,
    /// periodized to the padded size divided by `2^res`.
    psi: Vec<Vec<Tensor>>,
    /// `phi[res]`: the low-pass filter in Fourier at resolution `res`.
    phi: Vec<Tensor>,
}

/// `sum over 5 x 5 periods of exp(-u' A u + i xi (cos t, sin t) . u)`,
/// divided by `2 pi sigma^2 / slant`: Kymatio's `gabor_2d` on an `m x n`
/// grid starting at 0 (with Kymatio's 3.1415 for pi, so that the values
/// agree).
fn gabor(m: usize, n: usize, sigma: f64, theta: f64, xi: f64, slant: f64) -> Vec<(f64, f64)> {
    let (c, s) = (theta.cos(), theta.sin());
    let sl2 = slant * slant;
    let d = 2.0 * sigma * sigma;
    // R diag(1, slant^2) R^-1 / (2 sigma^2), R the rotation by theta.
    let a00 = (c * c + sl2 * s * s) / d;
    let a01 = 2.0 * c * s * (1.0 - sl2) / d;
    let a11 = (s * s + sl2 * c * c) / d;
    let mut out = vec![(0.0, 0.0); m * n];
    for ex in -2i64..=2 {
        for ey in -2i64..=2 {
            for i in 0..m {
                let x = (i as i64 + ex * m as i64) as f64;
                for k in 0..n {
                    let y = (k as i64 + ey * n as i64) as f64;
                    let re = -(a00 * x * x + a01 * x * y + a11 * y * y);
                    let im = xi * (x * c + y * s);
                    let e = re.exp();
                    let v = &mut out[i * n + k];
                    v.0 += e * im.cos();
                    v.1 += e * im.sin();
                }
            }
        }
    }
    // Kymatio's constant, not pi: the filters' scale is part of the values
    // Kymatio users know (it is 3e-5 away from pi, which the test sees).
    #[allow(clippy::approx_constant)] // deliberately Kymatio's, see above
    const KYMATIO_PI: f64 = 3.1415;
    let norm = 2.0 * KYMATIO_PI * sigma * sigma / slant;
    for v in &mut out {
        v.0 /= norm;
        v.1 /= norm;
    }
    out
}

/// Kymatio's `morlet_2d`: the Gabor filter minus the envelope that makes
/// its sum zero.
fn morlet(m: usize, n: usize, sigma: f64, theta: f64, xi: f64, slant: f64) -> Vec<(f64, f64)> {
    let wave = gabor(m, n, sigma, theta, xi, slant);
    let envelope = gabor(m, n, sigma, theta, 0.0, slant);
    let sum = |v: &[(f64, f64)]| {
        v.iter()
            .fold((0.0, 0.0), |(a, b), (re, im)| (a + re, b + im))
    };
    let (wr, wi) = sum(&wave);
    let (er, ei) = sum(&envelope);
    // K = sum(wave) / sum(envelope), complex.
    let den = er * er + ei * ei;
    let (kr, ki) = ((wr * er + wi * ei) / den, (wi * er - wr * ei) / den);
    wave.iter()
        .zip(&envelope)
        .map(|(w, e)| (w.0 - (kr * e.0 - ki * e.1), w.1 - (kr * e.1 + ki * e.0)))
        .collect()
}

/// The real part of the 2-D DFT of an `m x n` complex signal.
fn fourier_real(signal: &[(f64, f64)], m: usize, n: usize) -> Result<Vec<f64>> {
    let dims = [m as i64, n as i64];
    let re: Vec<f64> = signal.iter().map(|v| v.0).collect();
    let im: Vec<f64> = signal.iter().map(|v| v.1).collect();
    let z = Tensor::complex(
        &Tensor::from_slice(&re).view(dims),
        &Tensor::from_slice(&im).view(dims),
    );
    let f = z
        .fft_fft2(None::<&[i64]>, [-2i64, -1], "backward")
        .real()
        .contiguous()
        .flatten(0, -1);
    Vec::<f64>::try_from(&f)
        .map_err(|e| Error::InvalidConfig(format!("scattering filter spectrum: {e}")))
}

/// Kymatio's `periodize_filter_fft`: keeps the frequencies a signal
/// subsampled by `2^res` can hold and folds them onto its grid, as a `f32`
/// tensor of `m / 2^res x n / 2^res`.
fn periodize(x: &[f64], m: usize, n: usize, res: usize) -> Tensor {
    let k = 1usize << res;
    let (mm, nn) = (m / k, n / k);
    let scale = 2f64.powi(-(res as i32));
    let band = |len: usize| {
        let start = (len as f64 * scale / 2.0) as usize;
        let width = (len as f64 * (1.0 - scale)) as usize;
        start..start + width
    };
    let (rows, cols) = (band(m), band(n));
    let mut crop = vec![0f32; mm * nn];
    for a in 0..mm {
        for b in 0..nn {
            let mut sum = 0.0;
            for i in 0..k {
                for j in 0..k {
                    let (r, c) = (a + i * mm, b + j * nn);
                    if !rows.contains(&r) && !cols.contains(&c) {
                        sum += x[r * n + c];
                    }
                }
            }
            crop[a * nn + b] = sum as f32;
        }
    }
    Tensor::from_slice(&crop).view([mm as i64, nn as i64])
}

/// Averages the `k x k` periods of a spectrum: the spectrum of the signal
/// subsampled by `k` (Kymatio's `subsample_fourier`).
fn subsample(x: &Tensor, k: i64) -> Tensor {
    if k == 1 {
        return x.shallow_clone();
    }
    let size = x.size();
    let (m, n) = (size[size.len() - 2], size[size.len() - 1]);
    let mut out = size[..size.len() - 2].to_vec();
    out.extend([m / k, n / k]);
    x.reshape([-1, k, m / k, k, n / k])
        .mean_dim(&[1i64, 3][..], false, None::<Kind>)
        .reshape(out)
}

fn fft(x: &Tensor) -> Tensor {
    x.fft_fft2(None::<&[i64]>, [-2i64, -1], "backward")
}

fn ifft(x: &Tensor) -> Tensor {
    x.fft_ifft2(None::<&[i64]>, [-2i64, -1], "backward")
}

/// Drops the border pixel the padding left after the last subsampling.
fn unpad(x: &Tensor) -> Tensor {
    let size = x.size();
    let (m, n) = (size[size.len() - 2], size[size.len() - 1]);
    x.narrow(-2, 1, m - 2).narrow(-1, 1, n - 2)
}

impl Scattering {
    /// The transform for images of `[channels, height, width]` with
    /// `scales` (J >= 1) and `angles` (L >= 1; Kymatio's filters are made
    /// for 8). The images must be larger than `2^J` on each side.
    pub fn new(input: [usize; 3], scales: usize, angles: usize) -> Result<Self> {
        let [c, h, w] = input;
        if scales == 0 || scales > 8 || angles == 0 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "a scattering transform needs 1 <= J <= 8, L >= 1 and a channel, got J = {scales}, L = {angles}, {c} channels"
            )));
        }
        let step = 1usize << scales;
        if h <= step || w <= step {
            return Err(Error::InvalidConfig(format!(
                "a scattering transform with J = {scales} needs images larger than {step} pixels a side, got {h} x {w}"
            )));
        }
        // Kymatio's `compute_padding`: room for 2^J on each side, rounded
        // to a multiple of 2^J.
        let padded = |s: usize| ((s + step) / step + 1) * step;
        let (m, n) = (padded(h), padded(w));
        let pad = [
            ((n - w) / 2) as i64,
            ((n - w).div_ceil(2)) as i64,
            ((m - h) / 2) as i64,
            ((m - h).div_ceil(2)) as i64,
        ];
        let _guard = tch::no_grad_guard();
        let psi = (0..scales)
            .map(|j| {
                let levels = (j + 1).min((scales - 1).max(1));
                let spectra: Vec<Vec<f64>> = (0..angles)
                    .map(|t| {
                        // Kymatio: (int(L - L / 2 - 1) - t) pi / L.
                        let first = (angles as f64 - angles as f64 / 2.0 - 1.0).trunc();
                        let theta = (first - t as f64) * std::f64::consts::PI / angles as f64;
                        let sigma = 0.8 * 2f64.powi(j as i32);
                        let xi = 0.75 * std::f64::consts::PI / 2f64.powi(j as i32);
                        let signal = morlet(m, n, sigma, theta, xi, 4.0 / angles as f64);
                        fourier_real(&signal, m, n)
                    })
                    .collect::<Result<_>>()?;
                Ok((0..levels)
                    .map(|res| {
                        let per: Vec<Tensor> =
                            spectra.iter().map(|s| periodize(s, m, n, res)).collect();
                        Tensor::stack(&per, 0)
                    })
                    .collect())
            })
            .collect::<Result<_>>()?;
        let low = fourier_real(
            &gabor(m, n, 0.8 * 2f64.powi(scales as i32 - 1), 0.0, 0.0, 1.0),
            m,
            n,
        )?;
        let phi = (0..scales).map(|res| periodize(&low, m, n, res)).collect();
        Ok(Self {
            scales,
            angles,
            input,
            pad,
            psi,
            phi,
        })
    }

    /// Kymatio's default for MNIST-sized inputs: J = 2, L = 8 (81 maps of
    /// 7 x 7 for a 28 x 28 gray image).
    pub fn mnist() -> Result<Self> {
        Self::new([1, 28, 28], 2, 8)
    }

    /// The shape of the images it takes.
    pub fn input_shape(&self) -> [usize; 3] {
        self.input
    }

    /// Coefficient maps per input channel: `1 + J L + L^2 J (J - 1) / 2`.
    pub fn maps_per_channel(&self) -> usize {
        Self::shape_for([1, 0, 0], self.scales, self.angles)[0]
    }

    /// `[C * K, H / 2^J, W / 2^J]`: the shape of one image's coefficients.
    pub fn output_shape(&self) -> [usize; 3] {
        Self::shape_for(self.input, self.scales, self.angles)
    }

    /// [`Scattering::output_shape`] of the transform
    /// `Scattering::new(input, scales, angles)` would build, without
    /// building its filters.
    pub fn shape_for([c, h, w]: [usize; 3], scales: usize, angles: usize) -> [usize; 3] {
        let (j, l) = (scales, angles);
        let maps = 1 + j * l + l * l * j * j.saturating_sub(1) / 2;
        [c * maps, h >> j, w >> j]
    }

    /// The coefficients of a batch of images `[N, C, H, W]` (float), as
    /// `[N, C * K, H / 2^J, W / 2^J]` float32 on the batch's device.
    pub fn transform(&self, xs: &Tensor) -> Result<Tensor> {
        let size = xs.size();
        let want = self.input.map(|v| v as i64);
        if size.len() != 4 || size[1..] != want {
            return Err(Error::InvalidInput(format!(
                "images of shape {size:?}, the scattering transform takes [N, {}, {}, {}]",
                want[0], want[1], want[2]
            )));
        }
        let _guard = tch::no_grad_guard();
        let device = xs.device();
        let at = |t: &Tensor| t.to_device(device);
        let big_j = self.scales as i64;
        let n = size[0];
        let u0 = fft(&xs.to_kind(Kind::Float).reflection_pad2d(self.pad));
        let mut parts = vec![
            unpad(&ifft(&subsample(&(&u0 * at(&self.phi[0])), 1 << big_j)).real()).unsqueeze(2),
        ];
        let mut second = Vec::new();
        for j1 in 0..self.scales {
            let u1 = &u0.unsqueeze(2) * at(&self.psi[j1][0]);
            let u1 = fft(&ifft(&subsample(&u1, 1 << j1)).abs());
            let s1 = ifft(&subsample(
                &(&u1 * at(&self.phi[j1])),
                1 << (big_j - j1 as i64),
            ));
            parts.push(unpad(&s1.real()));
            let mut by_j2 = Vec::new();
            for j2 in j1 + 1..self.scales {
                let u2 = &u1.unsqueeze(3) * at(&self.psi[j2][j1]);
                let u2 = fft(&ifft(&subsample(&u2, 1 << (j2 - j1))).abs());
                let s2 = ifft(&subsample(
                    &(&u2 * at(&self.phi[j2])),
                    1 << (big_j - j2 as i64),
                ));
                by_j2.push(unpad(&s2.real()));
            }
            if !by_j2.is_empty() {
                // [N, C, L (first angle), J2, L (second angle), h, w]: the
                // first wavelet outermost, as Kymatio orders them.
                let s = Tensor::stack(&by_j2, 3);
                let &[_, c, _, _, _, h, w] = &s.size()[..] else {
                    unreachable!("a stack of 6-d tensors has 7 dimensions")
                };
                second.push(s.reshape([n, c, -1, h, w]));
            }
        }
        parts.extend(second);
        let out = Tensor::cat(&parts, 2);
        let [c, k, h, w] = [
            self.input[0] as i64,
            self.maps_per_channel() as i64,
            out.size()[3],
            out.size()[4],
        ];
        Ok(out.reshape([n, c * k, h, w]).contiguous())
    }

    /// Transforms a whole data set, `batch` images at a time, into an
    /// in-memory set of coefficient maps with the same targets.
    pub fn features(&self, data: &dyn ImageDataset, batch: usize) -> Result<InMemoryImages> {
        if data.image_shape() != self.input {
            return Err(Error::InvalidInput(format!(
                "images of shape {:?}, the scattering transform takes {:?}",
                data.image_shape(),
                self.input
            )));
        }
        let batch = batch.max(1);
        let mut values = Vec::new();
        let mut classes = Vec::new();
        let mut labels = None;
        let mut multi = Vec::new();
        for start in (0..data.len()).step_by(batch) {
            let indices: Vec<usize> = (start..(start + batch).min(data.len())).collect();
            let b = data.batch(&indices)?;
            let shape = b.shape.map(|v| v as i64);
            let out = self.transform(&Tensor::from_slice(&b.images).view(shape))?;
            values.extend(
                Vec::<f32>::try_from(&out.flatten(0, -1))
                    .map_err(|e| Error::InvalidInput(format!("scattering output: {e}")))?,
            );
            match b.targets {
                Targets::Classes(c) => classes.extend(c),
                Targets::MultiLabel { values, labels: l } => {
                    labels = Some(l);
                    multi.extend(values);
                }
            }
        }
        let targets = match labels {
            Some(labels) => Targets::MultiLabel {
                values: multi,
                labels,
            },
            None => Targets::Classes(classes),
        };
        InMemoryImages::new(values, self.output_shape(), targets)
    }
}

/// A linear classifier on scattering coefficients (Tramèr and Boneh's
/// "ScatterNet + linear"): GroupNorm without learned scale or shift (each
/// image's maps normalized in `groups` groups, which mixes no images and
/// has no parameters), then one linear layer `fc` to the class logits.
#[derive(Debug)]
pub struct ScatterLinear {
    input: [usize; 3],
    groups: usize,
    classes: usize,
    fc: Linear,
}

impl ScatterLinear {
    /// For coefficient maps of `input` (e.g. [`Scattering::output_shape`])
    /// normalized in `groups` groups (which must divide the maps; Tramèr
    /// and Boneh use 27 for MNIST's 81), and `classes` classes.
    pub fn build(
        b: &mut Builder,
        input: [usize; 3],
        groups: usize,
        classes: usize,
    ) -> Result<Self> {
        let features = input.iter().product::<usize>();
        if features == 0 || classes == 0 || groups == 0 || !input[0].is_multiple_of(groups) {
            return Err(Error::InvalidConfig(format!(
                "ScatterLinear needs inputs, classes and a group count that divides the maps, got {input:?}, {classes} classes, {groups} groups"
            )));
        }
        Ok(Self {
            input,
            groups,
            classes,
            fc: b.linear("fc", features, classes, false),
        })
    }

    fn run(&self, xs: &Tensor, trace: Option<&mut Trace>) -> Tensor {
        let x = xs.group_norm(
            self.groups as i64,
            None::<&Tensor>,
            None::<&Tensor>,
            1e-5,
            false,
        );
        self.fc.run(&x.flatten(1, -1), trace)
    }
}

impl Network for ScatterLinear {
    fn forward(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.run(xs, None)
    }

    fn task(&self) -> Task {
        Task::MultiClass {
            classes: self.classes,
        }
    }

    fn check_input(&self, shape: [usize; 3]) -> Result<()> {
        if shape == self.input {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "inputs of shape {shape:?}, the linear model takes {:?}",
                self.input
            )))
        }
    }

    fn has_batch_norm(&self) -> bool {
        false
    }

    fn head_patterns(&self) -> Vec<String> {
        vec!["fc.*".into()]
    }

    fn forward_traced(&self, xs: &Tensor, trace: &mut Trace) -> Option<Tensor> {
        Some(self.run(xs, Some(trace)))
    }
}
