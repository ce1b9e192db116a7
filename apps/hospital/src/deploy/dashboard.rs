//! The dashboards of a deployment: the aggregation server's (rounds,
//! connections, the admin's actions on the federation) and a hospital's
//! own (its staff read X-rays with the global models it opens).

use super::*;

/// The dashboard of a deployed server: the same app as the simulation's,
/// fed by this server's rounds. The server holds no data and no HE secret
/// key, so the held-out numbers are the hospitals' own evaluations, and
/// there is no model to read X-rays with here (the head stays encrypted):
/// inference answers 503.
pub(super) struct Dashboard {
    rt: tokio::runtime::Runtime,
    pub(super) shared: Arc<Shared>,
    task: tokio::task::JoinHandle<Result<()>>,
    store: crate::store::Store,
    job: i64,
}

impl Dashboard {
    pub(super) fn start<S: fedcore::Strategy>(
        a: &ServerArgs,
        at: std::net::SocketAddr,
        kit: &Kit,
        server: &mut Server<GrpcTransport, S>,
    ) -> Result<Self> {
        let rt = dashboard_runtime()?;
        std::fs::create_dir_all(&a.run_dir)
            .with_context(|| format!("cannot create {}", a.run_dir.display()))?;
        let config = WebConfig::from_env(&a.run_dir.join("dashboard.sqlite"))?;
        web::check_exposure(at, config.tls.is_some(), a.behind_tls_proxy)?;
        let shared = Arc::new(Shared::default());
        let threshold = crate::he_keys::kit::threshold(&a.kit)?;
        shared.set_progress(|p| {
            p.status = RunStatus::Training;
            p.total_rounds = a.rounds;
            p.current_round = server.next_round().saturating_sub(1);
            // What the server seals: nothing without keys in its kit.
            p.encrypt = if a.kit.join(KeyAuthority::PUBLIC_FILE).exists() {
                a.encrypt
            } else {
                Encrypt::None
            };
            p.he = p.encrypt != Encrypt::None;
            if p.he && crate::he_keys::kit::is_multiparty(&a.kit) {
                p.keys = crate::recipe::HeKeys::Multiparty;
                p.threshold = threshold;
            }
            p.aggregator = a.aggregator.label(p.encrypt);
        });
        // Any image size: nothing is ever read here (see above).
        let predictor = Arc::new(Predictor::new(32, a.seed));
        let mut state = rt.block_on(web::state(&config, shared.clone(), predictor))?;
        // The admin's actions that reach the federation: suspensions (the
        // stored ones at once), the roster; the sessions into the store.
        let link = FederationLink::new(
            server.transport().monitor(),
            server.exclusions(),
            kit.roster_path(),
            kit.ca_pem.clone(),
        );
        rt.block_on(
            state
                .store
                .close_open_connections(crate::store::now_ms(), "the server restarted"),
        )?;
        for c in rt.block_on(state.store.clients())? {
            if c.status == crate::store::ClientStatus::Suspended {
                link.suspend(&c.id, true);
            }
        }
        rt.spawn(crate::federation::record_connections(
            state.store.clone(),
            server.transport().monitor(),
        ));
        state.federation = Some(Arc::new(link));
        for (name, role, password) in rt.block_on(web::bootstrap_users(&state.store))? {
            println!(
                "created user {name:<7} ({}) with password {password}",
                role.as_str()
            );
        }
        let store = state.store.clone();
        // The run is a job of the store: its rounds are kept apart from
        // earlier runs' (a resumed run continues its job).
        let settings = serde_json::json!({
            "kind": "deployment",
            "rounds": a.rounds,
            "aggregator": a.aggregator,
            "encrypt": shared.progress.read().map(|p| p.encrypt).unwrap_or_default(),
        });
        let job = rt.block_on(crate::jobs::deployment_job(
            &store,
            &a.run_dir,
            &settings,
            server.next_round() > 1,
        ))?;
        shared.set_progress(|p| p.job = Some(job));
        let job_store = store.clone();
        let (task, url) = serve_web(&rt, state, at, &config)?;
        println!("dashboard: {url} (API docs at /docs)");

        // Rounds into the store and onto the page.
        let handle = rt.handle().clone();
        let live = shared.clone();
        let total = a.rounds;
        server.subscribe(move |event: &ServerEvent| match event {
            ServerEvent::RoundFinished { record } | ServerEvent::RoundFailed { record, .. } => {
                let row = round_row(record);
                let stored = handle.block_on(async {
                    for u in &record.accepted {
                        // What the server knows of a hospital: the examples
                        // it trained on (its patients stay at the hospital).
                        store
                            .upsert_client(u.client.as_str(), u.num_examples as i64, 0)
                            .await?;
                    }
                    store.record_round(job, &to_new_round(record, &row)).await
                });
                if let Err(e) = stored {
                    tracing::error!(error = %format!("{e:#}"), round = record.round, "round not stored");
                }
                live.send(LiveEvent::RoundFinished {
                    round: record.round,
                    total,
                    loss: row.loss,
                    auroc_macro: row.auroc_macro,
                    accuracy: None,
                    outcome: row.outcome.clone(),
                });
            }
            other => live.observe(other, total),
        });
        Ok(Self {
            rt,
            shared,
            task,
            store: job_store,
            job,
        })
    }

