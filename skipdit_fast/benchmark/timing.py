"""Timing and memory measurement of the benchmark: the Timer (CUDA events, or
perf_counter rounds interleaved across the rows of a table), quantile summaries, the
peak memory of one call, the size of the rotating input sets, and the device's own
copy bandwidth and matmul rate."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict:
    xs = sorted(times_ms)
    return {
        "median_ms": statistics.median(xs),
        "mean_ms": statistics.fmean(xs),
        "min_ms": xs[0],
        "p10_ms": _quantile(xs, 0.10),
        "p25_ms": _quantile(xs, 0.25),
        "p75_ms": _quantile(xs, 0.75),
        "p90_ms": _quantile(xs, 0.90),
        "samples": len(xs),
    }


# ---------------------------------------------------------------------------
# timers

class Timer:
    """Times fn(set) over rotating input sets; returns per-call samples in ms."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        # total measuring time per row (ms), and sample count limits
        # On a GPU a row's kernels take microseconds to milliseconds: 100 ms of samples
        # is hundreds of calls. On the CPU calls take up to ~100 ms each.
        if device.type == "cuda":
            self.target_ms = 50.0 if quick else 100.0
        else:
            self.target_ms = 100.0 if quick else 400.0
        self.min_samples = 3 if quick else 10
        self.max_samples = 200 if quick else 1000
        self.last_host_ms: float | None = None  # CUDA: host time to launch one call, last row

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, step: Callable[[Any], Any], sets: list) -> list[float]:
        if self.device.type == "cuda":
            return self._time_cuda(step, sets)
        return self._time_cpu(step, sets)

    def _time_cuda(self, step, sets) -> list[float]:
        n = len(sets)
        # rough per-call estimate (the first call, with compilation, already happened),
        # and the host's time to launch one call
        torch.cuda.synchronize(self.device)
        est_start = torch.cuda.Event(enable_timing=True)
        est_end = torch.cuda.Event(enable_timing=True)
        est_start.record()
        h0 = time.perf_counter()
        for i in range(5):
            step(sets[i % n])
        host_ms = (time.perf_counter() - h0) * 1e3 / 5
        est_end.record()
        torch.cuda.synchronize(self.device)
        est = max(est_start.elapsed_time(est_end) / 5, 1e-4)
        self.last_host_ms = host_ms
        n_warm = max(2, min(200, int(25.0 / est)))
        n_rep = max(self.min_samples, min(self.max_samples, int(self.target_ms / est)))
        for i in range(n_warm):
            step(sets[i % n])
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        torch.cuda.synchronize(self.device)
        # Keep the GPU's queue ahead of the host: a sleep kernel long enough for the host
        # to enqueue every timed call, so launch overhead stays out of the event times
        # (do_bench gets the same effect from its L2-flush memset before each call).
        # Rows whose host time exceeds the GPU time are flagged host-bound.
        sleep_ms = min(300.0, 1.25 * n_rep * (host_ms + 0.02) + 1.0)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(int(sleep_ms * 1e-3 * 2.0e9))  # cycles at ~2 GHz
        for i in range(n_rep):
            s = sets[(n_warm + i) % n]
            starts[i].record()
            step(s)
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [a.elapsed_time(b) for a, b in zip(starts, ends)]

    def _time_cpu(self, step, sets) -> list[float]:
        self.last_host_ms = None
        n = len(sets)
        t0 = time.perf_counter()
        step(sets[0])
        est = max((time.perf_counter() - t0) * 1e3, 1e-4)
        inner = max(1, int(math.ceil(1.0 / est)))  # >= 1 ms per sample
        per_sample = est * inner
        n_rep = max(self.min_samples, min(self.max_samples, int(self.target_ms / per_sample)))
        warm_calls = max(1, min(50, int(20.0 / est)))
        for i in range(warm_calls):
            step(sets[i % n])
        out = []
        k = 0
        for _ in range(n_rep):
            t0 = time.perf_counter()
            for _ in range(inner):
                step(sets[k % n])
                k += 1
            out.append((time.perf_counter() - t0) * 1e3 / inner)
        return out

    def time_cpu_interleaved(self, jobs: list[tuple[Callable, list, Callable]]) -> list[list[float]]:
        """CPU: per-call samples of several (step, sets, ctx) jobs, taken round-robin.

        The rows of one table are compared with each other, and a shared CPU's speed
        drifts over seconds: timing each job for its own block of time puts that drift
        into the ratios. Here every round takes one sample (>= 1 ms of calls) of each
        job, starting at a different job each round, so all rows see the same load.
        """
        self.last_host_ms = None
        inners, per_sample = [], 0.0
        for step, sets, ctx in jobs:
            with ctx():
                t0 = time.perf_counter()
                step(sets[0])
                est = max((time.perf_counter() - t0) * 1e3, 1e-4)
                inner = max(1, int(math.ceil(1.0 / est)))
                for i in range(max(1, min(50, int(20.0 / est)))):
                    step(sets[i % len(sets)])
            inners.append(inner)
            per_sample += est * inner
        budget = self.target_ms * len(jobs)
        n_rep = max(self.min_samples, min(self.max_samples, int(budget / max(per_sample, 1e-4))))
        out: list[list[float]] = [[] for _ in jobs]
        # One input-set counter for all jobs (they share the sets): consecutive calls,
        # whichever job makes them, read different sets, so no row finds its inputs in
        # the cache because the row before it just read them.
        k = 0
        for r in range(n_rep):
            for j in range(len(jobs)):
                i = (r + j) % len(jobs)
                step, sets, ctx = jobs[i]
                with ctx():
                    t0 = time.perf_counter()
                    for _ in range(inners[i]):
                        step(sets[k % len(sets)])
                        k += 1
                    out[i].append((time.perf_counter() - t0) * 1e3 / inners[i])
        return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the C++ side's stderr (Kineto prints a line per profiler start/stop)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (pytest capture)
        fd = 2
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def peak_memory_bytes(device: torch.device, call: Callable[[], Any]) -> int:
    """Peak of the bytes allocated on `device` during call() above what was allocated
    before it: its outputs and every temporary, inputs not counted. CUDA: the caching
    allocator's peak statistic. CPU: the allocation events of the PyTorch profiler
    (profile_memory), replayed in order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp, _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = call()
            del out
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"
                  and e.get("args", {}).get("Device Type", 0) == 0), key=lambda e: e["ts"])
    cur = peak = 0
    for e in mem:
        cur += int(e["args"]["Bytes"])
        peak = max(peak, cur)
    return peak


def cache_bytes(device: torch.device) -> int:
    """What the rotating input sets must exceed: 2x the GPU's L2; 64 MiB on the CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0) or 64 * 2**20
        return 2 * l2
    return 64 * 2**20


