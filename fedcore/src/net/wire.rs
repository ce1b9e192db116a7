//! Tasks and replies to protobuf headers plus a chunked payload, and back.
//!
//! A payload is the values of the header's layout as little-endian f32
//! (4 bytes each, the layout's order; a fit reply's may come in a lossy
//! [`Encoding`] its header names), then the extra tensors' values, then
//! the sealed bytes. On the
//! sending side the payload of a task borrows the global model's memory
//! ([`Bytes::from_owner`]); on the receiving side an [`Assembler`] copies
//! each chunk straight into the final `Vec<f32>` and sealed buffer, after
//! checking the declared sizes against the limit before allocating.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::proto;
use crate::client::{EvaluateIns, FitIns, StepIns, StepReply};
use crate::compress::{Compressed, Encoding};
use crate::error::{Error, Result};
use crate::model::{Evaluation, TrainConfig};
use crate::params::{Layout, Parameters, TensorSpec};
use crate::sealed::SealedTensors;
use crate::transport::{Reply, Task};
use crate::update::{ClientId, ClientUpdate, Metrics, Protection, UpdateKind};

/// The version of the protocol in `proto/fedcore.proto`.
pub const PROTOCOL: u32 = 1;

fn bad(msg: impl Into<String>) -> Error {
    Error::Transport(msg.into())
}

/// A layout as protobuf tensor specs.
pub(crate) fn layout_to_proto(layout: &Layout) -> Vec<proto::TensorSpec> {
    layout
        .tensors()
        .iter()
        .map(|t| proto::TensorSpec {
            name: t.name.clone(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
        })
        .collect()
}

/// Protobuf tensor specs as a layout (names unique, sizes without overflow).
pub(crate) fn layout_from_proto(specs: &[proto::TensorSpec]) -> Result<Arc<Layout>> {
    let specs = specs
        .iter()
        .map(|t| {
            let shape = t
                .shape
                .iter()
                .map(|&d| {
                    usize::try_from(d).map_err(|_| {
                        bad(format!("tensor `{}`: dimension {d} is too large", t.name))
                    })
                })
                .collect::<Result<Vec<usize>>>()?;
            Ok(TensorSpec::new(t.name.clone(), shape))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(Layout::new(specs)?))
}

/// The model values as bytes, sharing the parameters' memory on
/// little-endian machines (a copy elsewhere).
fn values_bytes(params: Arc<Parameters>) -> Bytes {
    struct Owner(Arc<Parameters>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(self.0.as_slice())
        }
    }
    if cfg!(target_endian = "little") {
        Bytes::from_owner(Owner(params))
    } else {
        Bytes::from(
            params
                .as_slice()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    }
}

/// The sealed bytes, sharing the sealed global's memory (every client gets
/// the same ciphertexts).
fn sealed_bytes(sealed: Arc<SealedTensors>) -> Bytes {
    struct Owner(Arc<SealedTensors>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            self.0.bytes()
        }
    }
    Bytes::from_owner(Owner(sealed))
}

fn owned_values_bytes(params: Parameters) -> Bytes {
    values_bytes(Arc::new(params))
}

fn sealed_header(sealed: Option<&SealedTensors>) -> Option<proto::Sealed> {
    sealed.map(|s| proto::Sealed {
        layout: layout_to_proto(s.layout()),
        len: s.bytes().len() as u64,
    })
}

fn extra_header(extra: &Parameters) -> proto::Extra {
    proto::Extra {
        layout: layout_to_proto(extra.layout()),
    }
}

/// A message to stream: its header and the payload that follows as chunks.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing<H> {
    pub header: H,
    pub payload: Vec<Bytes>,
}

impl<H> Outgoing<H> {
    /// Payload size in bytes.
    pub fn payload_len(&self) -> u64 {
        self.payload.iter().map(|b| b.len() as u64).sum()
    }
}

/// Encodes a task; the model values are shared, not copied.
pub(crate) fn encode_task(task_id: u64, task: &Task) -> Result<Outgoing<proto::TaskHeader>> {
    let extra = match task {
        Task::Fit(f) => f.extra.clone(),
        _ => None,
    };
    let (kind, round, config, parameters, sealed) = match task {
        Task::Fit(f) => (
            proto::TaskKind::Fit,
            f.round,
            serde_json::to_string(&f.config)?,
            &f.parameters,
            &f.sealed,
        ),
        Task::Evaluate(e) => (
            proto::TaskKind::Evaluate,
            e.round,
            String::new(),
            &e.parameters,
            &e.sealed,
        ),
        Task::Step(s) => (
            proto::TaskKind::Step,
            s.round,
            String::new(),
            &s.values,
            &s.sealed,
        ),
    };
    let (step, metrics_json) = match task {
        Task::Step(s) => (s.step, serde_json::to_string(&s.metrics)?),
        _ => (0, String::new()),
    };
    let mut payload = vec![values_bytes(parameters.clone())];
    let extra_header = extra.as_ref().map(|e| extra_header(e));
    if let Some(e) = extra {
        payload.push(values_bytes(e));
    }
    if let Some(s) = sealed {
        payload.push(sealed_bytes(s.clone()));
    }
    Ok(Outgoing {
        header: proto::TaskHeader {
            task_id,
            kind: kind as i32,
            round,
            train_config_json: config,
            layout: layout_to_proto(parameters.layout()),
            sealed: sealed_header(sealed.as_deref()),
            step,
            metrics_json,
            extra: extra_header,
        },
        payload,
    })
}

