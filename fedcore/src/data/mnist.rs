//! MNIST in its IDX format, gzip-compressed or raw.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::chestxray::data_error;
use super::{Batch, ImageDataset, Targets};
use crate::error::{Error, Result};

/// Which of the two MNIST sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MnistSplit {
    /// The 60 000 training images (`train-*`).
    Train,
    /// The 10 000 test images (`t10k-*`).
    Test,
}

/// The mean and standard deviation of MNIST's training pixels in `[0, 1]`.
pub const MNIST_MEAN_STD: (f32, f32) = (0.1307, 0.3081);

/// MNIST images and labels, in memory (47 MB for the training set).
#[derive(Debug, Clone)]
pub struct Mnist {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Mnist {
    /// Loads `train-images-idx3-ubyte` / `train-labels-idx1-ubyte` (or the
    /// `t10k-` pair) from `dir`, each with or without `.gz`.
    pub fn load(dir: impl AsRef<Path>, split: MnistSplit) -> Result<Self> {
        let prefix = match split {
            MnistSplit::Train => "train",
            MnistSplit::Test => "t10k",
        };
        let dir = dir.as_ref();
        let images = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        Self::from_idx(&read_maybe_gz(&images)?, &read_maybe_gz(&labels)?).map_err(|e| match e {
            Error::InvalidInput(reason) => data_error(&images, None, reason),
            other => other,
        })
    }

    /// Parses the two IDX buffers (already decompressed).
    pub fn from_idx(images: &[u8], labels: &[u8]) -> Result<Self> {
        let (dims, pixels) = parse_idx(images, 3)?;
        let (ldims, labels) = parse_idx(labels, 1)?;
        if dims[0] != ldims[0] {
            return Err(Error::InvalidInput(format!(
                "{} images but {} labels",
                dims[0], ldims[0]
            )));
        }
        if let Some(i) = labels.iter().position(|&l| l > 9) {
            return Err(Error::InvalidInput(format!("label #{i} is {}", labels[i])));
        }
        Ok(Self {
            pixels: pixels.to_vec(),
            labels: labels.to_vec(),
            rows: dims[1],
            cols: dims[2],
        })
    }

    /// The digit of image `i`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// All digits.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl ImageDataset for Mnist {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        [1, self.rows, self.cols]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let per = self.rows * self.cols;
        let (mean, std) = MNIST_MEAN_STD;
        let mut images = Vec::with_capacity(indices.len() * per);
        let mut classes = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::InvalidInput(format!(
                    "image {i} out of range ({})",
                    self.len()
                )));
            }
            images.extend(
                self.pixels[i * per..(i + 1) * per]
                    .iter()
                    .map(|&p| (f32::from(p) / 255.0 - mean) / std),
            );
            classes.push(i64::from(self.labels[i]));
        }
        Ok(Batch {
            images,
            shape: [indices.len(), 1, self.rows, self.cols],
            targets: Targets::Classes(classes),
        })
    }
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    [format!("{stem}.gz"), stem.to_owned()]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            data_error(
                &dir.join(stem),
                None,
                "not found (with or without .gz)".into(),
            )
        })
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| data_error(path, None, e.to_string()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| data_error(path, None, format!("bad gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Checks an unsigned-byte IDX header with `ndims` dimensions and returns the
/// dimensions and the data.
fn parse_idx(buf: &[u8], ndims: usize) -> Result<(Vec<usize>, &[u8])> {
    let header = 4 + 4 * ndims;
    if buf.len() < header {
        return Err(Error::InvalidInput(format!(
            "IDX file of {} bytes is shorter than its header",
            buf.len()
        )));
    }
    if buf[0] != 0 || buf[1] != 0 || buf[2] != 0x08 || usize::from(buf[3]) != ndims {
        return Err(Error::InvalidInput(format!(
            "not an unsigned-byte IDX file with {ndims} dimension(s) (magic {:02x?})",
            &buf[..4]
        )));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| {
            let b = &buf[4 + 4 * d..8 + 4 * d];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let data = &buf[header..];
    if expected != Some(data.len()) {
        return Err(Error::InvalidInput(format!(
            "IDX header says {dims:?} ({expected:?} bytes) but {} bytes follow",
            data.len()
        )));
    }
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_raw_and_gzip_and_normalizes() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..3 * 2 * 2).map(|v| (v * 20) as u8).collect();
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx(&[3, 2, 2], &pixels),
        )
        .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&idx(&[3], &[7, 0, 9])).unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte.gz"),
            gz.finish().unwrap(),
        )
        .unwrap();
        let m = Mnist::load(dir.path(), MnistSplit::Test).unwrap();
        assert_eq!((m.len(), m.image_shape()), (3, [1, 2, 2]));
        let b = m.batch(&[2, 0]).unwrap();
        assert_eq!(b.targets, Targets::Classes(vec![9, 7]));
        let (mean, std) = MNIST_MEAN_STD;
        assert!((b.images[0] - (160.0 / 255.0 - mean) / std).abs() < 1e-6);
        assert!(Mnist::load(dir.path(), MnistSplit::Train).is_err());
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        let ok = idx(&[1, 2, 2], &[0; 4]);
        let e = |r: Result<Mnist>| r.unwrap_err().to_string();
        assert!(e(Mnist::from_idx(&ok[..10], &idx(&[1], &[0]))).contains("shorter"));
        assert!(
            e(Mnist::from_idx(&idx(&[1, 2, 2], &[0; 3]), &idx(&[1], &[0])))
                .contains("bytes follow")
        );
        assert!(e(Mnist::from_idx(&ok, &idx(&[2], &[0, 1]))).contains("1 images but 2 labels"));
        assert!(e(Mnist::from_idx(&ok, &idx(&[1], &[10]))).contains("label #0 is 10"));
        assert!(e(Mnist::from_idx(&idx(&[1], &[0; 12]), &idx(&[1], &[0]))).contains("magic"));
        // Huge dimensions do not overflow or allocate.
        assert!(
            Mnist::from_idx(&idx(&[u32::MAX, u32::MAX, u32::MAX], &[]), &idx(&[1], &[0])).is_err()
        );
    }
}
