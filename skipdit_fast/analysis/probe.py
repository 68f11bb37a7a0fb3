"""The feature-stability probe: the paper's argument (long skips keep deep features
stable across denoising steps, and bound how much an error in cached deep features
grows through the rest of the network) measured on one sampling run of a model.

    result = probe(model, labels=range(10), steps=50, branch=2)
    result.summary()        # mean cosine similarity / relative L1 change, amplification

Per step of an uncached sampling run it records
- the feature similarity the paper plots: cosine similarity and relative L1 change
  (ops.cache_delta, sum|now - before| / sum|before|) between consecutive steps, of the
  deep features (the input of block depth-K, before its long-skip merge: what
  Skip-Cache keeps) and of every block's output;
- a spectral estimate: the largest singular value of the Jacobian of the deep stack
  (blocks depth-K .. depth-1 with their skip merges, the shallow skips of that step
  held fixed) with respect to the deep features, by power iteration on J^T J with
  torch.func.jvp / vjp (`power_iters` iterations, 8 by default): how much an error in
  the cached features is amplified. The samples of a batch do not interact in the
  blocks, so this is the largest amplification over the batch.

The probe drives the model through the cache protocol (embed -> cache.run -> head) so
it sees every block; it works for any model with the SkipModel block structure
(skipdit_fast.cache.SkipModel; a vanilla DiT through cache.baselines.CachedModel).
The Jacobian is taken on the `reference` backend (pure PyTorch, twice differentiable).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .. import ops
from ..cache import SkipCacheReport
from ..ops.backends import use_backend

DEFAULT_POWER_ITERS = 8


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], rmatvec: Callable[[torch.Tensor], torch.Tensor],
                    v0: torch.Tensor, iters: int = DEFAULT_POWER_ITERS) -> tuple[float, list[float]]:
    """Largest singular value of a linear map J given v -> J v (matvec) and u -> J^T u
    (rmatvec), from the start vector v0: v <- J^T J v / |J^T J v|, sigma = |J v|.
    Returns (sigma, the estimate after each iteration)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    v = v0 / v0.norm()
    history = []
    for _ in range(iters):
        u = matvec(v)
        history.append(float(u.detach().norm()))
        w = rmatvec(u)
        n = w.norm()
        if not torch.isfinite(n) or n == 0:
            break
        v = w / n
    return history[-1], history


