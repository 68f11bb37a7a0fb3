#!/usr/bin/env bash
# `make compat`: the CPU op, model and patch tests against both ends of the supported
# range, each in a throw-away virtual environment (not the repository's .venv, and not
# part of `make test`, which runs on the pinned versions of requirements.txt):
#
#   oldest   torch 2.6.0 (triton 3.2.0), diffusers 0.30.0 - the oldest releases supported
#   newest   torch 2.15.0 (triton 3.9.0), diffusers 0.42.1 - the newest releases on the index
#   gpu      torch 2.11.0 (triton 3.6.0): the versions of the GPU test machine (tools/gpu_check.sh),
#            where the Triton kernels must run too: COMPAT_ENVS=gpu runs the Triton kernels'
#            interpreter and AOT tests there
#
# For each: a venv and a copy of the working tree under build/compat/<name>/, the
# pinned requirements with the versions above swapped in, the native library built
# CPU-only (SKIPDIT_FAST_CUDA=0: the index's torch wheels are CUDA builds, a CUDA
# compile would take most of an hour on 2 cores), then pytest on COMPAT_TESTS. Prints
# the versions and pass / fail counts of each, then fingerprints the diffusers code
# skipdit_fast mirrors in every release of the supported range
# (tools/diffusers_fingerprints.py), and writes it all to build/compat/summary.md; exit
# status 1 when any environment or release failed.
#
#   COMPAT_ENVS="oldest newest"   which environments (default: both)
#   COMPAT_KEEP=1                 reuse an environment's venv when it is there
#   COMPAT_SCAN=0                 skip the fingerprint scan of the diffusers releases
#   COMPAT_SUMMARY=FILE           where the summary goes (default build/compat/summary.md)
#   PYTHON=python3                the interpreter the venvs are made from
#
# Needs the package index (torch wheels: ~3 GB per environment, cached by pip) and
# about 12 GB of disk; 30-40 minutes per environment on a shared 2-core machine.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=$ROOT/build/compat
ENVS=${COMPAT_ENVS:-oldest newest}
# The CPU op, model and patch tests (the Triton kernels in Triton's interpreter);
# without the GPU-only, AOT-compile, benchmark and training files.
COMPAT_TESTS=${COMPAT_TESTS:-"tests/test_skip_fuse_cpu.py tests/test_attention_cpu.py tests/test_cache_delta_cpu.py tests/test_op_registration.py tests/test_backends.py
  tests/test_bad_input.py tests/test_build.py tests/test_skip_fuse_triton.py tests/test_attention_triton.py
  tests/test_cache_delta_triton.py tests/test_models.py tests/test_diffusion.py tests/test_cache.py
  tests/test_patch.py tests/test_patch_cache.py tests/test_patch_diffusers.py tests/test_cli.py
  tests/test_demo.py tests/test_readme.py"}
# A machine whose pip is capped at an older torch (a constraint in the global pip
# configuration) would refuse torch 2.15: these venvs install with no constraint file.
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

# name -> the requirements that replace the pinned ones (same package names)
versions() {
  case $1 in
    oldest) echo "torch==2.6.0 triton==3.2.0 diffusers==0.30.0 huggingface-hub==0.24.7 transformers==4.44.2
                  tokenizers==0.19.1 numpy==1.26.4 scikit-learn==1.5.2 safetensors==0.4.5" ;;
    newest) echo "torch==2.15.0 triton==3.9.0 diffusers==0.42.1" ;;
    gpu) echo "torch==2.11.0 triton==3.6.0" ;;
    *) echo "unknown environment $1 (oldest, newest, gpu)" >&2; return 1 ;;
  esac
}

mkdir -p "$OUT"
summary=${COMPAT_SUMMARY:-$OUT/summary.md}
{
  echo "# make compat: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+changes')"
  echo
  echo "| environment | python | torch | triton | diffusers | transformers | build | passed | failed | skipped | errors | seconds |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
} > "$summary"

