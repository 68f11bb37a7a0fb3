"""Calibrated Skip-Cache schedules: measure what caching costs at each step, then
choose per step full or cached (and K) under a block budget.

    table = measure_errors(model, labels=range(10), steps=50, seed=1)
    sched = choose_schedule(table, speedup=2.5)     # or budget=<blocks>
    sched.save("sched.json")                         # SkipCache(schedule="sched.json")
    sched = calibrate(model, speedup=2.5)            # both at once

Error model. One uncached DDPM (or DDIM) run on the calibration labels gives, at every
step i, its input x_i, its posterior mean m_i (what the sampler adds its noise to) and,
for every K, the input of block depth-K. For step i cached with branch K on the deep
features of the full step j = i - g (g = 1..max_gap), the table holds

    err[i, g, K] = RMS(m_i(cached) - m_i(full))

over the calibration samples: the step's own contribution to the drift of the run,
measured on the uncached trajectory. A schedule's predicted error is the sum of its
cached steps' err (the drifts of the steps are assumed to add up, the deep features
of a cached step depend only on its last full step). choose_schedule finds the
schedule with the least predicted error whose block count (full: depth, cached: 2K)
is at most the budget, by dynamic programming over (step, steps since the last full
step, blocks used); step 0 is always full. Classifier-free guidance is not
calibrated here (cfg_scale 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..cache.schedule import CacheSchedule, run_full_keeping
from ..sampling.diffusion import Diffusion


@dataclass
class ErrorTable:
    """err[i, g, k]: error of caching step i on the full step i-g+... (see the module
    docstring) with branch branches[k]; inf where i - g < 0. g = 1..max_gap at index g."""

    err: np.ndarray              # [steps, max_gap + 1, len(branches)]
    branches: list[int]
    depth: int
    timesteps: list[float]       # the timestep of each sampling step, in run order
    unit: str = "blocks"
    info: dict | None = None
    amplification: np.ndarray | None = None   # [steps, branches]: final drift per unit injected at step i

    @property
    def weighted(self) -> np.ndarray:
        """err scaled by each step's measured amplification (what the schedule choice minimizes)."""
        return self.err if self.amplification is None else self.err * self.amplification[:, None, :]

    @property
    def steps(self) -> int:
        return self.err.shape[0]

    @property
    def max_gap(self) -> int:
        return self.err.shape[1] - 1

    def predicted_error(self, schedule: CacheSchedule) -> float:
        """Sum of err over the schedule's cached steps (inf when a gap is past max_gap)."""
        if schedule.steps != self.steps:
            raise ValueError(f"schedule has {schedule.steps} steps, the error table {self.steps}")
        total, last = 0.0, 0
        for i, k in enumerate(schedule.branches):
            if k == 0:
                last = i
                continue
            g = i - last
            if g > self.max_gap or k not in self.branches:
                return math.inf
            total += float(self.weighted[i, g, self.branches.index(k)])
        return total


