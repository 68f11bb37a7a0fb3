# skipdit_fast: `make demo` and `make test` set everything up on a fresh machine
# (project-local virtual environment, native build) and skip what is already done.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
NATIVE_SOURCES := $(shell find csrc tools -type f) CMakeLists.txt setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: all venv build demo train-default test test-fast bench gpu-check info clean

all: test

$(DEPS_STAMP): requirements.txt requirements-test.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-test.txt
	@touch $@

venv: $(DEPS_STAMP)

# The editable install builds skipdit_fast/_C.so through CMake (incremental).
skipdit_fast/_C.so: $(DEPS_STAMP) $(NATIVE_SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@touch $@

build: skipdit_fast/_C.so

info: build
	$(PY) -m skipdit_fast info

# OpenMP threads that spin while they wait make every op several times slower on a
# shared machine; passive waiting costs little on an idle one.
demo train-default: export OMP_WAIT_POLICY ?= PASSIVE

# The shipped tiny Skip-DiT: samples every digit without cache and with Skip-Cache,
# times both, PSNR between them, PNG grids in demo-out/. Under a minute on 2 cores.
demo: build
	$(VENV)/bin/skipdit-fast demo

# Trains the shipped tiny models, each pair with the same config but the long skips, same
# seed, steps and batches: DiT and Skip-DiT on scikit-learn's digits, Latte and Latte-skip
# on moving digits (skipdit_fast/data), and the digit / frame classifiers; writes
# skipdit_fast/weights/*.safetensors and the training logs. Resumes from build/train/.
# Each model is sized to take under 20 minutes on an idle 2-core machine.
train-default: build
	$(PY) -m skipdit_fast train --default

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark suite on this machine (CPU here; the GPU when there is one): tables on
# stdout, bench/results/<date>-<device>/{bench.json,bench.md,speedup.png}, the
# latest-results section of bench/results/README.md refreshed; then the
# pytest-benchmark microbenchmarks (bench/). Under 10 minutes on 2 CPU cores.
bench: build
	$(PY) -m skipdit_fast bench --save bench/results
	$(PY) -m pytest bench -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name

# On a machine with an NVIDIA GPU and no network (DESIGN.md 5.5): build for the
# device's arch with the Python that is there (python3, or PYTHON=...), GPU tests,
# compute-sanitizer, benchmarks; results in bench/results/<date>-<gpu>/. < 8 min on an H100.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf build skipdit_fast/_C.so skipdit_fast/_C.ptxas.txt
