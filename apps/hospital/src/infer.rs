//! Inference on an uploaded X-ray with the latest global model.
//!
//! Uploads are checked before any pixel is decoded: size (by the HTTP
//! layer), format (PNG or JPEG, sniffed from the bytes), and dimensions
//! (read from the header, bounded, and bounded again by the decoder's
//! allocation limit).

use std::sync::Mutex;

use fedcore::data::chestxray::FINDINGS;
use fedcore::models::{DenseNet, TchModel};
use fedcore::{Model, Parameters};
use image::{ImageFormat, ImageReader, Limits};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Why an upload cannot be read.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum UploadError {
    /// Not PNG or JPEG.
    #[error("not a PNG or JPEG image")]
    NotAnImage,
    /// Width or height over the limit.
    #[error("image dimensions {0}x{1} exceed the limit of {2}x{2} pixels")]
    TooLarge(u32, u32, u32),
    /// Width or height zero.
    #[error("the image is empty")]
    Empty,
    /// The bytes do not decode.
    #[error("the image cannot be decoded: {0}")]
    Corrupt(String),
    /// Decoded, the image would take more memory than allowed (its header
    /// declares the size and pixel format: nothing was decoded).
    #[error("the image would decode to {0} bytes, over the limit of {1}")]
    TooManyBytes(u64, u64),
}

/// A finding and its probability.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct Finding {
    /// One of the 14 ChestX-ray14 labels.
    pub label: String,
    /// The model's probability.
    pub probability: f64,
}

/// Where the model looked for one finding: Grad-CAM on the last dense
/// block (`TchModel::<DenseNet>::grad_cam`), as an RGBA PNG of the model's
/// input size (red where the finding's evidence is strongest, transparent
/// where there is none) to lay over the image, stretched to its box (the
/// model sees the image stretched to a square too).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Saliency {
    /// The finding.
    pub label: String,
    /// Its probability.
    pub probability: f64,
    /// Whether any part of the image raised the finding's score (false: the
    /// map is zero everywhere and the heatmap transparent).
    pub evidence: bool,
    /// `data:image/png;base64,...`.
    pub heatmap_png: String,
}

/// The colour of a Grad-CAM value in `[0, 1]`: blue through green and
/// yellow to red, more opaque as it grows; nothing under 0.15.
fn heat(v: f32) -> [u8; 4] {
    let v = v.clamp(0.0, 1.0);
    let ch = |centre: f32| ((1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    let alpha = if v < 0.15 { 0 } else { (v * 190.0) as u8 };
    [ch(3.0), ch(2.0), ch(1.0), alpha]
}

/// A Grad-CAM map of side `size` as a PNG data URL.
fn heatmap_png(map: &[f32], size: u32) -> anyhow::Result<String> {
    use base64::Engine;
    let mut img = image::RgbaImage::new(size, size);
    for (p, v) in img.pixels_mut().zip(map) {
        *p = image::Rgba(heat(*v));
    }
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, ImageFormat::Png)?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png.into_inner())
    ))
}

/// How the model that answers was protected while it trained: what the
/// inference page tells a doctor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Protections {
    /// The hospitals' differential privacy.
    pub dp_mode: crate::recipe::DpMode,
    /// Each hospital's (epsilon, delta) budget when DP was on.
    pub budget: Option<(f64, f64)>,
    /// What left the hospitals encrypted.
    pub encrypt: crate::recipe::Encrypt,
}

/// A decoded, preprocessed upload.
#[derive(Debug, Clone)]
pub struct Xray {
    /// Normalized pixels, `size x size`, one channel.
    pub pixels: Vec<f32>,
    /// Original width.
    pub width: u32,
    /// Original height.
    pub height: u32,
    /// SHA-256 of the uploaded bytes, hex.
    pub sha256: String,
}

