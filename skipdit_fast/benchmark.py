"""`skipdit-fast bench`: kernel benchmarks against the competitors, in one run.

For every op and shape it times each implementation side by side in one process:

    eager                 the pure-PyTorch reference (skipdit_fast.ops.reference), i.e. what a
                          model without this package runs
    compile               torch.compile of that same eager code (default mode)
    compile-max-autotune  torch.compile(mode="max-autotune-no-cudagraphs") (GPU, target shapes)
    sdpa[...]             torch SDPA (attention): the backend PyTorch picks, and each one forced
    gemm-floor            skip_fuse only: one GEMM (M, 2D) x (2D, D_out) + bias on a ready-made
                          normalized input (cuBLAS on a GPU) -- the floor a fused kernel aims at
    cpu / cuda / triton   our backends, called through skipdit_fast.ops with that backend chosen

Which of our backends run is read from skipdit_fast.ops.backends (registry/explain), so a
kernel that lands shows up without edits here; one that cannot run says why.

Timing: on a GPU, CUDA events around every call (median of many, after warm-up), the
inputs rotating over sets larger than twice the L2 cache, like triton.testing.do_bench
with a cold cache; on the CPU, perf_counter around calls (batched to >= 1 ms per sample),
the rows of one table sampled round-robin so that they all see the same machine load.
Rates are expressed against the device's copy bandwidth and matmul rate measured at the
start of the same run; all ratios come from times of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import ops as _ops
from .ops import reference as _reference

OPS = ("skip_fuse", "attention", "cache_delta")
EXTRAS = ("dispatch", "sampling")
SCHEMA_VERSION = 1
OURS = ("cpu", "cuda", "triton")  # our backends; "reference" is the eager row
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Relative max error (vs the eager output of the same dtype) above which a row is marked
# as a mismatch: a benchmark of a wrong kernel is not a result. Loose on purpose: this is
# a sanity check, the tests hold the real error budgets.
MISMATCH_REL = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-3}


# ---------------------------------------------------------------------------
# small helpers

def _fmt_time(ms: float | None) -> str:
    """3-4 significant digits: 12.3 us, 456.7 us, 1.234 ms, 12.35 ms, 123.5 ms, 1.23 s."""
    if ms is None or not math.isfinite(ms):
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.1f} ms"
    if ms >= 10:
        return f"{ms:.2f} ms"
    if ms >= 1:
        return f"{ms:.3f} ms"
    return f"{ms * 1000:.1f} us"


def _fmt_rate(r: dict) -> str:
    if r["bound"] == "compute":
        v = r["TFLOPs"]
        return f"{v:.1f} TFLOP/s" if v >= 1 else f"{v * 1000:.1f} GFLOP/s"
    v = r["GBps"]
    return f"{v:.0f} GB/s" if v >= 10 else f"{v:.2f} GB/s"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


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


def _short(msg: str, n: int = 160) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _raise_dynamo_limits() -> None:
    """Each (shape, direction) compiles its own graph: lift dynamo's recompile limits so
    that it never silently falls back to eager after the 8th shape."""
    try:
        cfg = torch._dynamo.config
    except AttributeError:
        return
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), 512))


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


# ---------------------------------------------------------------------------
# ops, shapes and costs

@dataclass
class Case:
    op: str
    label: str
    params: dict
    directions: tuple = ("fwd", "fwd+bwd")
    target: bool = False  # a DESIGN.md section 6 target shape (max-autotune runs here)


@dataclass
class InputSet:
    args: tuple
    leaves: list = field(default_factory=list)
    grad_out: torch.Tensor | None = None


# The CPU skip_fuse kernel's row-chunk buffer (kFwdChunkBytes in csrc/cpu/skip_fuse.cpp).
CPU_SKIP_FUSE_CHUNK_BYTES = 16 << 20


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SkipFuse:
    op = "skip_fuse"

    @staticmethod
    def cases(device: torch.device, quick: bool) -> list[Case]:
        if device.type == "cuda":
            grid = ([(4096, 1152), (32768, 1152), (4096, 1408)] if quick else
                    [(m, d) for d in (1152, 1408) for m in (512, 4096, 16384, 32768)])
        else:
            grid = [(64, 1152)] if quick else [(512, 384), (4096, 384), (512, 1152), (4096, 1152),
                                                  (512, 1408)]
        return [Case("skip_fuse", f"M={m} D={d}", {"M": m, "D": d, "D_out": d},
                     target=(device.type == "cuda" and d == 1152 and m in (4096, 32768)))
                for m, d in grid]

    @staticmethod
    def query_features(p):
        return (p["D"], p["D_out"])

    @staticmethod
    def make(p, device, dtype, grad) -> InputSet:
        M, D, Do = p["M"], p["D"], p["D_out"]
        x = torch.randn(M, D, device=device, dtype=dtype)
        skip = torch.randn(M, D, device=device, dtype=dtype) * 0.5 + 0.1
        nw = 1 + 0.1 * torch.randn(2 * D, device=device, dtype=torch.float32)
        nb = 0.1 * torch.randn(2 * D, device=device, dtype=torch.float32)
        w = torch.randn(Do, 2 * D, device=device, dtype=dtype) * (2 * D) ** -0.5
        b = 0.1 * torch.randn(Do, device=device, dtype=dtype)
        args = [x, skip, nw, nb, w, b]
        if not grad:
            return InputSet(tuple(args))
        for t in args:
            t.requires_grad_(True)
        g = torch.randn(M, Do, device=device, dtype=dtype)
        return InputSet(tuple(args), list(args), g)

    @staticmethod
    def eager(args):
        return _reference.skip_fuse(*args)

    @staticmethod
    def ours(args):
        return _ops.skip_fuse(*args)

    @staticmethod
    def cost(p, direction, e):
        M, D, Do = p["M"], p["D"], p["D_out"]
        gemm = 2 * M * (2 * D) * Do
        fwd_bytes = e * (2 * M * D + Do * 2 * D + Do + M * Do) + 4 * 4 * D
        if direction == "fwd":
            return gemm, fwd_bytes
        bwd_bytes = e * (M * Do + 2 * M * D + 2 * Do * D + 2 * M * D + 2 * Do * D + Do) + 4 * 8 * D
        return 3 * gemm, fwd_bytes + bwd_bytes


class Attention:
    op = "attention"

    @staticmethod
    def cases(device: torch.device, quick: bool) -> list[Case]:
        # (B, N, H, Dh): DiT-XL/2 (Dh 72, 16 heads), HunyuanDiT (Dh 88), Latte temporal
        if device.type == "cuda":
            grid = ([(4, 1024, 16, 72), (1024, 16, 16, 72)] if quick else
                    [(16, 256, 16, 72), (4, 1024, 16, 72), (1, 4096, 16, 72),
                     (4, 1024, 16, 88), (1, 4096, 16, 88), (1024, 16, 16, 72)])
        else:
            grid = ([(1, 256, 8, 72), (64, 16, 16, 72)] if quick else
                    [(1, 256, 16, 72), (1, 1024, 4, 72), (1, 256, 16, 88), (64, 16, 16, 72)])
        out = []
        for B, N, H, Dh in grid:
            tag = " (temporal)" if N == 16 else ""
            out.append(Case("attention", f"B={B} N={N} H={H} Dh={Dh}{tag}",
                            {"B": B, "N": N, "H": H, "Dh": Dh},
                            target=(device.type == "cuda" and Dh == 72 and N == 1024)))
        return out

    @staticmethod
    def query_features(p):
        return (p["Dh"],)

    @staticmethod
    def make(p, device, dtype, grad) -> InputSet:
        B, N, H, Dh = p["B"], p["N"], p["H"], p["Dh"]
        # q, k, v as strided views of one fused qkv projection output, as in a DiT
        qkv = torch.randn(B, N, 3, H, Dh, device=device, dtype=dtype)
        if grad:
            qkv.requires_grad_(True)
        q, k, v = qkv.unbind(2)
        if not grad:
            return InputSet((q, k, v))
        g = torch.randn(B, N, H, Dh, device=device, dtype=dtype)
        return InputSet((q, k, v), [qkv], g)

    @staticmethod
    def eager(args):
        return _reference.attention(*args)

    @staticmethod
    def ours(args):
        return _ops.attention(*args)

    @staticmethod
    def cost(p, direction, e):
        B, N, H, Dh = p["B"], p["N"], p["H"], p["Dh"]
        flops = 4 * B * H * N * N * Dh
        io = B * N * H * Dh
        fwd_bytes = e * 4 * io
        if direction == "fwd":
            return flops, fwd_bytes
        # flash convention: backward = 2.5x forward FLOPs; reads q k v o do lse, writes dq dk dv
        return int(3.5 * flops), fwd_bytes + e * 8 * io + 4 * B * H * N


class CacheDelta:
    op = "cache_delta"

    @staticmethod
    def cases(device: torch.device, quick: bool) -> list[Case]:
        # DiT hidden states (batch incl. CFG, tokens, width)
        if device.type == "cuda":
            grid = [(16, 256, 1152)] if quick else [(16, 256, 1152), (16, 1024, 1152), (2, 4096, 1408)]
        else:
            grid = [(2, 256, 1152)] if quick else [(2, 256, 1152), (4, 1024, 1152)]
        return [Case("cache_delta", f"B={b} N={n} D={d}", {"B": b, "N": n, "D": d}, directions=("fwd",))
                for b, n, d in grid]

    @staticmethod
    def query_features(p):
        return ()

    @staticmethod
    def make(p, device, dtype, grad) -> InputSet:
        shape = (p["B"], p["N"], p["D"])
        b = torch.randn(shape, device=device, dtype=dtype)
        a = b + 0.05 * torch.randn(shape, device=device, dtype=dtype)
        return InputSet((a, b))

    @staticmethod
    def eager(args):
        return _reference.cache_delta(*args)

    @staticmethod
    def ours(args):
        return _ops.cache_delta(*args)

    @staticmethod
    def cost(p, direction, e):
        n = p["B"] * p["N"] * p["D"]
        return 5 * n, 2 * n * e + 4


SPECS = {"skip_fuse": SkipFuse, "attention": Attention, "cache_delta": CacheDelta}


def set_bytes(s: InputSet) -> int:
    seen, total = set(), 0
    for t in list(s.args) + ([s.grad_out] if s.grad_out is not None else []):
        if isinstance(t, torch.Tensor):
            base = t._base if t._base is not None else t
            if id(base) not in seen:
                seen.add(id(base))
                total += base.numel() * base.element_size()
    return total


# ---------------------------------------------------------------------------
# implementations (rows)

@dataclass
class Impl:
    name: str
    kind: str  # eager | compile | ours | sdpa | floor
    fn: Callable | None = None  # args -> output
    ctx: Callable[[], Any] = contextlib.nullcontext
    sets: Callable | None = None  # (case, direction) -> list[InputSet]; None: the shared sets
    reason: str | None = None  # why it does not run here
    backend: str | None = None
    note: str | None = None
    compile_s: float | None = None


def _fresh_function(fn, tag: int):
    """A copy of fn with its own code object. Dynamo keeps its graph cache and its
    automatic-dynamic shape history per code object: without this, shapes seen by one
    compiled variant (another head dim, another direction) would make the next one's
    dims symbolic."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        b = getattr(SDPBackend, name, None)
        if b is not None:
            out[name.lower().replace("_attention", "")] = b
    return out


