# The two commands of the README:
#   make demo   set up, then run the main job (the hospital simulation)
#   make test   set up, then run every check CI runs
SHELL := /bin/bash
.DEFAULT_GOAL := help
ARGS ?=

.PHONY: help setup demo test bench

help:
	@echo "make demo   # set up everything, run the hospital simulation (ARGS='--rounds 30' to pass flags)"
	@echo "make test   # set up everything, run fmt, all tests with all features, clippy"
	@echo "make bench  # criterion benches (long; see docs/benchmarks.md)"

setup:
	@scripts/setup.sh

# The demo needs no test tools (browser, PostgreSQL): set-up leaves them out.
demo:
	@scripts/setup.sh --demo
	@source scripts/env.sh && cargo run --release -p fedcore-hospital -- simulate $(ARGS)

test: setup
	@source scripts/env.sh && scripts/test.sh

bench: setup
	@source scripts/env.sh && cargo bench -p fedcore-benches --features tch,net && cargo bench -p fedcore-he --bench he
