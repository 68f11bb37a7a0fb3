#!/usr/bin/env bash
# `make gpu-check`: the one command for a machine with an NVIDIA GPU and no network
# access (nothing is downloaded). With the Python that is there (python3, or $PYTHON):
#
#   1. build the native library in place for this GPU's arch only (SKIPDIT_FAST_CUDA=1,
#      TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability(), MAX_JOBS<=16)
#   2. load it, print its build info, ptxas spills and `skipdit-fast info`
#   3. the GPU test subset: pytest -k "(gpu or cuda or triton) and not aot"
#      (tests marked gpu plus the op tests parametrized on CUDA / Triton)
#   4. tools/exercise_ops.py: every CUDA/Triton op once, then the same under
#      compute-sanitizer memcheck
#   5. `skipdit-fast tune`: what `auto` measures and chooses for DiT-XL/2-skip (batch 8 +
#      CFG, bf16) and HunyuanDiT-sized shapes, with a fresh autotune cache
#   6. the GPU benchmark suite (skipdit-fast bench), under a time budget
#
# Results: bench/results/<date>-<gpu>/{bench.json, bench.md, speedup.png, summary.md,
# tune-*.md (every candidate's time and error, the winner, why; JSON in the logs)};
# logs: build/gpu-check/*.log. Every stage has a time limit and the whole run a budget
# (GPU_CHECK_BUDGET, default 450 s: under 8 minutes on an H100); a failing stage does
# not stop the later ones; the exit status is 1 when any stage failed or timed out.
# GPU_CHECK_COPY_TO=DIR also copies the results and logs.tar.gz there (<= 8 files).
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
LOGDIR=$ROOT/build/gpu-check
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

STAGES=()
STATUS=()
SECS=()
NOTES=()
FAILED=0
LAST_RC=0
LAST_DT=0

now() { date +%s; }

record() {  # record NAME STATUS SECONDS NOTE
  STAGES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4")
  case $2 in FAIL | TIMEOUT | SKIPPED) FAILED=1 ;; esac
  echo "== $1: $2 (${3}s) $4"
}

# run_stage NAME LIMIT RESERVE CMD...: runs CMD with a limit of min(LIMIT, time left
# minus RESERVE, the time the later stages need); log in $LOGDIR/NAME.log. Sets LAST_RC
# and LAST_DT; returns 1 without running when too little time is left (recorded).
run_stage() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  local left=$((DEADLINE - $(now) - reserve))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    record "$name" SKIPPED 0 "no time left in the ${BUDGET}s budget"
    LAST_RC=125
    return 1
  fi
  echo
  echo "== $name (limit ${limit}s): $*"
  local t
  t=$(now)
  timeout --kill-after=5 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  LAST_RC=$?
  LAST_DT=$(($(now) - t))
  tail -n 30 "$LOGDIR/$name.log" | cut -c1-240 | sed 's/^/   | /'
  if ((LAST_RC == 124 || LAST_RC == 137)); then
    record "$name" TIMEOUT "$LAST_DT" "killed after ${limit}s (log: build/gpu-check/$name.log)"
    return 1
  fi
  return 0
}

finish() {  # finish NAME [NOTE]: PASS / FAIL from LAST_RC (after run_stage returned 0)
  if ((LAST_RC == 0)); then
    record "$1" PASS "$LAST_DT" "${2:-}"
  else
    local last
    last=$(grep -v '^[[:space:]]*$' "$LOGDIR/$1.log" | tail -n 1 | cut -c1-160)
    record "$1" FAIL "$LAST_DT" "exit $LAST_RC: ${last} (log: build/gpu-check/$1.log)"
  fi
}

# ---------------------------------------------------------------------------
# 0. preflight: a Python with torch and a CUDA device
PRE=$("$PY" - <<'EOF' 2>"$LOGDIR/preflight.log"
import re, torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
name = torch.cuda.get_device_name(0)
major, minor = torch.cuda.get_device_capability(0)
arch = f"{major}.{minor}" + ("a" if major >= 9 else "")  # sm_90a: wgmma / TMA
slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48].strip("-")
print(f"{arch}|{slug}|{name}|torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
)
if [[ -z $PRE ]]; then
  cat "$LOGDIR/preflight.log"
  echo "gpu-check: $PY cannot use a CUDA device; nothing to check" >&2
  exit 1
