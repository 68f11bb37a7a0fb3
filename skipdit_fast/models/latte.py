"""Latte and Latte-skip (class-to-video; Skip-DiT arXiv 2411.17616) in one small module.

    model = Latte.from_name("Latte-XL/2-skip", extras=2, num_classes=101)   # UCF101
    model.load_checkpoint("UCF101-skip.pt")       # official keys, strict; an 'ema' entry is taken
    out = model(x, t, y)                          # x [B, F, C, H, W] -> [B, F, 2C, H, W] (learn_sigma)
    out = model(x, t, y, cache=SkipCache.for_model(model, interval=2, branch=1))

The blocks are DiT's adaLN-Zero blocks (models.layers), in pairs: block 2p is spatial
(attention over the H*W tokens of each frame), block 2p+1 temporal (attention over the
F frames of each token position); the fixed 1-D sin-cos `temp_embed` is added after
the first spatial block. `extras` = 1: unconditional (ffs, sky, taichi), the
conditioning is the timestep only; 2: class-conditional (UCF101: 101 classes + the null
label for CFG), timestep + label. Latte-skip adds the long skips over the pairs:
pairs 0..P/2-1 (P = depth // 2 pairs) push the output of their temporal block, each
pair p >= P/2 first merges x = skip_fuse(x, pop()) with skip_norms[p - P/2] and
skip_linears[p - P/2].linear (depth // 4 merges) before its spatial block. The official
code indexes the merges with (i - 14) // 2 over even block indices i, which is right
for depth 28 only; this module uses p - P/2 for every depth divisible by 4.

Hidden states are [B, F*T, D] (T = tokens per frame) in frame-major order between
pairs and token-major [B, T*F, D] between the spatial and the temporal block of a
pair; the change of order is one copy each way (the official rearrange). In both
blocks the attention takes BSHD views of the fused qkv output, [B*F, T, H, Dh] or
[B*T, F, H, Dh], no copies (layers.Attention with seq_len).

Skip-Cache (skipdit_fast.cache.SkipModel): the units of the U are the pairs, so
`depth` here is the number of pairs P (config.depth counts blocks), `run_blocks` runs
pairs and the cache's branch K counts pairs, as the official `skip_at_branch` does.
`cache_defaults` are the official Latte_skip_cache settings: K = 1 pair, full while
t >= 900, counter and cache reset after a call with t < 50.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import DiTFamily
from .dit import PATCHES, SIZES, LatentGrid, sized_name
from .layers import BlockState, merge, unpatchify


@dataclass(frozen=True)
class LatteConfig(LatentGrid):
    depth: int = 28               # blocks: depth // 2 spatial/temporal pairs
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32          # latent side: image_size // 8
    in_channels: int = 4
    num_frames: int = 16
    extras: int = 1               # 1: unconditional; 2: class-conditional
    num_classes: int = 101        # extras 2: + 1 null label (row num_classes) for CFG
    learn_sigma: bool = True      # output channels 2 * in_channels
    mlp_ratio: float = 4.0
    skip: bool = False            # Latte-skip long-skip connections over the pairs

    @property
    def class_conditional(self) -> bool:
        return self.extras == 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latents: (F, C, H, W)."""
        return (self.num_frames, self.in_channels, self.input_size, self.input_size)

    @classmethod
    def from_name(cls, name: str, image_size: int = 256, **overrides) -> "LatteConfig":
        """'Latte-XL/2', 'Latte-S/4-skip', ... (and the official alias 'Latte-skip'
        for 'Latte-XL/2-skip'); image_size in pixels (the latent is image_size // 8).
        overrides: num_frames, extras, num_classes, ..."""
        return replace(cls(**sized_name(name, "Latte", image_size, latte_names)), **overrides)


def latte_names() -> list[str]:
    return [f"Latte-{s}/{p}{k}" for s in SIZES for p in PATCHES for k in ("", "-skip")]


def _reorder(h, a: int, b: int):
    """[B, a*b, D] in (a, b) order -> [B, b*a, D] in (b, a) order (one copy)."""
    B, _, D = h.shape
    return h.view(B, a, b, D).transpose(1, 2).reshape(B, b * a, D)


