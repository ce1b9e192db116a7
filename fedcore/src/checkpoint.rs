//! Safetensors files and crash-safe checkpoints of a run.
//!
//! A checkpoint directory holds `model-<round>.safetensors` files and one
//! `state.json` that names the current model file with its SHA-256 and holds
//! the round history. Each file is written to a temporary name, synced and
//! renamed into place; `state.json` is renamed last, so a crash at any point
//! leaves the previous consistent checkpoint readable.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::events::RoundRecord;
use crate::params::{Layout, Parameters, TensorSpec};
use crate::server_opt::OptState;

/// Metadata key that records the tensor order of a `Parameters` value
/// (safetensors itself sorts tensors by name).
const ORDER_KEY: &str = "fedcore.order";

enum OutView<'a> {
    F32 {
        shape: &'a [usize],
        values: &'a [f32],
    },
    I64Scalar([u8; 8]),
}

impl View for OutView<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutView::F32 { .. } => Dtype::F32,
            OutView::I64Scalar(_) => Dtype::I64,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            OutView::F32 { shape, .. } => shape,
            OutView::I64Scalar(_) => &[],
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutView::F32 { values, .. } => {
                Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            OutView::I64Scalar(b) => Cow::Borrowed(b),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            OutView::F32 { values, .. } => values.len() * 4,
            OutView::I64Scalar(_) => 8,
        }
    }
}