fi
IFS='|' read -r ARCH SLUG GPU_NAME VERSIONS <<<"$PRE"
ARCH=${GPU_CHECK_ARCH:-$ARCH}
JOBS=$(nproc 2>/dev/null || echo 8)
((JOBS > 16)) && JOBS=16
DATE=$(date -u +%F)
RESULTS=bench/results/$DATE-$SLUG
mkdir -p "$RESULTS"
echo "gpu-check: $GPU_NAME, $VERSIONS, arch $ARCH, MAX_JOBS=$JOBS, budget ${BUDGET}s"
echo "gpu-check: results in $RESULTS/, logs in build/gpu-check/"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$LOGDIR/nvidia-smi.log" 2>&1 || true

# ---------------------------------------------------------------------------
# 1. build in place, this GPU's arch only
if run_stage build 240 230 env SKIPDIT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" \
  "$PY" setup.py build_ext --inplace; then
  finish build "TORCH_CUDA_ARCH_LIST=$ARCH"
fi

# 2. load the library, build info, ptxas spills, `skipdit-fast info`
if run_stage load 45 200 "$PY" - <<'EOF'; then
import importlib.util, json, subprocess, sys
import skipdit_fast
from skipdit_fast.ops import native
if not native.available():
    sys.exit(f"native library not loaded: {native.load_error()}")
info = native.build_info()
print("build info:", json.dumps(info))
if not info.get("cuda"):
    sys.exit("the native library was built without CUDA")
rep = native.ptxas_report()
spills = [r for r in rep if (r["spill_stores"] or 0) + (r["spill_loads"] or 0)]
print(f"ptxas: {len(rep)} kernels, {len(spills)} with spills")
for r in spills:
    print(f"  SPILL {r['kernel']} {r['arch']}: {r['spill_stores']} B stores, {r['spill_loads']} B loads")
rc = subprocess.call([sys.executable, "-m", "skipdit_fast", "info"])
if rc:
    sys.exit(f"skipdit-fast info failed ({rc})")
sys.exit(1 if spills else 0)
EOF
  finish load "library loads, built with CUDA, 0 ptxas spills"
fi

# 3. GPU tests
if run_stage tests 150 170 "$PY" -m pytest tests -q -p no:cacheprovider -rfE \
  -k "(gpu or cuda or triton) and not aot" --junitxml="$LOGDIR/tests.xml"; then
  line=$(grep -E "(passed|failed|error|no tests ran|deselected)" "$LOGDIR/tests.log" | tail -n 1)
  if ((LAST_RC == 5)); then
    record tests FAIL "$LAST_DT" "no GPU tests selected: $line"
  else
    finish tests "$line"
  fi
fi

# 4. every CUDA/Triton op once, then under compute-sanitizer memcheck
if run_stage ops-once 60 150 "$PY" tools/exercise_ops.py; then
  finish ops-once "$(tail -n 1 "$LOGDIR/ops-once.log")"
fi
SAN=$(command -v compute-sanitizer || true)
if [[ -z $SAN ]]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0 /opt/nvidia/compute-sanitizer; do
    [[ -n $d && -x $d/bin/compute-sanitizer ]] && SAN=$d/bin/compute-sanitizer && break
    [[ -n $d && -x $d/compute-sanitizer ]] && SAN=$d/compute-sanitizer && break
  done
fi
if [[ -z $SAN ]]; then
  record sanitizer FAIL 0 "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)"
