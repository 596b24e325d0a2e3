# One target per habit. Every target sets up its own virtualenv on first use.
#   make test                 every test on CPython 3.11 and on each of 3.10, 3.12, 3.13 found
#   make test PY=python3.12   every test on that one interpreter (a name or a path)
#   make bench                the main job, in .venv (the default python3, or PY)
PY ?=
BENCH_PY := $(or $(PY),python3)
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(BENCH_PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.PHONY: install servers test bench bench-full lint stubtest clean
install: $(BIN)/python
	$(BIN)/pip install -q ".[test,bench,integration]"

# PostgreSQL and Redis for tests/integration (installed from Debian's packages when missing).
servers:
	scripts/ensure-servers.sh

# Every test: the Rust unit tests, then per interpreter (scripts/test-all.sh) behaviour,
# stress, runner, CPython's test_asyncio conformance, and the integration tests of real
# libraries against real PostgreSQL and Redis servers. Fails on any failure, on an
# interpreter that does not build, and on a run that collected no tests.
test: servers
	cargo test --lib --quiet
	scripts/test-all.sh $(PY)

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
	$(BIN)/pip install -q ruff && $(BIN)/ruff check python tests bench examples scripts
	$(MAKE) --no-print-directory stubtest

# The type stubs (python/ferroloop/_ferroloop.pyi) and the Python modules' annotations
# against the package as built from this tree (scripts/test-all.sh runs the same check
# on every interpreter it tests).
stubtest: $(BIN)/python
	$(BIN)/pip install -q ".[test]"
	$(BIN)/python -m mypy.stubtest ferroloop --mypy-config-file pyproject.toml \
		--allowlist scripts/stubtest-allowlist.txt

clean:
	rm -rf $(VENV) .venv-3.* target bench/loadgen/target bench/results
