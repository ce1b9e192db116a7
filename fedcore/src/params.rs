use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use ndarray::{ArrayView1, ArrayViewD, IxDyn};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Name and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The tensor's name, e.g. `features.conv0.weight`.
    pub name: String,
    /// The tensor's shape; the empty shape is a scalar.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec from a name and a shape.
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<usize>>) -> Self {
        Self {
            name: name.into(),
            shape: shape.into(),
        }
    }

    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.name, self.shape)
    }
}

/// The ordered list of tensors in a parameter vector and where each one lives.
#[derive(Debug, Clone)]
pub struct Layout {
    specs: Vec<TensorSpec>,
    /// `offsets[i]..offsets[i + 1]` is tensor `i`; `offsets.len() == specs.len() + 1`.
    offsets: Vec<usize>,
    index: HashMap<String, usize>,
}

impl Layout {
    /// Builds a layout; a repeated name or a size that overflows `usize` is an error.
    pub fn new(specs: impl IntoIterator<Item = TensorSpec>) -> Result<Self> {
        let specs: Vec<TensorSpec> = specs.into_iter().collect();
        let mut offsets = Vec::with_capacity(specs.len() + 1);
        let mut index = HashMap::with_capacity(specs.len());
        let mut total = 0usize;
        offsets.push(0);
        for (i, spec) in specs.iter().enumerate() {
            if index.insert(spec.name.clone(), i).is_some() {
                return Err(Error::DuplicateTensor {
                    name: spec.name.clone(),
                });
            }
            let n = spec
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .and_then(|n| total.checked_add(n).map(|t| (n, t)));
            let Some((_, t)) = n else {
                return Err(Error::InvalidConfig(format!(
                    "tensor `{}` with shape {:?} is too large",
                    spec.name, spec.shape
                )));
            };
            total = t;
            offsets.push(total);
        }
        Ok(Self {
            specs,
            offsets,
            index,
        })
    }

    /// Total number of f32 values.
    pub fn len(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// True when the layout holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Position of a tensor in the order, if present.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The tensor called `name`, if present.
    pub fn spec(&self, name: &str) -> Option<&TensorSpec> {
        self.position(name).map(|i| &self.specs[i])
    }

    /// The range of the flat vector that holds tensor number `i`.
    pub fn range_at(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// Position of a tensor, or [`Error::UnknownTensor`].
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.position(name).ok_or_else(|| Error::UnknownTensor {
            name: name.to_owned(),
        })
    }

    /// The range of the flat vector that holds `name`.
    pub fn range(&self, name: &str) -> Result<Range<usize>> {
        self.index_of(name).map(|i| self.range_at(i))
    }

    /// Checks that `other` has the same tensors, in the same order, with the same shapes.
    pub fn ensure_same(&self, other: &Layout) -> Result<()> {
        let n = self.specs.len().max(other.specs.len());
        for position in 0..n {
            let (a, b) = (self.specs.get(position), other.specs.get(position));
            if a != b {
                let show =
                    |s: Option<&TensorSpec>| s.map_or("nothing".to_owned(), |s| s.to_string());
                return Err(Error::LayoutMismatch {
                    position,
                    expected: show(a),
                    got: show(b),
                });
            }
        }
        Ok(())
    }

    /// Name of the tensor that holds flat index `i` and the index inside it.
    pub fn locate(&self, i: usize) -> Option<(&str, usize)> {
        if i >= self.len() {
            return None;
        }
        // offsets is sorted; find the last offset <= i among tensors with elements.
        let t = self.offsets.partition_point(|&o| o <= i) - 1;
        Some((&self.specs[t].name, i - self.offsets[t]))
    }
}

impl Layout {
    /// The tensors matching any of `patterns`: an exact name, or a prefix
    /// followed by `*` (`"classifier.*"`, `"features.denseblock4.*"`).
    ///
    /// Used to split a model into a "head" and a "body" (HE encrypts the
    /// head, DP may treat the parts differently). A pattern that matches
    /// nothing is [`Error::UnknownTensor`], so a typo cannot silently select
    /// an empty head.
    pub fn select<S: AsRef<str>>(&self, patterns: &[S]) -> Result<Selection> {
        let mut chosen = vec![false; self.specs.len()];
        for pattern in patterns {
            let pattern = pattern.as_ref();
            let mut hit = false;
            for (i, spec) in self.specs.iter().enumerate() {
                let m = match pattern.strip_suffix('*') {
                    Some(prefix) => spec.name.starts_with(prefix),
                    None => spec.name == pattern,
                };
                if m {
                    chosen[i] = true;
                    hit = true;
                }
            }
            if !hit {
                return Err(Error::UnknownTensor {
                    name: pattern.to_owned(),
                });
            }
        }
        Ok(self.selection_from(chosen))
    }

