"""diffusers specifics of skipdit_fast.patch (imported only for models that hold
diffusers modules). Imports the generic part (common.py) and is imported by the entry
points only when needed; nothing generic imports it.

- Attention: diffusers' `Attention` modules compute attention in a processor object.
  The processors skipdit_fast knows (AttnProcessor, AttnProcessor2_0,
  FusedAttnProcessor2_0 - DiT, PixArt, Latte - and HunyuanAttnProcessor2_0 /
  FusedHunyuanAttnProcessor2_0 - HunyuanDiT, with QK-norm and the rotary embedding on
  q, and on k for self-attention) are replaced by SkipditAttnProcessor /
  SkipditHunyuanAttnProcessor: the same projections, norms and rotary embedding (by
  diffusers' own apply_rotary_emb), on BSHD views, and ops.attention instead of SDPA.
  A call with an attention mask goes to the original processor (ops.attention has no
  mask; PixArt / Latte pipelines pass one to cross-attention): PatchReport.calls()
  counts them.
- HunyuanDiT's long skips: each HunyuanDiTBlock with a skip_linear merges
  cat([hidden, skip]) -> skip_norm (fp32 LayerNorm) -> skip_linear in its forward; the
  patched forward does the same with ops.skip_fuse (no concatenation in memory).
- Skip-Cache over HunyuanDiT2DModel: HunyuanSkipModel is the SkipCache engine's
  SkipModel over its blocks (blocks 0..P-1 push, the last P pop, P = the blocks with a
  skip_linear: 19 of 40), and the model's forward becomes embed -> cache.run -> head.

Each helper here mirrors one piece of diffusers code. Before using it on a module, the
code of the function it stands in for is fingerprinted (its AST without docstrings,
annotations and comments) and must match a fingerprint recorded in MIRRORED, each read
off the releases it names: code that differs (another release, a subclass, a local
change) is left alone (patch) or refused (Skip-Cache) with a message that says so,
never run with the wrong semantics. Every release from SUPPORTED[0] to SUPPORTED[1]
was fingerprinted (tools/diffusers_fingerprints.py; `make compat` runs it and the
tests at both ends); the one difference in that range is apply_rotary_emb, which takes
[B, S, H, D] (sequence_dim=1) from 0.35.0 on and [B, H, S, D] only before.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import textwrap

import diffusers
import torch
import torch.nn as nn

from .common import (_CACHE, _RECORD, ATTENTION, SKIP_MERGE, Change, _has_hooks, _set_forward,
                     attention_head_dim_reason)

# The first release with all four model classes patched (LatteTransformer3DModel came
# in 0.30.0) and the newest release; every release between was fingerprinted.
SUPPORTED = ("0.30.0", "0.42.1")

# name -> {fingerprint (fingerprint() below): variant}; the comment says which releases
# have that code. Functions are looked up where SOURCES says.
MIRRORED = {
    "AttnProcessor.__call__": {"163252e6b6139fcb": "mirrored"},               # 0.30.0-0.42.1
    "AttnProcessor2_0.__call__": {"de5b13d70ef535c3": "mirrored"},            # 0.30.0-0.42.1
    "FusedAttnProcessor2_0.__call__": {"fc988485cb8c2903": "mirrored"},       # 0.30.0-0.42.1
    "HunyuanAttnProcessor2_0.__call__": {"e3b6c2d3deeb2974": "mirrored"},     # 0.30.0-0.42.1
    "FusedHunyuanAttnProcessor2_0.__call__": {"1b7b8458bc5bc283": "mirrored"},  # 0.30.0-0.42.1
    "HunyuanDiTBlock.forward": {"f852d87fdc9bc90a": "mirrored"},              # 0.30.0-0.42.1
    "HunyuanDiT2DModel.forward": {"014daff031caa22b": "mirrored"},            # 0.30.0-0.42.1
    "apply_rotary_emb": {
        "6d290b424e048f86": "sequence_dim",  # 0.35.0-0.42.1: q / k as [B, S, H, D] with sequence_dim=1
        "84094b6a86bbd3b3": "bhsd",          # 0.30.0-0.34.0: [B, H, S, D] only
    },
}

# where each mirrored function lives: (module, class or None)
SOURCES = {
    "AttnProcessor": ("diffusers.models.attention_processor", "AttnProcessor"),
    "AttnProcessor2_0": ("diffusers.models.attention_processor", "AttnProcessor2_0"),
    "FusedAttnProcessor2_0": ("diffusers.models.attention_processor", "FusedAttnProcessor2_0"),
    "HunyuanAttnProcessor2_0": ("diffusers.models.attention_processor", "HunyuanAttnProcessor2_0"),
    "FusedHunyuanAttnProcessor2_0": ("diffusers.models.attention_processor", "FusedHunyuanAttnProcessor2_0"),
    "HunyuanDiTBlock": ("diffusers.models.transformers.hunyuan_transformer_2d", "HunyuanDiTBlock"),
    "HunyuanDiT2DModel": ("diffusers.models.transformers.hunyuan_transformer_2d", "HunyuanDiT2DModel"),
    "apply_rotary_emb": ("diffusers.models.embeddings", None),
}


def version() -> str:
    return diffusers.__version__


def _range() -> str:
    return f"diffusers {SUPPORTED[0]} to {SUPPORTED[1]}"


def installed(name: str):
    """The installed diffusers' function for a MIRRORED name."""
    owner, _, meth = name.partition(".")
    module, cls = SOURCES[owner]
    obj = importlib.import_module(module)
    return getattr(getattr(obj, cls), meth) if cls else getattr(obj, owner)