/// A step reply's fields other than its tensors, sent as JSON.
#[derive(Debug, Serialize, Deserialize)]
struct StepMeta {
    round: u64,
    step: u32,
    metrics: Metrics,
}

/// The update's fields other than its tensors, sent as JSON.
#[derive(Debug, Serialize, Deserialize)]
struct UpdateMeta {
    client: ClientId,
    round: u64,
    num_examples: u64,
    kind: UpdateKind,
    metrics: Metrics,
    provenance: Vec<Protection>,
}

/// A reply that carries tensors: its metadata as JSON, its values, then its
/// sealed bytes (fit updates and step answers).
fn tensor_reply(
    task_id: u64,
    kind: proto::TaskKind,
    meta: &impl Serialize,
    values: Parameters,
    compressed: Option<Compressed>,
    extra: Option<Parameters>,
    sealed: Option<SealedTensors>,
) -> Result<Outgoing<proto::ReplyHeader>> {
    let header = proto::ReplyHeader {
        task_id,
        kind: kind as i32,
        meta_json: serde_json::to_string(meta)?,
        layout: layout_to_proto(values.layout()),
        sealed: sealed_header(sealed.as_ref()),
        extra: extra.as_ref().map(extra_header),
        encoding: compressed
            .as_ref()
            .map(|c| c.encoding().to_string())
            .unwrap_or_default(),
    };
    let mut payload = vec![match compressed {
        Some(c) => Bytes::from(c.into_bytes()),
        None => owned_values_bytes(values),
    }];
    if let Some(e) = extra {
        payload.push(owned_values_bytes(e));
    }
    if let Some(s) = sealed {
        payload.push(Bytes::from(s.bytes().to_vec()));
    }
    Ok(Outgoing { header, payload })
}

/// Encodes a reply.
pub(crate) fn encode_reply(task_id: u64, reply: Reply) -> Result<Outgoing<proto::ReplyHeader>> {
    match reply {
        Reply::Fit(u) => {
            let meta = UpdateMeta {
                client: u.client,
                round: u.round,
                num_examples: u.num_examples,
                kind: u.kind,
                metrics: u.metrics,
                provenance: u.provenance,
            };
            tensor_reply(
                task_id,
                proto::TaskKind::Fit,
                &meta,
                u.values,
                u.compressed,
                u.extra,
                u.sealed,
            )
        }
        Reply::Step(r) => {
            let meta = StepMeta {
                round: r.round,
                step: r.step,
                metrics: r.metrics,
            };
            tensor_reply(
                task_id,
                proto::TaskKind::Step,
                &meta,
                r.values,
                None,
                None,
                r.sealed,
            )
        }
        Reply::Evaluate(e) => Ok(Outgoing {
            header: proto::ReplyHeader {
                task_id,
                kind: proto::TaskKind::Evaluate as i32,
                meta_json: serde_json::to_string(&e)?,
                layout: Vec::new(),
                sealed: None,
                extra: None,
                encoding: String::new(),
            },
            payload: Vec::new(),
        }),
    }
}

/// Splits payload parts into chunks of at most `chunk_bytes` (no copies).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn chunks(
    task_id: u64,
    payload: &[Bytes],
    chunk_bytes: usize,
) -> impl Iterator<Item = proto::Chunk> + '_ {
    chunks_from(task_id, payload, chunk_bytes, 0, 0)
}

/// How many bytes a transfer sends in short chunks first, after its
/// header. tonic hands the encoded messages to HTTP/2 in buffers of at
/// least 32 KiB (its yield threshold) and HTTP/2 never puts two of them in
/// one frame, so this lead leaves the header in a frame of 32 KiB and a
/// little, not in the first of 256 KiB
/// ([`Limits::frame_bytes`](super::Limits::frame_bytes)). On a 50 KB/s link
/// the peer then knows the transfer, and reports its progress, after
/// 0.7 s instead of 5 s.
pub(crate) const LEAD_CHUNK_BYTES: usize = 32 << 10;

