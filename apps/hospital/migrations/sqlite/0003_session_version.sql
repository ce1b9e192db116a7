-- Revocable sessions (issue 20, finding 3): every access token carries the
-- user's session version when it was issued, and a request is refused when
-- the version has moved on. Signing out, a password change or reset, a role
-- change and erasure raise it, ending every token issued before.
ALTER TABLE users ADD COLUMN session_version BIGINT NOT NULL DEFAULT 0;