def _rms(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Per group of n samples: RMS of a - b. a, b: [G * n, ...] -> [G]."""
    d = (a - b).double().reshape(-1, n, *a.shape[1:]).flatten(1)
    return d.pow(2).mean(1).sqrt()


@torch.no_grad()
def measure_errors(model, labels: Sequence[int] | None = None, *, num_samples: int | None = None, steps: int = 50,
                   seed: int = 0, sampler: str = "ddpm", max_gap: int = 12,
                   branches: Sequence[int] | None = None, propagate: bool = True) -> ErrorTable:
    """The error table of `model` (a model with the SkipModel block structure and
    embed / head: models.DiT / Latte with skips, or cache.baselines.CachedModel's
    .model for a vanilla one) on one uncached run from `seed`. branches: the K to
    measure (default every K with 2K < depth up to the model's max_branch)."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if int(max_gap) != max_gap or max_gap < 1:
        raise ValueError(f"max_gap must be an integer >= 1, got {max_gap}")
    depth = model.depth
    max_k = getattr(model, "max_branch", depth // 2)
    if branches is None:
        branches = [k for k in range(1, max_k + 1) if 2 * k < depth]
    branches = sorted({int(k) for k in branches})
    if not branches or branches[0] < 1 or branches[-1] > max_k:
        raise ValueError(f"branches must be in 1..{max_k} for this model (depth {depth}), got {branches}")
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if getattr(cfg, "class_conditional", True):
        if labels is None:
            raise ValueError("this model is class-conditional: pass labels")
        y = torch.as_tensor(list(labels), dtype=torch.long, device=device)
        n = y.numel()
    else:
        if num_samples is None or num_samples < 1:
            raise ValueError(f"an unconditional model needs num_samples >= 1, got {num_samples}")
        y, n = None, int(num_samples)
    if n < 1:
        raise ValueError("labels must not be empty")
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((n, *cfg.latent_shape), generator=gen, device=device, dtype=torch.float32)
    diffusion = Diffusion(steps, learn_sigma=cfg.learn_sigma)
    S = diffusion.steps
    err = np.full((S, max_gap + 1, len(branches)), np.inf)
    kept: list[dict[int, torch.Tensor]] = []
    timesteps = []
    probes: list[torch.Tensor] = []   # propagation: replica r was cached at step r, full since
    injected = np.zeros((S, len(branches)))
    started: list[tuple[int, int]] = []  # (step, branch index) of each replica

    def rep(v, times):
        return None if v is None else v.repeat(times, *([1] * (v.dim() - 1)))

    def step(out, xs, i, z):
        if sampler == "ddpm":
            mean, log_var, _, _ = diffusion.p_mean_variance(out, xs, i)
            return mean if i == 0 else mean + torch.exp(0.5 * log_var) * rep(z, len(xs) // n)
        return diffusion.ddim_step(out, xs, i, None)

    was_training = model.training
    model.eval()
    try:
        for k_step, i in enumerate(reversed(range(S))):
            tv = diffusion.timesteps[i]
            timesteps.append(float(tv))
            z = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype) \
                if sampler == "ddpm" and i > 0 else None
            P = len(probes)
            xs = torch.cat([x, *probes]) if P and propagate else x
            t = torch.full((len(xs),), tv, dtype=torch.long, device=device)
            h, state = model.embed(xs.to(dtype), t, rep(y, 1 + P) if propagate else y)
            hout, deep = run_full_keeping(model, h, state, branches)
            out = model.head(hout, state).float()
            nxt = step(out, xs, i, z)
            x_next, probes = nxt[:n], list(nxt[n:].split(n)) if P and propagate else []
            kept.append({k: v[:n] for k, v in deep.items()})
            gaps = [g for g in range(1, max_gap + 1) if k_step - g >= 0]
            if gaps:
                G = len(gaps)
                xin = x.to(dtype)
                for ki, K in enumerate(branches):
                    h2, st2 = model.embed(rep(xin, G), t[:1].expand(G * n), rep(y, G))
                    model.run_blocks(h2, 0, K, st2)
                    cached = torch.cat([kept[k_step - g][K] for g in gaps])
                    o = model.head(model.run_blocks(cached, depth - K, depth, st2), st2).float()
                    xc = step(o, rep(x, G), i, z)
                    e = _rms(xc, rep(x_next, G), n).cpu().numpy()
                    for gi, g in enumerate(gaps):
                        err[k_step, g, ki] = e[gi]
                    if propagate:  # the gap-1 cached step starts replica (k_step, K)
                        probes.append(xc[:n])
                        started.append((k_step, ki))
                        injected[k_step, ki] = e[0]
            if len(kept) > max_gap:  # only the last max_gap steps' features are needed
                kept[len(kept) - max_gap - 1] = {}
            x = x_next
    finally:
        model.train(was_training)
    amp = np.ones((S, len(branches)))
    if propagate:
        for (r, ki), p in zip(started, probes):
            d = float(_rms(p, x, n)[0])
            amp[r, ki] = d / injected[r, ki] if injected[r, ki] > 0 else 1.0
    info = {"steps": S, "sampler": sampler, "seed": seed, "samples": n,
            "labels": None if y is None else [int(v) for v in y.tolist()], "max_gap": max_gap}
    return ErrorTable(err, branches, depth, timesteps, getattr(model, "cache_unit", "blocks"), info, amp)


def budget_for(speedup: float, steps: int, depth: int) -> int:
    """The block budget of an ideal (block-count) speedup: floor(steps * depth / speedup)."""
    if not speedup >= 1:
        raise ValueError(f"speedup must be >= 1, got {speedup}")
    return int(math.floor(steps * depth / speedup + 1e-9))


def choose_schedule(table: ErrorTable, *, speedup: float | None = None, budget: int | None = None,
                    name: str | None = None) -> CacheSchedule:
    """The schedule with the least predicted error (ErrorTable.predicted_error) that
    runs at most `budget` blocks (or steps * depth / speedup); step 0 full."""
    S, D, G = table.steps, table.depth, table.max_gap
    if (speedup is None) == (budget is None):
        raise ValueError("pass exactly one of speedup= and budget=")
    B = budget_for(speedup, S, D) if budget is None else int(budget)
    if budget is not None and (int(budget) != budget or budget < 0):
        raise ValueError(f"budget must be an integer >= 0, got {budget}")
    inf = math.inf
    # dp[s, b]: least error after the current step, s = steps since the last full step, b blocks used
    W = table.weighted
    dp = np.full((G + 1, B + 1), inf)
    if D > B:
        raise ValueError(f"budget {B} {table.unit} is below one full step ({D}): no schedule fits")
    dp[0, D] = 0.0
    back_s = np.zeros((S, G + 1, B + 1), dtype=np.int16)
    back_k = np.zeros((S, G + 1, B + 1), dtype=np.int16)  # 0: full, else K
    for i in range(1, S):
        new = np.full_like(dp, inf)
        # full step: from any s
        if D <= B:
            prev = dp[:, : B + 1 - D]
            best_s = prev.argmin(0)
            new[0, D:] = prev[best_s, np.arange(prev.shape[1])]
            back_s[i, 0, D:] = best_s
            back_k[i, 0, D:] = 0
        for s in range(G):
            for ki, K in enumerate(table.branches):
                c = 2 * K
                if c > B:
                    continue
                e = W[i, s + 1, ki]
                if not np.isfinite(e):
                    continue
                cand = dp[s, : B + 1 - c] + e
                tgt = new[s + 1, c:]
                better = cand < tgt
                if better.any():
                    tgt[better] = cand[better]
                    back_s[i, s + 1, c:][better] = s
                    back_k[i, s + 1, c:][better] = K
        dp = new
    s_best, b_best = np.unravel_index(np.argmin(dp), dp.shape)
    if not np.isfinite(dp[s_best, b_best]):
        raise ValueError(f"no schedule of {S} steps fits in {B} {table.unit} with gaps of at most {G} steps "
                         f"(measure with a larger max_gap, or ask for less speedup)")
    ks = [0] * S
    s, b = int(s_best), int(b_best)
    for i in range(S - 1, 0, -1):
        k = int(back_k[i, s, b])
        ks[i] = k
        prev_s = int(back_s[i, s, b])
        b -= D if k == 0 else 2 * k
        s = prev_s
    meta = {"made_by": "skipdit_fast.analysis.calibrate", "budget": B, "target_speedup": speedup,
            "predicted_error": float(dp[s_best, b_best]), "error_model": "sum over cached steps of the RMS "
            "change of the step's posterior mean, measured on the uncached run", "calibration": table.info}
    if name:
        meta["model"] = name
    sched = CacheSchedule.from_branches(ks, D, table.timesteps, unit=table.unit, meta=meta)
    assert sched.block_budget <= B
    return sched


def calibrate(model, *, speedup: float | None = None, budget: int | None = None, labels=None,
              num_samples: int | None = None, steps: int = 50, seed: int = 0, sampler: str = "ddpm",
              max_gap: int = 12, branches=None, name: str | None = None) -> CacheSchedule:
    """measure_errors then choose_schedule (labels default: one per class, at most 10)."""
    if labels is None and getattr(model.config, "class_conditional", True):
        labels = list(range(min(10, model.config.num_classes)))
    table = measure_errors(model, labels, num_samples=num_samples, steps=steps, seed=seed, sampler=sampler,
                           max_gap=max_gap, branches=branches)
    return choose_schedule(table, speedup=speedup, budget=budget, name=name)
