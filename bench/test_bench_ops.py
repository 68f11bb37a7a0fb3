"""Microbenchmarks of every op x backend (pytest-benchmark), at the quick shapes of
`skipdit-fast bench` for this device (DESIGN.md section 6 / issues 3-4 shapes on a GPU,
scaled down on the CPU), and `auto` (its decision from the autotune cache, or measured
on the first call). Backends that cannot run an input are skipped with the reason
skipdit_fast.backends gives, so kernels that land show up here without edits.

    pytest bench/test_bench_ops.py --benchmark-columns=median,iqr,rounds
    pytest bench -k "skip_fuse and cuda" --benchmark-json out.json

`skipdit-fast bench` is the suite with competitors, rotating inputs and ratios; these
are the same ops at the same shapes in pytest-benchmark's format (one input set,
so on a GPU small shapes run from L2)."""

from __future__ import annotations

import pytest
import torch

from skipdit_fast.ops import backends
from skipdit_fast.benchmark import SPECS, BenchRunner, elem_size

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

CASES = [pytest.param(op, case, id=f"{op}-{case.label.replace(' ', '_')}")
         for op in SPECS for case in SPECS[op].cases(DEVICE, quick=True)]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", backends.BACKENDS + ("auto",))
@pytest.mark.parametrize("op,case", CASES)
def test_op(benchmark, op, case, backend, direction):
    spec = SPECS[op]
    if direction not in case.directions:
        pytest.skip(f"{op} is benchmarked forward only")
    q = backends.Query(op, DEVICE, DTYPE, direction == "fwd+bwd", spec.query_features(case.params))
    why = [] if backend == "auto" else backends.explain(q)[backend]
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("Triton on CPU tensors is the interpreter: not timed")
    inputs = spec.make(case.params, DEVICE, DTYPE, direction == "fwd+bwd")
    step = BenchRunner._step(spec.ours, direction)

    def run():
        step(inputs)
        _sync()

    flops, nbytes = spec.cost(case.params, direction, elem_size(DTYPE))
    benchmark.extra_info.update(op=op, shape=case.label, backend=backend, direction=direction,
                                dtype=str(DTYPE), flops=flops, bytes=nbytes, device=str(DEVICE))
    with backends.use_backend(**{op: backend}):
        run()  # first call: JIT / autotuning (auto: measuring its candidates) outside the timing
        benchmark.pedantic(run, rounds=20 if DEVICE.type == "cuda" else 5, warmup_rounds=2,
                           iterations=10 if DEVICE.type == "cuda" else 1)
    assert benchmark.stats.stats.median > 0
