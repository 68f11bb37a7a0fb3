"""Skip-Cache on the CPU: sampling time with Skip-Cache N = 2, 3, 4 against no cache,
next to the ideal block-count ratio (DESIGN.md sections 5.7 and 6: target >= 0.95x
ideal).

    PYTHONPATH=. python bench/bench_cache_cpu.py [--threads 2] [--repeats 3]
    PYTHONPATH=. python bench/bench_cache_cpu.py --video --threads 1

Model (image): Skip-DiT, depth 28, width 384 (6 heads), 256 tokens (32x32 latents,
patch 2), batch 4, K = 4 blocks. --video: Latte-skip, depth 28 (14 spatial/temporal
pairs), width 384, 16 frames of 8x8 tokens (16x16 latents, patch 2), batch 2, K = 1
pair, the official Latte thresholds (full while t >= 900: the first 2 of 20 steps).
Both: 20 DDPM steps, random weights, fp32. Runs are interleaved (none, N=2, N=3,
N=4, none, ...) so that load changes on a shared machine hit all of them alike; the
best time of each is reported, as wall-clock time and as the process's CPU time (on a
machine shared with other jobs the CPU time of a single-threaded run is the steadier
measure: it does not count the time other processes held the core). A third
measure is taken inside each cached run, where full and cached steps alternate
within seconds: the median CPU time of its full steps and of its cached steps give
the run's speedup over running every step as a full one, steps * full /
(F * full + C * cached), which slow load changes cannot skew.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from skipdit_fast import SkipCache
from skipdit_fast.files import write_atomic
from skipdit_fast.sampling.diffusion import sample
from skipdit_fast.models import DiT, DiTConfig, Latte, LatteConfig

# kind -> (config, batch, K, description)
SETUPS = {
    "image": (DiTConfig(depth=28, hidden_size=384, num_heads=6, patch_size=2, input_size=32, num_classes=1000,
                        skip=True), 4, 4, "Skip-DiT depth 28, D 384, T 256"),
    "video": (LatteConfig(depth=28, hidden_size=384, num_heads=6, patch_size=2, input_size=16, num_frames=16,
                          extras=2, num_classes=101, skip=True), 2, 1, "Latte-skip depth 28, D 384, 16 frames x 64 tokens"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, help="default 4 (--video: 2)")
    p.add_argument("--video", action="store_true", help="Latte-skip on videos instead of Skip-DiT on images")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, batch, K, what = SETUPS["video" if args.video else "image"]
    args.batch = args.batch or batch
    torch.manual_seed(0)
    model = (Latte if args.video else DiT)(cfg).eval()
    labels = list(range(args.batch))
    configs = {"none": None, "N=2": 2, "N=3": 3, "N=4": 4}
    times: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    inrun: dict[str, list[float]] = {k: [] for k in configs}
    reports = {}
    sample(model, labels, steps=2, seed=0)  # warm-up
    for rep in range(args.repeats):
        for name, n in configs.items():
            cache = SkipCache.for_model(model, interval=n, branch=K) if n else None
            stamps = []
            t0, c0 = time.perf_counter(), time.process_time()
            res = sample(model, labels, steps=args.steps, cache=cache, seed=0,
                         progress=lambda done, total: stamps.append(time.process_time()))
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            reports[name] = res.report
            if res.report is not None:
                durations = [b - a for a, b in zip([c0] + stamps[:-1], stamps)]
                full = statistics.median(d for d, k in zip(durations, res.report.kinds) if k == "full")
                cached = statistics.median(d for d, k in zip(durations, res.report.kinds) if k == "cached")
                r = res.report
                inrun[name].append(r.steps * full / (r.full_steps * full + r.cached_steps * cached))
            print(f"  run {rep + 1} {name:5s} wall {times[name][-1]:7.2f} s  cpu {cpu[name][-1]:7.2f} s", flush=True)
    rows = []
    print(f"\n{what}, batch {args.batch}, K={K}, {args.steps} DDPM steps, fp32, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'cache':6s} {'ideal':>6s} | {'wall s':>7s} {'speedup':>8s} {'of ideal':>8s} | "
          f"{'cpu s':>7s} {'speedup':>8s} {'of ideal':>8s} | {'in-run':>7s} {'of ideal':>8s} | full/cached")
    print(f"{'none':6s} {1.0:5.2f}x | {min(times['none']):7.2f} {'':8s} {'':8s} | {min(cpu['none']):7.2f}")
    for name in ("N=2", "N=3", "N=4"):
        r = reports[name]
        row = dict(cache=name, ideal=r.ideal_speedup, full=r.full_steps, cached=r.cached_steps)
        line = f"{name:6s} {r.ideal_speedup:5.2f}x"
        for label, t in (("wall", times), ("cpu", cpu)):
            speedup = min(t["none"]) / min(t[name])
            row.update({f"{label}_seconds": min(t[name]), f"{label}_speedup": speedup,
                        f"{label}_of_ideal": speedup / r.ideal_speedup, f"{label}_all": t[name]})
            line += f" | {min(t[name]):7.2f} {speedup:7.2f}x {speedup / r.ideal_speedup:7.2f}x"
        med = statistics.median(inrun[name])
        row.update(inrun_speedup=med, inrun_of_ideal=med / r.ideal_speedup, inrun_all=inrun[name])
        line += f" | {med:6.2f}x {med / r.ideal_speedup:7.2f}x"
        rows.append(row)
        print(line + f" | {r.full_steps}/{r.cached_steps}")
    if args.json:
        write_atomic(args.json, json.dumps(dict(model=what, K=K, threads=torch.get_num_threads(), steps=args.steps,
                                                batch=args.batch, none_wall=times["none"], none_cpu=cpu["none"],
                                                rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
