"""Caching baselines for the fidelity study (bench/fidelity.py): what Skip-Cache is
compared with on models of the same size.

- ForaCache: FORA-style static caching (Selvaraju et al., 2024) for our DiT and Latte: every N-th
  forward call is full and keeps, for every block, the outputs of its attention and
  its MLP (before the adaLN gate); the N-1 calls after it reuse them, so a cached
  call runs only the cheap parts of each block (adaLN modulation from the current
  timestep, the gates, the residual adds, and the long-skip merges of a Skip-DiT).
- FirstBlockCache: a cache-dit-style first-block residual check: block 0 always
  runs; when its residual moved less than a threshold since the last full step, the
  other blocks' residual is reused from it.
- CachedModel: runs a DiT or Latte with any cache through the block protocol
  (embed -> cache.run -> head), so that a SkipCache can also drive a *vanilla* model:
  the Skip-Cache-like shallow/deep split without long skips. There the cached step
  runs blocks 0..K-1 (whose outputs nothing uses: no skips carry them) and
  blocks depth-K..depth-1 from the cached tensor, the same blocks as Skip-Cache
  runs on a Skip-DiT, so the two differ only in the long skips.

    model = CachedModel(dit)                      # dit: models.DiT, skip or not
    sample(model, labels, cache=ForaCache(3))     # diffusion.sample takes it as a model
    sample(model, labels, cache=SkipCache(3, 2))  # the split, on any DiT
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .engine import CACHED, FULL, SkipCacheReport
from .reuse import reuse_block


class ForaCache:
    """FORA-style static cache over a sampling run: a full step every `interval`
    forward calls (the first call is full), the attention and MLP outputs of each
    block kept from it and reused on the other calls. For CachedModel /
    run(model, h, state, t) of our models (models.DiT, models.Latte: any model whose
    run_blocks calls its DiT blocks through BlockState.block)."""

    def __init__(self, interval: int = 2):
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval}")
        self.interval = int(interval)
        self.reset()

    def __repr__(self) -> str:
        return f"ForaCache(interval={self.interval})"

    def reset(self) -> None:
        self._counter = 0
        self._attn: list[torch.Tensor] = []
        self._mlp: list[torch.Tensor] = []
        self._shape = None
        self._report = SkipCacheReport()

    def report(self) -> SkipCacheReport:
        """blocks_run counts the blocks (units) whose attention and MLP ran."""
        return self._report

    def next_timestep(self, t: float) -> None:  # the samplers call this; FORA's schedule is static
        pass

    def cached(self) -> dict[str, list[torch.Tensor]]:
        """The tensors held now: per block, its attention and MLP outputs."""
        return {"attn": list(self._attn), "mlp": list(self._mlp)}

    def _block(self, full: bool, i: int, block, h, c, seq_len):
        return reuse_block(self._attn, self._mlp, full, i, block, h, c, seq_len)

    def run(self, model, h: torch.Tensor, state, t) -> torch.Tensor:
        n = len(model.blocks)
        key = (tuple(h.shape), h.dtype, h.device)
        if self._shape is not None and key != self._shape:
            raise ValueError(f"ForaCache: this run started with hidden states {self._shape[0]} and now gets "
                             f"{tuple(h.shape)}; call reset() for each run")
        self._shape = key
        kind = FULL if self._counter % self.interval == 0 or len(self._attn) != n else CACHED
        if kind == FULL:
            self._attn, self._mlp = [None] * n, [None] * n
        state.run_block = functools.partial(self._block, kind == FULL)
        try:
            h = model.run_blocks(h, 0, model.depth, state)  # the model's merges, pushes and reorders
        finally:
            state.run_block = None
        r = self._report
        r.unit = getattr(model, "cache_unit", "blocks")
        r.steps += 1
        r.kinds.append(kind)
        r.blocks_total += model.depth
        if kind == FULL:
            r.full_steps += 1
            r.blocks_run += model.depth
        else:
            r.cached_steps += 1
        self._counter += 1
        return h


class CachedModel(nn.Module):
    """One of our models (models.DiT, models.Latte) whose forward takes any cache
    with run(model, h, state, t) (SkipCache, ForaCache), long skips or not;
    everything else is the model's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def depth(self) -> int:
        return self.model.depth

    @property
    def cache_defaults(self) -> dict:
        return getattr(self.model, "cache_defaults", {})

    def forward(self, x, t, y=None, cache=None):
        if cache is None:
            return self.model(x, t, y)
        h, state = self.model.embed(x, t, y)
        h = cache.run(self.model, h, state, t)
        return self.model.head(h, state)


class FirstBlockCache:
    """A cache-dit-style first-block residual check (the "FBCache" idea): every step
    runs block 0 and compares its residual r = block0(h) - h with the one of the last
    full step, cache_delta(r, r_full) = sum|r - r_full| / sum|r_full|. Below
    `threshold` the step is cached: its output is block 0's output plus the residual
    of blocks 1..depth-1 kept from the last full step (output - block 0's output);
    otherwise the step runs blocks 1..depth-1 and keeps that residual. The first step
    is full; `max_cached` (optional) caps the cached steps in a row. Works on any
    model with the block protocol (a Skip-DiT's long skips run inside the full steps);
    report(): blocks_run counts block 0 on every step, checks the host syncs."""

    def __init__(self, threshold: float = 0.1, max_cached: int | None = None):
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if max_cached is not None and (int(max_cached) != max_cached or max_cached < 0):
            raise ValueError(f"max_cached must be an integer >= 0 or None, got {max_cached}")
        self.threshold = float(threshold)
        self.max_cached = max_cached
        self.reset()

    def __repr__(self) -> str:
        return f"FirstBlockCache(threshold={self.threshold}, max_cached={self.max_cached})"

    def reset(self) -> None:
        self._first: torch.Tensor | None = None   # block 0's residual at the last full step
        self._rest: torch.Tensor | None = None    # residual of blocks 1.. at the last full step
        self._shape = None
        self._in_row = 0
        self._report = SkipCacheReport()

    def report(self) -> SkipCacheReport:
        return self._report

    def next_timestep(self, t: float) -> None:
        pass

    def run(self, model, h: torch.Tensor, state, t) -> torch.Tensor:
        from .. import ops

        key = (tuple(h.shape), h.dtype, h.device)
        if self._shape is not None and key != self._shape:
            raise ValueError(f"FirstBlockCache: this run started with hidden states {self._shape[0]} and now gets "
                             f"{tuple(h.shape)}; call reset() for each run")
        self._shape = key
        depth = model.depth
        h1 = model.run_blocks(h, 0, 1, state)
        r1 = h1 - h
        r = self._report
        kind = FULL
        if self._first is not None and (self.max_cached is None or self._in_row < self.max_cached):
            d = float(ops.cache_delta(r1, self._first))  # the step's host sync
            r.checks += 1
            r.deltas.append(d)
            if d < self.threshold:
                kind = CACHED
        if kind == FULL:
            out = model.run_blocks(h1, 1, depth, state)
            self._first, self._rest = r1, out - h1
            self._in_row = 0
        else:
            out = h1 + self._rest
            self._in_row += 1
        r.unit = getattr(model, "cache_unit", "blocks")
        r.steps += 1
        r.kinds.append(kind)
        r.blocks_total += depth
        r.blocks_run += depth if kind == FULL else 1
        r.full_steps += kind == FULL
        r.cached_steps += kind == CACHED
        return out
