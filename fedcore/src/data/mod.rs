//! Data for the `tch` models (feature `data`): image data sets that stream
//! batches, the ChestX-ray14 and MNIST loaders, a synthetic chest X-ray
//! generator and the seeded Dirichlet partitioner that turns one data set into
//! non-IID hospitals.
//!
//! Everything here is plain Rust (no libtorch): a [`Batch`] is an `f32`
//! NCHW buffer plus its targets, so the loaders can be tested and used without
//! a model.

pub mod chestxray;
pub mod mnist;
pub mod partition;
pub mod synthetic;

use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

pub use chestxray::{ChestXray14, ChestXrayConfig, Entry, FINDINGS};
pub use mnist::Mnist;
pub use partition::{Partition, PartitionConfig, dirichlet_label_split, dirichlet_partition};
pub use synthetic::{SyntheticXrays, synthetic_digits, write_synthetic_chestxray};

/// What a model is asked to predict for each image.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// One class index per image (MNIST): cross-entropy, accuracy.
    Classes(Vec<i64>),
    /// `labels` 0/1 values per image, row-major (ChestX-ray14):
    /// binary cross-entropy with logits, per-label AUROC.
    MultiLabel {
        /// `images x labels` values in `{0, 1}`.
        values: Vec<f32>,
        /// Labels per image.
        labels: usize,
    },
}

impl Targets {
    /// Number of images these targets describe.
    pub fn len(&self) -> usize {
        match self {
            Targets::Classes(c) => c.len(),
            Targets::MultiLabel { values, labels } => values.len() / (*labels).max(1),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A mini-batch: images as `f32`, NCHW, row-major, already normalized.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `shape[0] * shape[1] * shape[2] * shape[3]` values.
    pub images: Vec<f32>,
    /// `[images, channels, height, width]`.
    pub shape: [usize; 4],
    /// One target per image.
    pub targets: Targets,
}

/// A data set of images that loads any subset on demand.
///
/// Implementations decode lazily (ChestX-ray14 reads PNGs per batch) or hold
/// everything in memory (MNIST); a model only ever sees batches.
pub trait ImageDataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;

    /// True when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[channels, height, width]` of every image.
    fn image_shape(&self) -> [usize; 3];

    /// Loads the images at `indices` (each `< len()`), in that order.
    fn batch(&self, indices: &[usize]) -> Result<Batch>;
}

/// The data one client trains or evaluates on: a shared source and the
/// indices that belong to this client. Cheap to clone.
#[derive(Clone)]
pub struct DataSplit {
    source: Arc<dyn ImageDataset>,
    indices: Arc<[usize]>,
}

impl std::fmt::Debug for DataSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataSplit")
            .field("images", &self.indices.len())
            .field("image_shape", &self.source.image_shape())
            .finish()
    }
}

impl DataSplit {
    /// Every image of `source`.
    pub fn all(source: Arc<dyn ImageDataset>) -> Self {
        let indices = (0..source.len()).collect();
        Self { source, indices }
    }

    /// The images of `source` at `indices`; an index out of range is an error.
    pub fn subset(source: Arc<dyn ImageDataset>, indices: Vec<usize>) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= source.len()) {
            return Err(Error::InvalidInput(format!(
                "index {bad} is out of range for a data set of {} images",
                source.len()
            )));
        }
        Ok(Self {
            source,
            indices: indices.into(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// `[channels, height, width]`.
    pub fn image_shape(&self) -> [usize; 3] {
        self.source.image_shape()
    }

    /// The indices into the source.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// The underlying data set.
    pub fn source(&self) -> &Arc<dyn ImageDataset> {
        &self.source
    }

    /// Batches of at most `batch_size` images, in order or shuffled with
    /// `shuffle_seed`. Each batch is loaded when the iterator reaches it, so
    /// only one batch is in memory at a time.
    pub fn batches(
        &self,
        batch_size: usize,
        shuffle_seed: Option<u64>,
    ) -> impl Iterator<Item = Result<Batch>> + '_ {
        let mut order = self.indices.to_vec();
        if let Some(seed) = shuffle_seed {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        let size = batch_size.max(1);
        let chunks: Vec<Vec<usize>> = order.chunks(size).map(<[usize]>::to_vec).collect();
        chunks.into_iter().map(move |idx| self.source.batch(&idx))
    }
}

/// Images held in memory, for tests and small generated sets.
#[derive(Debug, Clone)]
pub struct InMemoryImages {
    images: Vec<f32>,
    shape: [usize; 3],
    targets: Targets,
}

impl InMemoryImages {
    /// `images` holds `targets.len()` images of `shape`, NCHW.
    pub fn new(images: Vec<f32>, shape: [usize; 3], targets: Targets) -> Result<Self> {
        let per = shape.iter().product::<usize>();
        if per == 0 || images.len() != per * targets.len() {
            return Err(Error::InvalidInput(format!(
                "{} values are not {} images of shape {shape:?}",
                images.len(),
                targets.len()
            )));
        }
        if let Targets::MultiLabel { values, labels } = &targets
            && (*labels == 0 || !values.len().is_multiple_of(*labels))
        {
            return Err(Error::InvalidInput(format!(
                "{} target values do not form rows of {labels} labels",
                values.len()
            )));
        }
        Ok(Self {
            images,
            shape,
            targets,
        })
    }
}

impl ImageDataset for InMemoryImages {
    fn len(&self) -> usize {
        self.targets.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let per = self.shape.iter().product::<usize>();
        let mut images = Vec::with_capacity(per * indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::InvalidInput(format!(
                    "image {i} out of range ({} images)",
                    self.len()
                )));
            }
            images.extend_from_slice(&self.images[i * per..(i + 1) * per]);
        }
        let targets = select_targets(&self.targets, indices);
        let [c, h, w] = self.shape;
        Ok(Batch {
            images,
            shape: [indices.len(), c, h, w],
            targets,
        })
    }
}