    /// The tensors for which `keep(position, spec)` is true.
    pub fn select_by(&self, keep: impl Fn(usize, &TensorSpec) -> bool) -> Selection {
        let chosen = self
            .specs
            .iter()
            .enumerate()
            .map(|(i, s)| keep(i, s))
            .collect();
        self.selection_from(chosen)
    }

    fn selection_from(&self, chosen: Vec<bool>) -> Selection {
        let tensors: Vec<usize> = (0..chosen.len()).filter(|&i| chosen[i]).collect();
        let len = tensors.iter().map(|&i| self.range_at(i).len()).sum();
        Selection {
            tensors,
            len,
            of: self.specs.len(),
            digest: self.digest(),
        }
    }

    /// FNV-1a over the tensors' names and shapes: what a [`Selection`]
    /// checks a layout against.
    fn digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for s in &self.specs {
            eat(s.name.as_bytes());
            eat(&[0xff]);
            for &d in &s.shape {
                eat(&(d as u64).to_le_bytes());
            }
            eat(&[0xfe]);
        }
        h
    }
}

/// A subset of a [`Layout`]'s tensors, from [`Layout::select`].
///
/// It remembers the layout it was made for (a digest of its names and
/// shapes): every method that takes a layout checks it, and another layout
/// is [`Error::LayoutMismatch`], never an out-of-range panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    tensors: Vec<usize>,
    len: usize,
    of: usize,
    digest: u64,
}

impl Selection {
    /// Positions of the selected tensors in the layout, ascending.
    pub fn tensors(&self) -> &[usize] {
        &self.tensors
    }

    /// Number of f32 values selected.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is selected.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether tensor number `i` is selected.
    pub fn contains(&self, i: usize) -> bool {
        self.tensors.binary_search(&i).is_ok()
    }

    /// Checks that `layout` is the one this selection was made for.
    pub fn check(&self, layout: &Layout) -> Result<()> {
        if layout.specs.len() != self.of || layout.digest() != self.digest {
            return Err(Error::LayoutMismatch {
                position: 0,
                expected: format!(
                    "the layout of {} tensors this selection was made for",
                    self.of
                ),
                got: format!("another layout of {} tensors", layout.specs.len()),
            });
        }
        Ok(())
    }

