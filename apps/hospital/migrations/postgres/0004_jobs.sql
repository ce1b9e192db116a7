-- Jobs (issue 19): every run, queued from the web or started on the
-- command line, is a job, and everything a run records is keyed by its
-- job. Rounds recorded before jobs existed become job 1.
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
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
SELECT setval(pg_get_serial_sequence('jobs', 'id'), COALESCE(MAX(id), 1), MAX(id) IS NOT NULL)
FROM jobs;

-- The children no longer reference `rounds` by a foreign key (the store
-- deletes them with their round), as in SQLite.
ALTER TABLE client_updates DROP CONSTRAINT client_updates_round_id_fkey;
ALTER TABLE trust_scores DROP CONSTRAINT trust_scores_round_id_fkey;
ALTER TABLE round_metrics DROP CONSTRAINT round_metrics_round_id_fkey;

ALTER TABLE rounds DROP CONSTRAINT rounds_pkey;
ALTER TABLE rounds ADD COLUMN job_id BIGINT NOT NULL DEFAULT 1;
ALTER TABLE rounds ALTER COLUMN job_id DROP DEFAULT;
ALTER TABLE rounds ADD PRIMARY KEY (job_id, id);

ALTER TABLE client_updates ADD COLUMN job_id BIGINT NOT NULL DEFAULT 1;
ALTER TABLE client_updates ALTER COLUMN job_id DROP DEFAULT;
ALTER TABLE trust_scores ADD COLUMN job_id BIGINT NOT NULL DEFAULT 1;
ALTER TABLE trust_scores ALTER COLUMN job_id DROP DEFAULT;
ALTER TABLE round_metrics ADD COLUMN job_id BIGINT NOT NULL DEFAULT 1;
ALTER TABLE round_metrics ALTER COLUMN job_id DROP DEFAULT;

DROP INDEX client_updates_round;
DROP INDEX client_updates_client;
DROP INDEX trust_scores_client;
DROP INDEX round_metrics_round;
CREATE INDEX client_updates_round ON client_updates (job_id, round_id);
CREATE INDEX client_updates_client ON client_updates (job_id, client_id);
CREATE INDEX trust_scores_client ON trust_scores (job_id, client_id);
CREATE INDEX round_metrics_round ON round_metrics (job_id, round_id);