/// Safetensors files: what PyTorch's `safetensors.torch.load` reads and writes.
impl Parameters {
    /// Encodes the parameters as a safetensors buffer; `metadata` goes into
    /// the header, next to the tensor order (safetensors sorts by name).
    pub fn to_safetensors(
        &self,
        metadata: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Vec<u8>> {
        to_safetensors_with_scalars(self, metadata, &[])
    }

    /// Decodes a safetensors buffer of F32 tensors. The tensor order is the
    /// one recorded by [`Parameters::to_safetensors`], or the order in the
    /// file for foreign files. Returns the header metadata too.
    pub fn from_safetensors(bytes: &[u8]) -> Result<(Parameters, HashMap<String, String>)> {
        let (_, header) = SafeTensors::read_metadata(bytes)?;
        let st = SafeTensors::deserialize(bytes)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let order: Vec<String> = match meta.get(ORDER_KEY) {
            Some(o) => {
                let order: Vec<String> = serde_json::from_str(o)
                    .map_err(|e| Error::Safetensors(format!("bad `{ORDER_KEY}` metadata: {e}")))?;
                let mut sorted = order.clone();
                sorted.sort();
                let mut names: Vec<&str> = st.names();
                names.sort_unstable();
                if sorted.iter().map(String::as_str).ne(names.iter().copied()) {
                    return Err(Error::Safetensors(format!(
                        "`{ORDER_KEY}` metadata does not list the file's tensors"
                    )));
                }
                order
            }
            None => header.offset_keys(),
        };
        let mut tensors = Vec::with_capacity(order.len());
        for name in order {
            let view = st.tensor(&name)?;
            let values = decode_f32(&name, &view)?;
            tensors.push((name, view.shape().to_vec(), values));
        }
        Ok((Parameters::from_tensors(tensors)?, meta))
    }

    /// Reads the tensors of `layout` from a safetensors buffer, by name. A
    /// tensor of the layout that is missing or has another shape is an error
    /// naming it; `extra` says what a tensor in the file that the layout
    /// lacks is.
    pub fn from_safetensors_in(
        bytes: &[u8],
        layout: &Arc<Layout>,
        extra: ExtraTensors,
    ) -> Result<Parameters> {
        let st = SafeTensors::deserialize(bytes)?;
        let mut params = Parameters::zeros(layout.clone());
        for TensorSpec { name, shape } in layout.tensors() {
            let view = st.tensor(name).map_err(|_| Error::UnknownTensor {
                name: format!("{name} (missing from the file)"),
            })?;
            if view.shape() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    got: view.shape().to_vec(),
                });
            }
            params
                .tensor_mut(name)?
                .copy_from_slice(&decode_f32(name, &view)?);
        }
        if extra == ExtraTensors::Refuse
            && let Some(extra) = st
                .names()
                .into_iter()
                .find(|n| layout.position(n).is_none())
        {
            return Err(Error::UnknownTensor {
                name: format!("{extra} (in the file but not in the model)"),
            });
        }
        Ok(params)
    }

    /// Saves the parameters as a safetensors file, atomically
    /// ([`write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_safetensors([])?)
    }

    /// Loads a safetensors file written by [`Parameters::save`] (or any F32
    /// safetensors file); an error names the file.
    pub fn load(path: &Path) -> Result<Parameters> {
        let bytes = fs::read(path)?;
        Self::from_safetensors(&bytes)
            .map(|(p, _)| p)
            .map_err(|e| Error::Checkpoint {
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }
}

/// [`Parameters::to_safetensors`] plus 0-dimensional I64 tensors, e.g. the
/// `num_batches_tracked` counters PyTorch's BatchNorm keeps in its state dict.
pub(crate) fn to_safetensors_with_scalars(
    params: &Parameters,
    metadata: impl IntoIterator<Item = (String, String)>,
    scalars: &[(String, i64)],
) -> Result<Vec<u8>> {
    let mut meta: HashMap<String, String> = metadata.into_iter().collect();
    let order: Vec<&str> = params
        .layout()
        .tensors()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    meta.insert(ORDER_KEY.into(), serde_json::to_string(&order)?);
    if let Some((name, _)) = scalars
        .iter()
        .find(|(n, _)| params.layout().position(n).is_some())
    {
        return Err(Error::DuplicateTensor { name: name.clone() });
    }
    let views = params
        .iter()
        .map(|(spec, values)| {
            (
                spec.name.as_str(),
                OutView::F32 {
                    shape: &spec.shape,
                    values,
                },
            )
        })
        .chain(
            scalars
                .iter()
                .map(|(n, v)| (n.as_str(), OutView::I64Scalar(v.to_le_bytes()))),
        );
    Ok(safetensors::serialize(views, Some(meta))?)
}

pub(crate) fn decode_f32(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>> {
    if view.dtype() != Dtype::F32 {
        return Err(Error::Safetensors(format!(
            "tensor `{name}` is {:?}, expected F32",
            view.dtype()
        )));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// What [`Parameters::from_safetensors_in`] does with tensors in the file
/// that the layout lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtraTensors {
    /// They are an error naming the first one (a checkpoint of this model).
    Refuse,
    /// They are skipped (e.g. a full model read into a part of it).
    Ignore,
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, synced, then renamed over `path`, then the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::InvalidConfig(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The run's state saved next to each model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Format version of this file.
    pub version: u32,
    /// The seed the run was started with.
    pub seed: u64,
    /// The next round to run.
    pub next_round: u64,
    /// The model file, relative to the checkpoint directory.
    pub model_file: String,
    /// Lower-case hex SHA-256 of the model file.
    pub model_sha256: String,
    /// Every round so far, failed ones included.
    pub history: Vec<RoundRecord>,
    /// The server optimizer's state (tensors `m` and, but for momentum,
    /// `v`), when it keeps state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<StateFile>,
    /// The strategy's state (tensor `state`), when it keeps state across
    /// rounds ([`crate::Aggregator::state`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<StateFile>,
}

/// Where a checkpoint keeps a piece of state carried from round to round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    /// Whose state: the optimizer's [`crate::ServerOpt::name`], the
    /// strategy's name.
    pub kind: String,
    /// Its file (safetensors), relative to the checkpoint directory; empty
    /// for an empty state.
    pub file: String,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

const STATE_FILE: &str = "state.json";
/// Version 2 adds the optimizer's and the strategy's state files; a state
/// file without them is written as version 1, which older readers take.
const STATE_VERSION: u32 = 2;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A directory of checkpoints for one run.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

/// What [`CheckpointStore::save`] writes: the run's state after a round.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// The global model (in the clear; zeros where the run seals tensors).
    pub global: &'a Parameters,
    /// The sealed global's bytes, when the run seals tensors.
    pub sealed: Option<&'a [u8]>,
    /// The seed the run started with.
    pub seed: u64,
    /// The round the run continues with.
    pub next_round: u64,
    /// Every round so far.
    pub history: &'a [RoundRecord],
    /// The server optimizer's name and state, when it keeps state.
    pub optimizer: Option<(&'a str, &'a OptState)>,
    /// The strategy's name and state, when it keeps state.
    pub strategy: Option<(&'a str, &'a [f32])>,
}

/// The file holding the sealed global that round `next_round` starts from.
fn sealed_file(next_round: u64) -> String {
    format!("sealed-{next_round:06}.bin")
}

impl RunState {
    /// Parses and checks a state file's bytes (format version, a plain model
    /// file name); the error is the reason, for the caller to attach the path.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<Self, String> {
        let state: RunState =
            serde_json::from_slice(bytes).map_err(|e| format!("not a valid state file: {e}"))?;
        if state.version != STATE_VERSION && state.version != 1 {
            return Err(format!("format version {} is not supported", state.version));
        }
        if state.model_file.is_empty()
            || state.model_file.contains(['/', '\\'])
            || state.model_file.starts_with('.')
        {
            return Err("model file name is not a plain file name".into());
        }
        Ok(state)
    }
}

impl CheckpointStore {
    /// A store in `dir` (created when first saved) that keeps the `keep`
    /// most recent model files (at least 1).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Self {
        Self {
            dir: dir.into(),
            keep: keep.max(1),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the directory holds a state file.
    pub fn exists(&self) -> bool {
        self.dir.join(STATE_FILE).exists()
    }

    /// Saves a snapshot: the sealed values (if any) and the model first,
    /// then the state file that points at them, so a crash in between leaves
    /// the previous checkpoint whole. Prunes model and sealed files beyond
    /// the `keep` most recent. Returns the model file's path.
    pub fn save(&self, snapshot: Snapshot<'_>) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir).map_err(|e| Error::Checkpoint {
            path: self.dir.clone(),
            reason: format!("cannot create the checkpoint folder: {e}"),
        })?;
        let sealed_file = sealed_file(snapshot.next_round);
        if let Some(sealed) = snapshot.sealed {
            write_atomic(&self.dir.join(&sealed_file), sealed)?;
        }
        let round = snapshot.next_round.saturating_sub(1);
        let model_file = format!("model-{round:06}.safetensors");
        let bytes = snapshot
            .global
            .to_safetensors([("fedcore.round".to_owned(), round.to_string())])?;
        let model_path = self.dir.join(&model_file);
        write_atomic(&model_path, &bytes)?;
        let optimizer = match snapshot.optimizer {
            None => None,
            Some((kind, opt)) => Some(self.write_state_file(
                &format!("server-opt-{round:06}.safetensors"),
                kind,
                &[("m", &opt.m), ("v", &opt.v)],
            )?),
        };
        let strategy = match snapshot.strategy {
            None => None,
            Some((kind, values)) => Some(self.write_state_file(
                &format!("strategy-{round:06}.safetensors"),
                kind,
                &[("state", values)],
            )?),
        };
        let state = RunState {
            // An older reader would resume without the state files.
            version: if optimizer.is_some() || strategy.is_some() {
                STATE_VERSION
            } else {
                1
            },
            seed: snapshot.seed,
            next_round: snapshot.next_round,
            model_sha256: sha256_hex(&bytes),
            model_file,
            history: snapshot.history.to_vec(),
            optimizer,
            strategy,
        };
        write_atomic(
            &self.dir.join(STATE_FILE),
            &serde_json::to_vec_pretty(&state)?,
        )?;
        self.prune(("model-", ".safetensors"), &state.model_file)?;
        if snapshot.sealed.is_some() {
            self.prune(("sealed-", ".bin"), &sealed_file)?;
        }
        if let Some(o) = &state.optimizer {
            self.prune(("server-opt-", ".safetensors"), &o.file)?;
        }
        if let Some(s) = &state.strategy {
            self.prune(("strategy-", ".safetensors"), &s.file)?;
        }
        Ok(model_path)
    }

    /// Whether the checkpoint of the run that starts round `next_round`
    /// saved sealed values.
    pub(crate) fn has_sealed(&self, next_round: u64) -> bool {
        self.dir.join(sealed_file(next_round)).exists()
    }

    /// The sealed values saved with the checkpoint of the run that starts
    /// round `next_round`.
    pub fn load_sealed(&self, next_round: u64) -> Result<Vec<u8>> {
        let path = self.dir.join(sealed_file(next_round));
        fs::read(&path).map_err(|e| Error::Checkpoint {
            path,
            reason: format!("the run seals tensors but their saved values cannot be read: {e}"),
        })
    }

    /// Removes the oldest files named `prefix..suffix` (numbered, so the
    /// names sort by round) beyond the `keep` most recent, `current` included.
    fn prune(&self, (prefix, suffix): (&str, &str), current: &str) -> Result<()> {
        let mut old: Vec<String> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix) && n.ends_with(suffix) && n != current)
            .collect();
        old.sort();
        let excess = (old.len() + 1).saturating_sub(self.keep);
        for name in old.into_iter().take(excess) {
            fs::remove_file(self.dir.join(name))?;
        }
        Ok(())
    }

    /// Writes named flat tensors (the empty ones left out) as `file`;
    /// no file when all are empty.
    fn write_state_file(
        &self,
        file: &str,
        kind: &str,
        tensors: &[(&str, &[f32])],
    ) -> Result<StateFile> {
        let kept: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|(n, t)| ((*n).to_owned(), vec![t.len()], t.to_vec()))
            .collect();
        if kept.is_empty() {
            return Ok(StateFile {
                kind: kind.to_owned(),
                file: String::new(),
                sha256: String::new(),
            });
        }
        let bytes = Parameters::from_tensors(kept)?
            .to_safetensors([("fedcore.state".to_owned(), kind.to_owned())])?;
        write_atomic(&self.dir.join(file), &bytes)?;
        Ok(StateFile {
            kind: kind.to_owned(),
            sha256: sha256_hex(&bytes),
            file: file.to_owned(),
        })
    }

    /// The named tensors of a state file a checkpoint names, its hash
    /// checked (none for a state that was empty).
    pub fn load_state_file(&self, file: &StateFile) -> Result<Vec<(String, Vec<f32>)>> {
        if file.file.is_empty() {
            return Ok(Vec::new());
        }
        let path = self.dir.join(&file.file);
        let bad = |reason: String| Error::Checkpoint {
            path: path.clone(),
            reason,
        };
        if file.file.contains(['/', '\\']) || file.file.starts_with('.') {
            return Err(bad("not a plain file name".into()));
        }
        let bytes = fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let digest = sha256_hex(&bytes);
        if digest != file.sha256 {
            return Err(bad(format!(
                "SHA-256 is {digest}, the state file expects {}: the file is corrupt",
                file.sha256
            )));
        }
        let (params, _) = Parameters::from_safetensors(&bytes).map_err(|e| bad(e.to_string()))?;
        params
            .layout()
            .tensors()
            .iter()
            .map(|t| Ok((t.name.clone(), params.tensor(&t.name)?.to_vec())))
            .collect()
    }

    /// The tensor `name` of a state file (empty for an empty state); a
    /// non-empty file without it is an error, not an empty state.
    pub fn load_state_tensor(&self, file: &StateFile, name: &str) -> Result<Vec<f32>> {
        let tensors = self.load_state_file(file)?;
        if tensors.is_empty() {
            return Ok(Vec::new());
        }
        tensors
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::Checkpoint {
                path: self.dir.join(&file.file),
                reason: format!("the state file holds no tensor `{name}`"),
            })
    }

    /// The server optimizer's state a checkpoint names, its hash checked
    /// (`v` may be absent: momentum keeps none).
    pub fn load_optimizer(&self, file: &StateFile) -> Result<OptState> {
        let tensors = self.load_state_file(file)?;
        if tensors.is_empty() {
            return Ok(OptState::default());
        }
        let get = |n: &str| {
            tensors
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, v)| v.clone())
        };
        Ok(OptState {
            m: get("m").ok_or_else(|| Error::Checkpoint {
                path: self.dir.join(&file.file),
                reason: "the optimizer's state file holds no tensor `m`".into(),
            })?,
            v: get("v").unwrap_or_default(),
        })
    }

    /// Loads the latest checkpoint, checking the model file's hash and that its
    /// tensors match `layout`. `Ok(None)` when the directory holds none.
    pub fn load(&self, layout: &Arc<Layout>) -> Result<Option<(Parameters, RunState)>> {
        let state_path = self.dir.join(STATE_FILE);
        let bad = |path: &Path, reason: String| Error::Checkpoint {
            path: path.to_owned(),
            reason,
        };
        let state_bytes = match fs::read(&state_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let state = RunState::from_json(&state_bytes).map_err(|e| bad(&state_path, e))?;
        let model_path = self.dir.join(&state.model_file);
        let bytes = fs::read(&model_path).map_err(|e| bad(&model_path, e.to_string()))?;
        let digest = sha256_hex(&bytes);
        if digest != state.model_sha256 {
            return Err(bad(
                &model_path,
                format!(
                    "SHA-256 is {digest}, the state file expects {}: the file is corrupt",
                    state.model_sha256
                ),
            ));
        }
        let params = Parameters::from_safetensors_in(&bytes, layout, ExtraTensors::Refuse)
            .map_err(|e| bad(&model_path, e.to_string()))?;
        Ok(Some((params, state)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Parameters {
        Parameters::from_tensors([
            (
                "z.weight",
                vec![2, 3],
                vec![1.5, -2.0, 3.25, f32::MIN_POSITIVE, -0.0, 7.0],
            ),
            ("a.bias", vec![2], vec![0.1, 0.2]),
            ("scalar", vec![], vec![42.0]),
        ])
        .unwrap()
    }

    #[test]
    fn round_trip_is_bit_exact_and_keeps_order() {
        let p = sample();
        let bytes = p
            .to_safetensors([("k".to_owned(), "v".to_owned())])
            .unwrap();
        let (q, meta) = Parameters::from_safetensors(&bytes).unwrap();
        assert_eq!(meta.get("k").map(String::as_str), Some("v"));
        assert_eq!(p.layout().tensors(), q.layout().tensors());
        let bits = |x: &Parameters| x.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&q));
        let r = Parameters::from_safetensors_in(&bytes, p.layout(), ExtraTensors::Refuse).unwrap();
        assert_eq!(bits(&p), bits(&r));
    }

    #[test]
    fn reading_a_layout_names_missing_and_mismatched_tensors() {
        let p = sample();
        let bytes = p.to_safetensors([]).unwrap();
        let other = Parameters::from_tensors([("z.weight", vec![3, 2], vec![0.0; 6])]).unwrap();
        let e = Parameters::from_safetensors_in(&bytes, other.layout(), ExtraTensors::Ignore)
            .unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { ref name, .. } if name == "z.weight"),
            "{e}"
        );
        let e = Parameters::from_safetensors_in(&bytes, other.layout(), ExtraTensors::Refuse)
            .unwrap_err();
        assert!(e.to_string().contains("z.weight"));
        let missing = Parameters::from_tensors([("nope", vec![1], vec![0.0])]).unwrap();
        let e = Parameters::from_safetensors_in(&bytes, missing.layout(), ExtraTensors::Ignore)
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let subset = Parameters::from_tensors([("a.bias", vec![2], vec![0.0; 2])]).unwrap();
        assert!(
            Parameters::from_safetensors_in(&bytes, subset.layout(), ExtraTensors::Ignore).is_ok()
        );
        let e = Parameters::from_safetensors_in(&bytes, subset.layout(), ExtraTensors::Refuse)
            .unwrap_err();
        assert!(e.to_string().contains("not in the model"), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bytes = sample().to_safetensors([]).unwrap();
        for cut in [0, 1, 7, 8, 20, bytes.len() - 1] {
            assert!(
                Parameters::from_safetensors(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut header_flip = bytes.clone();
        header_flip[10] ^= 0xff;
        assert!(Parameters::from_safetensors(&header_flip).is_err());
        assert!(Parameters::from_safetensors(b"not a safetensors file at all").is_err());
    }

    proptest::proptest! {
        /// Random byte mutations of a valid file never panic; whatever still
        /// decodes has the tensors the header promises.
        #[test]
        fn mutated_bytes_never_panic(
            flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8),
            cut in proptest::option::of(0usize..4096),
        ) {
            let mut bytes = sample().to_safetensors([]).unwrap();
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            if let Ok((p, _)) = Parameters::from_safetensors(&bytes) {
                proptest::prop_assert_eq!(p.len(), p.layout().len());
            }
            let _ = Parameters::from_safetensors_in(&bytes, sample().layout(), ExtraTensors::Refuse);
        }
    }
}