def _sdpa_call(args, scale=None):
    q, k, v = args
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2).contiguous()  # the op's contract: contiguous BSHD


def sdpa_choice(args) -> str | None:
    """Which SDPA backend PyTorch picks for these inputs (None if it cannot say)."""
    q, k, v = (t.transpose(1, 2) for t in args)
    try:
        idx = int(torch._fused_sdp_choice(q, k, v, None, 0.0, False))
    except Exception:  # private API; absent or changed
        return None
    for name, b in _sdpa_backends().items():
        try:
            if int(b.value if hasattr(b, "value") else b) == idx:
                return name
        except (TypeError, ValueError):
            continue
    return None


class Runner:
    """Runs the benchmark of one or more ops and collects rows (a plain dict each)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool, *,
                 compile_mode: str = "auto", deadline: float | None = None,
                 compile_deadline: float | None = None, log=print):
        self.device = device
        self.dtype = dtype
        self.quick = quick
        self.timer = Timer(device, quick)
        self.deadline = deadline
        # compiling is the slow part: it stops earlier, so that the remaining rows still run
        self.compile_deadline = compile_deadline if compile_deadline is not None else deadline
        self.log = log
        self.rows: list[dict] = []
        self.unavailable: list[dict] = []
        self.errors: list[dict] = []
        self._compiled: dict = {}
        # which torch.compile variants run: "none", "default", "targets" (default everywhere,
        # max-autotune on target shapes), "all"
        if compile_mode == "auto":
            if quick:
                compile_mode = "none"
            else:
                compile_mode = "targets" if device.type == "cuda" else "default"
        self.compile_mode = compile_mode
        _raise_dynamo_limits()

    # -- implementations of one case ----------------------------------------
    def impls(self, spec, case: Case, direction: str) -> list[Impl]:
        from .ops import backends

        grad = direction == "fwd+bwd"
        out = [Impl("eager", "eager", spec.eager)]
        out += self._compile_impls(spec, case, direction)
        if spec.op == "attention":
            out += self._sdpa_impls(case)
        if spec.op == "skip_fuse":
            out.append(self._gemm_floor(case, direction))
        q = backends.Query(spec.op, self.device, self.dtype, grad, spec.query_features(case.params))
        reasons = backends.explain(q)
        for name in backends.registry()[spec.op]:
            if name == "reference":
                continue  # the eager row is the reference backend
            why = reasons.get(name) or []
            if name == "triton" and self.device.type == "cpu" and not why:
                why = ["Triton on CPU tensors runs in the interpreter (TRITON_INTERPRET=1): "
                       "a correctness tool, not timed"]
            impl = Impl(name, "ours", spec.ours, backend=name,
                        ctx=(lambda n=name: backends.use_backend(**{spec.op: n})),
                        reason="; ".join(why) if why else None)
            out.append(impl)
        return out

    def _compile_impls(self, spec, case, direction) -> list[Impl]:
        modes = []
        why_default = why_max = None
        if self.compile_mode == "none":
            why_default = why_max = ("skipped (--quick / --compile none): torch.compile takes seconds "
                                     "to tens of seconds per graph")
        else:
            modes.append(("compile", "default"))
            if self.device.type != "cuda":
                why_max = "max-autotune is benchmarked on GPUs only"
            elif self.compile_mode == "all" or (self.compile_mode == "targets" and case.target
                                                 and direction == "fwd"):
                modes.append(("compile-max-autotune", "max-autotune-no-cudagraphs"))
            else:
                why_max = ("max-autotune (minutes of autotuning per graph) runs on the DESIGN.md target "
                           "shapes, forward, only (--compile all for every row)")
        out = []
        for name, mode in modes:
            # One compiled function per (op, direction, mode, widths): in a model the
            # widths (D, D_out; head dim) are fixed and token counts vary. Default mode
            # keeps dynamo's automatic dynamic shapes within that (what a user gets:
            # after the first shape, one dynamic-shape graph); max-autotune is static.
            key = (spec.op, direction, mode, spec.query_features(case.params))
            fn = self._compiled.get(key)
            if fn is None:
                fn = torch.compile(_fresh_function(spec.eager, len(self._compiled)),
                                   mode=None if mode == "default" else mode,
                                   dynamic=None if mode == "default" else False, fullgraph=True)
                self._compiled[key] = fn
            out.append(Impl(name, "compile", fn))
        if why_default:
            out.append(Impl("compile", "compile", reason=why_default))
        if why_max:
            out.append(Impl("compile-max-autotune", "compile", reason=why_max))
        return out

    def _sdpa_impls(self, case) -> list[Impl]:
        from torch.nn.attention import sdpa_kernel

        out = [Impl("sdpa", "sdpa", _sdpa_call, note="PyTorch's own pick")]
        for name, b in _sdpa_backends().items():
            if self.device.type == "cpu" and name not in ("flash", "math"):
                out.append(Impl(f"sdpa[{name}]", "sdpa", reason="not offered on CPU"))
                continue
            out.append(Impl(f"sdpa[{name}]", "sdpa", _sdpa_call, ctx=(lambda b=b: sdpa_kernel([b]))))
        return out

    def _gemm_floor(self, case, direction) -> Impl:
        p = case.params
        dev, dt = self.device, self.dtype

        def make_sets(n_hint=None):
            M, D, Do = p["M"], p["D"], p["D_out"]

            def one():
                a = torch.randn(M, 2 * D, device=dev, dtype=dt)
                w = torch.randn(Do, 2 * D, device=dev, dtype=dt) * (2 * D) ** -0.5
                b = 0.1 * torch.randn(Do, device=dev, dtype=dt)
                if direction == "fwd":
                    return InputSet((a, w, b))
                for t in (a, w, b):
                    t.requires_grad_(True)
                return InputSet((a, w, b), [a, w, b], torch.randn(M, Do, device=dev, dtype=dt))

            first = one()
            n = n_sets_for(set_bytes(first), dev)
            return [first] + [one() for _ in range(n - 1)]

        lib = "cuBLAS" if dev.type == "cuda" else "ATen CPU BLAS"
        return Impl("gemm-floor", "floor", lambda args: F.linear(*args), sets=make_sets,
                    note=f"{lib} GEMM (M, 2D) x (2D, D_out) + bias on a ready normalized input")

    # -- running -------------------------------------------------------------
    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _make_sets(self, spec, case, direction) -> list[InputSet]:
        grad = direction == "fwd+bwd"
        first = spec.make(case.params, self.device, self.dtype, grad)
        n = n_sets_for(set_bytes(first), self.device)
        return [first] + [spec.make(case.params, self.device, self.dtype, grad) for _ in range(n - 1)]

    @staticmethod
    def _step(fn, direction):
        if direction == "fwd":
            def step(s):
                with torch.no_grad():
                    return fn(s.args)
        else:
            def step(s):
                out = fn(s.args)
                return torch.autograd.grad(out, s.leaves, s.grad_out)
        return step

    def run_op(self, op: str) -> None:
        spec = SPECS[op]
        cases = spec.cases(self.device, self.quick)
        for case in cases:
            for direction in case.directions:
                if self._out_of_time():
                    self.unavailable.append({"op": op, "shape": case.label, "direction": direction,
                                             "impl": "*", "reason": "time budget (--budget) used up"})
                    continue
                try:
                    self._run_case(spec, case, direction)
                except Exception as ex:  # keep going: the other shapes still run
                    self.errors.append({"op": op, "shape": case.label, "direction": direction, "impl": "*",
                                        "error": _short(f"{type(ex).__name__}: {ex}")})
                    self.log(f"  ERROR {op} {case.label} {direction}: {_short(ex)}")

    def _run_case(self, spec, case, direction) -> None:
        e = _elem(self.dtype)
        flops, nbytes = spec.cost(case.params, direction, e)
        base = {"op": spec.op, "direction": direction, "shape": case.label, "params": case.params,
                "dtype": str(self.dtype).replace("torch.", ""), "flops": flops, "bytes": nbytes}
        try:
            sets = self._make_sets(spec, case, direction)
        except torch.cuda.OutOfMemoryError as ex:  # pragma: no cover - GPU only
            self.errors.append({**base, "impl": "*", "error": f"out of memory making inputs: {_short(ex)}"})
            return
        ref_out = None
        try:
            with torch.no_grad():
                ref_out = spec.eager(sets[0].args).float()
        except Exception as ex:  # e.g. eager attention's N x N scores out of memory
            self.log(f"  eager reference failed for {spec.op} {case.label}: {_short(ex)} (no output check)")
        choice = sdpa_choice(sets[0].args) if spec.op == "attention" else None
        case_rows, pending = [], []
        for impl in self.impls(spec, case, direction):
            if impl.reason:
                self.unavailable.append({**{k: base[k] for k in ("op", "shape", "direction")},
                                         "impl": impl.name, "reason": impl.reason})
                continue
            if impl.kind == "compile" and self.compile_deadline is not None \
                    and time.monotonic() > self.compile_deadline:
                self.unavailable.append({**{k: base[k] for k in ("op", "shape", "direction")},
                                         "impl": impl.name, "reason": "time budget (--budget) used up"})
                continue
            prepared = self._prepare_impl(spec, impl, sets, direction, base, ref_out)
            if prepared is None:
                continue
            if self.device.type != "cpu":  # GPU: event timing, one row after the other
                try:
                    prepared["samples"] = self._time_one(prepared)
                except Exception as ex:  # one failing row must not end the run
                    self._row_error(prepared, ex)
                    continue
            pending.append(prepared)
        if self.device.type == "cpu" and pending:
            jobs = [(p["step"], p["sets"], p["impl"].ctx) for p in pending]
            try:
                for p, samples in zip(pending, self.timer.time_cpu_interleaved(jobs)):
                    p["samples"] = samples
            except Exception as ex:  # pragma: no cover - a row that ran once then failed
                for p in pending:
                    self._row_error(p, ex)
                pending = []
        for p in pending:
            self._measure_peak(p)
            row = self._finish_row(p, base, ref_out)
            if p["impl"].name == "sdpa" and choice:
                row["note"] = f"PyTorch picks {choice}"
                row["sdpa_choice"] = choice
            case_rows.append(row)
        del sets, ref_out
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        add_ratios(case_rows)
        self.rows.extend(case_rows)
        for r in case_rows:
            self.log(f"  {r['op']:<11} {r['direction']:<7} {r['shape']:<34} {r['impl']:<22} "
                     f"{_fmt_time(r['median_ms']):>10}  vs eager {_fmt_ratio(r.get('vs_eager'))}")

    def _prepare_impl(self, spec, impl: Impl, shared_sets, direction, base, ref_out) -> dict | None:
        """First call (compilation included) and output check of one row; None if it
        cannot run (recorded as unavailable or as an error)."""
        sets = shared_sets
        ident = {k: base[k] for k in ("op", "shape", "direction")}
        caught: list = []
        try:
            if impl.sets is not None:
                sets = impl.sets()
            step = self._step(impl.fn, direction)
            with impl.ctx():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        first = impl.fn(sets[0].args)
                    if direction == "fwd+bwd":
                        step(sets[0])  # compile the backward too
                    self.timer.sync()
                    first_s = time.perf_counter() - t0
        except Exception as ex:  # one failing row must not end the run
            why = _short(f"{type(ex).__name__}: {ex}")
            if impl.kind == "sdpa" and "No available kernel" in str(ex):
                msgs = [_short(str(w.message), 120) for w in caught][:2]
                self.unavailable.append({**ident, "impl": impl.name,
                                         "reason": "not available for these inputs" + (": " + "; ".join(msgs) if msgs else "")})
                return None
            self.errors.append({**ident, "impl": impl.name, "kind": impl.kind, "error": why})
            self.log(f"  ERROR {ident} {impl.name}: {why}")
            return None
        finally:
            self._sync_quietly()
        return {"impl": impl, "ident": ident, "step": step, "sets": sets, "first": first,
                "first_s": first_s}

    def _time_one(self, p: dict) -> list[float]:
        try:
            with p["impl"].ctx():
                samples = self.timer.time(p["step"], p["sets"])
            p["host_ms"] = getattr(self.timer, "last_host_ms", None)
            return samples
        finally:
            self._sync_quietly()

    def _measure_peak(self, p: dict) -> None:
        """Peak memory of one more call of the row (outputs and temporaries)."""
        try:
            with p["impl"].ctx():
                p["peak_mem_bytes"] = peak_memory_bytes(self.device, lambda: p["step"](p["sets"][0]))
        except Exception as ex:  # pragma: no cover - the row itself ran; keep its time
            self.log(f"  peak memory of {p['ident']} {p['impl'].name} not measured: {_short(ex)}")
        finally:
            self._sync_quietly()

    def _sync_quietly(self) -> None:
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # reported by the row itself / the next one
                pass

    def _row_error(self, p: dict, ex: Exception) -> None:
        impl = p["impl"]
        why = _short(f"{type(ex).__name__}: {ex}")
        self.errors.append({**p["ident"], "impl": impl.name, "kind": impl.kind, "error": why})
        self.log(f"  ERROR {p['ident']} {impl.name}: {why}")

    def _finish_row(self, p: dict, base, ref_out) -> dict:
        impl, ident, samples, sets = p["impl"], p["ident"], p["samples"], p["sets"]
        row = {**base, "impl": impl.name, "kind": impl.kind, **summarize(samples), "n_sets": len(sets)}
        host = p.get("host_ms")
        if host is not None:
            row["host_ms"] = host  # the CPU's time to launch one call
            row["host_bound"] = host > row["median_ms"]
        if p.get("peak_mem_bytes") is not None:
            row["peak_mem_bytes"] = p["peak_mem_bytes"]
            if row["op"] == "skip_fuse" and row["direction"] == "fwd":
                # temporaries beyond the output, also as a fraction of one (M, 2D) tensor
                e, p_ = _elem(self.dtype), row["params"]
                row["temp_bytes"] = p["peak_mem_bytes"] - p_["M"] * p_["D_out"] * e
                row["temp_vs_cat"] = row["temp_bytes"] / (p_["M"] * 2 * p_["D"] * e)
                row["temp_MiB"] = row["temp_bytes"] / (1 << 20)
        if impl.backend:
            row["backend"] = impl.backend
        if impl.note:
            row["note"] = impl.note
        if impl.kind == "compile":
            row["first_call_s"] = round(p["first_s"], 3)
        if impl.kind != "floor" and ref_out is not None:
            err = (p["first"].float() - ref_out).abs().max().item()
            scale = ref_out.abs().max().item() or 1.0
            row["max_rel_err_vs_eager"] = err / scale
            if not (err / scale <= MISMATCH_REL.get(self.dtype, 1e-3)):
                row["mismatch"] = True
                self.errors.append({**ident, "impl": impl.name, "kind": impl.kind,
                                    "error": f"output differs from eager: max rel error {err / scale:.3e}"})
        return row


def add_ratios(case_rows: list[dict]) -> None:
    """Ratios within one (op, shape, direction), from times of the same run.

    vs_eager = t_eager / t_row; vs_compile / vs_sdpa = time of the fastest
    torch.compile / SDPA row / t_row; vs_best = t_best_competitor / t_row, where the
    competitors are the rows that compute the op and are not ours (eager, compile,
    sdpa); vs_floor = t_row / t_gemm_floor (skip_fuse; lower is better, 1.0 = the GEMM)."""
    by = {r["impl"]: r for r in case_rows}
    eager = by.get("eager")
    comp = [r for r in case_rows if r["kind"] in ("eager", "compile", "sdpa")]
    best = min(comp, key=lambda r: r["median_ms"]) if comp else None
    floor = by.get("gemm-floor")
    fastest = {}
    for kind in ("compile", "sdpa"):
        rows = [r for r in case_rows if r["kind"] == kind]
        if rows:
            fastest[kind] = min(r["median_ms"] for r in rows)
    for r in case_rows:
        r["vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
        for kind, t in fastest.items():
            r[f"vs_{kind}"] = t / r["median_ms"]
        r["vs_best"] = best["median_ms"] / r["median_ms"] if best else None
        r["best_competitor"] = best["impl"] if best else None
        if floor is not None:
            r["vs_floor"] = r["median_ms"] / floor["median_ms"]


def add_rates(rows: list[dict], peaks: dict) -> None:
    """TFLOP/s, GB/s and the fraction of the roofline, from the measured peaks: the
    roofline time is max(flops / matmul rate, bytes / copy bandwidth)."""
    pf = peaks["matmul_TFLOPs"] * 1e12
    pb = peaks["copy_GBps"] * 1e9
    for r in rows:
        t = r["median_ms"] * 1e-3
        r["TFLOPs"] = r["flops"] / t / 1e12
        r["GBps"] = r["bytes"] / t / 1e9
        t_flop, t_byte = r["flops"] / pf, r["bytes"] / pb
        r["bound"] = "compute" if t_flop >= t_byte else "memory"
        r["roofline_ms"] = max(t_flop, t_byte) * 1e3
        r["pct_roofline"] = 100.0 * max(t_flop, t_byte) / t


# ---------------------------------------------------------------------------
# dispatch overhead (CPU, tiny tensors)

def _time_calls(fns: list, n_inner: int, repeats: int) -> list[float]:
    """Per-call time (us) of each fn: the median over `repeats` rounds of the mean of
    n_inner calls, the fns interleaved within each round so that drift on a shared
    machine hits all of them alike."""
    for f in fns:
        f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(n_inner):
                f()
            samples[i].append((time.perf_counter() - t0) * 1e6 / n_inner)
    return [statistics.median(s) for s in samples]


def dispatch_overhead(quick: bool) -> list[dict]:
    """skipdit_fast.ops.X on tiny CPU tensors vs the direct torch.ops.skipdit call (same
    kernel: the difference is our Python layer: Query, backend selection) and vs a
    direct ATen call of similar cost (context: what a built-in op costs)."""
    from . import ops
    from .ops import native as _lib

    if not _lib.available():
        return [{"op": op, "error": f"native library not loaded: {_lib.load_error()}"} for op in OPS]
    n_inner, repeats = (200, 7) if quick else (1000, 15)
    x, s = torch.randn(2, 8), torch.randn(2, 8)
    nw, nb = torch.ones(16), torch.zeros(16)
    w, b = torch.randn(8, 16), torch.randn(8)
    z = torch.randn(2, 16)
    q, k, v = (torch.randn(1, 4, 1, 8) for _ in range(3))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    a2, b2 = torch.randn(4, 16), torch.randn(4, 16)
    sk = torch.ops.skipdit
    cases = {
        "skip_fuse": (lambda: ops.skip_fuse(x, s, nw, nb, w, b),
                      lambda: sk.skip_fuse.default(x, s, nw, nb, w, b, 1e-6),
                      lambda: torch.addmm(b, z, w.t()), "torch.addmm (2x16 @ 16x8)"),
        "attention": (lambda: ops.attention(q, k, v),
                      lambda: sk.attention.default(q, k, v, None),
                      lambda: F.scaled_dot_product_attention(qh, kh, vh), "F.scaled_dot_product_attention"),
        "cache_delta": (lambda: ops.cache_delta(a2, b2),
                        lambda: sk.cache_delta.default(a2, b2),
                        lambda: torch.dist(a2, b2, 1), "torch.dist(a, b, 1)"),
    }
    rows = []
    for op, (public, direct, aten, aten_name) in cases.items():
        t_pub, t_dir, t_aten = _time_calls([public, direct, aten], n_inner, repeats)
        rows.append({"op": op, "ops_us": t_pub, "direct_op_us": t_dir, "aten_us": t_aten,
                     "aten_call": aten_name, "extra_vs_direct_us": t_pub - t_dir,
                     "extra_vs_aten_us": t_pub - t_aten, "target_us": 5.0,
                     "meets_target": (t_pub - t_dir) <= 5.0})
    return rows


# ---------------------------------------------------------------------------
# end-to-end sampling (needs skipdit_fast.models and Skip-Cache; skipped while absent)

def _resolve_sampling_api():
    """(DiT.from_name, diffusion.sample, None), or (None, None, why not)."""
    try:
        models = importlib.import_module("skipdit_fast.models")
    except ImportError as e:
        return None, None, f"skipdit_fast.models is not available yet ({_short(e, 100)})"
    dit = getattr(models, "DiT", None)
    from_name = getattr(dit, "from_name", None) or getattr(models, "from_name", None)
    if from_name is None:
        return None, None, "skipdit_fast.models has no DiT.from_name(name) (the benchmark builds models by name)"
    try:
        sample = importlib.import_module("skipdit_fast.sampling.diffusion").sample
    except (ImportError, AttributeError) as e:
        return None, None, f"skipdit_fast.sampling.diffusion.sample is not available yet ({_short(e, 100)})"
    return from_name, sample, None


def sampling_configs() -> list[tuple[str, str, dict | None]]:
    """(label of the kernels, backend to use, Skip-Cache arguments or None)."""
    return [("eager", "reference", None), ("ours", "auto", None),
            ("eager", "reference", {"interval": 2, "branch": 4}),
            ("ours", "auto", {"interval": 2, "branch": 4}),
            ("ours", "auto", {"interval": 3, "branch": 4})]


def sampling_model(device: torch.device) -> tuple[str, int]:
    """(model name, image size): DiT-XL/2-skip at 256 px on a GPU (the DESIGN.md section
    6 row); on the CPU a DiT-S/4-skip at 128 px (16 tokens per image), small enough
    for 2 cores."""
    return ("DiT-XL/2-skip", 256) if device.type == "cuda" else ("DiT-S/4-skip", 128)


def sampling_benchmark(device: torch.device, dtype: torch.dtype, quick: bool,
                       model_name: str | None = None, image_size: int | None = None,
                       steps: int | None = None, batch: int | None = None,
                       repeats: int | None = None, configs: list | None = None) -> dict:
    """Times whole sampling runs (skipdit_fast.sampling.sample, DDPM, classifier-free
    guidance: a doubled batch) of a Skip-DiT with random weights, with and without
    Skip-Cache, with our kernels (backend auto) and with the eager reference ops
    (backend reference). Returns {"rows": [...], ...} or {"skipped": why}."""
    from .ops import backends

    from_name, sample, why = _resolve_sampling_api()
    if why:
        return {"skipped": why}
    if model_name is None or image_size is None:
        model_name, image_size = sampling_model(device)
    steps = steps or (50 if device.type == "cuda" else (5 if quick else 20))
    batch = batch or (8 if device.type == "cuda" else 2)
    repeats = repeats or (1 if quick else 3 if device.type == "cuda" else 5)
    try:
        model = from_name(model_name, image_size=image_size).to(device=device, dtype=dtype).eval()
    except Exception as e:
        return {"skipped": f"cannot build {model_name}: {_short(f'{type(e).__name__}: {e}', 200)}"}
    labels = list(range(batch))

    def run(backend, ck):
        with backends.use_backend(backend):
            return sample(model, labels, steps=steps, cfg_scale=4.0, cache=ck, seed=0)

    # Every config runs once (warm-up, and its report), then the timed runs go
    # round-robin over the configs, a different one first each round, so that a change
    # of machine load hits all of them alike (sample() syncs the device).
    jobs, rows = [], []
    for kernels, backend, ck in configs or sampling_configs():
        label = f"{kernels} ops, " + ("no cache" if ck is None else f"Skip-Cache N={ck['interval']} K={ck['branch']}")
        try:
            res = run(backend, ck)
        except Exception as e:
            rows.append({"config": label, "error": _short(f"{type(e).__name__}: {e}")})
            continue
        row = {"config": label, "kernels": kernels, "backend": backend, "cache": ck}
        rep = getattr(res, "report", None)
        if rep is not None:
            for k in ("full_steps", "cached_steps", "blocks_run", "blocks_total"):
                if hasattr(rep, k):
                    row[k] = getattr(rep, k)
            if row.get("blocks_run"):
                row["ideal_speedup"] = row["blocks_total"] / row["blocks_run"]
        rows.append(row)
        jobs.append((row, backend, ck, []))
    for r in range(repeats):
        for j in range(len(jobs)):
            row, backend, ck, times = jobs[(r + j) % len(jobs)]
            if "error" in row:
                continue
            try:
                t0 = time.perf_counter()
                run(backend, ck)
                times.append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # pragma: no cover - it ran once already
                row["error"] = _short(f"{type(e).__name__}: {e}")
    for row, _, _, times in jobs:
        if "error" not in row:
            row.update(summarize(times))
    base = next((r for r in rows if r.get("config") == "eager ops, no cache" and "median_ms" in r), None)
    for r in rows:
        if base and "median_ms" in r:
            r["vs_eager_nocache"] = base["median_ms"] / r["median_ms"]
    return {"model": model_name, "image_size": image_size, "steps": steps, "batch": f"{batch} x 2 (CFG)", "sampler": "ddpm",
            "dtype": str(dtype).replace("torch.", ""), "rows": rows}


# ---------------------------------------------------------------------------
# environment

def git_info() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        try:
            r = subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    from . import __version__
    from .ops import native as _lib

    dev: dict = {"type": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev.update(name=p.name, capability=list(torch.cuda.get_device_capability(device)),
                   sm_count=p.multi_processor_count, memory_bytes=p.total_memory,
                   l2_bytes=int(getattr(p, "L2_cache_size", 0) or 0))
    else:
        dev.update(name=_cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads())
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "skipdit_fast": __version__}
    try:
        from importlib.metadata import version
        versions["triton"] = version("triton")
    except Exception:
        versions["triton"] = None
    try:
        versions["cudnn"] = torch.backends.cudnn.version() if device.type == "cuda" else None
    except Exception:
        versions["cudnn"] = None
    build = dict(_lib.build_info()) if _lib.available() else {"load_error": _lib.load_error()}
    spills = [r for r in _lib.ptxas_report() if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) > 0]
    build["ptxas_kernels"] = len(_lib.ptxas_report())
    build["ptxas_kernels_spilling"] = len(spills)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"device": dev, "versions": versions, "git": git_info(), "build": build,
            "host": platform.node(), "load_average": load,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def device_slug(env: dict) -> str:
    name = env["device"]["name"] or env["device"]["type"]
    if env["device"]["type"] == "cpu":
        name = "cpu-" + name
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    s = re.sub(r"-(r|tm)-", "-", s)
    return s[:48].strip("-")


def backend_status(device: torch.device, dtype: torch.dtype, ops_: list[str]) -> dict:
    """op -> backend -> {"fwd": reason or None, "fwd+bwd": reason or None} (generic
    features, the shape-specific reasons are in `unavailable`)."""
    from .ops import backends

    feats = {"skip_fuse": (1152, 1152), "attention": (72,), "cache_delta": ()}
    out = {}
    for op in ops_:
        out[op] = {}
        for grad in (False, True):
            reasons = backends.explain(backends.Query(op, device, dtype, grad, feats[op]))
            for name, why in reasons.items():
                d = out[op].setdefault(name, {})
                d["fwd+bwd" if grad else "fwd"] = "; ".join(why) if why else None
    return out


# ---------------------------------------------------------------------------
# output: tables, JSON, plot

def format_table(rows: list[dict], floor_col: bool = False) -> str:
    """A markdown table of benchmark rows (one op and direction)."""
    extra = [k for k in ("vs_compile", "vs_sdpa") if any(k in r for r in rows)]
    head = ["shape", "impl", "median", "IQR", "p10-p90", "rate", "% roofline", "peak mem", "vs eager"]
    head += [k.replace("_", " ") for k in extra] + ["vs best"]
    if floor_col:
        head.append("/ gemm")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        med = r["median_ms"]
        iqr = f"{100 * (r['p75_ms'] - r['p25_ms']) / med:.1f}%" if med > 0 else "-"
        spread = f"{_fmt_time(r['p10_ms'])}-{_fmt_time(r['p90_ms'])}"
        if "TFLOPs" in r:
            rate = _fmt_rate(r)
            pct = f"{r['pct_roofline']:.0f}%"
        else:
            rate = pct = "-"
        name = r["impl"] + (f" ({r['note']})" if r.get("note") and r["impl"] == "sdpa" else "")
        if r.get("mismatch"):
            name += " MISMATCH"
        if r.get("impl") == r.get("best_competitor"):
            name += " *"
        cells = [r["shape"], name, _fmt_time(med) + (" (h)" if r.get("host_bound") else ""), iqr, spread, rate, pct,
                 _fmt_bytes(r.get("peak_mem_bytes")), _fmt_ratio(r.get("vs_eager"))] + [_fmt_ratio(r.get(k)) for k in extra] + [_fmt_ratio(r.get("vs_best"))]
        if floor_col:
            cells.append(_fmt_ratio(r.get("vs_floor")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(result: dict) -> list[dict]:
    """The DESIGN.md section 6 (and issue 3/4) targets this run can judge, per backend of
    ours: {"target", "backend", "value", "ok"} (value is the worst case over the shapes)."""
    rows, out = result["rows"], []
    gpu = result["env"]["device"]["type"] == "cuda"
    bf16 = result["settings"]["dtype"] == "bfloat16"
    ours = sorted({r["impl"] for r in rows if r["kind"] == "ours"})

    def add(target, backend, sel, key, worst, bound, ge=True):
        vals = [r[key] for r in sel if r.get(key) is not None]
        if not vals:
            return
        v = worst(vals)
        out.append({"target": target, "backend": backend, "value": v, "ok": v >= bound if ge else v <= bound,
                    "shapes": len(vals)})

    for b in ours:
        if gpu and bf16:
            sf = [r for r in rows if r["op"] == "skip_fuse" and r["direction"] == "fwd" and r["impl"] == b
                  and r["params"]["D"] == 1152 and r["params"]["M"] >= 4096]
            add("skip_fuse fwd, M >= 4096, D 1152: >= 2x eager", b, sf, "vs_eager", min, 2.0)
            add("skip_fuse fwd, M >= 4096, D 1152: >= 1.3x torch.compile", b, sf, "vs_compile", min, 1.3)
            add("skip_fuse fwd, M >= 4096, D 1152: <= 1.15x the bare GEMM", b, sf, "vs_floor", max, 1.15, ge=False)
            at = [r for r in rows if r["op"] == "attention" and r["direction"] == "fwd" and r["impl"] == b
                  and r["params"]["Dh"] == 72]
            add("attention fwd, Dh 72, N 256/1024/4096: >= 1.3x best SDPA", b,
                [r for r in at if r["params"]["N"] >= 256], "vs_sdpa", min, 1.3)
            add("attention fwd, temporal N 16: >= 1.5x best SDPA", b,
                [r for r in at if r["params"]["N"] == 16], "vs_sdpa", min, 1.5)
        if not gpu:
            sf = [r for r in rows if r["op"] == "skip_fuse" and r["direction"] == "fwd" and r["impl"] == b
                  and 512 <= r["params"]["M"] <= 4096 and 384 <= r["params"]["D"] <= 1152]
            add("skip_fuse fwd on the CPU, M 512..4096, D 384..1152: no slower than eager", b, sf,
                "vs_eager", min, 1.0)
            # Temporaries beyond the output (temp_MiB, set per row by _finish_row): the CPU
            # kernel normalizes row chunks into one buffer of at most
            # CPU_SKIP_FUSE_CHUNK_BYTES, so they stay bounded as M grows, where eager holds
            # the (M, 2D) concatenation and its normalized copy.
            sfm = [r for r in rows if r["op"] == "skip_fuse" and r["direction"] == "fwd"
                   and r["impl"] == b]
            add(f"skip_fuse fwd on the CPU: temporaries <= {CPU_SKIP_FUSE_CHUNK_BYTES >> 20} MiB "
                "at every M (no (M, 2D) tensor beyond that), MiB", b,
                sfm, "temp_MiB", max, CPU_SKIP_FUSE_CHUNK_BYTES / (1 << 20),
                ge=False)
    for d in result.get("dispatch") or []:
        if "extra_vs_direct_us" in d:
            out.append({"target": f"dispatch overhead of ops.{d['op']}: <= 5 us", "backend": "auto",
                        "value": d["extra_vs_direct_us"], "ok": d["extra_vs_direct_us"] <= 5.0, "shapes": 1})
    samp = result.get("sampling") or {}
    if gpu and bf16 and samp.get("rows"):
        by = {r["config"]: r for r in samp["rows"] if "vs_eager_nocache" in r}
        for cfg, bound in (("ours ops, no cache", 1.4), ("ours ops, Skip-Cache N=2 K=4", 2.2)):
            if cfg in by:
                out.append({"target": f"sampling, {cfg}: >= {bound}x eager", "backend": "auto",
                            "value": by[cfg]["vs_eager_nocache"], "ok": by[cfg]["vs_eager_nocache"] >= bound,
                            "shapes": 1})
    return out


def format_targets(items: list[dict]) -> str:
    lines = ["| target | backend | worst over the shapes | met |", "|---|---|---|---|"]
    for t in items:
        if t["target"].startswith("dispatch"):
            v = f"{t['value']:+.1f} us"
        elif t["target"].endswith("MiB"):
            v = f"{t['value']:.1f} MiB"
        else:
            v = f"{t['value']:.2f}x"
        lines.append(f"| {t['target']} | {t['backend']} | {v} | {'yes' if t['ok'] else 'NO'} |")
    return "\n".join(lines)


def format_dispatch(rows: list[dict]) -> str:
    lines = ["| op | skipdit_fast.ops | torch.ops.skipdit (direct) | extra (target <= 5 us) | ATen call of similar cost | ops - ATen |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | error: {r['error']} | | | | |")
            continue
        ok = "ok" if r["meets_target"] else "OVER"
        lines.append(f"| {r['op']} | {r['ops_us']:.1f} us | {r['direct_op_us']:.1f} us | "
                     f"{r['extra_vs_direct_us']:+.1f} us ({ok}) | {r['aten_call']}: {r['aten_us']:.1f} us | "
                     f"{r['extra_vs_aten_us']:+.1f} us |")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The whole human-readable report (also the markdown file)."""
    env, peaks = result["env"], result.get("peaks") or {}
    dev = env["device"]
    out = [f"## skipdit-fast bench: {dev['name']} ({dev['type']}), {result['settings']['dtype']}",
           "",
           f"torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
           f"CUDA {env['versions']['cuda']}, commit {(env['git']['commit'] or '?')[:10]}"
           f"{' (dirty)' if env['git'].get('dirty') else ''}, {result['created']}"
           + (", --quick" if result["settings"]["quick"] else "")
           + (f", load average {env['load_average'][0]} on {dev.get('cores')} cores"
              if dev["type"] == "cpu" and env.get("load_average") else ""),
           ""]
    if peaks:
        mm = peaks["matmul_TFLOPs"]
        mm_s = f"{mm:.1f} TFLOP/s" if mm >= 1 else f"{mm * 1000:.1f} GFLOP/s"
        out.append(f"Measured peaks (this run): copy {peaks['copy_GBps']:.0f} GB/s (read + write), "
                   f"{peaks['matmul_dtype']} matmul {mm_s} "
                   f"({'x'.join(map(str, peaks['matmul_shape']))}).")
        out.append("")
    rows = result["rows"]
    for op in OPS:
        for direction in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["op"] == op and r["direction"] == direction]
            if not sel:
                continue
            out.append(f"### {op} {'forward' if direction == 'fwd' else 'forward + backward'}")
            out.append("")
            out.append(format_table(sel, floor_col=(op == "skip_fuse")))
            out.append("")
        missing = _group_unavailable([u for u in result["unavailable"] if u["op"] == op])
        if missing:
            out.append(f"Not timed for {op}:")
            out.extend(f"- {m}" for m in missing)
            out.append("")
        errs = [e for e in result["errors"] if e.get("op") == op]
        if errs:
            out.append(f"Errors for {op}:")
            out.extend(f"- {e.get('impl')} {e.get('shape', '')} {e.get('direction', '')}: {e['error']}" for e in errs)
            out.append("")
    tg = check_targets(result)
    if tg:
        out.append("### targets (DESIGN.md section 6, issues 3-4)")
        out.append("")
        out.append(format_targets(tg))
        out.append("")
    if result.get("dispatch"):
        out.append("### dispatch overhead (CPU, tiny tensors, per call)")
        out.append("")
        out.append(format_dispatch(result["dispatch"]))
        out.append("")
    samp = result.get("sampling")
    if samp:
        out.append("### end-to-end sampling")
        out.append("")
        if "skipped" in samp:
            out.append(f"skipped: {samp['skipped']}")
        else:
            out.append(f"{samp['model']} at {samp.get('image_size')} px, random weights, {samp['steps']} DDPM steps, "
                       f"batch {samp['batch']}, {samp['dtype']}; ideal = blocks total / blocks run")
            out.append("")
            out.append("| config | median | IQR | vs eager, no cache | blocks run / total | ideal |")
            out.append("|---|---|---|---|---|---|")
            for r in samp["rows"]:
                if "error" in r:
                    out.append(f"| {r['config']} | error: {r['error']} | | | | |")
                else:
                    iqr = 100 * (r["p75_ms"] - r["p25_ms"]) / r["median_ms"]
                    blocks = f"{r['blocks_run']} / {r['blocks_total']}" if "blocks_run" in r else "-"
                    out.append(f"| {r['config']} | {_fmt_time(r['median_ms'])} | {iqr:.1f}% | "
                               f"{_fmt_ratio(r.get('vs_eager_nocache'))} | {blocks} | "
                               f"{_fmt_ratio(r.get('ideal_speedup'))} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _group_unavailable(items: list[dict]) -> list[str]:
    """'impl (direction): reason [shapes]' lines, one per distinct (impl, reason)."""
    groups: dict = {}
    for u in items:
        key = (u["impl"], u["reason"])
        g = groups.setdefault(key, {"dirs": [], "shapes": []})
        if u["direction"] not in g["dirs"]:
            g["dirs"].append(u["direction"])
        if u["shape"] not in g["shapes"]:
            g["shapes"].append(u["shape"])
    lines = []
    for (impl, reason), g in groups.items():
        lines.append(f"{impl} ({', '.join(g['dirs'])}): {reason}"
                     + (f" [{'; '.join(g['shapes'])}]" if len(g["shapes"]) < 4 else ""))
    return lines


def write_plot(result: dict, path: str) -> str | None:
    """Speedup over eager by shape, one panel per (op, direction). Returns an error
    string when matplotlib is missing (it is an optional dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e}); `pip install matplotlib` for --plot"
    panels = []
    for op in OPS:
        for d in ("fwd", "fwd+bwd"):
            sel = [r for r in result["rows"] if r["op"] == op and r["direction"] == d]
            if sel:
                panels.append((op, d, sel))
    if not panels:
        return "no rows to plot"
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    all_impls = [i for i in dict.fromkeys(r["impl"] for r in result["rows"]) if i != "eager"]
    palette = plt.get_cmap("tab10").colors
    color = {impl: palette[k % len(palette)] for k, impl in enumerate(all_impls)}
    kinds = {r["impl"]: r["kind"] for r in result["rows"]}
    for ax, (op, d, sel) in zip(axes[:, 0], panels):
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        impls = [i for i in dict.fromkeys(r["impl"] for r in sel) if i != "eager"]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            ys = []
            for s in shapes:
                r = next((r for r in sel if r["shape"] == s and r["impl"] == impl), None)
                ys.append(r["vs_eager"] if r and r.get("vs_eager") else 0.0)
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
            ours = kinds.get(impl) == "ours"
            ax.bar(xs, ys, width, label=impl + (" (ours)" if ours else ""), color=color[impl],
                   hatch="//" if ours else None, edgecolor="black" if ours else None)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=8)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(f"{op} {d} ({result['env']['device']['name']}, {result['settings']['dtype']})", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _write_text(text: str, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=OPS + EXTRAS,
                   help="what to run (repeatable); default: every op, the dispatch overhead and "
                        "(without --quick) end-to-end sampling")
    p.add_argument("--quick", action="store_true", help="few small shapes, no torch.compile (seconds)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedup over eager by shape (matplotlib)")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--save", metavar="ROOT",
                   help="write bench.json, bench.md and speedup.png to ROOT/<date>-<device>/ and "
                        "refresh the latest-results section of ROOT/README.md")
    p.add_argument("--save-dir", metavar="DIR", help="like --save, into this folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU when there is one, else the CPU")
    p.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--compile", dest="compile_mode", default="auto",
                   choices=("auto", "none", "default", "targets", "all"),
                   help="torch.compile competitors: none; default mode; default + max-autotune on the "
                        "DESIGN.md target shapes; or max-autotune everywhere (auto: none with --quick, "
                        "targets on a GPU, default on the CPU)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new rows after this many seconds (the rest is listed as skipped)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("skipdit-fast bench: --device cuda but no CUDA device is available")
    return torch.device(name)


def run(args) -> dict:
    t_start = time.monotonic()
    wanted = args.op or list(OPS) + ["dispatch"] + ([] if args.quick else ["sampling"])
    deadline = compile_deadline = None
    if args.budget:
        # end-to-end sampling comes last: keep a share of the budget for it
        ops_budget = args.budget - (min(60.0, 0.3 * args.budget) if "sampling" in wanted else 0.0)
        deadline = t_start + ops_budget
        compile_deadline = t_start + 0.7 * ops_budget
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    ops_ = [o for o in OPS if o in wanted]
    torch.manual_seed(0)
    log = (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True))
    env = environment(device)
    result: dict = {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": sys.argv[1:],
        "settings": {"quick": bool(args.quick), "dtype": str(dtype).replace("torch.", ""),
                     "ops": wanted, "compile": args.compile_mode, "budget_s": args.budget,
                     "cache_bytes": cache_bytes(device),
                     "timing": ("CUDA events per call, median; inputs rotate over sets > 2x L2"
                                if device.type == "cuda" else
                                "perf_counter per call (batched to >= 1 ms), median; inputs rotate over >= 64 MiB")},
        "env": env, "backends": backend_status(device, dtype, ops_),
        "rows": [], "unavailable": [], "errors": [], "dispatch": [], "sampling": None,
    }
    log(f"skipdit-fast bench on {env['device']['name']} ({device.type}), {result['settings']['dtype']}")
    result["peaks"] = measure_peaks(device, dtype, args.quick)
    pk = result["peaks"]
    log(f"  peaks: copy {pk['copy_GBps']:.0f} GB/s, {pk['matmul_dtype']} matmul {pk['matmul_TFLOPs'] * 1000:.0f} GFLOP/s")
    runner = Runner(device, dtype, args.quick, compile_mode=args.compile_mode, deadline=deadline,
                    compile_deadline=compile_deadline, log=log)
    result["settings"]["compile"] = runner.compile_mode
    for op in ops_:
        runner.run_op(op)
        add_rates(runner.rows, result["peaks"])
        result["rows"], result["unavailable"], result["errors"] = runner.rows, runner.unavailable, runner.errors
        _write_partial(result, args)  # partial results survive a kill
    if "dispatch" in wanted:
        result["dispatch"] = dispatch_overhead(args.quick)
        _write_partial(result, args)
    if "sampling" in wanted:
        if args.budget and t_start + args.budget - time.monotonic() < 20:
            result["sampling"] = {"skipped": "time budget (--budget) used up"}
        else:
            log("  end-to-end sampling ...")
            result["sampling"] = sampling_benchmark(device, dtype, args.quick)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return result


def _write_partial(result: dict, args) -> None:
    if args.json:
        _write_json(result, args.json)
    if args.markdown:
        _write_text(format_report(result), args.markdown)


def result_folder_name(result: dict) -> str:
    return f"{result['created'][:10]}-{device_slug(result['env'])}"


def save_results(result: dict, root: str | None, folder: str | None = None) -> str:
    """Writes {bench.json, bench.md, speedup.png} to `folder` (default
    ROOT/<date>-<device>) and refreshes the latest-results section of the README.md in
    the folder's parent; returns the folder."""
    if folder is None:
        folder = os.path.join(root, result_folder_name(result))
    os.makedirs(folder, exist_ok=True)
    _write_json(result, os.path.join(folder, "bench.json"))
    _write_text(format_report(result), os.path.join(folder, "bench.md"))
    err = write_plot(result, os.path.join(folder, "speedup.png"))
    if err:
        print(f"skipdit-fast bench: no plot: {err}", file=sys.stderr)
    update_results_readme(os.path.dirname(os.path.abspath(folder)))
    return folder


README_BEGIN = "<!-- latest-results:begin (written by skipdit-fast bench --save; do not edit by hand) -->"
README_END = "<!-- latest-results:end -->"


def latest_per_device(root: str) -> dict[str, str]:
    """device slug -> the newest result folder (by the run's own timestamp)."""
    best: dict[str, tuple[str, str]] = {}
    if not os.path.isdir(root):
        return {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "bench.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                r = json.load(f)
            slug, created = device_slug(r["env"]), r["created"]
        except (OSError, ValueError, KeyError):
            continue
        if slug not in best or created > best[slug][0]:
            best[slug] = (created, name)
    return {k: v[1] for k, v in sorted(best.items())}


def update_results_readme(root: str) -> None:
    """Rewrites the section between the markers of ROOT/README.md with the latest table
    of each device found under ROOT (nothing else in the file changes)."""
    readme = os.path.join(root, "README.md")
    if not os.path.isfile(readme):
        return
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        return
    parts = [README_BEGIN, ""]
    latest = latest_per_device(root)
    if not latest:
        parts.append("No results yet.")
    for slug, folder in latest.items():
        md = os.path.join(root, folder, "bench.md")
        try:
            with open(md) as f:
                body = f.read()
        except OSError:
            continue
        body = re.sub(r"^## ", "### ", body, flags=re.M)
        body = re.sub(r"^### (?=\w+ (forward|dispatch|end-to-end))", "#### ", body, flags=re.M)
        parts.append(f"### {slug}: [{folder}/]({folder}/) ([JSON]({folder}/bench.json))")
        parts.append("")
        parts.append(body.split("\n", 1)[1].strip() if body.startswith("### ") else body.strip())
        parts.append("")
    parts.append(README_END)
    new = text[: text.index(README_BEGIN)] + "\n".join(parts) + text[text.index(README_END) + len(README_END):]
    with open(readme, "w") as f:
        f.write(new)


def main(args) -> int:
    result = run(args)
    report = format_report(result)
    print(report)
    if args.json:
        _write_json(result, args.json)
    if args.markdown:
        _write_text(report, args.markdown)
    if args.plot:
        err = write_plot(result, args.plot)
        if err:
            print(f"skipdit-fast bench: no plot: {err}", file=sys.stderr)
            return 1
    if args.save or args.save_dir:
        folder = save_results(result, args.save, folder=args.save_dir)
        print(f"results written to {folder}/", file=sys.stderr)
    ours_errors = [e for e in result["errors"] if e.get("kind") == "ours" or e.get("impl") == "*"]
    if ours_errors:
        print(f"skipdit-fast bench: {len(ours_errors)} error(s) in our backends (see above)", file=sys.stderr)
        return 1
    return 0