status=0
for name in $ENVS; do
  t0=$(date +%s)
  dir=$OUT/$name
  swap=$(versions "$name") || { status=1; continue; }
  echo "== compat $name: $swap"
  if [ "${COMPAT_KEEP:-0}" != 1 ] || [ ! -x "$dir/venv/bin/python" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    "$PY" -m venv "$dir/venv"
  fi
  vpy=$dir/venv/bin/python
  # the working tree as it is (tracked and untracked, not ignored): its own copy, so that
  # its build and its tests see only this environment's library
  rm -rf "$dir/src"
  mkdir -p "$dir/src"
  git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -C "$dir/src"
  # the pinned requirements with this environment's versions swapped in
  names=$(for r in $swap; do echo "${r%%[=<>]*}"; done | tr 'A-Z_' 'a-z-')
  cat requirements.txt requirements-test.txt | grep -v '^\s*#' | grep -v '^\s*$' | while read -r line; do
    pkg=$(echo "${line%%[=<>\[ ]*}" | tr 'A-Z_' 'a-z-')
    echo "$names" | grep -qx "$pkg" || echo "$line"
  done > "$dir/requirements.txt"
  for r in $swap; do echo "$r" >> "$dir/requirements.txt"; done
  build=ok
  if ! { "$vpy" -m pip install --upgrade pip && "$vpy" -m pip install -r "$dir/requirements.txt"; } \
      > "$dir/install.log" 2>&1; then
    build="pip failed (install.log)"
  elif ! (cd "$dir/src" && SKIPDIT_FAST_CUDA=0 MAX_JOBS=2 "$vpy" -m pip install --no-build-isolation --no-deps -e .) \
      > "$dir/build.log" 2>&1; then
    build="build failed (build.log)"
  fi
  ver() { "$vpy" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "-"; }
  pyv=$("$vpy" -c 'import platform; print(platform.python_version())')
  counts="- | - | - | -"
  if [ "$build" = ok ]; then
    # shellcheck disable=SC2086
    # SKIPDIT_FAST_CUDA=0 here too: the tests that expect CUDA kernels whenever nvcc is
    # there know the library was built CPU-only on purpose
    (cd "$dir/src" && SKIPDIT_FAST_CUDA=0 "$vpy" -m pytest -q -p no:cacheprovider -m "not gpu" \
        --junitxml="$dir/junit.xml" $COMPAT_TESTS) > "$dir/pytest.log" 2>&1
    rc=$?
    counts=$("$vpy" - "$dir/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("- | - | - | -")
    raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "skipped", "errors")}
print(f"{n['tests'] - n['failures'] - n['skipped'] - n['errors']} | {n['failures']} | {n['skipped']} | {n['errors']}")
EOF
)
    [ $rc -eq 0 ] || status=1
    tail -n 3 "$dir/pytest.log"
  else
    status=1
    echo "$build"
  fi
  echo "| $name | $pyv | $(ver torch) | $(ver triton) | $(ver diffusers) | $(ver transformers) | $build | $counts | $(( $(date +%s) - t0 )) |" >> "$summary"
  [ "$build" = ok ] && scan_env=$dir
done

# The mirrored diffusers code in every release of the supported range (read off the
# release wheels, ~3 MB each, cached in build/compat/diffusers-wheels/), with the
# first environment that built.
{
  echo
  echo "## diffusers releases: tools/diffusers_fingerprints.py"
  echo
} >> "$summary"
if [ "${COMPAT_SCAN:-1}" = 0 ]; then
  echo "not run (COMPAT_SCAN=0)" >> "$summary"
elif [ -n "${scan_env:-}" ]; then
  if (cd "$scan_env/src" && "$scan_env/venv/bin/python" tools/diffusers_fingerprints.py \
      --download "$OUT/diffusers-wheels") > "$OUT/fingerprints.md" 2> "$OUT/fingerprints.err"; then
    cat "$OUT/fingerprints.md" >> "$summary"
  else
    status=1
    { cat "$OUT/fingerprints.md"; echo; echo '```'; cat "$OUT/fingerprints.err"; echo '```'; } >> "$summary"
  fi
else
  echo "not run: no environment built" >> "$summary"
fi
echo
cat "$summary"
exit $status
