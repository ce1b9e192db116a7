//! Synthetic chest X-rays in the ChestX-ray14 on-disk format.
//!
//! Each image is a stylised frontal chest film (torso, two dark lung fields,
//! spine, heart) with noise, random brightness and a small shift; each of the
//! 14 findings adds its own structure (a bigger heart for Cardiomegaly, fluid
//! at the lung bases for Effusion, a bright blob for Mass, small dots for
//! Nodule, ...). The structure is strong enough that a CNN's AUROC rises
//! clearly above 0.5 within a few rounds, and varied enough that it is not
//! trivial. The output is a `Data_Entry_2017.csv` with the NIH columns, PNGs
//! in `images/`, and `train_val_list.txt` / `test_list.txt` split by patient,
//! so the real loader ([`super::ChestXray14`]) is what reads it.

use std::io::Write;
use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use super::chestxray::{FINDINGS, NO_FINDING, data_error};
use crate::error::{Error, Result};

/// Settings of [`write_synthetic_chestxray`].
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticXrays {
    /// Number of patients.
    pub patients: usize,
    /// Images per patient are drawn uniformly from `1..=max_follow_ups`.
    pub max_follow_ups: usize,
    /// Side of the square PNGs written (the loader resizes as configured).
    pub size: u32,
    /// Chance of each finding per patient (independently).
    pub prevalence: f64,
    /// Share of patients in `test_list.txt`.
    pub test_fraction: f64,
    /// Strength of the findings' structure relative to the anatomy and the
    /// noise: 1.0 is obvious (a DenseNet reaches macro AUROC 0.99 in a
    /// minute), 0.5 (default) leaves room to see differences between
    /// aggregators and privacy settings.
    pub contrast: f32,
    /// Everything is a function of this seed.
    pub seed: u64,
}

impl Default for SyntheticXrays {
    /// 200 patients, up to 3 images each, 128 x 128, 12 % prevalence, 20 % test,
    /// contrast 0.5.
    fn default() -> Self {
        Self {
            patients: 200,
            max_follow_ups: 3,
            size: 128,
            prevalence: 0.12,
            test_fraction: 0.2,
            contrast: 0.5,
            seed: 0,
        }
    }
}

/// What [`write_synthetic_chestxray`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticSummary {
    /// Images written.
    pub images: usize,
    /// Images with each finding.
    pub positives: [usize; 14],
    /// Images in `test_list.txt`.
    pub test_images: usize,
}

/// Writes a synthetic data set into `dir` (created if needed).
pub fn write_synthetic_chestxray(dir: &Path, config: &SyntheticXrays) -> Result<SyntheticSummary> {
    if config.patients == 0 || config.max_follow_ups == 0 || config.size < 16 {
        return Err(Error::InvalidConfig(
            "synthetic X-rays need patients, follow-ups and a size of at least 16".into(),
        ));
    }
    let ok = (0.0..=1.0).contains(&config.prevalence)
        && (0.0..1.0).contains(&config.test_fraction)
        && config.contrast.is_finite()
        && config.contrast > 0.0;
    if !ok {
        return Err(Error::InvalidConfig(
            "prevalence must be in [0, 1], test_fraction in [0, 1) and contrast positive".into(),
        ));
    }
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    // Per patient: findings, follow-up count, age, sex, split.
    struct Patient {
        id: u32,
        labels: Vec<u16>,
        age: u16,
        sex: &'static str,
        test: bool,
    }
    let mut patients = Vec::with_capacity(config.patients);
    for p in 0..config.patients {
        let base: u16 = (0..14)
            .filter(|_| rng.random_bool(config.prevalence))
            .fold(0, |acc, i| acc | (1 << i));
        let follow_ups = rng.random_range(1..=config.max_follow_ups);
        // Follow-ups keep the patient's findings and sometimes gain or lose one.
        let labels = (0..follow_ups)
            .map(|f| {
                if f > 0 && rng.random_bool(0.2) {
                    base ^ (1 << rng.random_range(0..14))
                } else {
                    base
                }
            })
            .collect();
        patients.push(Patient {
            id: p as u32 + 1,
            labels,
            age: rng.random_range(18..90),
            sex: if rng.random_bool(0.5) { "M" } else { "F" },
            test: rng.random_bool(config.test_fraction),
        });
    }
    let jobs: Vec<(String, u16, u64)> = patients
        .iter()
        .flat_map(|p| {
            p.labels.iter().enumerate().map(move |(f, &l)| {
                let name = image_name(p.id, f);
                let seed = config.seed ^ (u64::from(p.id) << 20) ^ f as u64;
                (name, l, seed)
            })
        })
        .collect();
    jobs.par_iter().try_for_each(|(name, labels, seed)| {
        let img = render(config.size, *labels, config.contrast, *seed);
        let path = images_dir.join(name);
        img.save(&path)
            .map_err(|e| data_error(&path, None, format!("cannot write PNG: {e}")))
    })?;

    let mut csv = std::io::BufWriter::new(std::fs::File::create(dir.join("Data_Entry_2017.csv"))?);
    writeln!(
        csv,
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )?;
    let mut train_list = String::new();
    let mut test_list = String::new();
    let mut summary = SyntheticSummary {
        images: 0,
        positives: [0; 14],
        test_images: 0,
    };
    for p in &patients {
        for (f, &l) in p.labels.iter().enumerate() {
            let name = image_name(p.id, f);
            let findings = if l == 0 {
                NO_FINDING.to_owned()
            } else {
                (0..14)
                    .filter(|i| l & (1 << i) != 0)
                    .map(|i| FINDINGS[i])
                    .collect::<Vec<_>>()
                    .join("|")
            };
            writeln!(
                csv,
                "{name},{findings},{f},{},{},{},PA,{s},{s},0.143,0.143",
                p.id,
                p.age + f as u16,
                p.sex,
                s = config.size
            )?;
            let list = if p.test {
                &mut test_list
            } else {
                &mut train_list
            };
            list.push_str(&name);
            list.push('\n');
            summary.images += 1;
            summary.test_images += usize::from(p.test);
            for (i, count) in summary.positives.iter_mut().enumerate() {
                *count += usize::from(l & (1 << i) != 0);
            }
        }
    }
    csv.flush()?;
    std::fs::write(dir.join("train_val_list.txt"), train_list)?;
    std::fs::write(dir.join("test_list.txt"), test_list)?;
    Ok(summary)
}