/// Decodes `bytes` (PNG or JPEG, at most `max_side` pixels a side, at most
/// `max_decoded_bytes` once decoded in its own pixel format) into the
/// model's input of side `size`.
pub fn decode(
    bytes: &[u8],
    max_side: u32,
    max_decoded_bytes: u64,
    size: u32,
) -> Result<Xray, UploadError> {
    let format = image::guess_format(bytes).map_err(|_| UploadError::NotAnImage)?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg) {
        return Err(UploadError::NotAnImage);
    }
    let reader = || {
        let mut r = ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let mut limits = Limits::default();
        limits.max_image_width = Some(max_side);
        limits.max_image_height = Some(max_side);
        limits.max_alloc = Some(max_decoded_bytes);
        r.limits(limits);
        r
    };
    // The header alone (no pixel is decoded), without limits, so an
    // oversized image is reported as such.
    let (w, h) = ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| UploadError::Corrupt(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(UploadError::Empty);
    }
    if w > max_side || h > max_side {
        return Err(UploadError::TooLarge(w, h, max_side));
    }
    // What the pixels take decoded (a 4096 x 4096 RGBA16 PNG of 130 KB is
    // 128 MiB), from the header.
    let decoded = ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_decoder()
        .map(|d| image::ImageDecoder::total_bytes(&d))
        .map_err(|e| UploadError::Corrupt(e.to_string()))?;
    if decoded > max_decoded_bytes {
        return Err(UploadError::TooManyBytes(decoded, max_decoded_bytes));
    }
    let img = reader()
        .decode()
        .map_err(|e| UploadError::Corrupt(e.to_string()))?;
    let gray = img.into_luma8();
    let resized = image::imageops::resize(&gray, size, size, image::imageops::FilterType::Triangle);
    let c = crate::recipe::image_config(size);
    let pixels = resized
        .as_raw()
        .iter()
        .map(|&p| (f32::from(p) / 255.0 - c.mean) / c.std)
        .collect();
    Ok(Xray {
        pixels,
        width: w,
        height: h,
        sha256: Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    })
}

struct Loaded {
    model: TchModel<DenseNet>,
    round: u64,
    parameters: Parameters,
}

/// The model that answers inference requests: the latest global model,
/// with its head opened by the hospital's HE key.
pub struct Predictor {
    size: u32,
    seed: u64,
    loaded: Mutex<Option<Loaded>>,
    protections: Mutex<Option<Protections>>,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("size", &self.size)
            .finish()
    }
}

impl Predictor {
    /// A predictor for images of side `size`; it answers once a model is set.
    pub fn new(size: u32, seed: u64) -> Self {
        Self {
            size,
            seed,
            loaded: Mutex::new(None),
            protections: Mutex::new(None),
        }
    }

    /// The model's input side.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Records how the run whose models this predictor answers with was
    /// protected (set by the runner before its first model).
    pub fn set_protections(&self, p: Protections) {
        if let Ok(mut g) = self.protections.lock() {
            *g = Some(p);
        }
    }

    /// How the current model was protected, when a runner said so.
    pub fn protections(&self) -> Option<Protections> {
        self.protections.lock().ok().and_then(|g| *g)
    }

    /// The round of the current model, if any.
    pub fn round(&self) -> Option<u64> {
        self.loaded.lock().ok()?.as_ref().map(|l| l.round)
    }

    /// Installs the global model after `round` (0: the initial model).
    pub fn update(&self, parameters: &Parameters, round: u64) -> anyhow::Result<()> {
        let mut guard = self
            .loaded
            .lock()
            .map_err(|_| anyhow::anyhow!("predictor lock poisoned"))?;
        if guard.is_none() {
            *guard = Some(Loaded {
                model: crate::recipe::densenet(self.seed)?,
                round,
                parameters: parameters.clone(),
            });
        }
        let l = guard.as_mut().expect("set above");
        l.model.set_parameters(parameters)?;
        l.round = round;
        l.parameters = parameters.clone();
        Ok(())
    }

