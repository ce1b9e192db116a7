//! Entry points for the fuzz targets in `fedcore/fuzz` (feature `fuzzing`).
//! Not a stable API: they exist so that cargo-fuzz reaches the decoders a
//! peer's bytes go through, exactly as a session runs them.

use prost::Message;

use super::proto::{self, client_message, server_message};
use super::wire::{self, Assembler, Plan};
use crate::error::{Error, Result};
use crate::transport::{Reply, Task};

/// At most this many messages are read from one input.
const MAX_MESSAGES: usize = 4096;

fn next<M: Message + Default>(buf: &mut &[u8]) -> Result<Option<M>> {
    if buf.is_empty() {
        return Ok(None);
    }
    M::decode_length_delimited(buf)
        .map(Some)
        .map_err(|e| Error::Transport(format!("protobuf: {e}")))
}

/// One message of a payload stream, as the reader sees it.
enum Frame<H> {
    Header(H),
    Chunk(proto::Chunk),
    Other,
}

/// Reads a header (messages before it are skipped, as heartbeats are) and
/// the chunks of its payload, under the payload limit `max_payload`.
fn assemble<M: Message + Default, H>(
    mut bytes: &[u8],
    max_payload: u64,
    frame: impl Fn(M) -> Frame<H>,
    plan: impl Fn(&H) -> Result<(Plan, u64)>,
) -> Result<(H, Plan, Assembler)> {
    let buf = &mut bytes;
    let header = loop {
        match next::<M>(buf)?.map(&frame) {
            Some(Frame::Header(h)) => break h,
            Some(_) => continue,
            None => return Err(Error::Transport("no header".into())),
        }
    };
    let (plan, task_id) = plan(&header)?;
    let mut assembler = plan.assembler(task_id, max_payload)?;
    for _ in 0..MAX_MESSAGES {
        if assembler.is_complete() {
            break;
        }
        match next::<M>(buf)?.map(&frame) {
            Some(Frame::Chunk(c)) => assembler.push(&c)?,
            Some(_) => return Err(Error::Transport("a message inside a payload".into())),
            None => break,
        }
    }
    // Decoding an incomplete payload is an error of its own.
    Ok((header, plan, assembler))
}

/// Reads `bytes` as a client would: length-delimited `ServerMessage`s, a
/// task header then its chunks, with a payload limit of `max_payload`
/// bytes; decodes the task once its payload is complete.
pub fn task_from_frames(bytes: &[u8], max_payload: u64) -> Result<Task> {
    let (header, plan, assembler) = assemble(
        bytes,
        max_payload,
        |m: proto::ServerMessage| match m.kind {
            Some(server_message::Kind::Task(h)) => Frame::Header(h),
            Some(server_message::Kind::Chunk(c)) => Frame::Chunk(c),
            _ => Frame::Other,
        },
        |h| Ok((Plan::of_task(h)?, h.task_id)),
    )?;
    wire::decode_task(&header, plan, assembler)
}

/// Reads `bytes` as the server would: length-delimited `ClientMessage`s, a
/// reply header then its chunks, with a payload limit of `max_payload`.
pub fn reply_from_frames(bytes: &[u8], max_payload: u64) -> Result<Reply> {
    let (header, plan, assembler) = assemble(
        bytes,
        max_payload,
        |m: proto::ClientMessage| match m.kind {
            Some(client_message::Kind::Reply(h)) => Frame::Header(h),
            Some(client_message::Kind::Chunk(c)) => Frame::Chunk(c),
            _ => Frame::Other,
        },
        |h| Ok((Plan::of_reply(h)?, h.task_id)),
    )?;
    wire::decode_reply(&header, plan, assembler)
}

/// Length-delimited messages: `header`, then one per chunk of `payload`.
fn frames<M: Message>(
    header: M,
    payload: &[bytes::Bytes],
    chunk_bytes: usize,
    chunk: impl Fn(proto::Chunk) -> M,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let messages = std::iter::once(header).chain(wire::chunks(1, payload, chunk_bytes).map(chunk));
    for m in messages {
        m.encode_length_delimited(&mut bytes)
            .map_err(|e| Error::Transport(e.to_string()))?;
    }
    Ok(bytes)
}

/// Encodes `task` as the frames [`task_from_frames`] reads (for seed corpora
/// and tests), with chunks of `chunk_bytes`.
pub fn task_to_frames(task: &Task, chunk_bytes: usize) -> Result<Vec<u8>> {
    let out = wire::encode_task(1, task)?;
    let msg = |kind| proto::ServerMessage { kind: Some(kind) };
    frames(
        msg(server_message::Kind::Task(out.header)),
        &out.payload,
        chunk_bytes,
        |c| msg(server_message::Kind::Chunk(c)),
    )
}

/// Encodes `reply` as the frames [`reply_from_frames`] reads.
pub fn reply_to_frames(reply: Reply, chunk_bytes: usize) -> Result<Vec<u8>> {
    let out = wire::encode_reply(1, reply)?;
    let msg = |kind| proto::ClientMessage { kind: Some(kind) };
    frames(
        msg(client_message::Kind::Reply(out.header)),
        &out.payload,
        chunk_bytes,
        |c| msg(client_message::Kind::Chunk(c)),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::client::{FitIns, StepIns};
    use crate::model::TrainConfig;
    use crate::params::Parameters;
    use crate::update::ClientUpdate;

    fn params() -> Parameters {
        Parameters::from_tensors([("w", vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 7.0, 9.0])]).unwrap()
    }

    #[test]
    fn frames_round_trip_and_truncation_is_an_error() {
        let task = Task::Fit(FitIns {
            round: 3,
            parameters: Arc::new(params()),
            config: TrainConfig::default(),
            sealed: None,
            extra: None,
        });
        let bytes = task_to_frames(&task, 7).unwrap();
        let Task::Fit(back) = task_from_frames(&bytes, 1 << 20).unwrap() else {
            panic!("not a fit task")
        };
        assert_eq!(*back.parameters, params());
        assert!(task_from_frames(&bytes[..bytes.len() - 3], 1 << 20).is_err());
        assert!(
            task_from_frames(&bytes, 8).is_err(),
            "over the payload limit"
        );
        let step = Task::Step(StepIns {
            round: 2,
            step: 1,
            values: Arc::new(params()),
            sealed: None,
            metrics: [("r".to_owned(), 0.5)].into(),
            max_reply_bytes: 0,
        });
        let Task::Step(s) = task_from_frames(&task_to_frames(&step, 5).unwrap(), 1 << 20).unwrap()
        else {
            panic!("not a step")
        };
        assert_eq!((s.round, s.step, s.metrics["r"]), (2, 1, 0.5));

        let reply = Reply::Fit(ClientUpdate::new("a".into(), 1, 4, params()));
        let bytes = reply_to_frames(reply, 5).unwrap();
        let Reply::Fit(u) = reply_from_frames(&bytes, 1 << 20).unwrap() else {
            panic!("not a fit reply")
        };
        assert_eq!(u.values, params());
    }
}