/// NIH-style file name: patient, follow-up (`00000013_003.png`).
fn image_name(patient: u32, follow_up: usize) -> String {
    format!("{patient:08}_{follow_up:03}.png")
}

/// Soft-edged ellipse mask: 1 inside, 0 outside, a short ramp at the edge.
fn ellipse(u: f32, v: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> f32 {
    let d = ((u - cx) / rx).powi(2) + ((v - cy) / ry).powi(2);
    (1.0 - (d - 0.85) / 0.3).clamp(0.0, 1.0)
}

/// Renders one film of `size x size` with findings `labels`, their added
/// intensity scaled by `contrast`.
fn render(size: u32, labels: u16, contrast: f32, seed: u64) -> image::GrayImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let has = |i: usize| labels & (1 << i) != 0;
    let (dx, dy) = (
        rng.random_range(-0.03..0.03f32),
        rng.random_range(-0.03..0.03f32),
    );
    let gain = rng.random_range(0.85..1.15f32);
    let noise = Normal::new(0.0f32, 0.04).unwrap_or_else(|_| unreachable!("valid sigma"));
    // Per-image positions of the localized findings.
    let mass = (
        rng.random_range(0.25..0.4f32),
        rng.random_range(0.35..0.6f32),
    );
    let nodules: Vec<(f32, f32)> = (0..3)
        .map(|_| {
            (
                rng.random_range(0.6..0.78f32),
                rng.random_range(0.3..0.65f32),
            )
        })
        .collect();
    let heart_r = if has(1) { 0.12 + 0.08 * contrast } else { 0.12 };
    let lung_r = if has(10) { 1.0 + 0.12 * contrast } else { 1.0 };
    let n = size as f32;
    image::GrayImage::from_fn(size, size, |x, y| {
        let u = x as f32 / n - dx;
        let v = y as f32 / n - dy;
        let left = ellipse(u, v, 0.32, 0.48, 0.15 * lung_r, 0.3 * lung_r);
        let right = ellipse(u, v, 0.68, 0.48, 0.15 * lung_r, 0.3 * lung_r);
        let lungs = left.max(right);
        let mut p = 0.15 + 0.45 * ellipse(u, v, 0.5, 0.55, 0.42, 0.5); // torso
        p -= (if has(10) { 0.3 + 0.08 * contrast } else { 0.3 }) * lungs;
        p += 0.25 * ellipse(u, v, 0.5, 0.5, 0.04, 0.5); // spine
        p += 0.25 * ellipse(u, v, 0.45, 0.62, heart_r, heart_r * 0.8);
        let base = p;
        if has(0) {
            // Atelectasis: a collapsed, dense band in the right lower lung.
            p += 0.25 * ellipse(u, v, 0.68, 0.66, 0.12, 0.03) * right;
        }
        if has(2) {
            // Effusion: fluid filling both bases, flat top.
            p += 0.3 * lungs * ((v - 0.64) / 0.05).clamp(0.0, 1.0);
        }
        if has(3) {
            // Infiltration: patchy haze over the mid lungs.
            let patch = ((u * 40.0).sin() * (v * 33.0).cos()).max(0.0);
            p += 0.22 * lungs * patch * ellipse(u, v, 0.5, 0.45, 0.4, 0.15);
        }
        if has(4) {
            p += 0.35 * ellipse(u, v, mass.0, mass.1, 0.07, 0.07);
        }
        if has(5) {
            for &(cx, cy) in &nodules {
                p += 0.35 * ellipse(u, v, cx, cy, 0.022, 0.022);
            }
        }
        if has(6) {
            // Pneumonia: a cloud in the left lower lobe.
            p += 0.25 * left * ellipse(u, v, 0.3, 0.62, 0.12, 0.1);
        }
        if has(7) {
            // Pneumothorax: a black, featureless apex on the right.
            p -= 0.2 * ellipse(u, v, 0.7, 0.3, 0.13, 0.1);
        }
        if has(8) {
            // Consolidation: dense, uniform upper left lung.
            p += 0.3 * left * ellipse(u, v, 0.32, 0.32, 0.12, 0.1);
        }
        if has(9) {
            // Edema: bilateral "bat-wing" haze around the hila.
            p += 0.2 * lungs * ellipse(u, v, 0.5, 0.45, 0.3, 0.12);
        }
        if has(11) {
            // Fibrosis: reticular lines in the upper lungs.
            let lines = f32::from(u8::from((v * n * 0.5).floor() as i32 % 3 == 0));
            p += 0.2 * lungs * lines * ellipse(u, v, 0.5, 0.3, 0.4, 0.12);
        }
        if has(12) {
            // Pleural thickening: a bright rim at the lung edges.
            p += 0.3 * (lungs * (1.0 - lungs) * 4.0);
        }
        if has(13) {
            // Hernia: a round opacity low behind the heart.
            p += 0.3 * ellipse(u, v, 0.5, 0.8, 0.08, 0.06);
        }
        let value =
            ((base + contrast * (p - base)) * gain + noise.sample(&mut rng)).clamp(0.0, 1.0);
        image::Luma([(value * 255.0).round() as u8])
    })
}

