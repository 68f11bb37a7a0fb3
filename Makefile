# skipdit_fast: `make demo` and `make test` set everything up on a fresh machine
# (project-local virtual environment, native build) and skip what is already done.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
NATIVE_SOURCES := $(shell find csrc -type f) tools/ptxas_log.sh tools/join_ptxas_logs.cmake CMakeLists.txt setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: all venv build demo train-default test test-fast bench gpu-check info sdist dist package-check compat clean

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

# On a machine with an NVIDIA GPU and no network: build for the
# device's arch with the Python that is there (python3, or PYTHON=...), GPU tests,
# compute-sanitizer, benchmarks; results in bench/results/<date>-<gpu>/. < 8 min on an H100.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

# The sdist (sources, build description, tools the build calls, weights, kernels; no
# build output) and the wheel built from it, in dist/. The wheel's native library is
# built like `make build` (CUDA kernels when nvcc and a CUDA torch are there;
# SKIPDIT_FAST_CUDA=0 for the CPU library only). Needs `build` (requirements-dist.txt).
DIST_STAMP := $(VENV)/.dist-stamp
$(DIST_STAMP): requirements-dist.txt $(DEPS_STAMP)
	$(PY) -m pip install -r requirements-dist.txt
	@touch $@

sdist: $(DIST_STAMP)
	rm -f dist/skipdit_fast-*.tar.gz
	$(PY) -m build --sdist --no-isolation --outdir dist .

dist: $(DIST_STAMP)
	rm -f dist/skipdit_fast-*
	$(PY) -m build --no-isolation --outdir dist .

# Installs the sdist into a fresh venv (build/package-check/) with the pinned torch,
# CPU-only build, then imports it, runs one op and `skipdit-fast info` from outside the
# source tree. About 15 minutes on a shared 2-core machine, most of it installing torch.
package-check: sdist
	PYTHON=$(PYTHON) bash tools/package_check.sh dist/skipdit_fast-*.tar.gz

# The CPU op, model and patch tests against the oldest supported torch + diffusers
# (2.6.0 + 0.30.0) and the newest (2.15.0 + 0.42.1), each in a throw-away venv under
# build/compat/, and the diffusers code skipdit_fast mirrors fingerprinted in every
# release of the supported range. Not part of `make test` (CI runs the pinned versions).
# Needs the package index and ~12 GB of disk; 30-40 minutes per environment on 2 cores.
compat:
	PYTHON=$(PYTHON) bash tools/compat.sh

clean:
	rm -rf build dist skipdit_fast.egg-info skipdit_fast/_C.so skipdit_fast/_C.ptxas.txt
