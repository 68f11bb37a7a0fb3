"""The hybrid mode of SkipCache (reuse_outer=True): FORA-style reuse inside the
outer blocks of a cached step.

A full step keeps, for every block, the outputs of its attention and its MLP (before
the adaLN gate). A cached step of Skip-Cache runs blocks 0..K-1 and depth-K..depth-1;
in the hybrid mode those blocks reuse the kept attention and MLP outputs and run only
their cheap parts (adaLN modulation from the current timestep, the gates, the
residual adds; the long-skip merges run as always). So a hybrid cached step runs no
attention and no MLP at all: the deep blocks come from the cache (Skip-Cache), the
outer ones from their kept outputs (FORA). Works with any model that calls its
blocks through BlockState.block (models.DiT, models.Latte).

The same store serves a schedule's reuse steps (every block reuses) and its
extrapolated reuse steps (code X): with the outputs a0, a1 of the last two full
steps j0 < j1, step i takes

    a1 + EXTRAPOLATION_DAMPING * (i - j1) / (j1 - j0) * (a1 - a0)

for each block's attention and MLP output: first order in the step index, damped.
Measured on the tiny Skip-DiT (50 DDPM steps, 30 samples, every step between full
ones extrapolated at a fixed interval N, PSNR against the uncached run): with the
damping 0.5, +1.2 to +1.4 dB over plain reuse at N = 2 and +0.9 to +1.2 at N = 3
(seeds 0-2), +0.4 at N = 4 and -1.0 at N = 5 (seed 0); undamped, +1.0 / -0.4 / -1.7 /
-3.1 dB at N = 2 / 3 / 4 / 5 (seed 0): the outputs bend between full steps. With one
full step so far it is plain reuse."""

from __future__ import annotations

import functools

import torch

from ..models.layers import layer_norm, modulate

EXTRAPOLATION_DAMPING = 0.5   # see the module docstring


def reuse_block(attn, mlp, full: bool, i: int, block, h, c, seq_len):
    """One DiT block with its attention / MLP outputs computed and kept in attn[i] /
    mlp[i] (full) or reused from there (cached); the adaLN modulation, gates and
    residuals always run. The FORA baseline (cache/baselines.py) and the hybrid mode
    share it."""
    shift1, scale1, gate1, shift2, scale2, gate2 = block.modulation(c)
    if full:
        attn[i] = block.attn(modulate(layer_norm(h), shift1, scale1), seq_len)
    h = h + gate1 * attn[i]
    if full:
        mlp[i] = block.mlp(modulate(layer_norm(h), shift2, scale2))
    return h + gate2 * mlp[i]


class OuterReuse:
    """The per-run store of the hybrid and reuse modes: block index -> (attention,
    MLP) output of the last full step, and (for extrapolated steps) of the one
    before it."""

    def __init__(self):
        self.attn: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}
        self.prev_attn: dict[int, torch.Tensor] = {}
        self.prev_mlp: dict[int, torch.Tensor] = {}
        self.step: int | None = None       # the step index of the last full step
        self.prev_step: int | None = None  # of the one before (prev_* hold its outputs)

    def clear(self) -> None:
        self.attn, self.mlp, self.prev_attn, self.prev_mlp = {}, {}, {}, {}
        self.step = self.prev_step = None

    def _block(self, full: bool, i, block, h, c, seq_len):
        return reuse_block(self.attn, self.mlp, full, i, block, h, c, seq_len)

    def _extrapolated(self, coef: float, i, block, h, c, seq_len):
        shift1, scale1, gate1, shift2, scale2, gate2 = block.modulation(c)
        a1, m1 = self.attn[i], self.mlp[i]
        h = h + gate1 * torch.add(a1, a1 - self.prev_attn[i], alpha=coef)
        return h + gate2 * torch.add(m1, m1 - self.prev_mlp[i], alpha=coef)

    def attach(self, state, full: bool, *, step: int | None = None, hold_previous: bool = False,
               extrapolate: bool = False) -> None:
        """Routes the step's blocks through the store (keep on a full step, reuse on
        a cached one); detach() after the step. step: the index of this step in the
        run (needed by full steps that hold_previous, which keep the last full
        step's outputs as the previous ones, and by extrapolate steps)."""
        if not hasattr(state, "run_block"):
            raise ValueError("SkipCache(reuse_outer=True) needs a model that runs its blocks through "
                             "BlockState.block (skipdit_fast.models.DiT / Latte)")
        if not full and not self.attn:
            raise RuntimeError("SkipCache(reuse_outer=True): a cached step with nothing kept")
        if full:
            if hold_previous and self.attn:
                self.prev_attn, self.prev_mlp, self.prev_step = self.attn, self.mlp, self.step
            else:
                self.prev_attn, self.prev_mlp, self.prev_step = {}, {}, None
            self.attn, self.mlp, self.step = {}, {}, step
        elif extrapolate and self.prev_step is not None:
            coef = EXTRAPOLATION_DAMPING * (step - self.step) / (self.step - self.prev_step)
            state.run_block = functools.partial(self._extrapolated, coef)
            return
        state.run_block = functools.partial(self._block, full)

    @staticmethod
    def detach(state) -> None:
        state.run_block = None
