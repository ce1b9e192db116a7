//! Splitting one data set into hospitals: by group (patient), non-IID by a
//! Dirichlet distribution over label profiles, seeded.
//!
//! For every profile `k` (a patient's dominant finding, an MNIST digit) the
//! partitioner draws hospital shares `p_k ~ Dirichlet(alpha, ..., alpha)` and
//! deals that profile's groups out in those proportions (Hsu et al., 2019).
//! Whole groups move together, so no patient is in two hospitals. Small
//! `alpha` (0.1) gives hospitals that see mostly a few profiles; large
//! `alpha` (100) is close to IID.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::error::{Error, Result};

/// Settings of [`dirichlet_partition`].
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionConfig {
    /// Number of hospitals.
    pub hospitals: usize,
    /// Dirichlet concentration; smaller is more skewed.
    pub alpha: f64,
    /// Seed; the same inputs and seed give the same partition.
    pub seed: u64,
    /// Every hospital gets at least this many items; draws that miss it are
    /// redrawn (up to 1000 times, then it is an error).
    pub min_items: usize,
}

impl Default for PartitionConfig {
    /// 3 hospitals, `alpha = 0.5`, seed 0, at least one item each.
    fn default() -> Self {
        Self {
            hospitals: 3,
            alpha: 0.5,
            seed: 0,
            min_items: 1,
        }
    }
}

/// Which items (indices into the source) went to which hospital.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `hospitals[h]` holds the item indices of hospital `h`, ascending.
    pub hospitals: Vec<Vec<usize>>,
}

impl Partition {
    /// Per hospital, how many items carry each of `classes` labels;
    /// `labels_of(item)` lists an item's labels (several for multi-label data).
    pub fn histograms<I>(&self, classes: usize, labels_of: impl Fn(usize) -> I) -> Vec<Vec<usize>>
    where
        I: IntoIterator<Item = usize>,
    {
        self.hospitals
            .iter()
            .map(|items| {
                let mut h = vec![0; classes];
                for &i in items {
                    for l in labels_of(i) {
                        if l < classes {
                            h[l] += 1;
                        }
                    }
                }
                h
            })
            .collect()
    }

    /// A text table of [`Partition::histograms`] with a column per class.
    pub fn format_histograms(histograms: &[Vec<usize>], class_names: &[&str]) -> String {
        let width = class_names
            .iter()
            .map(|n| n.len())
            .max()
            .unwrap_or(0)
            .max(8);
        let mut out = format!("{:width$}", "label");
        for h in 0..histograms.len() {
            out.push_str(&format!(" {:>8}", format!("h{h}")));
        }
        out.push('\n');
        for (c, name) in class_names.iter().enumerate() {
            out.push_str(&format!("{name:width$}"));
            for h in histograms {
                out.push_str(&format!(" {:>8}", h.get(c).copied().unwrap_or(0)));
            }
            out.push('\n');
        }
        out
    }
}