/// Label flipping, the data-level Byzantine attack: class `c` becomes
/// `classes - 1 - c`; multi-label targets become `1 - v`. Images are unchanged.
pub struct LabelFlip {
    inner: Arc<dyn ImageDataset>,
    classes: usize,
}

impl LabelFlip {
    /// Flips the labels of `inner`, whose classes are `0..classes`
    /// (ignored for multi-label data).
    pub fn new(inner: Arc<dyn ImageDataset>, classes: usize) -> Self {
        Self { inner, classes }
    }
}

impl ImageDataset for LabelFlip {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        self.inner.image_shape()
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let mut b = self.inner.batch(indices)?;
        b.targets = match b.targets {
            Targets::Classes(c) => {
                let k = self.classes as i64;
                if let Some(bad) = c.iter().find(|&&v| v < 0 || v >= k) {
                    return Err(Error::InvalidInput(format!(
                        "class {bad} out of range for flipping {k} classes"
                    )));
                }
                Targets::Classes(c.into_iter().map(|v| k - 1 - v).collect())
            }
            Targets::MultiLabel { values, labels } => Targets::MultiLabel {
                values: values.into_iter().map(|v| 1.0 - v).collect(),
                labels,
            },
        };
        Ok(b)
    }
}

/// The targets at `indices` (all `< targets.len()`).
pub(crate) fn select_targets(targets: &Targets, indices: &[usize]) -> Targets {
    match targets {
        Targets::Classes(c) => Targets::Classes(indices.iter().map(|&i| c[i]).collect()),
        Targets::MultiLabel { values, labels } => Targets::MultiLabel {
            values: indices
                .iter()
                .flat_map(|&i| values[i * labels..(i + 1) * labels].iter().copied())
                .collect(),
            labels: *labels,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Arc<dyn ImageDataset> {
        let images: Vec<f32> = (0..5 * 4).map(|v| v as f32).collect();
        Arc::new(
            InMemoryImages::new(images, [1, 2, 2], Targets::Classes(vec![0, 1, 2, 3, 4])).unwrap(),
        )
    }

    #[test]
    fn batches_cover_every_image_once_and_shuffle_by_seed() {
        let split = DataSplit::subset(tiny(), vec![4, 0, 2]).unwrap();
        let seen: Vec<i64> = split
            .batches(2, None)
            .flat_map(|b| match b.unwrap().targets {
                Targets::Classes(c) => c,
                Targets::MultiLabel { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(seen, [4, 0, 2]);
        let order = |seed| -> Vec<i64> {
            split
                .batches(3, Some(seed))
                .flat_map(|b| match b.unwrap().targets {
                    Targets::Classes(c) => c,
                    Targets::MultiLabel { .. } => unreachable!(),
                })
                .collect()
        };
        assert_eq!(order(7), order(7));
        let mut sorted = order(7);
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 2, 4]);
        let b = split.batches(2, None).next().unwrap().unwrap();
        assert_eq!(b.shape, [2, 1, 2, 2]);
        assert_eq!(&b.images[..4], &[16.0, 17.0, 18.0, 19.0]);
    }

    #[test]
    fn label_flip_maps_classes_and_labels() {
        let flipped = LabelFlip::new(tiny(), 10);
        let b = flipped.batch(&[0, 3]).unwrap();
        assert_eq!(b.targets, Targets::Classes(vec![9, 6]));
        let ml = InMemoryImages::new(
            vec![0.0; 4],
            [1, 2, 2],
            Targets::MultiLabel {
                values: vec![1.0, 0.0],
                labels: 2,
            },
        )
        .unwrap();
        let b = LabelFlip::new(Arc::new(ml), 0).batch(&[0]).unwrap();
        assert_eq!(
            b.targets,
            Targets::MultiLabel {
                values: vec![0.0, 1.0],
                labels: 2
            }
        );
        assert!(LabelFlip::new(tiny(), 3).batch(&[4]).is_err());
    }

    #[test]
    fn bad_shapes_and_indices_are_errors() {
        assert!(DataSplit::subset(tiny(), vec![5]).is_err());
        assert!(
            InMemoryImages::new(vec![0.0; 7], [1, 2, 2], Targets::Classes(vec![0, 1])).is_err()
        );
        let t = Targets::MultiLabel {
            values: vec![0.0; 5],
            labels: 2,
        };
        assert!(InMemoryImages::new(vec![0.0; 8], [1, 2, 2], t).is_err());
    }
}
