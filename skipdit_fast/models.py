"""Vanilla DiT and Skip-DiT (arXiv 2411.17616) in one small module.

    model = DiT.from_name("DiT-XL/2-skip", image_size=256)
    model.load_checkpoint("DiT-XL-2-skip.pt")          # official keys, strict
    out = model(x, t, y)                                 # [B, 2C, H, W] (learn_sigma)
    out = model(x, t, y, cache=SkipCache(interval=2))   # Skip-Cache, see cache.py

The blocks are DiT's adaLN-Zero blocks (GELU-tanh MLP) and run on skipdit_fast.ops:
`attention` on the BSHD views of the fused qkv projection and, for Skip-DiT, `skip_fuse`
for the long-skip merge (DESIGN.md section 3): blocks 0..depth/2-1 push their outputs
on a stack and block i >= depth/2 first merges x = skip_fuse(x, stack.pop()) with
skip_norms[i - depth/2] (evaluated in fp32, like the official FP32_Layernorm) and
skip_linears[i - depth/2].linear. Parameter names are the official state-dict keys.

The model exposes the block structure SkipCache needs (cache.SkipModel): `depth`,
`run_blocks(h, start, stop, state)` and `block_flops(h)`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

# name -> (depth, hidden_size, num_heads); patch size from the name's "/p"
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)


@dataclass(frozen=True)
class DiTConfig:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32          # latent side: image_size // 8
    in_channels: int = 4
    num_classes: int = 1000       # + 1 null label (row num_classes) for CFG
    learn_sigma: bool = True      # output channels 2 * in_channels
    mlp_ratio: float = 4.0
    skip: bool = False            # Skip-DiT long-skip connections

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @classmethod
    def from_name(cls, name: str, image_size: int = 256, **overrides) -> "DiTConfig":
        """'DiT-XL/2', 'DiT-S/8-skip', ... (and the official alias 'DiT-skip' for
        'DiT-XL/2-skip'); image_size in pixels (the latent is image_size // 8)."""
        base = "DiT-XL/2-skip" if name == "DiT-skip" else name
        skip = base.endswith("-skip")
        core = base[: -len("-skip")] if skip else base
        try:
            prefix, size_patch = core.split("-", 1)
            size, patch = size_patch.split("/")
            depth, hidden, heads = SIZES[size]
            patch = int(patch)
            assert prefix == "DiT" and patch in PATCHES
        except (ValueError, KeyError, AssertionError):
            raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}") from None
        if image_size % 8 or (image_size // 8) % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of 8 * patch size ({8 * patch})")
        cfg = cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
                  input_size=image_size // 8, skip=skip)
        return replace(cfg, **overrides)


def model_names() -> list[str]:
    return [f"DiT-{s}/{p}{k}" for s in SIZES for p in PATCHES for k in ("", "-skip")]


class CheckpointError(ValueError):
    """A checkpoint does not match the model (the message names the keys)."""


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _ln(x):
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
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.input_size = cfg.input_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

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

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.attn = Attention(D, cfg.num_heads)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(_ln(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(_ln(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.linear = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(_ln(x), shift, scale))


class SkipLinear(nn.Module):  # official ResidualLinear: key skip_linears.{j}.linear
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden, hidden)


class BlockState:
    """Per-forward state the blocks share: conditioning c and the long-skip stack."""

    __slots__ = ("c", "skips")

    def __init__(self, c):
        self.c = c
        self.skips: list[torch.Tensor] = []


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim], tokens in row-major
    order (MAE / DiT layout: the first half of the channels encodes the column
    index, the second half the row index)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)  # col varies along a row
    emb = np.concatenate([one_d(dim // 2, col), one_d(dim // 2, row)], axis=1)
    return torch.from_numpy(emb).float()


class DiT(nn.Module):
    """DiT (config.skip=False) or Skip-DiT (config.skip=True)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.skip and config.depth % 2:
            raise ValueError(f"Skip-DiT needs an even depth, got {config.depth}")
        if config.hidden_size % config.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.register_buffer("pos_embed", sincos_pos_embed(D, config.input_size // config.patch_size)[None])
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        if config.skip:
            half = config.depth // 2
            self.skip_norms = nn.ModuleList(nn.LayerNorm(2 * D, eps=1e-6) for _ in range(half))
            self.skip_linears = nn.ModuleList(SkipLinear(D) for _ in range(half))

    @classmethod
    def from_name(cls, name: str, image_size: int = 256, **overrides) -> "DiT":
        return cls(DiTConfig.from_name(name, image_size, **overrides))

    @property
    def depth(self) -> int:
        return self.config.depth

    # ---- the block structure (cache.SkipModel protocol) -------------------------
    def embed(self, x, t, y):
        """Patch, time and label embedding: (h [B, T, D], BlockState)."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = (self.x_embedder(x) + self.pos_embed).contiguous()  # the ops want stride-1 channels
        c = self.t_embedder(t) + self.y_embedder(y)
        return h, BlockState(c)

    def run_blocks(self, h, start: int, stop: int, state: BlockState):
        """Blocks [start, stop) in order with their long-skip merges and pushes."""
        half = self.config.depth // 2
        for i in range(start, stop):
            if self.config.skip and i >= half:
                h = self.merge(i - half, h, state.skips.pop())
            h = self.blocks[i](h, state.c)
            if self.config.skip and i < half:
                state.skips.append(h)
        return h

    def merge(self, j: int, x, skip):
        norm, lin = self.skip_norms[j], self.skip_linears[j].linear
        # fp32 norm parameters, as the official FP32_Layernorm evaluates them
        return ops.skip_fuse(x, skip, norm.weight.float(), norm.bias.float(), lin.weight, lin.bias, norm.eps)

    def head(self, h, state: BlockState):
        """Final layer and unpatchify: [B, out_channels, H, W]."""
        h = self.final_layer(h, state.c)
        B, T, _ = h.shape
        p, C = self.config.patch_size, self.config.out_channels
        g = self.config.input_size // p
        h = h.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, C, g * p, g * p)

    def block_flops(self, h) -> list[float]:
        """Estimated multiply-add FLOPs (x2) of each block, its merge included, for
        hidden states shaped like h [B, T, D]."""
        B, T, D = h.shape
        inner = int(D * self.config.mlp_ratio)
        block = 2 * B * T * (3 * D * D + D * D + 2 * D * inner) + 4 * B * T * T * D + 2 * B * D * 6 * D
        merge = 2 * B * T * 2 * D * D
        half = self.config.depth // 2
        return [float(block + (merge if self.config.skip and i >= half else 0)) for i in range(self.depth)]

    # ---- forward ------------------------------------------------------------------
    def forward(self, x, t, y, cache=None):
        """x [B, C, H, W] latents, t [B] timesteps, y [B] labels (num_classes = null
        label). cache: a SkipCache for this sampling run, or None."""
        h, state = self.embed(x, t, y)
        if cache is None:
            h = self.run_blocks(h, 0, self.depth, state)
        else:
            if not self.config.skip:
                raise ValueError("SkipCache needs a model with long skips (a '-skip' model); this is a vanilla DiT")
            h = cache.run(self, h, state, t)
        return self.head(h, state)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, cache=None):
        """Classifier-free guidance, official convention: x holds [cond; uncond]
        halves (the second half of x is replaced by the first), y their labels; one
        forward for both halves; guidance on the first 3 channels only (the official
        code's choice for 4-channel latents), never past the noise channels: a model
        with fewer input channels guides those, not its variance outputs."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y, cache=cache)
        g = min(3, self.config.in_channels)
        eps, rest = out[:, :g], out[:, g:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    # ---- weights --------------------------------------------------------------------
    def initialize_weights(self):
        """DiT's training initialization (adaLN-Zero: every block starts as the
        identity, the output is zero). The constructor's default initialization is
        PyTorch's, so that a model with random weights computes something."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [*self.blocks, self.final_layer]:
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        return self

    def load_state_dict_strict(self, state_dict) -> None:
        """Loads official-key weights; any missing, unexpected or mis-shaped key is a
        CheckpointError that names it. Values are cast to the model's dtype."""
        check_state_dict(self, state_dict)
        self.load_state_dict(state_dict, strict=True)

    def load_checkpoint(self, path) -> "DiT":
        self.load_state_dict_strict(load_checkpoint(path))
        return self


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """A state dict from .pt/.pth (torch.load with weights_only=True; a DiT training
    checkpoint's 'ema' entry is taken) or .safetensors."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("loading .safetensors needs the 'safetensors' package") from e
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return obj


def save_safetensors(model_or_state_dict, path) -> None:
    from safetensors.torch import save_file

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, os.fspath(path))


def check_state_dict(model: nn.Module, state_dict) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)}, model {list(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return

    def listing(title, items):
        more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more

    msg = "checkpoint does not match the model"
    if missing:
        msg += listing("missing keys", missing)
    if unexpected:
        msg += listing("unexpected keys", unexpected)
    if shapes:
        msg += listing("mis-shaped keys", shapes)
    if any(k.startswith("skip_") for k in missing):
        msg += "\n  (the checkpoint has no long-skip weights: a vanilla DiT; use a name without '-skip')"
    elif any(k.startswith("skip_") for k in unexpected):
        msg += "\n  (the checkpoint has long-skip weights: a Skip-DiT; use a '-skip' model name)"
    raise CheckpointError(msg)
