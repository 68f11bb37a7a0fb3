"""Swap skipdit_fast's ops and Skip-Cache into DiTs people already run, in one line.

    report = skipdit_fast.patch(model)          # attention + long-skip merges -> our ops
    print(report)                               # what changed, to which op and backend,
                                                # what was left alone and why
    skipdit_fast.unpatch(model)                 # the original behaviour, bit for bit

    cache = skipdit_fast.enable_skip_cache(pipe, interval=2, branch=4)
    image = pipe(prompt).images[0]
    print(cache.report())                       # steps full / cached, blocks run
    skipdit_fast.disable_skip_cache(pipe)

What patch() finds, by structure (never by class name alone):

- fused-qkv self-attention, the layout of timm's `Attention` that the official DiT,
  Skip-DiT and Latte code use: a module with a `qkv` Linear(D, 3D), a `proj` Linear,
  `num_heads` (or `heads`), and at most dropouts and per-head q/k norms besides. Its
  forward becomes qkv -> BSHD views -> ops.attention -> proj. Before a module is
  changed, its original forward and the replacement run side by side on random
  float64 weights and inputs (a probe, once per distinct layout); a module whose
  forward computes something else (a rotary embedding, a mask, a scale) is left alone.
- long-skip merges of the official Skip-DiT / Latte-skip layout: `skip_norms[j]` (a
  LayerNorm over 2D) and `skip_linears[j]` (a Linear(2D, D), or a module holding one
  as `.linear`) that the model applies as skip_linears[j](skip_norms[j](cat([x, skip]))).
  The norm becomes a pass-through and the linear runs ops.skip_fuse on the two halves
  of the concatenation (views, no copy); probed like the attention.
- diffusers models (diffusers is imported only when the model holds its modules):
  `Attention` modules get a processor that calls ops.attention (set_attn_processor on
  models with diffusers' AttentionMixin, set_processor elsewhere), and the blocks of
  HunyuanDiT2DModel merge their long skip with ops.skip_fuse; see diffusers.py.
- skipdit_fast.models.DiT and Latte already run on the ops: reported, left as they are.

Each change keeps the module's parameters, buffers and state-dict keys; unpatch()
puts the original processors / forwards back. An op runs on the backend patch() was
given ("auto": skipdit_fast's choice at call time, use_backend / set_backend /
SKIPDIT_FAST_BACKEND); an explicit backend that cannot serve the model's device and
dtype is an error at patch time, and at call time for inputs it cannot serve.

enable_skip_cache() drives a model's block loop with the SkipCache engine (skipdit_fast.cache):
skipdit_fast.models.DiT and Latte with skip=True, diffusers HunyuanDiT2DModel and pipelines
holding one as `.transformer` (HunyuanDiTPipeline, classifier-free guidance batched in
one forward). A sampling run starts when the pipeline sets its timesteps, or, for a
bare model, when a forward's timestep is above the previous one's.
"""

from __future__ import annotations

import torch.nn as nn

from ..ops import backends
from .common import (_RECORD, _ROOT, ATTENTION, SKIP_MERGE, Change, LeftAlone, PatchReport, Runner, _float_param,
                     _undo, _unwrap, uses_diffusers)
from .official import _fused_qkv_attention, _official_skip_merges, _ours, _Prober
from .skip_cache import disable_skip_cache, enable_skip_cache

__all__ = ["ATTENTION", "SKIP_MERGE", "Change", "LeftAlone", "PatchReport", "disable_skip_cache", "enable_skip_cache",
           "patch", "unpatch"]


def patch(model, backend: str = "auto", attention: bool = True, skip_fuse: bool = True) -> PatchReport:
    """Swaps skipdit_fast's ops into `model` (an nn.Module, or a pipeline: its
    .transformer) in place and returns a PatchReport.

    attention / skip_fuse: which kinds of module to change. backend: 'auto' (the
    ops' own choice at each call) or a backend name (BackendError now if it cannot
    serve the model's device and dtype). Patching a patched model again with the same
    arguments returns the first report and changes nothing; other arguments are an
    error (unpatch first)."""
    model = _unwrap(model)
    if backend not in backends.BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; choose from auto, {', '.join(backends.BACKENDS)}")
    args = (backend, bool(attention), bool(skip_fuse))
    prev = model.__dict__.get(_ROOT)
    if prev is not None:
        if prev[0] == args:
            return prev[1]
        raise RuntimeError(f"model already patched with backend={prev[0][0]!r}, attention={prev[0][1]}, "
                           f"skip_fuse={prev[0][2]}; call skipdit_fast.unpatch(model) before patching it "
                           "with other arguments")
    runner = Runner(backend)
    p = _float_param(model)
    if p is not None and backend != "auto" and p.device.type != "meta":
        for op in (("attention",) if attention else ()) + (("skip_fuse",) if skip_fuse else ()):
            impl = backends.registry()[op][backend]
            why = impl.reasons(backends.Query(op, p.device, p.dtype, False, _probe_features(op)))
            if why:
                raise backends.BackendError(f"backend {backend!r} cannot run {op} for this model "
                                            f"({p.device.type} {str(p.dtype).replace('torch.', '')}): {'; '.join(why)}")
    report = PatchReport(type(model).__name__, backend, args[1], args[2])
    prober = _Prober(runner)
    diff = None
    if uses_diffusers(model):
        from . import diffusers as diff

        report.notes.append(f"diffusers {diff.version()}")
    try:
        _walk(model, runner, prober, report, attention, skip_fuse, diff)
    except BaseException:
        _restore_all(model)
        raise
    if not report.changed and not report.left_alone:
        report.notes.append(f"{type(model).__name__} has no attention layer or long-skip merge that "
                            "skipdit_fast knows (fused-qkv attention, skip_norms/skip_linears, diffusers "
                            "Attention / HunyuanDiT blocks)")
    model.__dict__[_ROOT] = (args, report)
    return report


def _probe_features(op: str) -> tuple:
    return (64,) if op == "attention" else (64, 64)


def _walk(model, runner, prober, report, attention, skip_fuse, diff) -> None:
    from .. import models

    walk = diff.Walk(runner, report, attention, skip_fuse) if diff is not None else None
    done: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in done:
            continue
        if _RECORD in m.__dict__:  # patched by a patch() call on another module
            report.leave(name, "module", "already patched (by an earlier patch call)")
            continue
        if isinstance(m, (models.DiT, models.Latte)) and m.config.skip:
            done.update(id(c) for c in (*m.skip_norms, *m.skip_linears))
        if _ours(name, m, report):
            continue
        if walk is not None and walk.handle(name, m):
            continue
        if attention and _fused_qkv_attention(name, m, runner, prober, report):
            continue
        if skip_fuse and _official_skip_merges(name, m, runner, prober, report):
            done.update(id(c) for c in (*m.skip_norms, *m.skip_linears))
    if walk is not None:
        walk.finish(model)


def _restore_all(model: nn.Module) -> int:
    n = sum(_undo(m) for m in model.modules())
    model.__dict__.pop(_ROOT, None)
    return n


def unpatch(model) -> int:
    """Restores every module patch() changed inside `model` (original processors and
    forwards; parameters were never touched, so outputs are bitwise the original's).
    Returns the number of modules restored (0 for a model that was not patched)."""
    return _restore_all(_unwrap(model))
