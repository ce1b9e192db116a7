-- The dashboard's store (PostgreSQL). migrations/sqlite holds the same schema
-- in SQLite's dialect; the application's queries are shared.
CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'doctor', 'viewer')),
    created_at BIGINT NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE clients (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    examples BIGINT NOT NULL,
    patients BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE rounds (
    id BIGINT PRIMARY KEY,
    outcome TEXT NOT NULL,
    aggregator TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    accepted BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    loss DOUBLE PRECISION,
    train_loss DOUBLE PRECISION,
    auroc_macro DOUBLE PRECISION,
    update_norm DOUBLE PRECISION
);

CREATE TABLE client_updates (
    id BIGSERIAL PRIMARY KEY,
    round_id BIGINT NOT NULL REFERENCES rounds (id) ON DELETE CASCADE,
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
CREATE INDEX client_updates_round ON client_updates (round_id);
CREATE INDEX client_updates_client ON client_updates (client_id);

CREATE TABLE trust_scores (
    id BIGSERIAL PRIMARY KEY,
    round_id BIGINT NOT NULL REFERENCES rounds (id) ON DELETE CASCADE,
    client_id TEXT NOT NULL,
    trust DOUBLE PRECISION NOT NULL,
    trust_ema DOUBLE PRECISION,
    suspicious BIGINT NOT NULL
);
CREATE INDEX trust_scores_client ON trust_scores (client_id);

CREATE TABLE round_metrics (
    id BIGSERIAL PRIMARY KEY,
    round_id BIGINT NOT NULL REFERENCES rounds (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL
);
CREATE INDEX round_metrics_round ON round_metrics (round_id);

CREATE TABLE inference_logs (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    model_round BIGINT,
    image_sha256 TEXT NOT NULL,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    findings TEXT NOT NULL
);
CREATE INDEX inference_logs_user ON inference_logs (user_id);

CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor_id BIGINT,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL,
    detail TEXT,
    ip TEXT
);
