# One target per habit. Every target sets up its own virtualenv (.venv) on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.PHONY: install servers test bench bench-full lint clean
install: $(BIN)/python
	$(BIN)/pip install -q ".[test,bench,integration]"

# PostgreSQL and Redis for tests/integration (installed from Debian's packages when missing).
servers:
	scripts/ensure-servers.sh

# Every test: behaviour, stress, runner, CPython's test_asyncio conformance, and the
# integration tests of real libraries against real PostgreSQL and Redis servers.
# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: install servers
	cargo test --lib --quiet
	$(BIN)/python -m pytest tests -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# The main job: the benchmark suite's quick mode (six echo workloads from a Rust load
# generator, and the micro benchmarks), every installed loop side by side in one run;
# bench/results/summary.md, suite.json and suite.png. bench-full: the whole matrix.
bench: install
	$(BIN)/python bench/suite.py

bench-full: install
	$(BIN)/python bench/suite.py --full

lint: $(BIN)/python
	cargo fmt --check
	cargo clippy --release -- -D warnings
	cargo fmt --check --manifest-path bench/loadgen/Cargo.toml
	cargo clippy --release --manifest-path bench/loadgen/Cargo.toml -- -D warnings
	$(BIN)/pip install -q ruff && $(BIN)/ruff check python tests bench examples

clean:
	rm -rf $(VENV) target bench/loadgen/target bench/results