/// Partitions items into hospitals.
///
/// `groups[i]` is item `i`'s group (patient ID): all items of a group go to
/// the same hospital. `profiles[i]` is item `i`'s label profile; a group's
/// profile is the most common one among its items (ties to the smallest).
pub fn dirichlet_partition(
    groups: &[u64],
    profiles: &[usize],
    config: &PartitionConfig,
) -> Result<Partition> {
    if groups.len() != profiles.len() {
        return Err(Error::InvalidInput(format!(
            "{} groups but {} profiles",
            groups.len(),
            profiles.len()
        )));
    }
    if config.hospitals == 0 || !(config.alpha.is_finite() && config.alpha > 0.0) {
        return Err(Error::InvalidConfig(
            "partition needs at least one hospital and a positive, finite alpha".into(),
        ));
    }
    // Items of each group, and each group's profile; BTreeMap keeps it seeded-deterministic.
    let mut members: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, &g) in groups.iter().enumerate() {
        members.entry(g).or_default().push(i);
    }
    if members.len() < config.hospitals
        || groups.len() < config.hospitals.saturating_mul(config.min_items)
    {
        return Err(Error::InvalidConfig(format!(
            "{} groups ({} items) cannot fill {} hospitals with at least {} items each",
            members.len(),
            groups.len(),
            config.hospitals,
            config.min_items
        )));
    }
    let mut by_profile: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for (&g, items) in &members {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in items {
            *counts.entry(profiles[i]).or_default() += 1;
        }
        let best = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(&p, _)| p)
            .unwrap_or_default();
        by_profile.entry(best).or_default().push(g);
    }
    let gamma =
        Gamma::new(config.alpha, 1.0).map_err(|e| Error::InvalidConfig(format!("alpha: {e}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    for _attempt in 0..1000 {
        let mut hospitals: Vec<Vec<usize>> = vec![Vec::new(); config.hospitals];
        for pgroups in by_profile.values() {
            let mut pgroups = pgroups.clone();
            pgroups.shuffle(&mut rng);
            let mut shares: Vec<f64> = (0..config.hospitals)
                .map(|_| gamma.sample(&mut rng))
                .collect();
            let total: f64 = shares.iter().sum();
            if total > 0.0 && total.is_finite() {
                shares.iter_mut().for_each(|s| *s /= total);
            } else {
                // Every gamma draw underflowed (tiny alpha): one hospital takes all.
                let h = rng.random_range(0..config.hospitals);
                shares = (0..config.hospitals)
                    .map(|i| f64::from(u8::from(i == h)))
                    .collect();
            }
            // Cumulative cut points over the shuffled groups.
            let n = pgroups.len();
            let mut start = 0;
            let mut cum = 0.0;
            for (h, share) in shares.iter().enumerate() {
                cum += share;
                let end = if h + 1 == config.hospitals {
                    n
                } else {
                    ((cum * n as f64).round() as usize).clamp(start, n)
                };
                for g in &pgroups[start..end] {
                    hospitals[h].extend_from_slice(&members[g]);
                }
                start = end;
            }
        }
        if hospitals.iter().all(|h| h.len() >= config.min_items) {
            hospitals.iter_mut().for_each(|h| h.sort_unstable());
            return Ok(Partition { hospitals });
        }
    }
    Err(Error::InvalidConfig(format!(
        "no Dirichlet(alpha = {}) draw in 1000 gave every one of {} hospitals {} items; raise alpha or lower min_items",
        config.alpha, config.hospitals, config.min_items
    )))
}

/// Splits items among many clients of equal size, each with its own label
/// mix: client `c` draws proportions `q_c ~ Dirichlet(alpha, ..., alpha)`
/// over the labels and then each of its `per_client` items by a label drawn
/// from `q_c` (the next unused item of that label; an exhausted label is
/// left out of later draws). This is the split of Hsu et al. (2019, "Measuring
/// the effects of non-identical data distribution") for thousands of
/// clients with a few items each, where [`dirichlet_partition`] (label
/// shares over clients) would leave clients empty. Items are taken in a
/// seeded shuffle; the same inputs and seed give the same split.
///
/// Needs `clients * per_client <= labels.len()`; items left over belong to
/// no client.
pub fn dirichlet_label_split(
    labels: &[usize],
    clients: usize,
    per_client: usize,
    alpha: f64,
    seed: u64,
) -> Result<Partition> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::InvalidConfig(format!(
            "alpha must be positive and finite, got {alpha}"
        )));
    }
    if clients.saturating_mul(per_client) > labels.len() {
        return Err(Error::InvalidConfig(format!(
            "{clients} clients of {per_client} items need {} items, there are {}",
            clients.saturating_mul(per_client),
            labels.len()
        )));
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| Error::InvalidConfig(format!("alpha: {e}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // The items of each label, shuffled; each client takes from the back.
    let mut pools: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        pools.entry(l).or_default().push(i);
    }
    let mut pools: Vec<Vec<usize>> = pools.into_values().collect();
    pools.iter_mut().for_each(|p| p.shuffle(&mut rng));
    let mut hospitals = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut q: Vec<f64> = (0..pools.len()).map(|_| gamma.sample(&mut rng)).collect();
        let mut items = Vec::with_capacity(per_client);
        for _ in 0..per_client {
            let weight = |q: &[f64], k: usize| if pools[k].is_empty() { 0.0 } else { q[k] };
            let mut total: f64 = (0..pools.len()).map(|k| weight(&q, k)).sum();
            if !(total > 0.0 && total.is_finite()) {
                // Every weight left underflowed (tiny alpha): uniform over the
                // labels that have items.
                q = vec![1.0; pools.len()];
                total = (0..pools.len()).map(|k| weight(&q, k)).sum();
            }
            let mut x = rng.random_range(0.0..total);
            let mut label = None;
            for k in 0..pools.len() {
                let w = weight(&q, k);
                if w > 0.0 {
                    label = Some(k);
                    if x < w {
                        break;
                    }
                    x -= w;
                }
            }
            let k = label.expect("clients * per_client <= items, so an item is left");
            items.push(pools[k].pop().expect("weighted labels have items"));
        }
        items.sort_unstable();
        hospitals.push(items);
    }
    Ok(Partition { hospitals })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn check_no_group_split(groups: &[u64], p: &Partition) {
        let mut home: HashMap<u64, usize> = HashMap::new();
        let mut seen = vec![false; groups.len()];
        for (h, items) in p.hospitals.iter().enumerate() {
            for &i in items {
                assert!(!seen[i], "item {i} in two hospitals");
                seen[i] = true;
                let prev = home.insert(groups[i], h);
                assert!(
                    prev.is_none() || prev == Some(h),
                    "group {} split",
                    groups[i]
                );
            }
        }
        assert!(seen.iter().all(|&s| s), "an item was lost");
    }

    #[test]
    fn the_label_split_gives_every_client_its_items_once_and_skews_with_alpha() {
        let labels: Vec<usize> = (0..3000).map(|i| i % 10).collect();
        let split = |alpha, seed| dirichlet_label_split(&labels, 400, 6, alpha, seed).unwrap();
        let p = split(0.5, 1);
        assert_eq!(p.hospitals.len(), 400);
        let mut seen = vec![false; labels.len()];
        for h in &p.hospitals {
            assert_eq!(h.len(), 6);
            for &i in h {
                assert!(!seen[i], "item {i} twice");
                seen[i] = true;
            }
        }
        assert_eq!(p, split(0.5, 1));
        assert_ne!(p, split(0.5, 2));
        // Distinct labels per client: few with alpha 0.1, most of 6 with 100.
        let distinct = |p: &Partition| {
            p.hospitals
                .iter()
                .map(|h| {
                    let mut l: Vec<usize> = h.iter().map(|&i| labels[i]).collect();
                    l.sort_unstable();
                    l.dedup();
                    l.len() as f64
                })
                .sum::<f64>()
                / p.hospitals.len() as f64
        };
        let (skewed, flat) = (distinct(&split(0.1, 3)), distinct(&split(100.0, 3)));
        assert!(skewed < 2.5 && flat > 4.0, "{skewed} {flat}");
        // Every item taken: labels run out and the rest comes from others.
        let all = dirichlet_label_split(&labels, 500, 6, 0.1, 4).unwrap();
        assert_eq!(all.hospitals.iter().map(Vec::len).sum::<usize>(), 3000);
        assert!(dirichlet_label_split(&labels, 501, 6, 0.5, 0).is_err());
        assert!(dirichlet_label_split(&labels, 10, 6, 0.0, 0).is_err());
    }

    proptest! {
        #[test]
        fn never_splits_a_patient_and_is_seeded(
            items in proptest::collection::vec((0u64..40, 0usize..5), 20..200),
            hospitals in 1usize..6,
            alpha in 0.05f64..50.0,
            seed in any::<u64>(),
        ) {
            let (groups, profiles): (Vec<u64>, Vec<usize>) = items.into_iter().unzip();
            let config = PartitionConfig { hospitals, alpha, seed, min_items: 1 };
            match dirichlet_partition(&groups, &profiles, &config) {
                Ok(p) => {
                    prop_assert_eq!(p.hospitals.len(), hospitals);
                    check_no_group_split(&groups, &p);
                    prop_assert_eq!(dirichlet_partition(&groups, &profiles, &config).unwrap(), p);
                }
                // Only possible when there are too few groups to go round.
                Err(e) => prop_assert!(e.to_string().contains("cannot fill") || e.to_string().contains("no Dirichlet"), "{}", e),
            }
        }
    }

    #[test]
    fn small_alpha_is_skewed_large_alpha_is_balanced() {
        // 1000 single-item groups, 10 profiles of 100 each, 5 hospitals.
        let groups: Vec<u64> = (0..1000).collect();
        let profiles: Vec<usize> = (0..1000).map(|i| i % 10).collect();
        let spread = |alpha| {
            let config = PartitionConfig {
                hospitals: 5,
                alpha,
                seed: 3,
                min_items: 1,
            };
            let p = dirichlet_partition(&groups, &profiles, &config).unwrap();
            let h = p.histograms(10, |i| [profiles[i]]);
            // Mean over hospitals of the largest class share.
            h.iter()
                .map(|row| {
                    *row.iter().max().unwrap() as f64 / row.iter().sum::<usize>().max(1) as f64
                })
                .sum::<f64>()
                / 5.0
        };
        let (skewed, flat) = (spread(0.1), spread(1000.0));
        assert!(
            skewed > 0.4,
            "alpha 0.1 should concentrate classes: {skewed}"
        );
        assert!(flat < 0.15, "alpha 1000 should be near uniform: {flat}");
        let with_seed = |seed| {
            let config = PartitionConfig {
                seed,
                ..PartitionConfig::default()
            };
            dirichlet_partition(&groups, &profiles, &config).unwrap()
        };
        assert_ne!(with_seed(4), with_seed(3), "the seed matters");
    }

    #[test]
    fn histogram_table_and_bad_settings() {
        let p = Partition {
            hospitals: vec![vec![0, 1], vec![2]],
        };
        let h = p.histograms(2, |i| if i == 1 { vec![0, 1] } else { vec![0] });
        assert_eq!(h, vec![vec![2, 1], vec![1, 0]]);
        let table = Partition::format_histograms(&h, &["Mass", "Hernia"]);
        assert!(table.contains("Hernia") && table.contains("h1"), "{table}");
        let groups = [1, 1, 2];
        let bad = |c: PartitionConfig| dirichlet_partition(&groups, &[0, 0, 1], &c).is_err();
        assert!(
            bad(PartitionConfig {
                hospitals: 3,
                ..PartitionConfig::default()
            }),
            "2 patients, 3 hospitals"
        );
        assert!(bad(PartitionConfig {
            alpha: 0.0,
            ..PartitionConfig::default()
        }));
        assert!(bad(PartitionConfig {
            hospitals: 0,
            ..PartitionConfig::default()
        }));
        assert!(dirichlet_partition(&groups, &[0], &PartitionConfig::default()).is_err());
    }
}
