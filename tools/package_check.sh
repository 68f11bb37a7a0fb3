#!/usr/bin/env bash
# `make package-check`: what a user of the sdist gets. Installs SDIST into a fresh venv
# (build/package-check/venv) with the pinned torch of requirements.txt and the build
# requirements, builds the native library CPU-only (SKIPDIT_FAST_CUDA=0, to keep it
# short), then, from a folder outside the source tree: imports the package, checks
# that it is the installed copy with its own library (whose RPATH names no other
# environment), runs one op on every backend that can run here against the reference,
# runs `skipdit-fast info` and a short `skipdit-fast demo` (the shipped weights and
# their dependencies). Exit status 1 when anything fails.
#
#   bash tools/package_check.sh dist/skipdit_fast-<version>.tar.gz
#   PACKAGE_CHECK_REUSE=1 ...    only the checks, on the venv a previous run installed
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
SDIST=$(realpath "${1:?usage: package_check.sh SDIST}")
DIR=$ROOT/build/package-check
VPY=$DIR/venv/bin/python
t0=$(date +%s)
step() { echo "== package-check [$(( $(date +%s) - t0 )) s] $*"; }

if [ "${PACKAGE_CHECK_REUSE:-0}" != 1 ] || [ ! -x "$VPY" ]; then
  rm -rf "$DIR"
  mkdir -p "$DIR/run"
  step "fresh venv $DIR/venv"
  "$PY" -m venv "$DIR/venv"
  pin() { grep -E "^$1==" "$ROOT/requirements.txt"; }
  build_reqs=$(grep -E '^(setuptools|wheel|cmake|ninja)\b' "$ROOT/requirements.txt")
  step "pip install $(pin torch) $(echo $build_reqs)"
  "$VPY" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VPY" -m pip install -q "$(pin torch)" $build_reqs
  step "pip install --no-build-isolation $(basename "$SDIST") (SKIPDIT_FAST_CUDA=0)"
  SKIPDIT_FAST_CUDA=0 "$VPY" -m pip install --no-build-isolation "$SDIST" > "$DIR/install.log" 2>&1 \
    || { tail -n 40 "$DIR/install.log"; exit 1; }
fi
mkdir -p "$DIR/run"

cd "$DIR/run"  # outside the source tree: nothing of it on sys.path
step "import, one op per backend"
"$VPY" - "$ROOT" <<'PY'
import os, subprocess, sys
import torch
import skipdit_fast as sf
from skipdit_fast.ops import backends, native

root = os.path.realpath(sys.argv[1])
pkg = os.path.realpath(os.path.dirname(sf.__file__))
assert pkg != os.path.join(root, "skipdit_fast") and "site-packages" in pkg, f"not the installed copy: {pkg}"
lib = os.path.join(pkg, "_C.so")
assert native.available(), native.load_error()
rpath = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
paths = [p for line in rpath.splitlines() if "RPATH" in line or "RUNPATH" in line
         for p in line.split("[", 1)[1].rstrip("]").split(":")]
assert all(p.startswith("$ORIGIN") for p in paths), f"{lib} has absolute library paths: {paths}"
assert os.path.isfile(os.path.join(pkg, "kernels", "attention.py")) and not os.path.islink(os.path.join(pkg, "kernels"))
assert os.path.isfile(os.path.join(pkg, "py.typed"))
g = torch.Generator().manual_seed(0)
B, N, H, Dh, D = 2, 37, 4, 32, 64
qkv = torch.randn(B, N, 3, H, Dh, generator=g)
x, skip = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
w, b = torch.randn(2 * D, generator=g), torch.randn(2 * D, generator=g)
lw, lb = torch.randn(D, 2 * D, generator=g) / 8, torch.randn(D, generator=g)
want_a = sf.reference.attention(*qkv.unbind(2))
want_s = sf.reference.skip_fuse(x, skip, w, b, lw, lb, 1e-6)
ran = []
for name in backends.BACKENDS:
    try:
        with sf.use_backend(name):
            a = sf.ops.attention(*qkv.unbind(2))
            s = sf.ops.skip_fuse(x, skip, w, b, lw, lb, eps=1e-6)
    except sf.BackendError as e:
        print(f"  {name}: cannot run here ({e})")
        continue
    torch.testing.assert_close(a, want_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, want_s, rtol=1e-4, atol=1e-4)
    ran.append(name)
assert "cpu" in ran, ran
print(f"  skipdit_fast {sf.__version__} from {pkg}; torch {torch.__version__}; "
      f"attention and skip_fuse match the reference on: {', '.join(ran)}")
PY
step "skipdit-fast info"
"$DIR/venv/bin/skipdit-fast" info
step "skipdit-fast demo (few steps)"
OMP_WAIT_POLICY=PASSIVE "$DIR/venv/bin/skipdit-fast" demo --steps 4 --per-class 1 --repeats 1 --no-progress \
  --out-dir "$DIR/run/demo-out"
step "passed"