    /// The current global model's parameters, for export.
    pub fn parameters(&self) -> Option<(Parameters, u64)> {
        let g = self.loaded.lock().ok()?;
        g.as_ref().map(|l| (l.parameters.clone(), l.round))
    }

    /// The 14 findings, most likely first; `None` before any model is set.
    pub fn predict(&self, x: &Xray) -> anyhow::Result<Option<(Vec<Finding>, u64)>> {
        let guard = self
            .loaded
            .lock()
            .map_err(|_| anyhow::anyhow!("predictor lock poisoned"))?;
        let Some(l) = guard.as_ref() else {
            return Ok(None);
        };
        let s = self.size as usize;
        let logits = l.model.forward(&x.pixels, [1, 1, s, s])?;
        let mut findings: Vec<Finding> = FINDINGS
            .iter()
            .zip(logits)
            .map(|(label, z)| Finding {
                label: (*label).to_owned(),
                probability: 1.0 / (1.0 + (-f64::from(z)).exp()),
            })
            .collect();
        findings.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        Ok(Some((findings, l.round)))
    }

    /// Where the model looked for each of `findings` (Grad-CAM), with the
    /// model that answered `round`; `None` when the model changed since
    /// (the maps would explain another model) or there is none.
    pub fn explain(
        &self,
        x: &Xray,
        findings: &[Finding],
        round: u64,
    ) -> anyhow::Result<Option<Vec<Saliency>>> {
        let guard = self
            .loaded
            .lock()
            .map_err(|_| anyhow::anyhow!("predictor lock poisoned"))?;
        let Some(l) = guard.as_ref().filter(|l| l.round == round) else {
            return Ok(None);
        };
        let classes: Vec<usize> = findings
            .iter()
            .filter_map(|f| FINDINGS.iter().position(|n| *n == f.label))
            .collect();
        let s = self.size as usize;
        let maps = l.model.grad_cam(&x.pixels, [1, 1, s, s], &classes)?;
        findings
            .iter()
            .zip(maps)
            .map(|(f, m)| {
                Ok(Saliency {
                    label: f.label.clone(),
                    probability: f.probability,
                    evidence: m.iter().any(|v| *v > 0.0),
                    heatmap_png: heatmap_png(&m, self.size)?,
                })
            })
            .collect::<anyhow::Result<_>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x + y) % 256) as u8]));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn uploads_are_checked_before_decoding() {
        let x = decode(&png(40, 30), 1024, 1 << 26, 32).unwrap();
        assert_eq!((x.width, x.height, x.pixels.len()), (40, 30, 32 * 32));
        assert_eq!(x.sha256.len(), 64);
        assert_eq!(
            decode(b"hello", 1024, 1 << 26, 32).unwrap_err(),
            UploadError::NotAnImage
        );
        assert_eq!(
            decode(b"GIF89a....", 1024, 1 << 26, 32).unwrap_err(),
            UploadError::NotAnImage
        );
        assert!(matches!(
            decode(&png(300, 20), 256, 1 << 26, 32),
            Err(UploadError::TooLarge(300, 20, 256))
        ));
        let mut cut = png(64, 64);
        cut.truncate(cut.len() / 2);
        assert!(matches!(
            decode(&cut, 1024, 1 << 26, 32),
            Err(UploadError::Corrupt(_))
        ));
    }

    #[test]
    fn an_image_that_would_decode_too_large_is_refused_from_its_header() {
        // 512 x 512 RGBA with 16 bits a channel: 2 MiB decoded, a few KB
        // as a PNG of one colour.
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
            512,
            512,
            image::Rgba([1000, 2000, 3000, 65535]),
        );
        let mut bytes = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
        assert_eq!(
            decode(&bytes, 4096, 1 << 20, 32).unwrap_err(),
            UploadError::TooManyBytes(512 * 512 * 8, 1 << 20)
        );
        // The same image under a limit it fits decodes.
        assert!(decode(&bytes, 4096, 4 << 20, 32).is_ok());
    }
}
