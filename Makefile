# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Torch for compiling the CUDA ops on machines without a GPU (the CPU wheel disables CUDA builds).
CUDA_VENV := .venv-cuda
TORCH_CPU := torch==2.13.0
TORCH_CUDA := torch==2.14.1
# pytest-xdist workers for `make test` (tests/conftest.py keeps what shares set-up on one worker).
TEST_WORKERS ?= 2

.PHONY: demo demo-diffusion test venv cuda-venv clean

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

cuda-venv: $(CUDA_VENV)/.installed
# pyyaml: megalm.models (presets) for tests/ops/test_no_triton.py, which runs a step here too.
$(CUDA_VENV)/.installed: Makefile
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(TORCH_CUDA) ninja numpy pyyaml
	touch $@

demo: venv
	bash scripts/demo.sh

# Diffusion on the same engine: digits -> DiT on 2 CPU ranks -> sample grid -> classifier score.
demo-diffusion: venv
	bash scripts/demo_diffusion.sh

# With Slurm installed, the local 2-node cluster (slurm/local/) runs for the Slurm tests; it is
# stopped afterwards only if this target started it.
test: venv cuda-venv
	@started=; if command -v slurmctld >/dev/null && ! bash slurm/local/running.sh; then \
		bash slurm/local/start.sh >/dev/null && started=1; fi; \
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=25 tests; rc=$$?; \
	if [ -n "$$started" ]; then bash slurm/local/stop.sh; fi; exit $$rc

clean:
	rm -rf build runs data/demo data/digits

# GPU-only checks on a machine with a CUDA GPU, using that machine's own CUDA torch (python3), not
# the CPU .venv: build the ops (default arch list) and self-test every kernel on the GPU, failing
# on any wrong kernel (--strict), then the GPU test suite. Then `python benchmarks/ops.py`.
# A GPU machine without a package index and without pytest: run `make gpu-wheels` where there is
# one and carry .whl/ along; test-gpu installs pytest from it into .whl/site.
.PHONY: test-gpu gpu-wheels bench-gpu
test-gpu:
	@$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'test-gpu: $(PYTHON) sees no CUDA GPU')"
	PYTHONPATH=$(CURDIR) $(PYTHON) -m megalm.ops.build --strict
	@$(PYTHON) -c "import pytest" 2>/dev/null || test -d .whl/site || $(PYTHON) -m pip install -q --no-index --find-links .whl --target .whl/site pytest || { echo "test-gpu: no pytest for $(PYTHON) (make gpu-wheels, carry .whl/)"; exit 1; }
	PYTHONPATH=$(CURDIR):$(CURDIR)/.whl/site $(PYTHON) -m pytest -q -p no:cacheprovider gpu_tests

# DeepSpeed and what it needs beyond the GPU machine's own packages (Python 3.12 there), for bench-gpu.
GPU_BINARY_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing_extensions==4.16.0 hjson==3.1.0 zstandard==0.25.0
gpu-wheels: venv
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 -d .whl pytest
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl $(GPU_BINARY_WHEELS)
	$(BIN)/pip wheel -q --no-deps deepspeed==0.19.8 -w .whl

# Training speed on one GPU against a nanoGPT-style loop, eager and compiled (benchmarks/train_gpu.py):
# builds the ops, then writes BENCH_OUT. DeepSpeed comes from the carried .whl/ (make gpu-wheels).
BENCH_OUT ?= benchmarks/results/train_gpu.json
# Document-masked attention candidates (benchmarks/attention.py), measured in the same session.
ATTENTION_OUT ?= benchmarks/results/attention_gpu.json
GPU_PATH := PYTHONPATH=$(CURDIR):$(CURDIR)/.whl/site
bench-gpu:
	@$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu: $(PYTHON) sees no CUDA GPU')"
	@$(GPU_PATH) $(PYTHON) -c "import deepspeed" 2>/dev/null || $(PYTHON) -m pip install -q --no-index --no-deps \
		--target .whl/site .whl/*.whl || { echo "bench-gpu: no DeepSpeed for $(PYTHON) (make gpu-wheels, carry .whl/)"; exit 1; }
	$(GPU_PATH) $(PYTHON) -m megalm.ops.build --strict
	$(GPU_PATH) $(PYTHON) benchmarks/train_gpu.py --out $(BENCH_OUT)
	$(GPU_PATH) $(PYTHON) benchmarks/attention.py --out $(ATTENTION_OUT)
