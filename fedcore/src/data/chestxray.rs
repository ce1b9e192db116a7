//! NIH ChestX-ray14: `Data_Entry_2017.csv` (or `_v2020`), the `images/`
//! folder and the official `train_val_list.txt` / `test_list.txt`.
//!
//! Rows are parsed up front (112 120 rows, a few MB); images are decoded only
//! when a batch asks for them, in parallel, converted to gray, resized and
//! normalized. Nothing else is kept in memory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use super::{Batch, ImageDataset, Targets};
use crate::error::{Error, Result};

/// The 14 findings, in the order of the label vector (the NIH order).
pub const FINDINGS: [&str; 14] = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
];

/// The CSV's value for an image with none of the 14 findings.
pub(crate) const NO_FINDING: &str = "No Finding";

/// One row of `Data_Entry_2017.csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File name, e.g. `00000001_000.png`.
    pub image: String,
    /// Bit `i` set when finding `FINDINGS[i]` is present; 0 is "No Finding".
    pub labels: u16,
    /// `Follow-up #`.
    pub follow_up: u32,
    /// `Patient ID`.
    pub patient: u32,
    /// `Patient Age` in years, if it parses.
    pub age: Option<u16>,
    /// `Patient Gender` (`M` / `F`).
    pub sex: String,
    /// `View Position` (`PA` / `AP`).
    pub view: String,
}

impl Entry {
    /// Whether finding `i` (an index into [`FINDINGS`]) is present.
    pub fn has(&self, i: usize) -> bool {
        self.labels & (1 << i) != 0
    }

    /// The 14-element 0/1 label vector.
    pub fn label_vector(&self) -> [f32; 14] {
        std::array::from_fn(|i| if self.has(i) { 1.0 } else { 0.0 })
    }
}

/// Parses `Finding Labels` (`|`-separated; `No Finding` alone means none).
pub fn parse_findings(field: &str) -> std::result::Result<u16, String> {
    let field = field.trim();
    if field == NO_FINDING {
        return Ok(0);
    }
    let mut bits = 0u16;
    for name in field.split('|') {
        let name = name.trim();
        if name == NO_FINDING {
            return Err(format!(
                "`{NO_FINDING}` combined with findings in `{field}`"
            ));
        }
        match FINDINGS.iter().position(|f| *f == name) {
            Some(i) => bits |= 1 << i,
            None => return Err(format!("unknown label `{name}` in `{field}`")),
        }
    }
    Ok(bits)
}

/// Reads the rows of a `Data_Entry_2017.csv` (either release). A bad row is
/// an error naming the file and its line.
pub fn read_entries(path: &Path) -> Result<Vec<Entry>> {
    let file = std::fs::File::open(path).map_err(|e| data_error(path, None, e.to_string()))?;
    parse_entries(file, path)
}

/// [`read_entries`] on any reader; `path` is only used in error messages.
pub fn parse_entries(reader: impl std::io::Read, path: &Path) -> Result<Vec<Entry>> {
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(reader);
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for (i, record) in csv.records().enumerate() {
        let line = i as u64 + 1;
        let record = record.map_err(|e| data_error(path, Some(line), e.to_string()))?;
        if i == 0 {
            let ok =
                record.get(0) == Some("Image Index") && record.get(1) == Some("Finding Labels");
            if !ok {
                return Err(data_error(
                    path,
                    Some(line),
                    "expected the header `Image Index,Finding Labels,...`".into(),
                ));
            }
            continue;
        }
        if record.len() < 7 {
            return Err(data_error(
                path,
                Some(line),
                format!("{} fields, expected at least 7", record.len()),
            ));
        }
        let bad = |what: &str| data_error(path, Some(line), what.to_owned());
        let image = record[0].trim().to_owned();
        if image.is_empty() || image.contains(['/', '\\']) || image.starts_with('.') {
            return Err(bad(&format!("bad image name `{image}`")));
        }
        if !seen.insert(image.clone()) {
            return Err(bad(&format!("image `{image}` listed twice")));
        }
        let labels = parse_findings(&record[1]).map_err(|m| bad(&m))?;
        let follow_up = record[2]
            .trim()
            .parse()
            .map_err(|_| bad(&format!("bad `Follow-up #` `{}`", &record[2])))?;
        let patient = record[3]
            .trim()
            .parse()
            .map_err(|_| bad(&format!("bad `Patient ID` `{}`", &record[3])))?;
        // The 2017 release writes some ages as `058Y`; the v2020 one as `58`.
        let age = record[4].trim().trim_end_matches(['Y', 'y']).parse().ok();
        entries.push(Entry {
            image,
            labels,
            follow_up,
            patient,
            age,
            sex: record[5].trim().to_owned(),
            view: record[6].trim().to_owned(),
        });
    }
    Ok(entries)
}

/// Reads an official split list (one image name per line).
pub fn read_split_list(path: &Path) -> Result<HashSet<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| data_error(path, None, e.to_string()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// How images become tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ChestXrayConfig {
    /// Images are resized to `size x size`.
    pub size: u32,
    /// 1 (gray) or 3 (gray repeated, for RGB-pretrained weights).
    pub channels: usize,
    /// Per-channel mean subtracted after scaling pixels to `[0, 1]`.
    pub mean: f32,
    /// Per-channel standard deviation divided by.
    pub std: f32,
}

