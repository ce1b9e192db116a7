-- Connections of a deployed server (issue 19): each hospital's latest
-- session as the server's transport saw it, and the connections its roster
-- refused (revoked and off-roster certificates). Times in ms since the
-- Unix epoch.
CREATE TABLE site_connections (
    site TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    not_after BIGINT,
    peer TEXT,
    connected_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    closed_at BIGINT,
    close_reason TEXT
);

CREATE TABLE connection_refusals (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    site TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_after BIGINT,
    peer TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('not_on_roster', 'revoked', 'identity_mismatch')),
    reason TEXT NOT NULL,
    closed_session BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX connection_refusals_at ON connection_refusals (at);