def fingerprint(fn) -> str | None:
    """sha256 (16 hex digits) of fn's source AST without its name, docstrings,
    annotations, comments or formatting; None when the source is not available."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    return fingerprint_source(src)


def fingerprint_source(src: str) -> str:
    """fingerprint() of one function given as source text (the function alone, any
    indentation): what tools/diffusers_fingerprints.py reads off release archives."""
    tree = ast.parse(textwrap.dedent(src))
    if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        tree.body[0].name = "_"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:16]


def variant(name: str, fn) -> str | None:
    """The MIRRORED variant fn's code is, None when it is none of them."""
    return MIRRORED[name].get(fingerprint(fn))


def _mirrors(name: str, fn) -> bool:
    return variant(name, fn) is not None


# ---------------------------------------------------------------------------------------
# attention processors

# processor -> (fused projections, softmax scale from attn.scale, rotary embedding)
PROCESSORS = {
    "AttnProcessor": (False, True, False),
    "AttnProcessor2_0": (False, False, False),
    "FusedAttnProcessor2_0": (True, False, False),
    "HunyuanAttnProcessor2_0": (False, False, True),
    "FusedHunyuanAttnProcessor2_0": (True, False, True),
}


def _processor_kinds() -> dict[str, tuple[str, bool, bool, bool]]:
    """fingerprint -> (name, fused projections, softmax scale from attn.scale, rotary embedding)"""
    return {fp: (name, *flags) for name, flags in PROCESSORS.items() for fp in MIRRORED[f"{name}.__call__"]}


def _rotary(x, emb, rope: str):
    """diffusers' own apply_rotary_emb on x [B, S, H, D] (a view); rope is its MIRRORED variant."""
    from diffusers.models.embeddings import apply_rotary_emb

    if rope == "sequence_dim":
        return apply_rotary_emb(x, emb, sequence_dim=1)
    # releases before 0.35 rotate [B, H, S, D] only: the same elementwise product on the
    # transposed view, transposed back (the op takes strided q / k)
    return apply_rotary_emb(x.transpose(1, 2), emb).transpose(1, 2)