    /// Names of the selected tensors.
    pub fn names<'a>(&'a self, layout: &'a Layout) -> Result<impl Iterator<Item = &'a str> + 'a> {
        self.check(layout)?;
        Ok(self
            .tensors
            .iter()
            .map(move |&i| layout.specs[i].name.as_str()))
    }

    /// The ranges of the flat vector the selection covers (adjacent tensors merged).
    pub fn ranges(&self, layout: &Layout) -> Result<Vec<Range<usize>>> {
        self.check(layout)?;
        Ok(self.ranges_unchecked(layout))
    }

    fn ranges_unchecked(&self, layout: &Layout) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for &i in &self.tensors {
            let r = layout.range_at(i);
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }

    /// Every tensor of `layout` not in this selection (the "body" of a "head").
    pub fn complement(&self, layout: &Layout) -> Result<Selection> {
        self.check(layout)?;
        let chosen = (0..self.of).map(|i| !self.contains(i)).collect();
        Ok(layout.selection_from(chosen))
    }

    /// The selected values of `values` (laid out as `layout`), concatenated
    /// in layout order.
    pub fn gather(&self, layout: &Layout, values: &[f32]) -> Result<Vec<f32>> {
        self.check(layout)?;
        if values.len() != layout.len() {
            return Err(Error::DimensionMismatch {
                expected: layout.len(),
                got: values.len(),
            });
        }
        let mut out = Vec::with_capacity(self.len);
        for r in self.ranges_unchecked(layout) {
            out.extend_from_slice(&values[r]);
        }
        Ok(out)
    }

    /// The layout of just the selected tensors, in layout order.
    pub fn layout(&self, layout: &Layout) -> Result<Layout> {
        self.check(layout)?;
        Layout::new(self.tensors.iter().map(|&i| layout.specs[i].clone()))
    }

    /// The selected tensors of `params` as parameters of their own layout.
    pub fn subset(&self, params: &Parameters) -> Result<Parameters> {
        Ok(Parameters {
            layout: Arc::new(self.layout(params.layout())?),
            values: self.gather(params.layout(), params.as_slice())?,
        })
    }

    /// `values[selected] += alpha * part` (`part` as made by [`Selection::gather`]).
    pub fn axpy(
        &self,
        layout: &Layout,
        alpha: f32,
        part: &[f32],
        values: &mut [f32],
    ) -> Result<()> {
        self.zip_ranges(layout, part, values, |v, p| {
            v.iter_mut().zip(p).for_each(|(v, p)| *v += alpha * p)
        })
    }

    /// Writes `part` (as made by [`Selection::gather`]) back into `values`.
    pub fn scatter(&self, layout: &Layout, part: &[f32], values: &mut [f32]) -> Result<()> {
        self.zip_ranges(layout, part, values, |v, p| v.copy_from_slice(p))
    }

    /// Calls `f` on each selected range of `values` with the matching slice
    /// of `part` (as made by [`Selection::gather`]).
    fn zip_ranges(
        &self,
        layout: &Layout,
        part: &[f32],
        values: &mut [f32],
        mut f: impl FnMut(&mut [f32], &[f32]),
    ) -> Result<()> {
        self.check(layout)?;
        if part.len() != self.len {
            return Err(Error::DimensionMismatch {
                expected: self.len,
                got: part.len(),
            });
        }
        if values.len() != layout.len() {
            return Err(Error::DimensionMismatch {
                expected: layout.len(),
                got: values.len(),
            });
        }
        let mut at = 0;
        for r in self.ranges_unchecked(layout) {
            let n = r.len();
            f(&mut values[r], &part[at..at + n]);
            at += n;
        }
        Ok(())
    }
}

impl PartialEq for Layout {
    fn eq(&self, other: &Self) -> bool {
        self.specs == other.specs
    }
}

impl Eq for Layout {}

/// Where the first non-finite value of a parameter vector sits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NonFinite {
    /// The tensor holding it.
    pub tensor: String,
    /// Its index inside that tensor (row-major).
    pub index: usize,
    /// The value (NaN or ±Inf), as text so that it survives JSON.
    pub value: String,
}

/// Named f32 tensors stored in one flat, contiguous vector.
///
/// A [`Layout`] lists the tensors (name and shape) in a fixed order; a
/// [`Parameters`] value pairs a shared layout with one `Vec<f32>` that holds
/// every tensor back to back. Aggregators work on the flat slice (a loop that
/// rayon can split), models and checkpoints work by tensor name.
///
/// ```
/// use fedcore::Parameters;
/// let p = Parameters::from_tensors([
///     ("fc.weight", vec![2, 3], vec![1.0; 6]),
///     ("fc.bias", vec![2], vec![0.5, -0.5]),
/// ])?;
/// assert_eq!(p.len(), 8);
/// assert_eq!(p.tensor("fc.bias")?, &[0.5, -0.5]);
/// assert!(p.tensor("fc.scale").is_err());
/// # Ok::<(), fedcore::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Parameters {
    layout: Arc<Layout>,
    values: Vec<f32>,
}

impl PartialEq for Parameters {
    fn eq(&self, other: &Self) -> bool {
        (Arc::ptr_eq(&self.layout, &other.layout) || self.layout == other.layout)
            && self.values == other.values
    }
}

