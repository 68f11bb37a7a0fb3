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
`run_blocks(h, start, stop, state)` and `block_flops(h)`; forward, forward_with_cfg (guidance
on the first 3 channels, the official choice) and the initialization are base.DiTFamily's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import DiTFamily
from .config_checks import check_config, check_image_size
from .layers import BlockState, merge, unpatchify

# name -> (depth, hidden_size, num_heads); patch size from the name's "/p"
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)


class LatentGrid:
    """What the configs derive from their fields: output channels (2x with
    learn_sigma) and tokens per image / frame."""

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def __post_init__(self) -> None:
        check_config(self)


@dataclass(frozen=True)
class DiTConfig(LatentGrid):
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
        return replace(cls(**sized_name(name, "DiT", image_size, dit_names)), **overrides)


def sized_name(name: str, family: str, image_size: int, names) -> dict:
    """The config fields a '<family>-<size>/<patch>[-skip]' name fixes (depth, width,
    heads, patch, latent size, skip); '<family>-skip' is the official alias of
    '<family>-XL/2-skip'. names() lists the family's names for the error."""
    check_image_size(image_size)
    base = f"{family}-XL/2-skip" if name == f"{family}-skip" else name
    skip = base.endswith("-skip")
    core = base[: -len("-skip")] if skip else base
    try:
        prefix, size_patch = core.split("-", 1)
        size, patch = size_patch.split("/")
        depth, hidden, heads = SIZES[size]
        patch = int(patch)
        assert prefix == family and patch in PATCHES
    except (ValueError, KeyError, AssertionError):
        raise ValueError(f"unknown model {name!r}; known: {', '.join(names())}") from None
    if image_size % 8 or (image_size // 8) % patch:
        raise ValueError(f"image_size {image_size} must be a multiple of 8 * patch size ({8 * patch})")
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, input_size=image_size // 8,
                skip=skip)


def dit_names() -> list[str]:
    return [f"DiT-{s}/{p}{k}" for s in SIZES for p in PATCHES for k in ("", "-skip")]


class DiT(DiTFamily):
    """DiT (config.skip=False) or Skip-DiT (config.skip=True)."""

    SKIP_NAME = "Skip-DiT"
    CONFIG = DiTConfig

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.skip and config.depth % 2:
            raise ValueError(f"Skip-DiT needs an even depth, got {config.depth}")
        self._add_parts(config, config.depth // 2)

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