    /// Records how the run ended on its job.
    pub(super) fn finish(&self, end: std::result::Result<fedcore::RunEnd, String>) {
        use crate::store::JobStatus;
        let (to, error) = match &end {
            Ok(fedcore::RunEnd::Completed) => (JobStatus::Finished, None),
            Ok(fedcore::RunEnd::Stopped) => (JobStatus::Stopped, None),
            Ok(fedcore::RunEnd::TooManyFailedRounds { .. }) => {
                (JobStatus::Failed, Some("too many failed rounds in a row"))
            }
            Ok(_) => (JobStatus::Failed, Some("the run ended")),
            Err(e) => (JobStatus::Failed, Some(e.as_str())),
        };
        let moved = self.rt.block_on(self.store.move_job(
            self.job,
            &[JobStatus::Running, JobStatus::Stopping],
            to,
            error,
        ));
        if let Err(e) = moved {
            tracing::error!(error = %format!("{e:#}"), "the job's end not stored");
        }
    }

    /// Keeps serving after the run, until Ctrl-C.
    pub(super) fn serve_until_ctrl_c(self) -> Result<()> {
        serve_until_ctrl_c(&self.rt, self.task)
    }
}

/// A hospital's client that hands every global model it evaluates (its
/// head opened with the hospital's key) to the hospital's inference page.
pub(super) struct FeedsInference<M: Model<Data = DataSplit>> {
    pub(super) client: ModelClient<M>,
    pub(super) predictor: Arc<Predictor>,
}

impl<M> fedcore::Client for FeedsInference<M>
where
    M: Model<Data = DataSplit>,
{
    fn id(&self) -> &fedcore::ClientId {
        self.client.id()
    }

    fn fit(&mut self, ins: &fedcore::FitIns) -> fedcore::Result<fedcore::ClientUpdate> {
        self.client.fit(ins)
    }

    fn step(&mut self, ins: &fedcore::StepIns) -> fedcore::Result<fedcore::StepReply> {
        self.client.step(ins)
    }

    /// Evaluates the round's global model, which the model then holds.
    fn evaluate(&mut self, ins: &fedcore::EvaluateIns) -> fedcore::Result<fedcore::Evaluation> {
        let evaluation = self.client.evaluate(ins)?;
        if let Err(e) = self
            .predictor
            .update(&self.client.model().parameters(), ins.round)
        {
            tracing::error!(error = %format!("{e:#}"), round = ins.round, "the inference model was not updated");
        }
        Ok(evaluation)
    }
}

/// A hospital's own dashboard: the app with its users and the inference
/// page, answering with the global models this hospital receives.
pub(super) struct HospitalDashboard {
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) task: tokio::task::JoinHandle<Result<()>>,
    pub(super) predictor: Arc<Predictor>,
}

impl HospitalDashboard {
    pub(super) fn start(
        a: &ClientArgs,
        at: std::net::SocketAddr,
        identity: &str,
        sealed: bool,
    ) -> Result<Self> {
        let rt = dashboard_runtime()?;
        std::fs::create_dir_all(&a.work_dir)
            .with_context(|| format!("cannot create {}", a.work_dir.display()))?;
        let config = WebConfig::from_env(&a.work_dir.join(format!("{identity}-dashboard.sqlite")))?;
        web::check_exposure(at, config.tls.is_some(), a.behind_tls_proxy)?;
        let shared = Arc::new(Shared::default());
        let predictor = Arc::new(Predictor::new(a.image_size, a.seed));
        predictor.set_protections(crate::infer::Protections {
            dp_mode: a.dp.mode,
            budget: (a.dp.mode != DpMode::Off).then_some((a.dp.epsilon, a.dp.delta)),
            encrypt: if sealed { a.encrypt } else { Encrypt::None },
        });
        let state = rt.block_on(web::state(&config, shared, predictor.clone()))?;
        for (name, role, password) in rt.block_on(web::bootstrap_users(&state.store))? {
            println!(
                "created user {name:<7} ({}) with password {password}",
                role.as_str()
            );
        }
        let (task, url) = serve_web(&rt, state, at, &config)?;
        println!("{identity}: dashboard: {url} (inference with the global model after each round)");
        Ok(Self {
            rt,
            task,
            predictor,
        })
    }
}

/// The runtime a dashboard serves on, beside the federation's threads.
fn dashboard_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dashboard")
        .enable_all()
        .build()?)
}

/// Serves the app at `at` on `rt`; returns the task and the URL it serves.
fn serve_web(
    rt: &tokio::runtime::Runtime,
    state: crate::api::AppState,
    at: std::net::SocketAddr,
    config: &WebConfig,
) -> Result<(tokio::task::JoinHandle<Result<()>>, String)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let app = web::app(state);
    let tls = config.tls.clone();
    let limits = config.server;
    let proxies = config.client_address.trusted_proxies.clone();
    let task =
        rt.spawn(async move { web::serve(app, at, tls.as_ref(), limits, &proxies, tx).await });
    let bound = rt.block_on(rx).context("the dashboard did not start")?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    Ok((task, format!("{scheme}://{bound}/")))
}

/// Keeps a dashboard's task serving until Ctrl-C.
pub(super) fn serve_until_ctrl_c(
    rt: &tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<Result<()>>,
) -> Result<()> {
    println!("the dashboard keeps serving (Ctrl-C to stop)");
    rt.block_on(async {
        tokio::select! {
            r = task => r.context("dashboard task")?,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