class Latte(DiTFamily):
    """Latte (config.skip=False) or Latte-skip (config.skip=True)."""

    SKIP_NAME = "Latte-skip"
    CFG_CHANNELS, CFG_DIM = 4, 2     # official: guidance on channels [:4] along dim 2 of [B, F, C, H, W]
    CONFIG = LatteConfig
    cache_unit = "block pairs"
    # the official Latte_skip_cache settings (skipdit_fast.cache.SkipCache.for_model):
    # skip_at_branch 1 pair, full while t >= 900, reset after a call with t < 50
    cache_defaults = {"branch": 1, "start": 900, "stop": 50, "strict_stop": True}

    def __init__(self, config: LatteConfig):
        super().__init__()
        if config.depth % 2 or config.depth < 2:
            raise ValueError(f"Latte needs an even depth (spatial/temporal pairs), got {config.depth}")
        if config.skip and config.depth % 4:
            raise ValueError(f"Latte-skip needs a depth divisible by 4 (an even number of pairs), got {config.depth}")
        if config.extras not in (1, 2):
            raise ValueError(f"extras must be 1 (unconditional) or 2 (class-conditional), got {config.extras}")
        self._add_parts(config, config.depth // 4, frames=config.num_frames)

    @property
    def depth(self) -> int:
        """The SkipModel depth: the number of spatial/temporal block pairs."""
        return self.config.depth // 2

    # ---- the block structure (cache.SkipModel protocol; units = pairs) ------------------
    def embed(self, x, t, y=None):
        """Patch (per frame), time and label embedding: (h [B, F*T, D], BlockState)."""
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"Latte takes video latents [B, F, C, H, W], got shape {list(x.shape)}")
        B, F = x.shape[:2]
        if F != cfg.num_frames:
            raise ValueError(f"input has {F} frames, the model has num_frames={cfg.num_frames} (its temp_embed)")
        if t.dim() == 0:
            t = t.expand(B)
        h = (self.x_embedder(x.reshape(B * F, *x.shape[2:])) + self.pos_embed).contiguous()
        h = h.view(B, F * cfg.num_patches, cfg.hidden_size)
        c = self.t_embedder(t)
        if cfg.class_conditional:
            if y is None:
                raise ValueError("this Latte is class-conditional (extras=2): pass labels y "
                                 f"(0..{cfg.num_classes - 1}, {cfg.num_classes} = null)")
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ValueError("this Latte is unconditional (extras=1): y must be None")
        return h, BlockState(c)

    def run_blocks(self, h, start: int, stop: int, state: BlockState):
        """Pairs [start, stop) in order, with Latte-skip's long-skip merges and pushes."""
        cfg = self.config
        F, T = cfg.num_frames, cfg.num_patches
        half = self.depth // 2
        for p in range(start, stop):
            if cfg.skip and p >= half:
                h = self.merge(p - half, h, state.skips.pop())
            h = _reorder(state.block(2 * p, self.blocks[2 * p], h, T), F, T)   # frames of each token
            if p == 0:
                B, N, D = h.shape
                h = (h.view(B, T, F, D) + self.temp_embed).view(B, N, D)
            h = _reorder(state.block(2 * p + 1, self.blocks[2 * p + 1], h, F), T, F)
            if cfg.skip and p < half:
                state.skips.append(h)
        return h

    def merge(self, j: int, x, skip):
        return merge(self.skip_norms[j], self.skip_linears[j].linear, x, skip)

    def head(self, h, state: BlockState):
        """Final layer and unpatchify per frame: [B, F, out_channels, H, W]."""
        B, N, _ = h.shape
        h = self.final_layer(h, state.c).view(B, self.config.num_frames, self.config.num_patches, -1)
        return unpatchify(h, self.config.patch_size, self.config.out_channels)

    def block_flops(self, h) -> list[float]:
        """Estimated multiply-add FLOPs (x2) of each pair (spatial + temporal block,
        its merge included) for hidden states shaped like h [B, F*T, D]."""
        B, N, D = h.shape
        F, T = self.config.num_frames, self.config.num_patches
        inner = int(D * self.config.mlp_ratio)
        dense = 2 * B * N * (3 * D * D + D * D + 2 * D * inner) + 2 * B * D * 6 * D
        pair = 2 * dense + 4 * B * F * T * T * D + 4 * B * T * F * F * D
        merge = 2 * B * N * 2 * D * D
        half = self.depth // 2
        return [float(pair + (merge if self.config.skip and p >= half else 0)) for p in range(self.depth)]
