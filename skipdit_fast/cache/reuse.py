"""The hybrid mode of SkipCache (reuse_outer=True): FORA-style reuse inside the
outer blocks of a cached step.

A full step keeps, for every block, the outputs of its attention and its MLP (before
the adaLN gate). A cached step of Skip-Cache runs blocks 0..K-1 and depth-K..depth-1;
in the hybrid mode those blocks reuse the kept attention and MLP outputs and run only
their cheap parts (adaLN modulation from the current timestep, the gates, the
residual adds; the long-skip merges run as always). So a hybrid cached step runs no
attention and no MLP at all: the deep blocks come from the cache (Skip-Cache), the
outer ones from their kept outputs (FORA). Works with any model that calls its
blocks through BlockState.block (models.DiT, models.Latte)."""

from __future__ import annotations

import functools

import torch

from ..models.layers import layer_norm, modulate


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
    """The per-run store of the hybrid mode: block index -> (attention, MLP) output
    of the last full step."""

    def __init__(self):
        self.attn: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self.attn.clear()
        self.mlp.clear()

    def _block(self, full: bool, i, block, h, c, seq_len):
        return reuse_block(self.attn, self.mlp, full, i, block, h, c, seq_len)

    def attach(self, state, full: bool) -> None:
        """Routes the step's blocks through the store (keep on a full step, reuse on
        a cached one); detach() after the step."""
        if not hasattr(state, "run_block"):
            raise ValueError("SkipCache(reuse_outer=True) needs a model that runs its blocks through "
                             "BlockState.block (skipdit_fast.models.DiT / Latte)")
        if not full and not self.attn:
            raise RuntimeError("SkipCache(reuse_outer=True): a cached step with nothing kept")
        state.run_block = functools.partial(self._block, full)

    @staticmethod
    def detach(state) -> None:
        state.run_block = None
