#!/usr/bin/env bash
# CMake compiler launcher for CUDA sources: runs the compile command unchanged and
# keeps a copy of its stderr (where nvcc -Xptxas=-v writes the resource report) in
# LOGDIR/<object name>.log. Usage: ptxas_log.sh LOGDIR compiler args...
set -o pipefail
logdir=$1; shift
obj=unknown
prev=
for a in "$@"; do
  if [ "$prev" = "-o" ]; then obj=$a; fi
  prev=$a
done
log="$logdir/$(basename "$obj").log"
"$@" 2> >(tee "$log" >&2)
rc=$?
wait
exit $rc
