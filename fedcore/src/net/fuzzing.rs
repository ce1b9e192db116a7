//! Entry points for the fuzz targets in `fedcore/fuzz` (feature `fuzzing`).
//! Not a stable API: they exist so that cargo-fuzz reaches the decoders a
//! peer's bytes go through, exactly as a session runs them.

use prost::Message;

use super::proto::{self, client_message, server_message};
use super::wire::{self, Plan};
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

/// Reads `bytes` as a client would: length-delimited `ServerMessage`s, a
/// task header then its chunks, with a payload limit of `max_payload`
/// bytes; decodes the task once its payload is complete.
pub fn task_from_frames(mut bytes: &[u8], max_payload: u64) -> Result<Task> {
    let buf = &mut bytes;
    let header = loop {
        match next::<proto::ServerMessage>(buf)?.and_then(|m| m.kind) {
            Some(server_message::Kind::Task(h)) => break h,
            Some(_) => continue,
            None => return Err(Error::Transport("no task header".into())),
        }
    };
    let plan = Plan::of_task(&header)?;
    let mut assembler = plan.assembler(header.task_id, max_payload)?;
    for _ in 0..MAX_MESSAGES {
        if assembler.is_complete() {
            return wire::decode_task(&header, plan, assembler);
        }
        match next::<proto::ServerMessage>(buf)?.and_then(|m| m.kind) {
            Some(server_message::Kind::Chunk(c)) => assembler.push(&c)?,
            Some(_) => return Err(Error::Transport("a message inside a payload".into())),
            None => break,
        }
    }
    if assembler.is_complete() {
        return wire::decode_task(&header, plan, assembler);
    }
    Err(Error::Transport("payload incomplete".into()))
}

/// Reads `bytes` as the server would: length-delimited `ClientMessage`s, a
/// reply header then its chunks, with a payload limit of `max_payload`.
pub fn reply_from_frames(mut bytes: &[u8], max_payload: u64) -> Result<Reply> {
    let buf = &mut bytes;
    let header = loop {
        match next::<proto::ClientMessage>(buf)?.and_then(|m| m.kind) {
            Some(client_message::Kind::Reply(h)) => break h,
            Some(_) => continue,
            None => return Err(Error::Transport("no reply header".into())),
        }
    };
    let plan = Plan::of_reply(&header)?;
    let mut assembler = plan.assembler(header.task_id, max_payload)?;
    for _ in 0..MAX_MESSAGES {
        if assembler.is_complete() {
            return wire::decode_reply(&header, plan, assembler);
        }
        match next::<proto::ClientMessage>(buf)?.and_then(|m| m.kind) {
            Some(client_message::Kind::Chunk(c)) => assembler.push(&c)?,
            Some(_) => return Err(Error::Transport("a message inside a payload".into())),
            None => break,
        }
    }
    if assembler.is_complete() {
        return wire::decode_reply(&header, plan, assembler);
    }
    Err(Error::Transport("payload incomplete".into()))
}

/// Encodes `task` as the frames [`task_from_frames`] reads (for seed corpora
/// and tests), with chunks of `chunk_bytes`.
pub fn task_to_frames(task: &Task, chunk_bytes: usize) -> Result<Vec<u8>> {
    let out = wire::encode_task(1, task)?;
    let mut bytes = Vec::new();
    let msg = |kind| proto::ServerMessage { kind: Some(kind) };
    msg(server_message::Kind::Task(out.header.clone()))
        .encode_length_delimited(&mut bytes)
        .map_err(|e| Error::Transport(e.to_string()))?;
    for c in wire::chunks(1, &out.payload, chunk_bytes) {
        msg(server_message::Kind::Chunk(c))
            .encode_length_delimited(&mut bytes)
            .map_err(|e| Error::Transport(e.to_string()))?;
    }
    Ok(bytes)
}

/// Encodes `reply` as the frames [`reply_from_frames`] reads.
pub fn reply_to_frames(reply: Reply, chunk_bytes: usize) -> Result<Vec<u8>> {
    let out = wire::encode_reply(1, reply)?;
    let mut bytes = Vec::new();
    let msg = |kind| proto::ClientMessage { kind: Some(kind) };
    msg(client_message::Kind::Reply(out.header.clone()))
        .encode_length_delimited(&mut bytes)
        .map_err(|e| Error::Transport(e.to_string()))?;
    for c in wire::chunks(1, &out.payload, chunk_bytes) {
        msg(client_message::Kind::Chunk(c))
            .encode_length_delimited(&mut bytes)
            .map_err(|e| Error::Transport(e.to_string()))?;
    }
    Ok(bytes)
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
