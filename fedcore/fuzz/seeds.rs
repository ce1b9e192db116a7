//! Writes the seed corpus of every target under the folder given as the
//! first argument (default `seeds`): valid inputs the fuzzer mutates.
//!
//! `cargo run --release --bin seeds -- seeds` (see README.md).

use std::path::Path;
use std::sync::Arc;

use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
use fedcore::memory::InMemoryTransport;
use fedcore::net::fuzzing::{reply_to_frames, task_to_frames};
use fedcore::net::provision::{Project, ProjectSpec};
use fedcore::{
    ClientUpdate, EvaluateIns, Evaluation, FedAvg, FitIns, Model, ModelClient, Parameters, Reply,
    SealedTensors, Server, ServerConfig, StepIns, StepReply, Task, TrainConfig,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("seed folder");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn split_input(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = (a.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out
}

fn params() -> Parameters {
    Parameters::from_tensors([
        ("a.weight", vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 7.0, 9.0]),
        ("b", vec![], vec![0.5]),
    ])
    .expect("params")
}

fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    let p = Arc::new(params());
    let sealed = Arc::new(SealedTensors::new(p.layout().clone(), vec![7; 40]));

    // wire_task and wire_reply
    let tasks = [
        Task::Fit(FitIns {
            round: 1,
            parameters: p.clone(),
            config: TrainConfig::default(),
            sealed: None,
            extra: None,
        }),
        Task::Fit(FitIns {
            round: 2,
            parameters: p.clone(),
            config: TrainConfig::default(),
            sealed: Some(sealed.clone()),
            extra: None,
        }),
        Task::Evaluate(EvaluateIns {
            round: 3,
            parameters: p.clone(),
            sealed: None,
        }),
        Task::Step(StepIns {
            round: 4,
            step: 1,
            values: p.clone(),
            sealed: None,
            metrics: [("distance".to_owned(), 1.5)].into(),
            max_reply_bytes: 0,
        }),
    ];
    for (i, t) in tasks.iter().enumerate() {
        for chunk in [3, 64] {
            let bytes = task_to_frames(t, chunk).expect("frames");
            write(&root.join("wire_task"), &format!("task-{i}-{chunk}"), &bytes);
        }
    }
    let mut update = ClientUpdate::new("site-1".into(), 1, 10, params());
    update.metrics.insert("loss".into(), 0.25);
    let replies = [
        Reply::Fit(update.clone()),
        Reply::Fit(update.with_sealed(SealedTensors::new(p.layout().clone(), vec![9; 24]))),
        Reply::Evaluate(Evaluation {
            loss: 0.5,
            num_examples: 3,
            metrics: Default::default(),
        }),
        Reply::Step(StepReply {
            round: 4,
            step: 1,
            values: params(),
            sealed: None,
            metrics: Default::default(),
        }),
    ];
    for (i, r) in replies.into_iter().enumerate() {
        let bytes = reply_to_frames(r, 16).expect("frames");
        write(&root.join("wire_reply"), &format!("reply-{i}"), &bytes);
    }

    // checkpoint: the files of a real two-round run
    let tmp = std::env::temp_dir().join(format!("fedcore-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut t = InMemoryTransport::new();
    for i in 0..3u64 {
        let data = synthetic_blobs(i + 1, 50, 4, 3, 2.0);
        t.add_client(ModelClient::new(format!("site-{i}"), SoftmaxRegression::new(4, 3), data))
            .expect("client");
    }
    let config = ServerConfig {
        rounds: 2,
        checkpoint_dir: Some(tmp.join("ckpt")),
        ..ServerConfig::default()
    };
    let mut server =
        Server::new(config, SoftmaxRegression::new(4, 3).parameters(), t, FedAvg).expect("server");
    server.run().expect("run");
    let state = std::fs::read(tmp.join("ckpt/state.json")).expect("state");
    let model = std::fs::read_dir(tmp.join("ckpt"))
        .expect("checkpoint folder")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| std::fs::read(e.path()).expect("model"))
        .expect("a model file");
    write(&root.join("checkpoint"), "run", &split_input(&state, &model));
    let own = params().to_safetensors([("round".to_owned(), "1".to_owned())]).expect("st");
    write(&root.join("checkpoint"), "layout", &split_input(b"{}", &own));

    // roster: a provisioned project's
    let project = Project::create(tmp.join("project"), &ProjectSpec::new("seeds", vec!["site-1".into(), "site-2".into()], 0))
        .expect("provision");
    project.revoke_site("site-2").expect("revoke");
    let roster = std::fs::read(project.server_kit().join("roster.json")).expect("roster");
    write(&root.join("roster"), "roster", &roster);
    let _ = std::fs::remove_dir_all(&tmp);

    // mnist_idx: two 2x3 images and their labels
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    images.extend((0u8..12).map(|v| v * 20));
    let labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 3, 7];
    write(&root.join("mnist_idx"), "two", &split_input(&images, &labels));

    // chestxray_csv: the release's header and a few rows
    let csv = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n\
00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143\n\
00000001_001.png,Cardiomegaly|Emphysema,1,1,058Y,M,PA,2894,2729,0.143,0.143\n\
00000002_000.png,No Finding,0,2,081Y,M,PA,2500,2048,0.171,0.171\n\
00000003_000.png,Hernia|Pleural_Thickening,0,3,74,F,AP,2500,2048,0.168,0.168\n";
    write(&root.join("chestxray_csv"), "entries", csv.as_bytes());
    println!("seeds written under {}", root.display());
}