def n_sets_for(set_bytes: int, device: torch.device, mem_cap: int | None = None) -> int:
    need = int(math.ceil(cache_bytes(device) / max(1, set_bytes)))
    n = max(2, need)
    cap = mem_cap if mem_cap is not None else (8 * 2**30 if device.type == "cuda" else 2**30)
    return max(1, min(n, 64, cap // max(1, set_bytes)))


# ---------------------------------------------------------------------------
# the device's own peaks, measured once per run

def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and the matmul rate in `dtype`."""
    timer = Timer(device, quick)
    out: dict = {}
    if device.type == "cuda":
        nbytes = 1 << 30
        mm = 8192
    else:  # --quick: smaller, so less exact (the copy may partly hit a large LLC)
        nbytes = (64 if quick else 256) << 20
        mm = 512 if quick else 1024
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    samples = timer.time(lambda s: dst.copy_(s), [src])
    med = statistics.median(samples)
    out["copy_bytes"] = nbytes
    out["copy_GBps"] = 2 * nbytes / (med * 1e-3) / 1e9
    del src, dst
    mm_dtype = dtype if (device.type == "cuda" or dtype == torch.float32) else torch.float32
    a = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    b = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    samples = timer.time(lambda s: torch.mm(s, b), [a])
    med = statistics.median(samples)
    out["matmul_shape"] = [mm, mm, mm]
    out["matmul_dtype"] = str(mm_dtype).replace("torch.", "")
    out["matmul_TFLOPs"] = 2 * mm**3 / (med * 1e-3) / 1e12
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
