-- Cross-site evaluation of an MNIST job (issue 22): the matrix of the
-- global model and every hospital's last local model on every hospital's
-- held-out data, as JSON (fedcore's CrossSiteEvaluation), written when the
-- job completes. Kept out of the jobs listing (GET /api/jobs/{id}/cross-site).
ALTER TABLE jobs ADD COLUMN cross_site TEXT;
