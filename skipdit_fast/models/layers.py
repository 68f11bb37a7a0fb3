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
    """Fused-qkv self-attention on ops.attention. x [B, N, D]; with seq_len = L, the
    N tokens of each sample are N / L independent sequences of L consecutive tokens
    (Latte: the tokens of one frame, or the frames of one token): q, k and v are BSHD
    views [B * N / L, L, H, Dh] of the one qkv projection output, never copies."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, seq_len: int | None = None):
        B, N, D = x.shape
        L = N if seq_len is None else seq_len
        q, k, v = self.qkv(x).view(B * N // L, L, 3, self.heads, D // self.heads).unbind(2)  # BSHD views
        return self.proj(ops.attention(q, k, v).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * attn(modulate(ln(x))); x += gate * mlp(modulate(ln(x))).
    x [B, N, D], c [B, D]: one conditioning vector per sample for all its N tokens;
    seq_len: see Attention (Latte's spatial and temporal blocks)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        D = hidden
        self.attn = Attention(D, heads)
        self.mlp = Mlp(D, int(D * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def modulation(self, c):
        """(shift1, scale1, gate1, shift2, scale2, gate2), each [B, 1, D]."""
        return self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)

    def forward(self, x, c, seq_len: int | None = None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = x + gate1 * self.attn(modulate(layer_norm(x), shift1, scale1), seq_len)
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
    """Per-forward state the blocks share: conditioning c, the long-skip stack, and
    `run_block`: None (each block runs its forward), or a function
    run_block(i, block, h, c, seq_len) -> h that a cache puts there to run the blocks
    its own way (FORA-style reuse of each block's attention and MLP outputs,
    skipdit_fast.cache.baselines); the models call every block through block()."""

    __slots__ = ("c", "skips", "run_block")

    def __init__(self, c):
        self.c = c
        self.skips: list[torch.Tensor] = []
        self.run_block = None

    def block(self, i: int, block: DiTBlock, h, seq_len: int | None = None):
        if self.run_block is None:
            return block(h, self.c, seq_len)
        return self.run_block(i, block, h, self.c, seq_len)


def unpatchify(h, patch: int, channels: int):
    """Tokens [..., T, patch * patch * channels] of a square grid (row-major) back to
    [..., channels, H, W] (the official einsum 'nhwpqc->nchpwq')."""
    *lead, T, _ = h.shape
    g = math.isqrt(T)
    if g * g != T:
        raise ValueError(f"{T} tokens are not a square grid")
    h = h.reshape(-1, g, g, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(*lead, channels, g * patch, g * patch)


def guide(out, cfg_scale: float, channels: int, dim: int):
    """Classifier-free guidance the official way on a model output whose batch holds
    [cond; uncond] halves: the first `channels` channels along `dim` (the noise
    prediction) become uncond + cfg_scale * (cond - uncond) in both halves; the others
    (the variance outputs) are kept."""
    eps, rest = out.split([channels, out.shape[dim] - channels], dim=dim)
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=dim)


def dit_initialization(model: nn.Module) -> nn.Module:
    """DiT's (and Latte's) training initialization of a model with DiT's attribute
    names (x_embedder, t_embedder, optional y_embedder, blocks, final_layer):
    xavier-uniform linears with zero biases, the patch embedding like a linear,
    N(0, 0.02) label and timestep embeddings, and adaLN-Zero: every block starts as
    the identity, the output is zero."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    if getattr(model, "y_embedder", None) is not None:
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for m in [*model.blocks, model.final_layer]:
        nn.init.zeros_(m.adaLN_modulation[-1].weight)
        nn.init.zeros_(m.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    return model


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