def _attend(proc, attn, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
    """The processors' computation for calls without a mask, ops.attention for SDPA."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    B = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if proc.fused and encoder_hidden_states is None:
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = attn.to_q(hidden_states)
        if proc.fused:
            k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    H = attn.heads
    dh = k.shape[-1] // H
    q, k, v = q.view(B, -1, H, dh), k.view(B, -1, H, dh), v.view(B, -1, H, dh)  # BSHD views
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if image_rotary_emb is not None:
        q = _rotary(q, image_rotary_emb, proc.rope)
        if not attn.is_cross_attention:
            k = _rotary(k, image_rotary_emb, proc.rope)
    o = proc.runner.attention(q, k, v, attn.scale if proc.attn_scale else None)
    hidden_states = o.reshape(B, -1, H * dh).to(q.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class SkipditAttnProcessor:
    """A diffusers attention processor that runs skipdit_fast.ops.attention; stands in
    for AttnProcessor / AttnProcessor2_0 / FusedAttnProcessor2_0 (`original`), which
    still serves calls with an attention mask."""

    def __init__(self, original, runner, *, fused: bool, attn_scale: bool, rope: str | None = None):
        self.original, self.runner = original, runner
        self.fused, self.attn_scale, self.rope = fused, attn_scale, rope
        self.served = self.delegated = 0

    def _count(self, served: bool) -> None:
        if not torch.compiler.is_compiling():
            if served:
                self.served += 1
            else:
                self.delegated += 1

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            self._count(False)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self._count(True)
        return _attend(self, attn, hidden_states, encoder_hidden_states, temb, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(for {type(self.original).__name__}, backend={self.runner.backend!r})"


class SkipditHunyuanAttnProcessor(SkipditAttnProcessor):
    """Stands in for HunyuanAttnProcessor2_0 / FusedHunyuanAttnProcessor2_0: QK-norm,
    then the rotary embedding on q (and on k for self-attention), then ops.attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            self._count(False)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)
        self._count(True)
        return _attend(self, attn, hidden_states, encoder_hidden_states, temb, image_rotary_emb)


def _qk_norm_ok(norm, dh: int) -> bool:
    if norm is None:
        return True
    from diffusers.models import normalization as dn

    known = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None), getattr(dn, "RMSNorm", None),
                              getattr(dn, "LpNorm", None)) if c is not None)
    if not isinstance(norm, known):
        return False
    shape = getattr(norm, "normalized_shape", getattr(norm, "dim", None))
    if isinstance(shape, int) and shape == -1:  # LpNorm over the last dim
        return True
    return shape is not None and tuple(shape) == (dh,)


def _attention_module(name, attn, runner, report, pending) -> None:
    proc = attn.processor
    kinds = _processor_kinds()
    kind = kinds.get(fingerprint(type(proc).__call__))

    def skip(reason):
        report.leave(name, ATTENTION, reason)

    if kind is None:
        known = ", ".join(PROCESSORS)
        pname = type(proc).__name__
        if pname in PROCESSORS:
            skip(f"processor {pname} of diffusers {version()} differs from the code skipdit_fast mirrors "
                 f"({pname}.__call__ of {_range()})")
        else:
            skip(f"processor {pname}: not one skipdit_fast stands in for ({known})")
        return
    pname, fused, attn_scale, rope = kind
    if getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim:
        return skip("grouped k/v heads (kv_heads): the mirrored processors do not serve them")
    if fused and not hasattr(attn, "to_qkv" if not attn.is_cross_attention else "to_kv"):
        return skip(f"{pname} without fused projections")
    dh = attn.inner_dim // attn.heads
    why = attention_head_dim_reason(dh)
    if why:
        return skip(why)
    if not (_qk_norm_ok(attn.norm_q, dh) and _qk_norm_ok(attn.norm_k, dh)):
        return skip(f"QK-norm {type(attn.norm_q).__name__} is not a per-head LayerNorm / RMSNorm / LpNorm")
    rope_variant = None
    if rope:
        rope_variant = variant("apply_rotary_emb", installed("apply_rotary_emb"))
        if rope_variant is None:
            return skip(f"apply_rotary_emb of diffusers {version()} differs from the code skipdit_fast mirrors "
                        f"({_range()})")
    cls = SkipditHunyuanAttnProcessor if rope else SkipditAttnProcessor
    ours = cls(proc, runner, fused=fused, attn_scale=attn_scale, rope=rope_variant)
    pending[attn] = (name, ours)
    p = attn.to_out[0].weight if attn.to_out is not None else next(attn.parameters())
    detail = "cross" if attn.is_cross_attention else "self"
    if rope:
        detail += ", rotary on q" + ("" if attn.is_cross_attention else " and k")
    if attn.norm_q is not None:
        detail += ", qk-norm"
    if fused:
        detail += ", fused projections"
    report.changed.append(Change(name, ATTENTION, "attention", runner.describe("attention", p.device, p.dtype, (dh,)),
                                 f"diffusers processor {pname} -> {cls.__name__}", detail))
    report._processors[name] = ours


