# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Torch for compiling the CUDA ops on machines without a GPU (the CPU wheel disables CUDA builds).
CUDA_VENV := .venv-cuda
TORCH_CPU := torch==2.13.0
TORCH_CUDA := torch==2.14.1

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

test: venv cuda-venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build runs data/demo data/digits

# GPU-only checks (kernels vs references, ops benchmark); run on a machine with a CUDA GPU.
.PHONY: test-gpu
# Uses the machine's own CUDA torch (python3), not the CPU .venv.
test-gpu:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m megalm.ops.build
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest -q -p no:cacheprovider gpu_tests
