#!/usr/bin/env bash
# Every check CI runs: formatting, all tests of all crates with all features,
# clippy with warnings as errors. `make test` runs this after set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# A clean clone gains nothing from incremental compilation; it only writes
# another ~2 GB into target/.
if [[ "${CI:-}" == true ]]; then export CARGO_INCREMENTAL=0; fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== PostgreSQL for the dashboard store's tests"
# Starts a throwaway cluster where Debian's PostgreSQL is installed and
# exports FEDCORE_TEST_POSTGRES; without one those tests say they are skipped.
# shellcheck source=apps/hospital/pg-test.sh
source apps/hospital/pg-test.sh
echo "== cargo test (all crates, all features)"
cargo test --workspace --all-features --no-fail-fast
echo "== browser end-to-end test (headless Debian Chromium)"
E2E_OUT=target/e2e-screenshots node apps/hospital/e2e/dashboard.mjs target/debug/hospital
echo "== black-box checks of the running dashboard (own checks + schemathesis, 127.0.0.1 only)"
apps/hospital/blackbox/run.sh target/debug/hospital
echo "== cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== all checks passed in $(( $(date +%s) - start )) s"
