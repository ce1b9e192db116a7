use std::ops::Range;

use fedcore::l2_norm;
use fedcore::{Parameters, PrivacyCost, PrivacyMechanism};

use crate::error::{DpError, Result};

/// Scales `values` down to L2 norm `max_norm` if it is longer; returns the
/// norm before. Never lengthens a vector.
pub fn clip_slice(values: &mut [f32], max_norm: f64) -> f64 {
    let norm = l2_norm(values);
    scale_to(values, norm, max_norm);
    norm
}

fn scale_to(values: &mut [f32], norm: f64, max_norm: f64) {
    if norm > max_norm {
        // Rounding the factor to f32 can land a hair above max_norm; shrink
        // by one ulp of safety so the bound holds exactly.
        let s = (max_norm / norm) as f32 * (1.0 - f32::EPSILON);
        values.iter_mut().for_each(|v| *v *= s);
    }
}

/// What a clip did.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipReport {
    /// L2 norm of the clipped part before clipping.
    pub norm: f64,
    /// Whether anything was scaled down.
    pub clipped: bool,
}

/// L2 clipping to `max_norm`, of the whole update or of the tensors that
/// match some patterns ([`fedcore::Layout::select`]), jointly or per tensor.
///
/// Per tensor, each of the `L` selected tensors is clipped to
/// `max_norm / sqrt(L)`, so the selected part as a whole stays within
/// `max_norm` (the sensitivity the noise is calibrated to).
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    max_norm: f64,
    patterns: Option<Vec<String>>,
    per_layer: bool,
}

impl Clip {
    /// Clips the whole update to `max_norm` (> 0 and finite).
    pub fn new(max_norm: f64) -> Result<Self> {
        if !(max_norm > 0.0 && max_norm.is_finite()) {
            return Err(DpError::InvalidParams(format!(
                "clipping norm must be positive and finite, got {max_norm}"
            )));
        }
        Ok(Self {
            max_norm,
            patterns: None,
            per_layer: false,
        })
    }

    /// Only the tensors matching `patterns` (e.g. everything but the head).
    pub fn only<S: AsRef<str>>(mut self, patterns: &[S]) -> Self {
        self.patterns = Some(patterns.iter().map(|p| p.as_ref().to_owned()).collect());
        self
    }

    /// Each selected tensor on its own, to `max_norm / sqrt(L)`.
    pub fn per_layer(mut self) -> Self {
        self.per_layer = true;
        self
    }

    /// The clipping norm.
    pub fn max_norm(&self) -> f64 {
        self.max_norm
    }

    /// The tensor patterns, if not the whole update.
    pub fn patterns(&self) -> Option<&[String]> {
        self.patterns.as_deref()
    }

    /// The value ranges this clip covers in `p`'s layout.
    pub fn ranges(&self, p: &Parameters) -> Result<Vec<Range<usize>>> {
        let layout = p.layout();
        Ok(match &self.patterns {
            None => (0..layout.tensors().len())
                .map(|i| layout.range_at(i))
                .collect(),
            Some(pats) => layout.select(pats)?.ranges(layout)?,
        })
    }

    /// Clips `p` in place.
    pub fn apply(&self, p: &mut Parameters) -> Result<ClipReport> {
        let ranges = self.ranges(p)?;
        let values = p.as_mut_slice();
        if self.per_layer {
            let per = self.max_norm / (ranges.len().max(1) as f64).sqrt();
            let (mut sq, mut clipped) = (0.0f64, false);
            for r in ranges {
                let n = clip_slice(&mut values[r], per);
                sq += n * n;
                clipped |= n > per;
            }
            return Ok(ClipReport {
                norm: sq.sqrt(),
                clipped,
            });
        }
        let sq: f64 = ranges
            .iter()
            .map(|r| l2_norm(&values[r.clone()]).powi(2))
            .sum();
        let norm = sq.sqrt();
        for r in ranges {
            scale_to(&mut values[r], norm, self.max_norm);
        }
        Ok(ClipReport {
            norm,
            clipped: norm > self.max_norm,
        })
    }

    pub(crate) fn describe(&self) -> String {
        let scope = match (&self.patterns, self.per_layer) {
            (None, false) => String::new(),
            (None, true) => ",per-layer".into(),
            (Some(p), false) => format!(",{}", p.join("|")),
            (Some(p), true) => format!(",{},per-layer", p.join("|")),
        };
        format!("clip(l2<={}{scope})", self.max_norm)
    }
}

impl PrivacyMechanism for Clip {
    fn name(&self) -> String {
        self.describe()
    }

    /// Clipping alone is not differentially private: its cost is `None`.
    fn privatize(&mut self, update: &mut Parameters) -> fedcore::Result<PrivacyCost> {
        self.apply(update)?;
        Ok(PrivacyCost::None)
    }
}
