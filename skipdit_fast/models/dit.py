"""Vanilla DiT and Skip-DiT (arXiv 2411.17616) in one small module.

    model = DiT.from_name("DiT-XL/2-skip", image_size=256)
    model.load_checkpoint("DiT-XL-2-skip.pt")          # official keys, strict
    out = model(x, t, y)                                 # [B, 2C, H, W] (learn_sigma)
    out = model(x, t, y, cache=SkipCache(interval=2))   # Skip-Cache, see skipdit_fast.cache

The blocks are DiT's adaLN-Zero blocks (GELU-tanh MLP) and run on skipdit_fast.ops:
`attention` on the BSHD views of the fused qkv projection and, for Skip-DiT, `skip_fuse`
for the long-skip merge (DESIGN.md section 3): blocks 0..depth/2-1 push their outputs
on a stack and block i >= depth/2 first merges x = skip_fuse(x, stack.pop()) with
skip_norms[i - depth/2] (evaluated in fp32, like the official FP32_Layernorm) and
skip_linears[i - depth/2].linear. Parameter names are the official state-dict keys.

The model exposes the block structure SkipCache needs (skipdit_fast.cache.SkipModel): `depth`,
`run_blocks(h, start, stop, state)` and `block_flops(h)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .checkpoint import StrictLoading
from .layers import (BlockState, DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, dit_initialization,
                     guide, long_skip_merges, merge, sincos_pos_embed, unpatchify)

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

    @property
    def class_conditional(self) -> bool:
        return True

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latents: (C, H, W)."""
        return (self.in_channels, self.input_size, self.input_size)

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
            raise ValueError(f"unknown model {name!r}; known: {', '.join(dit_names())}") from None
        if image_size % 8 or (image_size // 8) % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of 8 * patch size ({8 * patch})")
        cfg = cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
                  input_size=image_size // 8, skip=skip)
        return replace(cfg, **overrides)


def dit_names() -> list[str]:
    return [f"DiT-{s}/{p}{k}" for s in SIZES for p in PATCHES for k in ("", "-skip")]


class DiT(StrictLoading, nn.Module):
    """DiT (config.skip=False) or Skip-DiT (config.skip=True)."""

    SKIP_NAME = "Skip-DiT"

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.skip and config.depth % 2:
            raise ValueError(f"Skip-DiT needs an even depth, got {config.depth}")
        if config.hidden_size % config.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.in_channels, D, config.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.register_buffer("pos_embed", sincos_pos_embed(D, config.input_size // config.patch_size)[None])
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        if config.skip:
            self.skip_norms, self.skip_linears = long_skip_merges(D, config.depth // 2)

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
            h = state.block(i, self.blocks[i], h)
            if self.config.skip and i < half:
                state.skips.append(h)
        return h

    def merge(self, j: int, x, skip):
        return merge(self.skip_norms[j], self.skip_linears[j].linear, x, skip)

    def head(self, h, state: BlockState):
        """Final layer and unpatchify: [B, out_channels, H, W]."""
        return unpatchify(self.final_layer(h, state.c), self.config.patch_size, self.config.out_channels)

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
        return guide(out, cfg_scale, min(3, self.config.in_channels), dim=1)

    # ---- weights --------------------------------------------------------------------
    def initialize_weights(self):
        """DiT's training initialization (layers.dit_initialization: adaLN-Zero). The
        constructor's default initialization is PyTorch's, so that a model with random
        weights computes something."""
        return dit_initialization(self)
