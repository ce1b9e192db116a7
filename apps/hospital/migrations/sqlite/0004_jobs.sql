-- Jobs (issue 19): every run, queued from the web or started on the
-- command line, is a job, and everything a run records is keyed by its
-- job. Rounds recorded before jobs existed become job 1.
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('xray', 'mnist', 'deployment')),
    name TEXT NOT NULL,
    settings TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'stopping', 'stopped', 'finished', 'failed')),
    created_by BIGINT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    run_dir TEXT,
    error TEXT,
    resume BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_status ON jobs (status);

INSERT INTO jobs (id, kind, name, settings, status, created_at, started_at, finished_at)
SELECT 1, 'xray', 'run recorded before jobs', '{}', 'finished',
       MIN(started_at), MIN(started_at), MAX(started_at + duration_ms)
FROM rounds HAVING COUNT(*) > 0;

-- SQLite cannot change a primary key in place: the round tables are
-- rebuilt with the job in their keys. The children no longer reference
-- `rounds` by a foreign key (the store deletes them with their round).
CREATE TABLE rounds_by_job (
    job_id BIGINT NOT NULL,
    id BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    aggregator TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    accepted BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    loss DOUBLE PRECISION,
    train_loss DOUBLE PRECISION,
    auroc_macro DOUBLE PRECISION,
    update_norm DOUBLE PRECISION,
    PRIMARY KEY (job_id, id)
);
INSERT INTO rounds_by_job
SELECT 1, id, outcome, aggregator, started_at, duration_ms, accepted, rejected,
       loss, train_loss, auroc_macro, update_norm
FROM rounds;

CREATE TABLE client_updates_by_job (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id BIGINT NOT NULL,
    round_id BIGINT NOT NULL,
    client_id TEXT NOT NULL,
    accepted BIGINT NOT NULL,
    reason TEXT,
    weight DOUBLE PRECISION,
    trust DOUBLE PRECISION,
    update_norm DOUBLE PRECISION,
    num_examples BIGINT,
    epsilon DOUBLE PRECISION,
    delta DOUBLE PRECISION
);
INSERT INTO client_updates_by_job
    (job_id, round_id, client_id, accepted, reason, weight, trust, update_norm,
     num_examples, epsilon, delta)
SELECT 1, round_id, client_id, accepted, reason, weight, trust, update_norm,
       num_examples, epsilon, delta
FROM client_updates ORDER BY id;

CREATE TABLE trust_scores_by_job (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id BIGINT NOT NULL,
    round_id BIGINT NOT NULL,
    client_id TEXT NOT NULL,
    trust DOUBLE PRECISION NOT NULL,
    trust_ema DOUBLE PRECISION,
    suspicious BIGINT NOT NULL
);
INSERT INTO trust_scores_by_job (job_id, round_id, client_id, trust, trust_ema, suspicious)
SELECT 1, round_id, client_id, trust, trust_ema, suspicious FROM trust_scores ORDER BY id;

CREATE TABLE round_metrics_by_job (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id BIGINT NOT NULL,
    round_id BIGINT NOT NULL,
    name TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL
);
INSERT INTO round_metrics_by_job (job_id, round_id, name, value)
SELECT 1, round_id, name, value FROM round_metrics ORDER BY id;

DROP TABLE client_updates;
DROP TABLE trust_scores;
DROP TABLE round_metrics;
DROP TABLE rounds;
ALTER TABLE rounds_by_job RENAME TO rounds;
ALTER TABLE client_updates_by_job RENAME TO client_updates;
ALTER TABLE trust_scores_by_job RENAME TO trust_scores;
ALTER TABLE round_metrics_by_job RENAME TO round_metrics;
CREATE INDEX client_updates_round ON client_updates (job_id, round_id);
CREATE INDEX client_updates_client ON client_updates (job_id, client_id);
CREATE INDEX trust_scores_client ON trust_scores (job_id, client_id);
CREATE INDEX round_metrics_round ON round_metrics (job_id, round_id);