def jacobian_spectral_norm(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           iters: int = DEFAULT_POWER_ITERS, generator: torch.Generator | None = None
                           ) -> tuple[float, list[float]]:
    """Largest singular value of the Jacobian of fn at x by power iteration, on one
    forward graph: J^T u is a backward pass, J v the backward of the (linear in u) map
    u -> J^T u (double backward), so each iteration costs two backward passes."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        u_var = torch.zeros_like(y, requires_grad=True)
        jt_u = torch.autograd.grad(y, x, u_var, create_graph=True)[0]  # J^T u_var

    def matvec(v):
        return torch.autograd.grad(jt_u, u_var, v, retain_graph=True)[0]

    def rmatvec(u):
        return torch.autograd.grad(y, x, u, retain_graph=True)[0]

    v0 = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return power_iteration(matvec, rmatvec, v0, iters)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the cosine similarity of each sample's flattened features."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


@dataclass
class ProbeStep:
    t: float
    deep_cosine: float | None = None        # vs the step before; None on the first step
    deep_delta: float | None = None
    block_cosine: list[float] = field(default_factory=list)
    block_delta: list[float] = field(default_factory=list)
    amplification: float | None = None      # largest singular value of the deep stack's Jacobian


@dataclass
class ProbeResult:
    model: str
    depth: int
    branch: int
    power_iters: int
    steps: list[ProbeStep] = field(default_factory=list)

    def summary(self) -> dict:
        """Means over the steps that have a previous step (similarity) or an estimate."""
        def mean(xs):
            xs = [x for x in xs if x is not None and math.isfinite(x)]
            return sum(xs) / len(xs) if xs else None

        blocks = [[s.block_cosine[i] for s in self.steps if s.block_cosine] for i in range(self.depth)]
        return {"model": self.model, "depth": self.depth, "branch": self.branch,
                "mean_deep_cosine": mean([s.deep_cosine for s in self.steps]),
                "mean_deep_delta": mean([s.deep_delta for s in self.steps]),
                "mean_amplification": mean([s.amplification for s in self.steps]),
                "max_amplification": max((s.amplification for s in self.steps if s.amplification is not None),
                                         default=None),
                "mean_block_cosine": [mean(b) for b in blocks]}

    def to_dict(self) -> dict:
        return {"model": self.model, "depth": self.depth, "branch": self.branch, "power_iters": self.power_iters,
                "summary": self.summary(), "steps": [asdict(s) for s in self.steps]}


class FeatureProbe:
    """An observer with the cache protocol (reset / next_timestep / run / report) that
    runs every block (a full step, the model's output unchanged) and records the
    ProbeResult. spectral_every: estimate the amplification every n-th step (1: each)."""

    def __init__(self, branch: int, *, power_iters: int = DEFAULT_POWER_ITERS, spectral_every: int = 1,
                 seed: int = 0, name: str = "model"):
        if int(branch) != branch or branch < 1:
            raise ValueError(f"branch must be an integer >= 1, got {branch}")
        if int(spectral_every) != spectral_every or spectral_every < 0:
            raise ValueError(f"spectral_every must be an integer >= 0 (0: never), got {spectral_every}")
        self.branch, self.power_iters, self.spectral_every = int(branch), int(power_iters), int(spectral_every)
        self.seed, self.name = seed, name
        self.reset()

    def reset(self) -> None:
        self._prev: list[torch.Tensor] | None = None
        self._report = SkipCacheReport()
        self._t: float | None = None
        self._result: ProbeResult | None = None
        self._gen = torch.Generator().manual_seed(self.seed)

    def next_timestep(self, t: float) -> None:
        self._t = float(t)

    def report(self) -> SkipCacheReport:
        return self._report

    @property
    def result(self) -> ProbeResult:
        if self._result is None:
            raise RuntimeError("FeatureProbe: no step has run yet")
        return self._result

    def run(self, model, h: torch.Tensor, state, t) -> torch.Tensor:
        depth, K = model.depth, self.branch
        max_k = getattr(model, "max_branch", depth // 2)
        if not 1 <= K <= max_k:
            raise ValueError(f"branch {K} out of range for this model (depth {depth}: 1..{max_k})")
        if self._result is None:
            self._result = ProbeResult(self.name, depth, K, self.power_iters)
        tv = self._t if self._t is not None else float(torch.as_tensor(t).reshape(-1)[0])
        self._t = None
        feats = []
        deep_state = None
        for i in range(depth):
            if i == depth - K:
                feats.append(h)  # the deep features: input of block depth-K before its merge
                deep_state = copy.copy(state)
                deep_state.skips = list(state.skips)
            h = model.run_blocks(h, i, i + 1, state)
            feats.append(h)
        step = ProbeStep(tv)
        if self._prev is not None:
            now, before = feats[depth - K], self._prev[depth - K]
            step.deep_cosine = _cosine(now, before)
            step.deep_delta = float(ops.cache_delta(now.contiguous(), before.contiguous()))
            outs_now = feats[:depth - K] + feats[depth - K + 1:]
            outs_before = self._prev[:depth - K] + self._prev[depth - K + 1:]
            step.block_cosine = [_cosine(a, b) for a, b in zip(outs_now, outs_before)]
            step.block_delta = [float(ops.cache_delta(a.contiguous(), b.contiguous()))
                                for a, b in zip(outs_now, outs_before)]
        n_step = len(self.result.steps)
        if self.spectral_every and n_step % self.spectral_every == 0:
            step.amplification = self._amplification(model, feats[depth - K], deep_state, depth, K)
        self._prev = [f.detach() for f in feats]
        self.result.steps.append(step)
        r = self._report
        r.steps += 1
        r.full_steps += 1
        r.kinds.append("full")
        r.blocks_run += depth
        r.blocks_total += depth
        return h

    def _amplification(self, model, deep: torch.Tensor, deep_state, depth: int, K: int) -> float:
        def deep_stack(x):
            st = copy.copy(deep_state)
            st.skips = list(deep_state.skips)
            return model.run_blocks(x, depth - K, depth, st)

        with torch.enable_grad(), use_backend("reference"):
            sigma, _ = jacobian_spectral_norm(deep_stack, deep.detach(), self.power_iters, self._gen)
        return sigma


def probe(model, labels: Sequence[int], *, steps: int = 50, branch: int = 2, cfg_scale: float = 1.0,
          power_iters: int = DEFAULT_POWER_ITERS, spectral_every: int = 1, seed: int = 0,
          name: str | None = None) -> ProbeResult:
    """Runs one uncached DDPM sampling run of `model` (a models.DiT, skip or not, or any
    model whose forward takes a cache) for `labels` and returns what FeatureProbe saw."""
    from ..cache.baselines import CachedModel
    from ..sampling import sample

    wrapped = model if getattr(model, "config", None) is not None and model.config.skip else CachedModel(model)
    observer = FeatureProbe(branch, power_iters=power_iters, spectral_every=spectral_every, seed=seed,
                            name=name or type(model).__name__)
    sample(wrapped, labels, steps=steps, cfg_scale=cfg_scale, cache=observer, seed=seed)
    return observer.result