impl Default for ChestXrayConfig {
    /// 224 x 224, one channel, ImageNet's mean and standard deviation
    /// averaged over its three channels (0.449, 0.226).
    fn default() -> Self {
        Self {
            size: 224,
            channels: 1,
            mean: 0.449,
            std: 0.226,
        }
    }
}

/// The ChestX-ray14 data set on disk.
#[derive(Debug, Clone)]
pub struct ChestXray14 {
    root: PathBuf,
    images: PathBuf,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    config: ChestXrayConfig,
}

/// The CSV names [`ChestXray14::open`] looks for, in order.
pub(crate) const ENTRY_FILES: [&str; 2] = ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"];

impl ChestXray14 {
    /// Opens `root`: the first of `Data_Entry_2017_v2020.csv` and
    /// `Data_Entry_2017.csv` found there, and the images
    /// in `root/images`.
    pub fn open(root: impl AsRef<Path>, config: ChestXrayConfig) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let csv = ENTRY_FILES
            .iter()
            .map(|f| root.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                data_error(&root, None, format!("no {} here", ENTRY_FILES.join(" or ")))
            })?;
        let entries = read_entries(&csv)?;
        Self::from_entries(root.clone(), root.join("images"), entries, config)
    }

    /// A data set from rows already read, with images in `images`.
    pub fn from_entries(
        root: PathBuf,
        images: PathBuf,
        entries: Vec<Entry>,
        config: ChestXrayConfig,
    ) -> Result<Self> {
        if config.size == 0 || !(config.channels == 1 || config.channels == 3) {
            return Err(Error::InvalidConfig(format!(
                "image size must be positive and channels 1 or 3, got {} and {}",
                config.size, config.channels
            )));
        }
        if !(config.std.is_finite() && config.std > 0.0 && config.mean.is_finite()) {
            return Err(Error::InvalidConfig(
                "normalization std must be positive".into(),
            ));
        }
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.image.clone(), i))
            .collect();
        Ok(Self {
            root,
            images,
            entries,
            by_name,
            config,
        })
    }

    /// Every row.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The row for an image name.
    pub fn position(&self, image: &str) -> Option<usize> {
        self.by_name.get(image).copied()
    }

    /// Drops the rows whose image file is not in the image folder (the
    /// development sample has 145 of the 112 120 images); returns how many.
    pub fn retain_present(&mut self) -> usize {
        let before = self.entries.len();
        let dir = self.images.clone();
        self.entries.retain(|e| dir.join(&e.image).is_file());
        self.by_name = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.image.clone(), i))
            .collect();
        before - self.entries.len()
    }

    /// Indices of the rows named in the official list `file` (in `root`),
    /// e.g. `train_val_list.txt` or `test_list.txt`. Names in the list with
    /// no row are skipped (after [`ChestXray14::retain_present`] most are).
    pub fn official_split(&self, file: &str) -> Result<Vec<usize>> {
        let names = read_split_list(&self.root.join(file))?;
        let mut idx: Vec<usize> = names.iter().filter_map(|n| self.position(n)).collect();
        idx.sort_unstable();
        Ok(idx)
    }

    /// Loads and preprocesses one image: gray (RGB/RGBA originals are
    /// converted), resized, scaled to `[0, 1]`, normalized, repeated to
    /// `channels`.
    pub fn load_image(&self, index: usize) -> Result<Vec<f32>> {
        let entry = self.entries.get(index).ok_or_else(|| {
            Error::InvalidInput(format!(
                "image {index} out of range ({})",
                self.entries.len()
            ))
        })?;
        let path = self.images.join(&entry.image);
        let decoded = image::ImageReader::open(&path)
            .map_err(|e| data_error(&path, None, format!("cannot open image: {e}")))?
            .with_guessed_format()
            .map_err(|e| data_error(&path, None, e.to_string()))?
            .decode()
            .map_err(|e| data_error(&path, None, format!("cannot decode image: {e}")))?;
        let gray = decoded.into_luma8();
        let s = self.config.size;
        let resized = if gray.dimensions() == (s, s) {
            gray
        } else {
            image::imageops::resize(&gray, s, s, FilterType::Triangle)
        };
        let (mean, std) = (self.config.mean, self.config.std);
        let plane: Vec<f32> = resized
            .as_raw()
            .iter()
            .map(|&p| (f32::from(p) / 255.0 - mean) / std)
            .collect();
        let mut out = Vec::with_capacity(plane.len() * self.config.channels);
        for _ in 0..self.config.channels {
            out.extend_from_slice(&plane);
        }
        Ok(out)
    }
}