elif run_stage sanitizer 120 110 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck \
  --error-exitcode 99 --print-limit 20 "$PY" tools/exercise_ops.py; then
  summary=$(grep -E "ERROR SUMMARY" "$LOGDIR/sanitizer.log" | tail -n 1)
  if ((LAST_RC != 0)) && grep -qiE "device not supported|unsupported device" "$LOGDIR/sanitizer.log"; then
    # e.g. under gVisor the sanitizer cannot attach to the device: not a finding about our code
    record sanitizer UNSUPPORTED "$LAST_DT" "compute-sanitizer cannot run on this device/runtime (see log)"
  else
    finish sanitizer "${summary:-no ERROR SUMMARY line}"
  fi
fi

# 5. autotune decisions (which of our kernels won where, against torch), from an empty
# cache of this run
export SKIPDIT_FAST_CACHE_DIR=$LOGDIR/autotune
for target in "--model DiT-XL/2-skip --batch 8 --cfg" "--shapes hunyuandit --batch 1 --cfg"; do
  name=tune-$(echo "$target" | awk '{print $2}' | tr 'A-Z/' 'a-z-')
  # shellcheck disable=SC2086
  if run_stage "$name" 90 200 "$PY" -m skipdit_fast tune $target --dtype bf16 --force \
    --markdown "$RESULTS/$name.md" --json "$LOGDIR/$name.json"; then
    finish "$name" "decision table in $RESULTS/$name.md"
  fi
done

# 6. benchmarks: --budget inside the stage's limit (start-up, peaks, dispatch and
# writing the files take the rest)
left=$((DEADLINE - $(now) - 15))
((left > 330)) && left=330
BENCH_BUDGET=$((left - 40))
((BENCH_BUDGET < 30)) && BENCH_BUDGET=30
if run_stage bench 330 15 "$PY" -m skipdit_fast bench --budget "$BENCH_BUDGET" \
  --json "$RESULTS/bench.json" --markdown "$RESULTS/bench.md" --plot "$RESULTS/speedup.png"; then
  finish bench "tables in $RESULTS/bench.md"
fi

# ---------------------------------------------------------------------------
# summary
TOTAL=$(($(now) - T0))
{
  echo "# gpu-check: $GPU_NAME"
  echo
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
  [[ $commit != '?' ]] && ! git diff --quiet HEAD 2>/dev/null && commit="$commit (dirty)"
  echo "$(date -u +%FT%TZ), $VERSIONS, arch $ARCH, commit $commit, ${TOTAL}s of a ${BUDGET}s budget"
  echo
  echo "| stage | status | seconds | note |"
  echo "|---|---|---|---|"
  for i in "${!STAGES[@]}"; do
    echo "| ${STAGES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]//|/\\|} |"
  done
  echo
  echo "Benchmark tables: [bench.md](bench.md); raw numbers: bench.json. What \`auto\` chose and why:"
  echo "[tune-dit-xl-2-skip.md](tune-dit-xl-2-skip.md), [tune-hunyuandit.md](tune-hunyuandit.md). Logs of every stage"
  echo "are in build/gpu-check/ on the machine that ran this (logs.tar.gz where copied)."
} >"$RESULTS/summary.md"
if [[ -f $RESULTS/bench.json ]]; then
  "$PY" -c "from skipdit_fast.benchmark import update_results_readme; update_results_readme('bench/results')" \
    >>"$LOGDIR/summary.log" 2>&1 || echo "gpu-check: could not refresh bench/results/README.md (see build/gpu-check/summary.log)"
fi
if [[ -n ${GPU_CHECK_COPY_TO:-} ]]; then
  mkdir -p "$GPU_CHECK_COPY_TO"
  cp "$RESULTS"/* "$GPU_CHECK_COPY_TO"/ 2>/dev/null
  cp bench/results/README.md "$GPU_CHECK_COPY_TO"/results-README.md 2>/dev/null
  tar czf "$GPU_CHECK_COPY_TO/logs.tar.gz" -C "$LOGDIR" . 2>/dev/null
fi
echo
cat "$RESULTS/summary.md"
echo
if ((FAILED)); then
  echo "gpu-check: FAILED (see the table above)"
  exit 1
fi
echo "gpu-check: all stages passed"
exit 0
