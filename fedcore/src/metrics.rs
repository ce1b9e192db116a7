//! Evaluation metrics: AUROC (per label, tie-aware, with "undefined" made
//! explicit) and accuracy.
//!
//! These are pure Rust and need no feature; the `tch` models use them in
//! `evaluate`, and servers can use them on predictions gathered any other way.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Area under the ROC curve of `scores` against binary `labels`.
///
/// Computed as the Mann-Whitney U statistic with mid-ranks, so tied scores
/// count one half, exactly as the trapezoidal ROC area does. Returns
/// `Ok(None)` when only one class is present (the AUROC is undefined then;
/// reporting 0.5 or NaN would hide that). Scores must be finite and the two
/// slices equally long. `O(n log n)`.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Result<Option<f64>> {
    if scores.len() != labels.len() {
        return Err(Error::InvalidInput(format!(
            "auroc: {} scores but {} labels",
            scores.len(),
            labels.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::InvalidInput(format!(
            "auroc: score #{i} is {}",
            scores[i]
        )));
    }
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return Ok(None);
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, mid-) ranks of the positives.
    let mut rank_sum = 0.0f64;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end share their mean.
        let mid_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end].iter().filter(|&&i| labels[i]).count();
        rank_sum += mid_rank * tied_positives as f64;
        start = end;
    }
    let p = positives as f64;
    let n = negatives as f64;
    Ok(Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n)))
}

/// Per-label AUROC of a multi-label problem and their macro mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelAurocs {
    /// One entry per label, `None` where that label is undefined (one class only).
    pub per_label: Vec<Option<f64>>,
    /// Mean over the defined labels; `None` if no label is defined.
    pub macro_mean: Option<f64>,
}

impl LabelAurocs {
    /// Labels whose AUROC is defined.
    pub fn defined(&self) -> usize {
        self.per_label.iter().flatten().count()
    }
}

/// AUROC of every column of row-major `scores` (`n x labels`) against the
/// 0/1 `targets` of the same shape.
pub fn multilabel_auroc(scores: &[f32], targets: &[f32], labels: usize) -> Result<LabelAurocs> {
    if labels == 0 || scores.len() != targets.len() || !scores.len().is_multiple_of(labels) {
        return Err(Error::InvalidInput(format!(
            "multilabel_auroc: {} scores and {} targets do not form rows of {labels} labels",
            scores.len(),
            targets.len()
        )));
    }
    let rows = scores.len() / labels;
    let mut per_label = Vec::with_capacity(labels);
    let mut column = Vec::with_capacity(rows);
    let mut truth = Vec::with_capacity(rows);
    for l in 0..labels {
        column.clear();
        truth.clear();
        for r in 0..rows {
            column.push(scores[r * labels + l]);
            truth.push(targets[r * labels + l] >= 0.5);
        }
        per_label.push(auroc(&column, &truth)?);
    }
    let defined: Vec<f64> = per_label.iter().flatten().copied().collect();
    let macro_mean =
        (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
    Ok(LabelAurocs {
        per_label,
        macro_mean,
    })
}

/// Fraction of rows of row-major `logits` (`n x classes`) whose arg-max is the
/// class in `targets`. `None` for no rows.
pub fn accuracy(logits: &[f32], targets: &[i64], classes: usize) -> Result<Option<f64>> {
    if classes == 0 || logits.len() != targets.len() * classes {
        return Err(Error::InvalidInput(format!(
            "accuracy: {} logits do not form {} rows of {classes} classes",
            logits.len(),
            targets.len()
        )));
    }
    if targets.is_empty() {
        return Ok(None);
    }
    let correct = logits
        .chunks_exact(classes)
        .zip(targets)
        .filter(|(row, t)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as i64);
            best == Some(**t)
        })
        .count();
    Ok(Some(correct as f64 / targets.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn auroc_perfect_inverse_and_hand_computed() {
        let y = [false, false, true, true];
        assert!(close(auroc(&[0.1, 0.2, 0.8, 0.9], &y).unwrap(), 1.0));
        assert!(close(auroc(&[0.9, 0.8, 0.2, 0.1], &y).unwrap(), 0.0));
        // Pairs (pos, neg): (0.35 vs 0.1 ✓, vs 0.4 ✗), (0.8 vs both ✓) = 3/4.
        let s = [0.1, 0.4, 0.35, 0.8];
        assert!(close(auroc(&s, &y).unwrap(), 0.75));
    }

    #[test]
    fn auroc_counts_ties_as_one_half() {
        // Every score equal: each pair is a tie, AUROC 0.5 exactly.
        let y = [true, false, true, false, false];
        assert!(close(auroc(&[0.3; 5], &y).unwrap(), 0.5));
        // pos {0.5, 0.9}, neg {0.5, 0.1}: pairs 0.5/0.5 = ½, 0.5/0.1 = 1,
        // 0.9/0.5 = 1, 0.9/0.1 = 1 → 3.5 / 4.
        let s = [0.5, 0.5, 0.9, 0.1];
        let y = [true, false, true, false];
        assert!(close(auroc(&s, &y).unwrap(), 0.875));
        // Three-way tie across classes: pos {0.2, 0.2}, neg {0.2, 0.0, 0.7}.
        // Pairs: each pos vs 0.2 = ½, vs 0.0 = 1, vs 0.7 = 0 → 2 × 1.5 / 6.
        let s = [0.2, 0.2, 0.2, 0.0, 0.7];
        let y = [true, true, false, false, false];
        assert!(close(auroc(&s, &y).unwrap(), 0.5));
    }

    #[test]
    fn auroc_matches_pair_counting() {
        // Brute force over all pairs on scores with many ties.
        let s: Vec<f32> = (0..40).map(|i| ((i * 7) % 5) as f32 / 4.0).collect();
        let y: Vec<bool> = (0..40).map(|i| (i * 13) % 3 == 0).collect();
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for i in 0..40 {
            for j in 0..40 {
                if y[i] && !y[j] {
                    pairs += 1.0;
                    wins += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!(close(auroc(&s, &y).unwrap(), wins / pairs));
    }

    #[test]
    fn auroc_undefined_for_one_class_and_errors_on_bad_input() {
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]).unwrap(), None);
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]).unwrap(), None);
        assert_eq!(auroc(&[], &[]).unwrap(), None);
        assert!(auroc(&[0.1], &[true, false]).is_err());
        let e = auroc(&[0.1, f32::NAN], &[true, false]).unwrap_err();
        assert!(e.to_string().contains("score #1"), "{e}");
    }

    #[test]
    fn multilabel_reports_undefined_labels_and_macro_over_the_rest() {
        // 2 labels, 4 rows; label 1 is all negative.
        let scores = [0.9, 0.1, 0.2, 0.3, 0.8, 0.5, 0.1, 0.7];
        let targets = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let a = multilabel_auroc(&scores, &targets, 2).unwrap();
        assert_eq!(a.per_label, vec![Some(1.0), None]);
        assert_eq!(a.macro_mean, Some(1.0));
        assert_eq!(a.defined(), 1);
        assert!(multilabel_auroc(&scores, &targets[..6], 2).is_err());
    }

    #[test]
    fn accuracy_by_argmax() {
        let logits = [0.1, 0.9, 0.8, 0.2, 0.3, 0.7];
        assert_eq!(accuracy(&logits, &[1, 0, 0], 2).unwrap(), Some(2.0 / 3.0));
        assert_eq!(accuracy(&[], &[], 2).unwrap(), None);
        assert!(accuracy(&logits, &[1, 0], 2).is_err());
    }
}