impl ImageDataset for ChestXray14 {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        let s = self.config.size as usize;
        [self.config.channels, s, s]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let decoded: Vec<Vec<f32>> = indices
            .par_iter()
            .map(|&i| self.load_image(i))
            .collect::<Result<_>>()?;
        let [c, h, w] = self.image_shape();
        let mut images = Vec::with_capacity(indices.len() * c * h * w);
        let mut values = Vec::with_capacity(indices.len() * FINDINGS.len());
        for (img, &i) in decoded.iter().zip(indices) {
            images.extend_from_slice(img);
            values.extend_from_slice(&self.entries[i].label_vector());
        }
        Ok(Batch {
            images,
            shape: [indices.len(), c, h, w],
            targets: Targets::MultiLabel {
                values,
                labels: FINDINGS.len(),
            },
        })
    }
}

pub(crate) fn data_error(path: &Path, line: Option<u64>, reason: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n";

    fn parse(rows: &str) -> Result<Vec<Entry>> {
        parse_entries(format!("{HEADER}{rows}").as_bytes(), Path::new("t.csv"))
    }

    #[test]
    fn parses_real_format_rows() {
        // Rows as they appear in the v2020 release, and one 2017-style age.
        let e = parse(
            "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.14300000000000002,0.14300000000000002\n\
             00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143\n\
             00000002_000.png,No Finding,0,2,080Y,M,PA,2500,2048,0.168,0.168\n\
             00000013_003.png,Effusion|Infiltration|Pleural_Thickening|Hernia,3,13,60,M,AP,3056,2544,0.139,0.139,\n",
        )
        .unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].labels, 1 << 1);
        assert_eq!(e[1].label_vector()[1], 1.0);
        assert_eq!(e[1].label_vector()[10], 1.0);
        assert_eq!(e[1].label_vector().iter().sum::<f32>(), 2.0);
        assert_eq!(e[2].labels, 0);
        assert_eq!(e[2].age, Some(80));
        assert_eq!(e[3].labels, (1 << 2) | (1 << 3) | (1 << 12) | (1 << 13));
        assert_eq!(
            (e[3].patient, e[3].follow_up, e[3].view.as_str()),
            (13, 3, "AP")
        );
    }

    #[test]
    fn bad_rows_name_their_line() {
        let err = |rows: &str| parse(rows).unwrap_err().to_string();
        let good = "a.png,No Finding,0,1,50,F,PA,1,1,1,1\n";
        let e = err(&format!(
            "{good}b.png,Cardiomegaly|Pneumonitis,0,2,50,F,PA,1,1,1,1\n"
        ));
        assert!(
            e.contains("t.csv:3") && e.contains("unknown label `Pneumonitis`"),
            "{e}"
        );
        let e = err(&format!("{good}c.png,Mass,zero,2,50,F,PA\n"));
        assert!(e.contains(":3") && e.contains("Follow-up"), "{e}");
        let e = err(&format!("{good}d.png,Mass,0\n"));
        assert!(e.contains(":3") && e.contains("fields"), "{e}");
        let e = err(&format!("{good}{good}"));
        assert!(e.contains(":3") && e.contains("twice"), "{e}");
        let e = err("../x.png,Mass,0,1,50,F,PA\n");
        assert!(e.contains(":2") && e.contains("bad image name"), "{e}");
        let e = err("e.png,No Finding|Mass,0,1,50,F,PA\n");
        assert!(e.contains("combined"), "{e}");
        let e = parse_entries("nope,nope\n".as_bytes(), Path::new("t.csv")).unwrap_err();
        assert!(e.to_string().contains("t.csv:1"), "{e}");
    }

    #[test]
    fn decodes_gray_and_rgba_resizes_and_reports_missing_images() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        image::GrayImage::from_fn(8, 8, |x, _| image::Luma([if x < 4 { 0 } else { 255 }]))
            .save(images.join("g.png"))
            .unwrap();
        image::RgbaImage::from_pixel(6, 6, image::Rgba([255, 255, 255, 255]))
            .save(images.join("c.png"))
            .unwrap();
        let rows = parse(
            "g.png,Mass,0,1,50,F,PA\nc.png,No Finding,0,2,50,F,PA\nm.png,Hernia,0,3,50,F,PA\n",
        )
        .unwrap();
        let config = ChestXrayConfig {
            size: 4,
            channels: 3,
            mean: 0.0,
            std: 1.0,
        };
        let mut ds = ChestXray14::from_entries(dir.path().into(), images, rows, config).unwrap();
        assert_eq!(ds.image_shape(), [3, 4, 4]);
        let b = ds.batch(&[0, 1]).unwrap();
        assert_eq!(b.shape, [2, 3, 4, 4]);
        // Left half dark, right half bright, in every channel.
        assert!(b.images[0] < 0.1 && b.images[3] > 0.9 && b.images[16 + 3] > 0.9);
        // The white RGBA image is white gray.
        assert!(b.images[48..].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        let Targets::MultiLabel { values, labels } = &b.targets else {
            panic!("multi-label targets expected")
        };
        assert_eq!(*labels, 14);
        assert_eq!(values[4], 1.0);
        assert!(values[14..].iter().all(|&v| v == 0.0));
        let e = ds.batch(&[2]).unwrap_err().to_string();
        assert!(e.contains("m.png") && e.contains("cannot open"), "{e}");
        assert_eq!(ds.retain_present(), 1);
        assert_eq!(ds.len(), 2);
    }
}
