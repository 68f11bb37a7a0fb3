"""The benchmarks beside the op tables: the dispatch overhead of skipdit_fast.ops on
tiny tensors, and end-to-end sampling runs of a Skip-DiT with and without Skip-Cache."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .cases import OPS
from .report import _short
from .timing import summarize

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
    """skipdit_fast.ops.X with backend auto on tiny CPU tensors: the first call (auto
    measures its candidates: the tuning cost), then, once decided, the call against a
    direct call of the chosen backend's entry point (the same kernel: the difference is
    our Python layer, backend selection included) and against an ATen call of similar
    cost (context: what a built-in op costs)."""
    from .. import ops
    from ..ops import backends
    from ..ops import native as _lib

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
    cases = {
        "skip_fuse": (ops.skip_fuse, (x, s, nw, nb, w, b, 1e-6), (8, 8), (2,),
                      lambda: torch.addmm(b, z, w.t()), "torch.addmm (2x16 @ 16x8)"),
        "attention": (ops.attention, (q, k, v, None), (8,), (1, 4, 4),
                      lambda: F.scaled_dot_product_attention(qh, kh, vh), "F.scaled_dot_product_attention"),
        "cache_delta": (ops.cache_delta, (a2, b2), (), (64,),
                        lambda: torch.dist(a2, b2, 1), "torch.dist(a, b, 1)"),
    }
    rows = []
    with backends.use_backend("auto"):
        for op, (public, args, features, sizes, aten, aten_name) in cases.items():
            t0 = time.perf_counter()
            public(*args)  # the first call of this shape: measures the candidates
            first_ms = (time.perf_counter() - t0) * 1e3
            chosen = backends.pick(op, torch.device("cpu"), torch.float32, False, features, sizes=sizes)
            t_pub, t_dir, t_aten = _time_calls([lambda: public(*args), lambda: chosen.fn(*args), aten],
                                               n_inner, repeats)
            rows.append({"op": op, "backend": chosen.backend, "first_call_ms": first_ms, "ops_us": t_pub,
                         "direct_op_us": t_dir, "aten_us": t_aten, "aten_call": aten_name,
                         "extra_vs_direct_us": t_pub - t_dir, "extra_vs_aten_us": t_pub - t_aten, "target_us": 5.0,
                         "meets_target": (t_pub - t_dir) <= 5.0})
    return rows


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
    from ..models import DiT
    from ..ops import backends
    from ..sampling.diffusion import sample

    if model_name is None or image_size is None:
        model_name, image_size = sampling_model(device)
    steps = steps or (50 if device.type == "cuda" else (5 if quick else 20))
    batch = batch or (8 if device.type == "cuda" else 2)
    repeats = repeats or (1 if quick else 3 if device.type == "cuda" else 5)
    try:
        model = DiT.from_name(model_name, image_size=image_size).to(device=device, dtype=dtype).eval()
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
