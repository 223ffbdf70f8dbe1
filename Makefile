# engram_rs: every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.deps-stamp
# PyO3 builds and links against the venv's interpreter (also for `cargo test`/`clippy`).
export PYO3_PYTHON := $(PY)
export CARGO_TERM_COLOR := never

.PHONY: demo test lint rust-test py-test bench develop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet "maturin>=1.7,<2"
	touch $@

## develop: build the extension in release mode into .venv, with test and dev dependencies
develop: $(STAMP)
	$(VENV)/bin/maturin develop --release --extras test,dev

## demo: hash a generated batch with both presets and print the throughput table
demo: develop
	$(PY) -m engram_rs demo
	$(PY) -m engram_rs v41-demo

## test: lint, then the Rust and Python test suites
test: develop lint rust-test py-test

rust-test: $(STAMP)
	cargo test --workspace --release

# The second run forces the scalar reference paths (ENGRAM_RS_FORCE_SCALAR=1): they alone must
# meet the golden vectors and torch, and the first run's "fast equals scalar" checks are then
# known to compare two different paths.
py-test: develop
	$(PY) -m pytest
	ENGRAM_RS_FORCE_SCALAR=1 $(PY) -m pytest -q

## lint: rustfmt, clippy (warnings are errors), ruff, mypy and the stub check
lint: develop
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --release -- -D warnings
	cargo clippy -p engram-core --no-default-features --release -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest engram_rs._engram_rs

## bench: throughput against numpy/torch baselines in the same run (prints ratios)
bench: develop
	$(PY) -m engram_rs bench hash
	$(PY) -m engram_rs bench gather --dtype float32 --dim 64 --mode resident
	$(PY) -m engram_rs bench gather --dtype bfloat16 --dim 64 --mode resident
	$(PY) -m engram_rs bench gather --dtype float8_e4m3 --dim 256 --mode resident
	$(PY) -m engram_rs bench gather --dtype float32 --dim 64 --mode mmap
	$(PY) -m engram_rs bench gather --dtype bfloat16 --dim 64 --mode mmap
	$(PY) -m engram_rs bench compress
	$(PY) -m engram_rs bench precompute
	$(PY) -m engram_rs bench train
	$(PY) -m engram_rs bench v41
	$(PY) -m engram_rs bench stats
	$(PY) -m engram_rs bench tiered
	$(PY) benches/host_module.py
	$(PY) -m pytest benches -o python_files='bench_*.py' --benchmark-enable --benchmark-only -q
	cargo bench -p engram-core --bench hashing -- --warm-up-time 1 --measurement-time 3

clean:
	rm -rf $(VENV) target
