# Two entry points (README): `make test` and `make bench`. Both create .venv and install the CPU
# torch pin plus the package with its compiled extension; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cu csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.py)
NVCC ?= $(shell command -v nvcc 2>/dev/null)
PYTEST_ARGS ?=
BENCH_SIZE ?= quick
BENCH_ARGS ?=

.PHONY: install test test-slow bench bench-full bench-pytest check-cuda clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Where nvcc is found the install builds the CUDA module too (no GPU needed) and must succeed
# (RESONANT_NO_CUDA=1 skips it).
$(STAMP): $(SOURCES) | $(PY)
	$(PIP) install -q "$(TORCH_PIN)" setuptools wheel "pybind11>=2.12"
	RESONANT_REQUIRE_CUDA=$(if $(NVCC),$(if $(filter 1,$(RESONANT_NO_CUDA)),0,1),0) $(PIP) install -q --no-build-isolation -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

# `make test` (CI) leaves out the tests marked slow (minutes each, e.g. a full `make bench`).
test: install check-cuda
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_read.py --quick
	$(PY) benchmarks/bench_prune.py --quick

bench-full: install
	$(PY) benchmarks/bench_read.py
	$(PY) benchmarks/bench_prune.py

# Every benchmark case under pytest-benchmark (BENCHMARKS.md): BENCH_SIZE=smoke|quick|full, and
# BENCH_ARGS for pytest-benchmark's own flags, e.g. BENCH_ARGS=--benchmark-autosave, then
# BENCH_ARGS=--benchmark-compare (saved runs go to runs/pytest-benchmark/, untracked).
bench-pytest: install
	$(PY) -m pytest benchmarks/ --benchmark-only --bench-size $(BENCH_SIZE) $(BENCH_ARGS)

# Compiles every .cu file (no GPU needed) so a CUDA syntax error cannot land; skipped without nvcc,
# and done already where the install built resonant_kernels._C_cuda (same flags).
check-cuda:
	@if [ -z "$(NVCC)" ]; then echo "check-cuda: nvcc not found, skipped"; \
	elif [ -z "$(wildcard csrc/cuda/*.cu)" ]; then echo "check-cuda: no .cu sources"; \
	elif $(PY) -c "import json, sys; sys.exit(not json.load(open('resonant_kernels/_build_info.json'))['cuda']['built'])" 2>/dev/null; \
	then echo "check-cuda: the install compiled csrc/cuda into resonant_kernels._C_cuda"; \
	else $(MAKE) --no-print-directory -C csrc/cuda check NVCC="$(NVCC)" PY="$(abspath $(PY))"; fi

clean:
	rm -rf build dist *.egg-info resonant_kernels/*.so resonant_kernels/_build_info.json $(VENV)
