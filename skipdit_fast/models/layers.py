"""The layers DiT-family models share (DiT / Skip-DiT here, the video models beside
them): adaLN-Zero blocks on skipdit_fast.ops.attention, embeddings, the output layer,
the official long-skip merge on ops.skip_fuse, fixed sin-cos position embeddings.
Parameter names are the official state-dict keys."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def layer_norm(x):
    """DiT's LayerNorm without affine parameters (eps 1e-6)."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # last row: null label

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Conv2d patch embedding of [B, C, L, L] latents to [B, T, D] tokens."""

    def __init__(self, input_size: int, in_channels: int, hidden: int, patch_size: int):
        super().__init__()
        self.input_size = input_size
        self.proj = nn.Conv2d(in_channels, hidden, patch_size, patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, model expects {self.input_size}x{self.input_size} latents")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T, D]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).unbind(2)  # BSHD views
        return self.proj(ops.attention(q, k, v).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * attn(modulate(ln(x))); x += gate * mlp(modulate(ln(x)))."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        D = hidden
        self.attn = Attention(D, heads)
        self.mlp = Mlp(D, int(D * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(layer_norm(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(layer_norm(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        D = hidden
        self.linear = nn.Linear(D, patch_size ** 2 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class SkipLinear(nn.Module):  # official ResidualLinear: key skip_linears.{j}.linear
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden, hidden)


def long_skip_merges(hidden: int, n: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The official skip_norms (LayerNorm over 2D, eps 1e-6) and skip_linears of n
    long-skip merges."""
    return (nn.ModuleList(nn.LayerNorm(2 * hidden, eps=1e-6) for _ in range(n)),
            nn.ModuleList(SkipLinear(hidden) for _ in range(n)))


def merge(norm: nn.LayerNorm, lin: nn.Linear, x, skip):
    """x = lin(norm(cat([x, skip], -1))) on ops.skip_fuse, the norm parameters in fp32
    as the official FP32_Layernorm evaluates them."""
    return ops.skip_fuse(x, skip, norm.weight.float(), norm.bias.float(), lin.weight, lin.bias, norm.eps)


class BlockState:
    """Per-forward state the blocks share: conditioning c and the long-skip stack."""

    __slots__ = ("c", "skips")

    def __init__(self, c):
        self.c = c
        self.skips: list[torch.Tensor] = []


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's 1-D sin-cos embedding of positions `pos`: [len(pos), dim], sines first."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(np.asarray(pos).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim], tokens in row-major
    order (MAE / DiT layout: the first half of the channels encodes the column
    index, the second half the row index)."""
    coords = np.arange(grid, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)  # col varies along a row
    emb = np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1)
    return torch.from_numpy(emb).float()