# ---------------------------------------------------------------------------------------
# HunyuanDiT blocks: the long-skip merge

def _hunyuan_block_forward(self, hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None,
                           skip=None):
    """HunyuanDiTBlock.forward (diffusers 0.30.0-0.42.1) with the long-skip merge on ops.skip_fuse."""
    if self.skip_linear is not None:
        n, lin = self.skip_norm, self.skip_linear
        x = hidden_states if hidden_states.stride(-1) == 1 else hidden_states.contiguous()
        s = skip if skip.stride(-1) == 1 else skip.contiguous()
        hidden_states = self.__dict__[_RECORD]["runner"].skip_fuse(x, s, n.weight, n.bias, lin.weight, lin.bias, n.eps)
    hidden_states = hidden_states + self.attn1(self.norm1(hidden_states, temb), image_rotary_emb=image_rotary_emb)
    hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                                               image_rotary_emb=image_rotary_emb)
    return hidden_states + self.ff(self.norm3(hidden_states))


def _hunyuan_block(name, m, runner, report) -> bool:
    lin, norm = getattr(m, "skip_linear", None), getattr(m, "skip_norm", None)
    if not (isinstance(lin, nn.Linear) and isinstance(norm, nn.LayerNorm)):
        return False

    def skip(reason):
        return report.leave(name, SKIP_MERGE, reason)

    if not _mirrors("HunyuanDiTBlock.forward", type(m).forward):
        return skip(f"{type(m).__name__}.forward of diffusers {version()} differs from the "
                    f"HunyuanDiTBlock.forward skipdit_fast mirrors ({_range()})")
    if "forward" in m.__dict__:
        return skip("its forward was already replaced (another library's hooks)")
    why = _has_hooks(norm) or _has_hooks(lin)
    if why:
        return skip(f"skip_norm / skip_linear: {why}")
    if norm.weight is None or norm.bias is None:
        return skip("skip_norm without affine parameters")
    D = lin.out_features
    if lin.in_features != 2 * D or tuple(norm.normalized_shape) != (2 * D,):
        return skip(f"skip_linear {lin.in_features}->{lin.out_features} is not a 2D -> D merge")
    _set_forward(m, _hunyuan_block_forward, runner=runner)
    report.changed.append(Change(name, SKIP_MERGE, "skip_fuse",
                                 runner.describe("skip_fuse", lin.weight.device, lin.weight.dtype, (D, D)),
                                 "HunyuanDiTBlock: cat -> skip_norm -> skip_linear -> ops.skip_fuse", f"D={D}"))
    return True


# ---------------------------------------------------------------------------------------
# the patch walk's diffusers part

def _attention_module_mixin():
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:
        return None
    return AttentionModuleMixin


