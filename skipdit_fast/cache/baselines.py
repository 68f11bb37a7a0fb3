"""Caching baselines for the fidelity study (bench/fidelity.py): what Skip-Cache is
compared with on models of the same size.

- ForaCache: FORA-style static caching (Selvaraju et al., 2024) for our DiT: every N-th
  forward call is full and keeps, for every block, the outputs of its attention and
  its MLP (before the adaLN gate); the N-1 calls after it reuse them, so a cached
  call runs only the cheap parts of each block (adaLN modulation from the current
  timestep, the gates, the residual adds, and the long-skip merges of a Skip-DiT).
- CachedModel: runs a DiT with any cache through the block protocol
  (embed -> cache.run -> head), so that a SkipCache can also drive a *vanilla* DiT:
  the Skip-Cache-like shallow/deep split without long skips. There the cached step
  runs blocks 0..K-1 (whose outputs nothing uses: no skips carry them) and
  blocks depth-K..depth-1 from the cached tensor, the same blocks as Skip-Cache
  runs on a Skip-DiT, so the two differ only in the long skips.

    model = CachedModel(dit)                      # dit: models.DiT, skip or not
    sample(model, labels, cache=ForaCache(3))     # diffusion.sample takes it as a model
    sample(model, labels, cache=SkipCache(3, 2))  # the split, on any DiT
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .engine import CACHED, FULL, SkipCacheReport
from ..models.layers import layer_norm, modulate


class ForaCache:
    """FORA-style static cache over a sampling run: a full step every `interval`
    forward calls (the first call is full), the attention and MLP outputs of each
    block kept from it and reused on the other calls. Only for
    CachedModel / run(model, h, state, t) of a models.DiT."""

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
        """blocks_run counts the blocks whose attention and MLP ran."""
        return self._report

    def next_timestep(self, t: float) -> None:  # the samplers call this; FORA's schedule is static
        pass

    def cached(self) -> dict[str, list[torch.Tensor]]:
        """The tensors held now: per block, its attention and MLP outputs."""
        return {"attn": list(self._attn), "mlp": list(self._mlp)}

    def run(self, model, h: torch.Tensor, state, t) -> torch.Tensor:
        depth = model.depth
        key = (tuple(h.shape), h.dtype, h.device)
        if self._shape is not None and key != self._shape:
            raise ValueError(f"ForaCache: this run started with hidden states {self._shape[0]} and now gets "
                             f"{tuple(h.shape)}; call reset() for each run")
        self._shape = key
        kind = FULL if self._counter % self.interval == 0 or len(self._attn) != depth else CACHED
        if kind == FULL:
            self._attn, self._mlp = [None] * depth, [None] * depth
        half = depth // 2
        skip = model.config.skip
        for i, block in enumerate(model.blocks):
            if skip and i >= half:
                h = model.merge(i - half, h, state.skips.pop())
            shift1, scale1, gate1, shift2, scale2, gate2 = \
                block.adaLN_modulation(state.c).unsqueeze(1).chunk(6, dim=-1)
            if kind == FULL:
                self._attn[i] = block.attn(modulate(layer_norm(h), shift1, scale1))
            h = h + gate1 * self._attn[i]
            if kind == FULL:
                self._mlp[i] = block.mlp(modulate(layer_norm(h), shift2, scale2))
            h = h + gate2 * self._mlp[i]
            if skip and i < half:
                state.skips.append(h)
        r = self._report
        r.steps += 1
        r.kinds.append(kind)
        r.blocks_total += depth
        if kind == FULL:
            r.full_steps += 1
            r.blocks_run += depth
        else:
            r.cached_steps += 1
        self._counter += 1
        return h


class CachedModel(nn.Module):
    """A models.DiT whose forward takes any cache with run(model, h, state, t)
    (SkipCache, ForaCache), long skips or not; everything else is the model's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def depth(self) -> int:
        return self.model.depth

    def forward(self, x, t, y, cache=None):
        if cache is None:
            return self.model(x, t, y)
        h, state = self.model.embed(x, t, y)
        h = cache.run(self.model, h, state, t)
        return self.model.head(h, state)