/// A small MNIST-shaped set for tests and examples: `n` 28x28 gray images
/// of ten classes, class `k < 9` a bright 7x7 square at one of nine
/// positions, class 9 none, plus uniform noise in [-0.5, 0.5). Seeded.
pub fn synthetic_digits(n: usize, seed: u64) -> super::InMemoryImages {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(n * 784);
    let mut classes = Vec::with_capacity(n);
    for _ in 0..n {
        let class = rng.random_range(0..10usize);
        let (cy, cx) = (class / 3 * 9 + 1, class % 3 * 9 + 1);
        for y in 0..28 {
            for x in 0..28 {
                let on = class < 9 && (cy..cy + 7).contains(&y) && (cx..cx + 7).contains(&x);
                images.push(if on { 2.0 } else { 0.0 } + rng.random_range(-0.5..0.5f32));
            }
        }
        classes.push(class as i64);
    }
    super::InMemoryImages::new(images, [1, 28, 28], super::Targets::Classes(classes))
        .unwrap_or_else(|_| unreachable!("n images of 784 values and n classes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ChestXray14, ChestXrayConfig, ImageDataset};

    #[test]
    fn writes_a_data_set_the_real_loader_reads_deterministically() {
        let config = SyntheticXrays {
            patients: 12,
            size: 32,
            seed: 5,
            ..SyntheticXrays::default()
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = write_synthetic_chestxray(a.path(), &config).unwrap();
        let sb = write_synthetic_chestxray(b.path(), &config).unwrap();
        assert_eq!(sa, sb);
        let csv = |d: &Path| std::fs::read(d.join("Data_Entry_2017.csv")).unwrap();
        assert_eq!(csv(a.path()), csv(b.path()));
        let ds = ChestXray14::open(
            a.path(),
            ChestXrayConfig {
                size: 16,
                ..ChestXrayConfig::default()
            },
        )
        .unwrap();
        assert_eq!(ds.len(), sa.images);
        let first = ds.entries()[0].image.clone();
        let img = |d: &Path| std::fs::read(d.join("images").join(&first)).unwrap();
        assert_eq!(img(a.path()), img(b.path()), "PNG bytes are seeded");
        let test = ds.official_split("test_list.txt").unwrap();
        let train = ds.official_split("train_val_list.txt").unwrap();
        assert_eq!(test.len(), sa.test_images);
        assert_eq!(test.len() + train.len(), ds.len());
        let batch = ds.batch(&train[..2]).unwrap();
        assert_eq!(batch.shape, [2, 1, 16, 16]);
        assert!(batch.images.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn findings_change_the_pixels_where_they_should() {
        let plain = render(64, 0, 1.0, 1);
        let cardio = render(64, 1 << 1, 1.0, 1);
        // Same seed, same noise: only the heart region differs.
        let diff = |a: &image::GrayImage, b: &image::GrayImage, x: u32, y: u32| {
            i32::from(a.get_pixel(x, y)[0]) - i32::from(b.get_pixel(x, y)[0])
        };
        // At the edge of the enlarged heart (u = 0.45 - 0.17, v = 0.62) the
        // Cardiomegaly image is brighter.
        let x = (0.28 * 64.0) as u32 + 2;
        let y = (0.62 * 64.0) as u32;
        assert!(
            diff(&cardio, &plain, x, y) > 20,
            "{}",
            diff(&cardio, &plain, x, y)
        );
        assert_eq!(diff(&cardio, &plain, 60, 2), 0);
    }
}