class Walk:
    """The diffusers part of one patch() walk: handle() each module, then finish()."""

    def __init__(self, runner, report, attention: bool, skip_fuse: bool):
        self.runner, self.report = runner, report
        self.attention, self.skip_fuse = attention, skip_fuse
        self.pending: dict[nn.Module, tuple[str, SkipditAttnProcessor]] = {}

    def handle(self, name: str, m: nn.Module) -> bool:
        """Patches m when it is a diffusers attention module or HunyuanDiT block; True
        when m was a diffusers module of those kinds (changed or left alone)."""
        from diffusers.models.attention_processor import Attention

        if isinstance(m, Attention):
            if self.attention:
                _attention_module(name, m, self.runner, self.report, self.pending)
            return True
        mixin = _attention_module_mixin()
        if mixin is not None and isinstance(m, mixin):
            if self.attention:
                self.report.leave(
                    name, ATTENTION, f"diffusers {type(m).__name__} computes attention through diffusers' "
                    "attention dispatcher: not patched")
            return True
        return self.skip_fuse and _hunyuan_block(name, m, self.runner, self.report)

    def finish(self, root: nn.Module) -> None:
        """Sets the chosen processors: set_attn_processor on each outermost model with
        diffusers' processor API (with every processor, the others unchanged), and
        set_processor on attention modules outside such a model."""
        pending = self.pending
        if not pending:
            return
        # diffusers' processor API: from AttentionMixin since 0.35, defined on each model
        # class (HunyuanDiT2DModel, PixArtTransformer2DModel, ...) before
        mixins = [m for m in root.modules()
                  if isinstance(getattr(type(m), "attn_processors", None), property) and hasattr(m, "set_attn_processor")]
        inner = {id(c) for m in mixins for c in m.modules() if c is not m}
        done = set()
        for model in (m for m in mixins if id(m) not in inner):
            procs = dict(model.attn_processors)
            mine = {}
            for key in procs:
                attn = model.get_submodule(key[: -len(".processor")])
                if attn in pending:
                    mine[attn] = attn.processor
                    procs[key] = pending[attn][1]
            model.set_attn_processor(procs)
            for attn, original in mine.items():
                attn.__dict__[_RECORD] = {"kind": "processor", "original": original, "ours": pending[attn][1]}
            done.update(mine)
        for attn, (name, ours) in pending.items():
            if attn not in done:
                original = attn.processor
                attn.set_processor(ours)
                attn.__dict__[_RECORD] = {"kind": "processor", "original": original, "ours": ours}
        self.report.notes.append("diffusers attention calls with an attention mask run the original processor "
                                 "(PatchReport.calls() counts them)")


# ---------------------------------------------------------------------------------------
# Skip-Cache over HunyuanDiT2DModel

class _HunyuanState:
    __slots__ = ("temb", "text", "rope", "skips", "controlnet")

    def __init__(self, temb, text, rope, controlnet):
        self.temb, self.text, self.rope, self.controlnet = temb, text, rope, controlnet
        self.skips: list[torch.Tensor] = []


