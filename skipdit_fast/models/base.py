"""What DiT and Latte share above their blocks: the forward around the block
structure (embed -> blocks, or a Skip-Cache's run over them -> head), classifier-free
guidance the official way, DiT's training initialization and strict loading."""

from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import StrictLoading
from .layers import (DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, dit_initialization, guide,
                     long_skip_merges, sincos_1d, sincos_pos_embed)


class DiTFamily(StrictLoading, nn.Module):
    """A model made of embed(x, t, y) -> (h, state), run_blocks(h, start, stop,
    state) over `depth` units and head(h, state) (the cache.SkipModel protocol).
    Subclasses set CFG_CHANNELS / CFG_DIM (the official guidance: DiT the first 3
    channels along dim 1, Latte channels [:4] along dim 2) and SKIP_NAME."""

    CFG_CHANNELS, CFG_DIM = 3, 1
    SKIP_NAME = "model with long skips"
    CONFIG: type = object  # the config class (from_name)

    def _add_parts(self, config, merges: int, frames: int | None = None) -> None:
        """The official modules and buffers, in the official order: x_embedder,
        t_embedder, y_embedder (class-conditional configs), pos_embed (fixed 2-D
        sin-cos), temp_embed (fixed 1-D sin-cos over `frames`, video models), the
        blocks, final_layer and, with config.skip, `merges` skip_norms / skip_linears."""
        if config.hidden_size % config.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.in_channels, D, config.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        if config.class_conditional:
            self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.register_buffer("pos_embed", sincos_pos_embed(D, config.input_size // config.patch_size)[None])
        if frames is not None:
            self.register_buffer("temp_embed", torch.from_numpy(sincos_1d(D, range(frames))).float()[None])
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        if config.skip:
            self.skip_norms, self.skip_linears = long_skip_merges(D, merges)

    @classmethod
    def from_name(cls, name: str, image_size: int = 256, **overrides):
        """The model of CONFIG.from_name(name, image_size, **overrides), random weights."""
        return cls(cls.CONFIG.from_name(name, image_size, **overrides))

    def forward(self, x, t, y=None, cache=None):
        """Latents x, timesteps t [B], labels y [B] (num_classes = null label; None
        for an unconditional model). cache: a SkipCache for this sampling run, or
        None."""
        h, state = self.embed(x, t, y)
        if cache is None:
            h = self.run_blocks(h, 0, self.depth, state)
        else:
            if not self.config.skip:
                raise ValueError("SkipCache needs a model with long skips (a '-skip' model); "
                                 f"this is a vanilla {type(self).__name__}")
            h = cache.run(self, h, state, t)
        return self.head(h, state)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, cache=None):
        """Classifier-free guidance, official convention: x holds [cond; uncond]
        halves (the second half of x is replaced by the first), y their labels; one
        forward for both halves; guidance on the first CFG_CHANNELS channels along
        CFG_DIM only (the official code's choice for 4-channel latents), never past
        the noise channels: a model with fewer input channels guides those, not its
        variance outputs."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y, cache=cache)
        return guide(out, cfg_scale, min(self.CFG_CHANNELS, self.config.in_channels), dim=self.CFG_DIM)

    def initialize_weights(self):
        """DiT's training initialization (layers.dit_initialization: adaLN-Zero). The
        constructor's default initialization is PyTorch's, so that a model with random
        weights computes something."""
        return dit_initialization(self)