impl Parameters {
    /// Pairs a layout with its flat values; the length must match.
    pub fn new(layout: Arc<Layout>, values: Vec<f32>) -> Result<Self> {
        if values.len() != layout.len() {
            return Err(Error::DimensionMismatch {
                expected: layout.len(),
                got: values.len(),
            });
        }
        Ok(Self { layout, values })
    }

    /// All zeros in the given layout.
    pub fn zeros(layout: Arc<Layout>) -> Self {
        let values = vec![0.0; layout.len()];
        Self { layout, values }
    }

    /// Zeros with the same layout as `self`.
    pub fn zeros_like(&self) -> Self {
        Self::zeros(self.layout.clone())
    }

    /// Builds parameters from `(name, shape, values)` triples, in that order.
    pub fn from_tensors<I, S>(tensors: I) -> Result<Self>
    where
        I: IntoIterator<Item = (S, Vec<usize>, Vec<f32>)>,
        S: Into<String>,
    {
        let mut specs = Vec::new();
        let mut values = Vec::new();
        for (name, shape, data) in tensors {
            let spec = TensorSpec::new(name, shape);
            if data.len() != spec.numel() {
                return Err(Error::ShapeMismatch {
                    got: vec![data.len()],
                    expected: spec.shape,
                    name: spec.name,
                });
            }
            values.extend_from_slice(&data);
            specs.push(spec);
        }
        let layout = Arc::new(Layout::new(specs)?);
        Self::new(layout, values)
    }

    /// The shared layout.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Number of f32 values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The flat values.
    pub fn as_slice(&self) -> &[f32] {
        &self.values
    }

    /// The flat values, mutable (the layout cannot change through this).
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The flat values as an ndarray view.
    pub fn view(&self) -> ArrayView1<'_, f32> {
        ArrayView1::from(&self.values[..])
    }

    /// Gives up the layout and returns the flat values.
    pub fn into_vec(self) -> Vec<f32> {
        self.values
    }

    /// The values of one tensor.
    pub fn tensor(&self, name: &str) -> Result<&[f32]> {
        Ok(&self.values[self.layout.range(name)?])
    }

    /// The values of one tensor, mutable.
    pub fn tensor_mut(&mut self, name: &str) -> Result<&mut [f32]> {
        let r = self.layout.range(name)?;
        Ok(&mut self.values[r])
    }

    /// One tensor as an n-dimensional view with its shape.
    pub fn tensor_view(&self, name: &str) -> Result<ArrayViewD<'_, f32>> {
        let i = self.layout.index_of(name)?;
        let spec = &self.layout.tensors()[i];
        ArrayViewD::from_shape(IxDyn(&spec.shape), &self.values[self.layout.range_at(i)])
            .map_err(|e| Error::InvalidConfig(format!("tensor `{name}`: {e}")))
    }

    /// Overwrites one tensor; `shape` must equal the layout's shape for it.
    pub fn set_tensor(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        let i = self.layout.index_of(name)?;
        let spec = &self.layout.tensors()[i];
        if spec.shape != shape || values.len() != spec.numel() {
            return Err(Error::ShapeMismatch {
                name: name.to_owned(),
                expected: spec.shape.clone(),
                got: if values.len() == shape.iter().product::<usize>() {
                    shape.to_vec()
                } else {
                    vec![values.len()]
                },
            });
        }
        let r = self.layout.range_at(i);
        self.values[r].copy_from_slice(values);
        Ok(())
    }

    /// Iterates over `(spec, values)` in layout order.
    pub fn iter(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        self.layout
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, s)| (s, &self.values[self.layout.range_at(i)]))
    }

    /// Checks that `other` has the same layout.
    pub fn ensure_compatible(&self, other: &Parameters) -> Result<()> {
        if Arc::ptr_eq(&self.layout, &other.layout) {
            return Ok(());
        }
        self.layout.ensure_same(&other.layout)
    }

    /// The first NaN or infinite value, if any.
    pub fn first_non_finite(&self) -> Option<NonFinite> {
        let i = self.values.iter().position(|v| !v.is_finite())?;
        let (tensor, index) = self.layout.locate(i)?;
        Some(NonFinite {
            tensor: tensor.to_owned(),
            index,
            value: self.values[i].to_string(),
        })
    }

    /// Euclidean norm of all values (accumulated in f64).
    pub fn l2_norm(&self) -> f64 {
        l2_norm(&self.values)
    }

    /// The largest `|self[i] - other[i]|` (0 for empty parameters; NaN
    /// where either holds a NaN); layouts must match. How far two models
    /// are apart, as tests that compare training paths ask.
    pub fn max_abs_diff(&self, other: &Parameters) -> Result<f32> {
        self.ensure_compatible(other)?;
        Ok(self
            .values
            .iter()
            .zip(&other.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m }))
    }

    /// `self - other`, element-wise; layouts must match.
    pub fn sub(&self, other: &Parameters) -> Result<Parameters> {
        self.ensure_compatible(other)?;
        let values = self
            .values
            .iter()
            .zip(&other.values)
            .map(|(a, b)| a - b)
            .collect();
        Ok(Parameters {
            layout: self.layout.clone(),
            values,
        })
    }

    /// `self += alpha * x`, element-wise; layouts must match.
    pub fn axpy(&mut self, alpha: f32, x: &Parameters) -> Result<()> {
        self.ensure_compatible(x)?;
        for (a, b) in self.values.iter_mut().zip(&x.values) {
            *a += alpha * b;
        }
        Ok(())
    }

    /// Multiplies every value by `s`.
    pub fn scale(&mut self, s: f32) {
        self.values.iter_mut().for_each(|v| *v *= s);
    }

    /// A new value with the same layout and other flat values.
    pub fn with_values(&self, values: Vec<f32>) -> Result<Parameters> {
        Parameters::new(self.layout.clone(), values)
    }
}