class HunyuanSkipModel:
    """cache.SkipModel over the blocks of a HunyuanDiT2DModel. The pop blocks are those
    with a skip_linear (the last P); the first P push (the model's own rule pushes
    blocks 0..num_layers//2-2, which must be the same P); block depth-1-i pairs with
    block i; max_branch = P (19 of 40 layers: 19 and 20 neither push nor pop)."""

    def __init__(self, model: nn.Module):
        blocks = model.blocks
        L = len(blocks)
        pops = [i for i, b in enumerate(blocks) if getattr(b, "skip_linear", None) is not None]
        P = len(pops)
        if P == 0:
            raise ValueError(f"{type(model).__name__} has no block with a skip_linear: no long skips to cache over")
        if pops != list(range(L - P, L)):
            raise ValueError(f"the blocks with a skip_linear ({pops}) are not the last {P} of {L}")
        pushes = max(0, L // 2 - 1)
        if pushes != P:
            raise ValueError(f"{L} layers: the model pushes {pushes} skips but {P} blocks merge one "
                             "(its own forward cannot run; use an even num_layers)")
        self.model, self.depth, self.max_branch = model, L, P
        self.text_len = 0
        self._flops: dict[tuple, list[float]] = {}

    def run_blocks(self, h, start: int, stop: int, st: _HunyuanState):
        blocks = self.model.blocks
        first_pop = self.depth - self.max_branch
        for i in range(start, stop):
            if i >= first_pop:
                skip = st.skips.pop()
                if st.controlnet is not None:  # the model pops its controlnet list: the last sample first
                    skip = skip + st.controlnet[self.depth - 1 - i]
                h = blocks[i](h, temb=st.temb, encoder_hidden_states=st.text, image_rotary_emb=st.rope, skip=skip)
            else:
                h = blocks[i](h, temb=st.temb, encoder_hidden_states=st.text, image_rotary_emb=st.rope)
            if i < self.max_branch:
                st.skips.append(h)
        return h

    def block_flops(self, h) -> list[float]:
        """Estimated FLOPs of each block: 2 x multiply-adds of its Linear layers (on the
        image tokens, the text tokens for cross-attention k/v, one row for the
        adaptive-norm shift) and of the attention products."""
        B, T, D = h.shape
        L = self.text_len
        key = (B, T, D, L)
        if key not in self._flops:
            out = []
            for blk in self.model.blocks:
                f = 4.0 * B * T * T * D + 4.0 * B * T * L * D
                for n, lin in blk.named_modules():
                    if isinstance(lin, nn.Linear):
                        if n in ("attn2.to_k", "attn2.to_v", "attn2.to_kv"):
                            rows = L
                        else:
                            rows = 1 if n.startswith("norm1.") else T
                        f += 2.0 * B * rows * lin.in_features * lin.out_features
                out.append(f)
            self._flops[key] = out
        return self._flops[key]


def _hunyuan_cached_forward(self, hidden_states, timestep, encoder_hidden_states=None, text_embedding_mask=None,
                            encoder_hidden_states_t5=None, text_embedding_mask_t5=None, image_meta_size=None,
                            style=None, image_rotary_emb=None, controlnet_block_samples=None, return_dict=True):
    """HunyuanDiT2DModel.forward (diffusers 0.30.0-0.42.1) with its block loop run by the SkipCache."""
    hook = self.__dict__[_CACHE]
    adapter = hook.adapter
    height, width = hidden_states.shape[-2:]
    # PatchEmbed returns a transposed view that the native forward carries through every
    # residual add; the same values with a contiguous last dim, as the ops want them
    # (the adaptive check's cache_delta, the skip merges)
    h = self.pos_embed(hidden_states).contiguous()
    temb = self.time_extra_emb(timestep, encoder_hidden_states_t5, image_meta_size, style, hidden_dtype=timestep.dtype)
    B, S, _ = encoder_hidden_states_t5.shape
    t5 = self.text_embedder(encoder_hidden_states_t5.view(-1, encoder_hidden_states_t5.shape[-1])).view(B, S, -1)
    text = torch.cat([encoder_hidden_states, t5], dim=1)
    mask = torch.cat([text_embedding_mask, text_embedding_mask_t5], dim=-1).unsqueeze(2).bool()
    text = torch.where(mask, text, self.text_embedding_padding)
    if controlnet_block_samples is not None and len(controlnet_block_samples) != adapter.max_branch:
        raise ValueError("The number of controls is not equal to the number of skip connections.")
    adapter.text_len = text.shape[1]
    hook.before_step(timestep)
    h = hook.cache.run(adapter, h, _HunyuanState(temb, text, image_rotary_emb, controlnet_block_samples), timestep)
    h = self.proj_out(self.norm_out(h, temb.to(torch.float32)))
    p = self.pos_embed.patch_size
    gh, gw = height // p, width // p
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(h.shape[0], gh, gw, p, p, self.out_channels))
    out = h.reshape(h.shape[0], self.out_channels, gh * p, gw * p)
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=out)


def enable_cache(model: nn.Module, hook) -> None:
    """Installs the SkipCache-driven forward on a HunyuanDiT2DModel, or raises with the reason."""
    if not hasattr(model, "blocks") or not _mirrors("HunyuanDiT2DModel.forward", type(model).forward):
        if type(model).__name__ == "HunyuanDiT2DModel" or hasattr(model, "blocks"):
            raise ValueError(f"{type(model).__name__}.forward of diffusers {version()} differs from the "
                             "HunyuanDiT2DModel.forward that skipdit_fast's Skip-Cache mirrors "
                             f"({_range()}, verified release by release)")
        raise ValueError(f"enable_skip_cache: {type(model).__name__} is not a diffusers model skipdit_fast can "
                         "drive with Skip-Cache (HunyuanDiT2DModel)")
    if "forward" in model.__dict__:
        raise ValueError(f"{type(model).__name__}.forward was already replaced (another library's hooks)")
    adapter = HunyuanSkipModel(model)
    if hook.cache.branch > adapter.max_branch:
        raise ValueError(f"SkipCache branch {hook.cache.branch} too large for this model ({adapter.depth} layers, "
                         f"{adapter.max_branch} long skips: at most {adapter.max_branch})")
    hook.adapter = adapter
    model.__dict__[_CACHE] = hook
    model.__dict__["forward"] = functools.partial(_hunyuan_cached_forward, model)
