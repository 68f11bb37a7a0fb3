"""Small re-creations of the module layouts skipdit_fast.patch() must find by structure:
timm's `Attention` (the 0.6 version the official DiT code imported and the 0.9+ one
with q/k norms and fused SDPA), Latte's own `Attention` (attention_mode), and the
official DiT / Skip-DiT (class-to-image/models.py) and Latte / Latte-skip
(class-to-video/models/latte.py) models with their `skip_norms` (FP32_Layernorm) /
`skip_linears` (ResidualLinear holding `.linear`) lists and block loops. Written here
because neither timm nor the official code is installable in CI; the forward code
follows the originals' semantics (including ResidualLinear's (cat, hidden_states)
signature in DiT_skip and (cat) in Latte_skip), sizes are tiny and weights random.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimmAttentionV06(nn.Module):
    """timm 0.6 vision_transformer.Attention (what DiT's `from timm... import Attention` got)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TimmAttention(nn.Module):
    """timm >= 0.9 Attention: optional per-head q/k LayerNorm, fused SDPA or the math
    path, an optional attn_mask argument (timm 1.0)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0,
                 fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LatteAttention(nn.Module):
    """Latte's models/latte.py Attention (attention_mode 'math' / 'flash')."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, attention_mode="math"):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attention_mode = attention_mode
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).contiguous()
        q, k, v = qkv.unbind(0)
        if self.attention_mode == "flash":
            x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        elif self.attention_mode == "math":
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        else:
            raise NotImplementedError(self.attention_mode)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, size, patch, cin, dim):
        super().__init__()
        self.patch_size = (patch, patch)
        self.num_patches = (size // patch) ** 2
        self.proj = nn.Conv2d(cin, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=32):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, attn_cls=TimmAttentionV06, **attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = attn_cls(dim, num_heads=heads, qkv_bias=True, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, cout):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * cout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FP32_Layernorm(nn.LayerNorm):
    def forward(self, inputs):
        origin_dtype = inputs.dtype
        return F.layer_norm(inputs.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(origin_dtype)


class ResidualLinear(nn.Module):
    """DiT_skip's: forward(cat, hidden_states) returns linear(cat)."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, cat, hidden_states):
        return self.linear(cat)


class ResidualLinearLatte(nn.Module):
    """Latte_skip's: forward(cat)."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, cat):
        return self.linear(cat)


class OfficialDiT(nn.Module):
    """DiT (skip=False) or DiT_skip (skip=True) of the official code, tiny."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                 num_classes=10, skip=True, attn_cls=TimmAttentionV06, **attn_kwargs):
        super().__init__()
        self.out_channels = in_channels * 2
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, attn_cls, **attn_kwargs) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.skip = skip
        if skip:
            self.skip_norms = nn.ModuleList(FP32_Layernorm(2 * hidden_size, elementwise_affine=True, eps=1e-6)
                                            for _ in range(depth // 2))
            self.skip_linears = nn.ModuleList(ResidualLinear(hidden_size) for _ in range(depth // 2))
            for n in self.skip_norms:  # not the identity affine: a merge that drops it must show
                nn.init.normal_(n.weight, 1.0, 0.2)
                nn.init.normal_(n.bias, 0.0, 0.2)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        skips = []
        depth = len(self.blocks)
        for index, block in enumerate(self.blocks):
            if self.skip and index >= depth // 2:
                skip_linear = self.skip_linears[index - depth // 2]
                skip_norm = self.skip_norms[index - depth // 2]
                cat = torch.cat([x, skips.pop()], dim=-1)
                cat = skip_norm(cat)
                x = skip_linear(cat, x)
            x = block(x, c)
            if self.skip and index < depth // 2:
                skips.append(x)
        return self.unpatchify(self.final_layer(x, c))


class OfficialLatteSkip(nn.Module):
    """Latte_skip (skip=True) or Latte (skip=False) of the official Skip-DiT code
    (class-to-video), tiny, unconditional (extras 1): blocks alternate spatial /
    temporal, the pairs form the U, skip_norms / skip_linears have depth//4 entries;
    the block index of a merge is (i - depth // 2) // 2 (the original has 14 for
    depth 28)."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=8, num_heads=4,
                 num_frames=4, attention_mode="math", skip=True):
        super().__init__()
        self.out_channels = in_channels * 2
        self.skip = skip
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if skip:
            self.skip_norms = nn.ModuleList(FP32_Layernorm(2 * hidden_size, elementwise_affine=True, eps=1e-6)
                                            for _ in range(depth // 4))
            self.skip_linears = nn.ModuleList(ResidualLinearLatte(hidden_size) for _ in range(depth // 4))
            for n in self.skip_norms:
                nn.init.normal_(n.weight, 1.0, 0.2)
                nn.init.normal_(n.bias, 0.0, 0.2)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.temp_embed = nn.Parameter(0.1 * torch.randn(1, num_frames, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, LatteAttention, attention_mode=attention_mode)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t):
        b, f, ch, hh, ww = x.shape
        x = self.x_embedder(x.reshape(b * f, ch, hh, ww)) + self.pos_embed
        t = self.t_embedder(t)
        T = x.shape[1]
        t_spatial = t.repeat_interleave(f, dim=0)
        t_temp = t.repeat_interleave(T, dim=0)
        skips = []
        depth = len(self.blocks)
        for i in range(0, depth, 2):
            spatial_block, temp_block = self.blocks[i:i + 2]
            if self.skip and i >= depth // 2:
                skip_linear = self.skip_linears[(i - depth // 2) // 2]
                skip_norm = self.skip_norms[(i - depth // 2) // 2]
                cat = torch.cat([x, skips.pop()], dim=-1)
                cat = skip_norm(cat)
                x = skip_linear(cat)
            x = spatial_block(x, t_spatial)
            x = x.reshape(b, f, T, -1).transpose(1, 2).reshape(b * T, f, -1)  # (b f) t d -> (b t) f d
            if i == 0:
                x = x + self.temp_embed
            x = temp_block(x, t_temp)
            x = x.reshape(b, T, f, -1).transpose(1, 2).reshape(b * f, T, -1)  # (b t) f d -> (b f) t d
            if self.skip and i < depth // 2:
                skips.append(x)
        x = self.unpatchify(self.final_layer(x, t_spatial))
        return x.reshape(b, f, *x.shape[1:])


def dit_inputs(batch=2, size=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, classes, (batch,), generator=g))


def latte_inputs(batch=2, frames=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 4, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)