/// Euclidean norm of a slice, accumulated in f64 for accuracy.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    #[test]
    fn select_splits_head_and_body() {
        let layout = Layout::new([
            TensorSpec::new("features.conv0.weight", [2, 2]),
            TensorSpec::new("features.norm0.weight", [2]),
            TensorSpec::new("classifier.weight", [3, 2]),
            TensorSpec::new("classifier.bias", [3]),
        ])
        .unwrap();
        let head = layout.select(&["classifier.*"]).unwrap();
        assert_eq!(head.tensors(), &[2, 3]);
        assert_eq!(head.len(), 9);
        assert_eq!(head.ranges(&layout).unwrap(), vec![6..15]);
        let body = head.complement(&layout).unwrap();
        assert_eq!(
            body.names(&layout).unwrap().collect::<Vec<_>>(),
            ["features.conv0.weight", "features.norm0.weight"]
        );
        let values: Vec<f32> = (0..15).map(|v| v as f32).collect();
        let part = head.gather(&layout, &values).unwrap();
        assert_eq!(part, (6..15).map(|v| v as f32).collect::<Vec<_>>());
        let mut zeros = vec![0.0; 15];
        head.scatter(&layout, &part, &mut zeros).unwrap();
        assert_eq!(&zeros[6..], &values[6..]);
        assert!(head.scatter(&layout, &part[1..], &mut zeros).is_err());
        // Another layout, even of the same size, is an error, not a panic.
        let other = Layout::new([
            TensorSpec::new("features.conv0.weight", [2, 2]),
            TensorSpec::new("features.norm0.weight", [2]),
            TensorSpec::new("classifier.weight", [2, 3]),
            TensorSpec::new("head.bias", [3]),
        ])
        .unwrap();
        let short = Layout::new([TensorSpec::new("w", [1])]).unwrap();
        for l in [&other, &short] {
            assert!(matches!(
                head.gather(l, &vec![0.0; l.len()]),
                Err(Error::LayoutMismatch { .. })
            ));
            assert!(head.complement(l).is_err() && head.layout(l).is_err());
            assert!(head.scatter(l, &part, &mut vec![0.0; l.len()]).is_err());
        }
        assert!(head.gather(&layout, &values[..3]).is_err(), "short values");
        // Exact names work; a pattern matching nothing is an error naming it.
        let one = layout.select(&["features.norm0.weight"]).unwrap();
        assert_eq!(one.tensors(), &[1]);
        let e = layout.select(&["clasifier.*"]).unwrap_err();
        assert!(e.to_string().contains("clasifier.*"), "{e}");
    }

    use super::*;

    fn sample() -> Parameters {
        Parameters::from_tensors([
            ("a", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("empty", vec![0], vec![]),
            ("b", vec![], vec![5.0]),
        ])
        .unwrap()
    }

    #[test]
    fn tensors_by_name() {
        let p = sample();
        assert_eq!(p.len(), 5);
        assert_eq!(p.tensor("a").unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(p.tensor("b").unwrap(), &[5.0]);
        assert_eq!(p.tensor_view("a").unwrap().shape(), &[2, 2]);
        assert!(matches!(p.tensor("c"), Err(Error::UnknownTensor { .. })));
    }

    #[test]
    fn wrong_lengths_and_shapes_are_typed_errors() {
        let p = sample();
        assert!(matches!(
            Parameters::new(p.layout().clone(), vec![0.0; 4]),
            Err(Error::DimensionMismatch {
                expected: 5,
                got: 4
            })
        ));
        let mut q = p.clone();
        assert!(matches!(
            q.set_tensor("a", &[4], &[0.0; 4]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            q.set_tensor("a", &[2, 2], &[0.0; 3]),
            Err(Error::ShapeMismatch { .. })
        ));
        q.set_tensor("a", &[2, 2], &[9.0; 4]).unwrap();
        assert_eq!(q.tensor("a").unwrap(), &[9.0; 4]);
        assert!(matches!(
            Parameters::from_tensors([("x", vec![3], vec![1.0])]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            Parameters::from_tensors([("x", vec![1], vec![1.0]), ("x", vec![1], vec![1.0])]),
            Err(Error::DuplicateTensor { .. })
        ));
    }

    #[test]
    fn layout_mismatch_names_the_tensor() {
        let p = sample();
        let q = Parameters::from_tensors([("a", vec![4], vec![1.0; 4])]).unwrap();
        let err = p.ensure_compatible(&q).unwrap_err();
        match err {
            Error::LayoutMismatch {
                position,
                expected,
                got,
            } => {
                assert_eq!(position, 0);
                assert_eq!(expected, "a[2, 2]");
                assert_eq!(got, "a[4]");
            }
            e => panic!("unexpected {e}"),
        }
        assert!(p.sub(&q).is_err());
    }

    #[test]
    fn locate_skips_empty_tensors() {
        let p = sample();
        assert_eq!(p.layout().locate(3), Some(("a", 3)));
        assert_eq!(p.layout().locate(4), Some(("b", 0)));
        assert_eq!(p.layout().locate(5), None);
        let mut q = p.clone();
        q.as_mut_slice()[4] = f32::NAN;
        let nf = q.first_non_finite().unwrap();
        assert_eq!((nf.tensor.as_str(), nf.index), ("b", 0));
        assert!(p.first_non_finite().is_none());
    }

    #[test]
    fn arithmetic() {
        let p = sample();
        let mut d = p.sub(&p).unwrap();
        assert!(d.as_slice().iter().all(|&v| v == 0.0));
        d.axpy(2.0, &p).unwrap();
        assert_eq!(d.tensor("b").unwrap(), &[10.0]);
        d.scale(0.5);
        assert_eq!(d, p);
        assert!((p.l2_norm() - 55f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn max_abs_diff_is_the_worst_coordinate_and_keeps_nan() {
        let p = sample();
        assert_eq!(p.max_abs_diff(&p).unwrap(), 0.0);
        let mut q = p.clone();
        q.as_mut_slice()[1] -= 3.0;
        q.as_mut_slice()[4] += 0.5;
        assert_eq!(p.max_abs_diff(&q).unwrap(), 3.0);
        q.as_mut_slice()[0] = f32::NAN;
        assert!(p.max_abs_diff(&q).unwrap().is_nan(), "NaN is not ignored");
        let other = Parameters::from_tensors([("a", vec![4], vec![1.0; 4])]).unwrap();
        assert!(p.max_abs_diff(&other).is_err());
    }
}