/// The chunks of a transfer: from the start after its header, led by
/// [`LEAD_CHUNK_BYTES`] in short chunks; or, resumed from byte `from`
/// (no header goes first), in whole chunks only.
pub(crate) fn transfer_chunks(
    task_id: u64,
    payload: &[Bytes],
    chunk_bytes: usize,
    from: Option<u64>,
) -> impl Iterator<Item = proto::Chunk> + '_ {
    match from {
        None => chunks_from(task_id, payload, chunk_bytes, LEAD_CHUNK_BYTES, 0),
        Some(from) => chunks_from(task_id, payload, chunk_bytes, 0, from),
    }
}

/// The chunks of the payload from byte `from` on (a resumed transfer):
/// the first `lead` bytes in chunks of at most `lead` bytes, the rest in
/// chunks of at most `chunk_bytes`, none across the end of a part (no
/// copies).
pub(crate) fn chunks_from(
    task_id: u64,
    payload: &[Bytes],
    chunk_bytes: usize,
    lead: usize,
    from: u64,
) -> impl Iterator<Item = proto::Chunk> + '_ {
    let chunk_bytes = chunk_bytes.max(1);
    // What is left of the lead.
    let mut lead = lead;
    // The part being sent, where it starts in the payload, and where in it
    // the next chunk starts.
    let (mut part, mut base, mut at) = (0, 0u64, 0usize);
    std::iter::from_fn(move || {
        loop {
            let p = payload.get(part)?;
            let n = p.len();
            // Past `from`, or not at all.
            let skip = usize::try_from(from.saturating_sub(base)).map_or(n, |f| f.min(n));
            let s = at.max(skip);
            if s >= n {
                (part, base, at) = (part + 1, base + n as u64, 0);
                continue;
            }
            let size = if lead > 0 {
                lead.min(chunk_bytes)
            } else {
                chunk_bytes
            };
            let end = (s + size).min(n);
            at = end;
            lead = lead.saturating_sub(end - s);
            return Some(proto::Chunk {
                task_id,
                offset: base + s as u64,
                data: p.slice(s..end),
            });
        }
    })
}

/// Collects a payload of known size from chunks: encoded bytes (a lossy
/// encoding's values), f32 values, sealed bytes, in that order.
#[derive(Debug)]
pub(crate) struct Assembler {
    task_id: u64,
    /// Declared sizes: encoded bytes, f32 values, sealed bytes.
    sizes: [usize; 3],
    /// The payload's parts as they arrive. Reserved, not zeroed: bytes are
    /// appended, so memory is written once (a zeroed 28 MB buffer cost a
    /// pass of its own per transfer).
    encoded: Vec<u8>,
    values: Vec<f32>,
    /// The first bytes of a value that the chunk ended in the middle of.
    partial: ([u8; 4], usize),
    sealed: Vec<u8>,
    received: u64,
    total: u64,
    /// Checks the chunks' order and size but keeps nothing (a reply that
    /// nobody waits for any more).
    discard: bool,
}

impl Assembler {
    /// Expects `encoded` bytes, `values` f32 values, then `sealed` bytes;
    /// refuses a total over `max_bytes` before allocating anything.
    pub fn new(
        task_id: u64,
        encoded: u64,
        values: usize,
        sealed: u64,
        max_bytes: u64,
    ) -> Result<Self> {
        let total = (values as u64)
            .checked_mul(4)
            .and_then(|v| v.checked_add(sealed))
            .and_then(|v| v.checked_add(encoded))
            .ok_or_else(|| bad("declared payload size overflows"))?;
        if total > max_bytes {
            return Err(bad(format!(
                "declared payload of {total} bytes exceeds the limit of {max_bytes} bytes"
            )));
        }
        Ok(Self {
            task_id,
            sizes: [encoded as usize, values, sealed as usize],
            encoded: Vec::with_capacity(encoded as usize),
            values: Vec::with_capacity(values),
            partial: ([0; 4], 0),
            sealed: Vec::with_capacity(sealed as usize),
            received: 0,
            total,
            discard: false,
        })
    }

    /// Reads a payload of `total` bytes (at most `max_bytes`) and keeps none of it.
    pub fn discarding(task_id: u64, total: u64, max_bytes: u64) -> Result<Self> {
        if total > max_bytes {
            return Err(bad(format!(
                "declared payload of {total} bytes exceeds the limit of {max_bytes} bytes"
            )));
        }
        Ok(Self {
            task_id,
            sizes: [0; 3],
            encoded: Vec::new(),
            values: Vec::new(),
            partial: ([0; 4], 0),
            sealed: Vec::new(),
            received: 0,
            total,
            discard: true,
        })
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// True when it keeps nothing.
    pub fn is_discarding(&self) -> bool {
        self.discard
    }

    /// The bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// True when every byte arrived.
    pub fn is_complete(&self) -> bool {
        self.received == self.total()
    }

    /// Adds the next chunk; chunks must come in order and fit the size.
    pub fn push(&mut self, chunk: &proto::Chunk) -> Result<()> {
        if chunk.task_id != self.task_id {
            return Err(bad(format!(
                "chunk for task {} while receiving task {}",
                chunk.task_id, self.task_id
            )));
        }
        if chunk.offset != self.received {
            return Err(bad(format!(
                "chunk at offset {}, expected {}",
                chunk.offset, self.received
            )));
        }
        let end = self.received + chunk.data.len() as u64;
        if end > self.total() {
            return Err(bad(format!(
                "payload exceeds its declared size of {} bytes",
                self.total()
            )));
        }
        if self.discard {
            self.received = end;
            return Ok(());
        }
        // The parts in order; `end <= total` above means the chunk fits.
        let data: &[u8] = &chunk.data;
        let [encoded, values, _] = self.sizes;
        let n = (encoded - self.encoded.len()).min(data.len());
        self.encoded.extend_from_slice(&data[..n]);
        let data = &data[n..];
        let n = (values * 4 - self.values.len() * 4 - self.partial.1).min(data.len());
        self.push_values(&data[..n]);
        self.sealed.extend_from_slice(&data[n..]);
        self.received = end;
        Ok(())
    }

    /// Appends little-endian f32 bytes, keeping a value split across
    /// chunks until its last byte comes.
    fn push_values(&mut self, mut bytes: &[u8]) {
        let (buf, have) = &mut self.partial;
        if *have > 0 {
            let k = (4 - *have).min(bytes.len());
            buf[*have..*have + k].copy_from_slice(&bytes[..k]);
            *have += k;
            bytes = &bytes[k..];
            if *have < 4 {
                return;
            }
            self.values.push(f32::from_le_bytes(*buf));
            *have = 0;
        }
        let whole = bytes.chunks_exact(4);
        let rest = whole.remainder();
        self.values
            .extend(whole.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        buf[..rest.len()].copy_from_slice(rest);
        *have = rest.len();
    }

    /// The encoded bytes, the values (in host order) and the sealed bytes.
    fn finish(self) -> Result<(Vec<u8>, Vec<f32>, Vec<u8>)> {
        if !self.is_complete() {
            return Err(bad(format!(
                "payload incomplete: {} of {} bytes",
                self.received,
                self.total()
            )));
        }
        Ok((self.encoded, self.values, self.sealed))
    }
}

fn sealed_layout(sealed: &Option<proto::Sealed>) -> Result<Option<(Arc<Layout>, u64)>> {
    sealed
        .as_ref()
        .map(|s| Ok((layout_from_proto(&s.layout)?, s.len)))
        .transpose()
}

/// A header's payload plan: the values' layout and encoding, the extra
/// tensors' layout, the sealed layout and size.
pub(crate) struct Plan {
    pub layout: Arc<Layout>,
    pub encoding: Encoding,
    pub extra: Option<Arc<Layout>>,
    pub sealed: Option<(Arc<Layout>, u64)>,
}

/// A payload's parts, decoded: the values (and their encoded form, when
/// they came in a lossy encoding), the extra tensors, the sealed tensors.
type Parts = (
    Parameters,
    Option<Compressed>,
    Option<Parameters>,
    Option<SealedTensors>,
);

fn extra_layout(extra: &Option<proto::Extra>) -> Result<Option<Arc<Layout>>> {
    extra
        .as_ref()
        .map(|e| layout_from_proto(&e.layout))
        .transpose()
}

impl Plan {
    pub fn of_task(h: &proto::TaskHeader) -> Result<Self> {
        Ok(Self {
            layout: layout_from_proto(&h.layout)?,
            encoding: Encoding::F32,
            extra: extra_layout(&h.extra)?,
            sealed: sealed_layout(&h.sealed)?,
        })
    }

    pub fn of_reply(h: &proto::ReplyHeader) -> Result<Self> {
        let encoding = match h.encoding.as_str() {
            "" => Encoding::F32,
            e => e
                .parse()
                .map_err(|e| bad(format!("bad value encoding: {e}")))?,
        };
        if !encoding.is_lossless() && h.kind != proto::TaskKind::Fit as i32 {
            return Err(bad("only a fit reply carries encoded values"));
        }
        Ok(Self {
            layout: layout_from_proto(&h.layout)?,
            encoding,
            extra: extra_layout(&h.extra)?,
            sealed: sealed_layout(&h.sealed)?,
        })
    }

    /// Bytes of the layout's values in a lossy encoding (0 when they come
    /// as f32 with the rest).
    fn encoded(&self) -> u64 {
        if self.encoding.is_lossless() {
            0
        } else {
            self.encoding.encoded_len(&self.layout)
        }
    }

    /// f32 values in the payload: the tensors' (unless encoded), then the
    /// extra tensors'.
    fn values(&self) -> usize {
        let own = if self.encoding.is_lossless() {
            self.layout.len()
        } else {
            0
        };
        own.saturating_add(self.extra.as_ref().map_or(0, |e| e.len()))
    }

    /// Payload bytes the header declares.
    pub fn total_bytes(&self) -> u64 {
        (self.values() as u64)
            .saturating_mul(4)
            .saturating_add(self.encoded())
            .saturating_add(self.sealed.as_ref().map_or(0, |s| s.1))
    }

    pub fn assembler(&self, task_id: u64, max_bytes: u64) -> Result<Assembler> {
        // Encoded values decode to float32: their decoded size is held to
        // the same limit, so a few declared bytes cannot ask for a huge
        // allocation.
        let decoded = (self.layout.len() as u64).saturating_mul(4);
        if !self.encoding.is_lossless() && decoded > max_bytes {
            return Err(bad(format!(
                "declared {} values decode to {decoded} bytes, over the limit of {max_bytes} bytes",
                self.encoding
            )));
        }
        Assembler::new(
            task_id,
            self.encoded(),
            self.values(),
            self.sealed.as_ref().map_or(0, |s| s.1),
            max_bytes,
        )
    }

    fn finish(self, assembler: Assembler) -> Result<Parts> {
        let (encoded, mut values, sealed) = assembler.finish()?;
        let (params, compressed, tail) = if self.encoding.is_lossless() {
            let tail = values.split_off(self.layout.len());
            (Parameters::new(self.layout, values)?, None, tail)
        } else {
            let c = Compressed::new(self.encoding, encoded);
            let params = c
                .decode(self.layout)
                .map_err(|e| bad(format!("bad encoded values: {e}")))?;
            (params, Some(c), values)
        };
        let extra = match self.extra {
            Some(layout) => Some(Parameters::new(layout, tail)?),
            None => None,
        };
        let sealed = self.sealed.map(|(l, _)| SealedTensors::new(l, sealed));
        Ok((params, compressed, extra, sealed))
    }
}

/// Decodes a complete task.
pub(crate) fn decode_task(
    header: &proto::TaskHeader,
    plan: Plan,
    assembler: Assembler,
) -> Result<Task> {
    let (parameters, _, extra, sealed) = plan.finish(assembler)?;
    let parameters = Arc::new(parameters);
    let sealed = sealed.map(Arc::new);
    let kind = proto::TaskKind::try_from(header.kind);
    if extra.is_some() && kind != Ok(proto::TaskKind::Fit) {
        return Err(bad("only a fit task carries extra tensors"));
    }
    match kind {
        Ok(proto::TaskKind::Fit) => {
            let config: TrainConfig = serde_json::from_str(&header.train_config_json)
                .map_err(|e| bad(format!("bad training configuration: {e}")))?;
            Ok(Task::Fit(FitIns {
                round: header.round,
                parameters,
                config,
                sealed,
                extra: extra.map(Arc::new),
            }))
        }
        Ok(proto::TaskKind::Evaluate) => Ok(Task::Evaluate(EvaluateIns {
            round: header.round,
            parameters,
            sealed,
        })),
        Ok(proto::TaskKind::Step) => {
            let metrics: Metrics = serde_json::from_str(&header.metrics_json)
                .map_err(|e| bad(format!("bad step metrics: {e}")))?;
            Ok(Task::Step(StepIns {
                round: header.round,
                step: header.step,
                values: parameters,
                sealed,
                metrics,
                // A server-side limit; the client does not need it.
                max_reply_bytes: 0,
            }))
        }
        _ => Err(bad(format!("unknown task kind {}", header.kind))),
    }
}

/// Decodes a complete reply.
pub(crate) fn decode_reply(
    header: &proto::ReplyHeader,
    plan: Plan,
    assembler: Assembler,
) -> Result<Reply> {
    match proto::TaskKind::try_from(header.kind) {
        Ok(proto::TaskKind::Fit) => {
            let meta: UpdateMeta = serde_json::from_str(&header.meta_json)
                .map_err(|e| bad(format!("bad update metadata: {e}")))?;
            let (values, compressed, extra, sealed) = plan.finish(assembler)?;
            let mut update = ClientUpdate::new(meta.client, meta.round, meta.num_examples, values)
                .with_kind(meta.kind)
                .with_metrics(meta.metrics);
            update.provenance = meta.provenance;
            update.sealed = sealed;
            update.extra = extra;
            update.compressed = compressed;
            Ok(Reply::Fit(update))
        }
        Ok(proto::TaskKind::Evaluate) => {
            if !plan.layout.is_empty() || plan.sealed.is_some() || plan.extra.is_some() {
                return Err(bad("an evaluation reply carries tensors"));
            }
            let e: Evaluation = serde_json::from_str(&header.meta_json)
                .map_err(|e| bad(format!("bad evaluation: {e}")))?;
            Ok(Reply::Evaluate(e))
        }
        Ok(proto::TaskKind::Step) => {
            let meta: StepMeta = serde_json::from_str(&header.meta_json)
                .map_err(|e| bad(format!("bad step metadata: {e}")))?;
            let (values, _, extra, sealed) = plan.finish(assembler)?;
            if extra.is_some() {
                return Err(bad("a step reply carries extra tensors"));
            }
            Ok(Reply::Step(StepReply {
                round: meta.round,
                step: meta.step,
                values,
                sealed,
                metrics: meta.metrics,
            }))
        }
        _ => Err(bad(format!("unknown reply kind {}", header.kind))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Parameters {
        Parameters::from_tensors([
            (
                "a.weight",
                vec![2, 3],
                vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE, -0.0, 7.0],
            ),
            ("b.bias", vec![3], vec![0.1, 0.2, 0.3]),
        ])
        .unwrap()
    }

    fn reassemble(plan: &Plan, task_id: u64, payload: &[Bytes], chunk: usize) -> Assembler {
        let mut a = plan.assembler(task_id, 1 << 20).unwrap();
        for c in chunks(task_id, payload, chunk) {
            a.push(&c).unwrap();
        }
        assert!(a.is_complete());
        a
    }

    #[test]
    fn fit_task_round_trips_bit_exactly_whatever_the_chunk_size() {
        let layout = Arc::new(Layout::new([TensorSpec::new("h", vec![2])]).unwrap());
        let task = Task::Fit(FitIns {
            round: 7,
            parameters: Arc::new(params()),
            config: TrainConfig::default(),
            sealed: Some(Arc::new(SealedTensors::new(layout, vec![9, 8, 7, 6, 5]))),
            extra: Some(Arc::new(
                Parameters::from_tensors([("c", vec![2], vec![0.5, -f32::MAX])]).unwrap(),
            )),
        });
        for chunk in [1, 3, 4, 7, 1024] {
            let out = encode_task(11, &task).unwrap();
            assert_eq!(out.payload_len(), (9 + 2) * 4 + 5);
            let plan = Plan::of_task(&out.header).unwrap();
            let a = reassemble(&plan, 11, &out.payload, chunk);
            let Task::Fit(got) = decode_task(&out.header, plan, a).unwrap() else {
                panic!("not a fit task")
            };
            let Task::Fit(want) = &task else {
                unreachable!()
            };
            assert_eq!(got.round, 7);
            assert_eq!(got.config, want.config);
            let bits =
                |p: &Parameters| p.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.parameters), bits(&want.parameters));
            assert_eq!(
                got.parameters.layout().tensors(),
                want.parameters.layout().tensors()
            );
            assert_eq!(got.sealed.unwrap().bytes(), &[9, 8, 7, 6, 5]);
            assert_eq!(got.extra, want.extra);
        }
    }

    /// A transfer cut anywhere resumes from the receiver's offset: the
    /// chunks from there complete it, whatever the chunk size on either
    /// side of the cut and wherever the payload's parts meet.
    #[test]
    fn a_transfer_resumes_from_any_offset_bit_exactly() {
        let u = ClientUpdate::new("site-a".into(), 3, 42, params())
            .with_extra(Parameters::from_tensors([("c", vec![1, 2], vec![1.5, -2.0])]).unwrap());
        let out = encode_reply(5, Reply::Fit(u.clone())).unwrap();
        let total = out.payload_len();
        assert!(out.payload.len() >= 2, "parts that meet inside the payload");
        // Chunk sizes before and after the cut, and the resumed transfer's
        // first chunk.
        for (before, after, lead) in [(3, 5, 5), (7, 1, 1), (64, 2, 1), (1, 64, 3), (5, 7, 2)] {
            for cut in 0..=total {
                let plan = Plan::of_reply(&out.header).unwrap();
                let mut a = plan.assembler(5, 1 << 20).unwrap();
                for c in chunks(5, &out.payload, before) {
                    if a.received() + c.data.len() as u64 > cut {
                        break; // the connection dropped here
                    }
                    a.push(&c).unwrap();
                }
                let from = a.received();
                assert!(from <= cut);
                for (k, c) in chunks_from(5, &out.payload, after, lead, from).enumerate() {
                    assert!(c.data.len() <= if k == 0 { lead } else { after });
                    a.push(&c).unwrap();
                }
                assert!(a.is_complete(), "cut at {cut}, resumed at {from}");
                let Reply::Fit(got) = decode_reply(&out.header, plan, a).unwrap() else {
                    panic!("not a fit reply")
                };
                assert_eq!(got, u);
            }
        }
        // From the end: nothing left; past it: nothing either.
        assert_eq!(chunks_from(5, &out.payload, 4, 2, total).count(), 0);
        assert_eq!(chunks_from(5, &out.payload, 4, 2, total + 9).count(), 0);
    }

    #[test]
    fn a_transfer_leads_with_short_chunks_and_goes_on_in_whole_ones() {
        let part = |n: usize| Bytes::from((0..n).map(|i| i as u8).collect::<Vec<u8>>());
        let payload = [part(10), part(3), part(0), part(9)];
        let sizes = |lead, from| {
            chunks_from(1, &payload, 4, lead, from)
                .map(|c| (c.offset, c.data.len()))
                .collect::<Vec<_>>()
        };
        // The lead chunk, then whole chunks, each part cut at its end.
        assert_eq!(
            sizes(1, 0),
            [
                (0, 1),
                (1, 4),
                (5, 4),
                (9, 1),
                (10, 3),
                (13, 4),
                (17, 4),
                (21, 1)
            ]
        );
        // From inside a part. A lead that a part ends goes on in the next
        // part (a header followed by a short part still leaves with the
        // whole lead). A lead larger than a chunk goes in whole chunks.
        assert_eq!(sizes(2, 11), [(11, 2), (13, 4), (17, 4), (21, 1)]);
        assert_eq!(
            sizes(3, 8),
            [(8, 2), (10, 1), (11, 2), (13, 4), (17, 4), (21, 1)]
        );
        assert_eq!(sizes(6, 9)[..3], [(9, 1), (10, 3), (13, 2)]);
        assert_eq!(sizes(9, 0)[..4], [(0, 4), (4, 4), (8, 1), (9, 1)]);
        // A transfer from the start leads; a resumed one does not.
        let big = [part(100_000)];
        let lens = |from| {
            transfer_chunks(1, &big, 64 << 10, from)
                .map(|c| c.data.len())
                .collect::<Vec<_>>()
        };
        let (lead, chunk) = (LEAD_CHUNK_BYTES, 64 << 10);
        assert_eq!(lens(None), [lead, chunk, 100_000 - lead - chunk]);
        assert_eq!(lens(Some(0)), [chunk, 100_000 - chunk]);
        // The bytes are the payload's, in order.
        let joined: Vec<u8> = chunks_from(1, &payload, 4, 1, 0)
            .flat_map(|c| c.data.to_vec())
            .collect();
        let whole: Vec<u8> = payload.iter().flat_map(|p| p.to_vec()).collect();
        assert_eq!(joined, whole);
    }

    #[test]
    fn fit_reply_round_trips() {
        let mut u =
            ClientUpdate::new("site-a".into(), 3, 42, params()).with_kind(UpdateKind::Delta);
        u.metrics.insert("loss".into(), 0.25);
        for u in [
            u.clone(),
            u.with_extra(Parameters::from_tensors([("c", vec![1, 2], vec![1.5, -2.0])]).unwrap()),
        ] {
            let out = encode_reply(5, Reply::Fit(u.clone())).unwrap();
            let plan = Plan::of_reply(&out.header).unwrap();
            let a = reassemble(&plan, 5, &out.payload, 5);
            let Reply::Fit(got) = decode_reply(&out.header, plan, a).unwrap() else {
                panic!("not a fit reply")
            };
            assert_eq!(got, u);
        }
    }

    /// An update in a lossy encoding travels as its encoded bytes, comes
    /// back equal (values, encoding, extra tensors), and costs the bytes
    /// the encoding promises.
    fn compressed(u: &ClientUpdate, enc: Encoding) -> ClientUpdate {
        let c = enc.encode(&u.values).unwrap();
        let mut out = u.with_values(c.decode(u.values.layout().clone()).unwrap());
        out.compressed = Some(c);
        out
    }

    #[test]
    fn an_encoded_fit_reply_round_trips_in_fewer_bytes() {
        let extra = Parameters::from_tensors([("c", vec![1, 2], vec![1.5, -2.0])]).unwrap();
        let u = ClientUpdate::new("site-a".into(), 3, 42, params()).with_extra(extra);
        for (enc, values_bytes) in [
            (Encoding::F16, 18),
            (Encoding::Bf16, 18),
            (Encoding::Int8, 6 + 4 + 3 + 4),
            (Encoding::TopK { fraction: 0.3 }, (2 + 1) * 8),
        ] {
            let u = compressed(&u, enc);
            let out = encode_reply(5, Reply::Fit(u.clone())).unwrap();
            assert_eq!(out.header.encoding, enc.to_string());
            assert_eq!(out.payload_len(), values_bytes + 2 * 4, "{enc}");
            assert_eq!(u.upload_bytes(), values_bytes + 2 * 4, "{enc}");
            let plan = Plan::of_reply(&out.header).unwrap();
            assert_eq!(plan.total_bytes(), out.payload_len());
            for chunk in [1, 5, 1024] {
                let a = reassemble(&plan, 5, &out.payload, chunk);
                let plan = Plan::of_reply(&out.header).unwrap();
                let Reply::Fit(got) = decode_reply(&out.header, plan, a).unwrap() else {
                    panic!("not a fit reply")
                };
                assert_eq!(got, u, "{enc}, chunks of {chunk}");
            }
        }
    }

    #[test]
    fn bad_encoded_values_are_refused_with_a_reason() {
        let u = compressed(
            &ClientUpdate::new("site-a".into(), 3, 42, params()),
            Encoding::Int8,
        );
        let out = encode_reply(5, Reply::Fit(u)).unwrap();
        // A NaN scale for `a.weight` (the payload's first four bytes).
        let mut bytes = out.payload[0].to_vec();
        bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let plan = Plan::of_reply(&out.header).unwrap();
        let a = reassemble(&plan, 5, &[Bytes::from(bytes)], 7);
        let err = decode_reply(&out.header, plan, a).unwrap_err().to_string();
        assert!(
            err.contains("bad encoded values") && err.contains("NaN"),
            "{err}"
        );
        // An unknown encoding, and an encoding on a step reply.
        let mut header = out.header.clone();
        // Top-k of a tiny fraction declares 8 bytes for a huge tensor;
        // its decoded size is over the limit, refused before allocating.
        let mut huge = out.header.clone();
        huge.encoding = "top-k:1e-300".into();
        huge.layout = vec![proto::TensorSpec {
            name: "w".into(),
            shape: vec![1 << 40],
        }];
        let plan = Plan::of_reply(&huge).unwrap();
        assert_eq!(plan.total_bytes(), 8);
        let err = plan.assembler(5, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("decode to 4398046511104 bytes"), "{err}");
        header.encoding = "int4".into();
        let err = Plan::of_reply(&header).err().unwrap().to_string();
        assert!(err.contains("bad value encoding"), "{err}");
        header.encoding = "int8".into();
        header.kind = proto::TaskKind::Step as i32;
        let err = Plan::of_reply(&header).err().unwrap().to_string();
        assert!(err.contains("only a fit reply"), "{err}");
    }

    #[test]
    fn extra_tensors_outside_a_fit_are_refused() {
        let mut out = encode_reply(
            2,
            Reply::Step(StepReply {
                round: 1,
                step: 1,
                values: params(),
                sealed: None,
                metrics: Metrics::new(),
            }),
        )
        .unwrap();
        out.header.extra = Some(proto::Extra {
            layout: vec![proto::TensorSpec {
                name: "c".into(),
                shape: vec![1],
            }],
        });
        out.payload.push(Bytes::from_static(&[0, 0, 128, 63]));
        let plan = Plan::of_reply(&out.header).unwrap();
        let a = reassemble(&plan, 2, &out.payload, 7);
        let err = decode_reply(&out.header, plan, a).unwrap_err();
        assert!(err.to_string().contains("carries extra tensors"), "{err}");
    }

    #[test]
    fn assembler_refuses_oversized_declarations_and_bad_chunks() {
        let err = Assembler::new(1, 0, 1 << 30, 0, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        assert!(Assembler::new(1, 0, usize::MAX / 2, u64::MAX, u64::MAX).is_err());
        let mut a = Assembler::new(1, 0, 2, 0, 100).unwrap();
        let chunk = |task_id, offset, data: &[u8]| proto::Chunk {
            task_id,
            offset,
            data: Bytes::copy_from_slice(data),
        };
        assert!(
            a.push(&chunk(2, 0, &[0; 4])).is_err(),
            "another task's chunk"
        );
        assert!(a.push(&chunk(1, 4, &[0; 4])).is_err(), "a gap");
        a.push(&chunk(1, 0, &[0; 4])).unwrap();
        assert!(
            a.push(&chunk(1, 4, &[0; 8])).is_err(),
            "past the declared size"
        );
        assert!(!a.is_complete());
    }

    #[test]
    fn a_reply_with_bad_metadata_is_an_error() {
        let out =
            encode_reply(1, Reply::Fit(ClientUpdate::new("a".into(), 1, 1, params()))).unwrap();
        let mut header = out.header.clone();
        header.meta_json = "{not json".into();
        let plan = Plan::of_reply(&header).unwrap();
        let a = reassemble(&plan, 1, &out.payload, 64);
        let err = decode_reply(&header, plan, a).unwrap_err();
        assert!(err.to_string().contains("bad update metadata"), "{err}");
    }
}
