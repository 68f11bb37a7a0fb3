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
  HunyuanDiT2DModel merge their long skip with ops.skip_fuse; see _diffusers.py.
- skipdit_fast.models.DiT already runs on the ops: reported, left as it is.

Each change keeps the module's parameters, buffers and state-dict keys; unpatch()
puts the original processors / forwards back. An op runs on the backend patch() was
given ("auto": skipdit_fast's choice at call time, use_backend / set_backend /
SKIPDIT_FAST_BACKEND); an explicit backend that cannot serve the model's device and
dtype is an error at patch time, and at call time for inputs it cannot serve.

enable_skip_cache() drives a model's block loop with the SkipCache engine (cache.py):
skipdit_fast.models.DiT with skip=True, diffusers HunyuanDiT2DModel and pipelines
holding one as `.transformer` (HunyuanDiTPipeline, classifier-free guidance batched in
one forward). A sampling run starts when the pipeline sets its timesteps, or, for a
bare model, when a forward's timestep is above the previous one's.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from . import backends, ops
from .cache import SkipCache

__all__ = ["PatchReport", "Change", "LeftAlone", "patch", "unpatch", "enable_skip_cache", "disable_skip_cache"]

ATTENTION, SKIP_MERGE = "attention", "skip merge"
_RECORD = "_skipdit_patch"          # on each changed module: how to undo it
_ROOT = "_skipdit_patch_root"       # on the model patch() was called on: (args, report)
_CACHE = "_skipdit_cache"           # on a model with Skip-Cache enabled: _CacheHook


# ---------------------------------------------------------------------------------------
# the report

@dataclass(frozen=True)
class Change:
    """One module that patch() changed."""

    module: str      # qualified name in the patched model
    what: str        # "attention" or "skip merge"
    op: str          # the skipdit op it now calls: "attention" or "skip_fuse"
    backend: str     # the backend that runs it for the model's device and dtype now
    how: str         # what was swapped
    detail: str = ""


@dataclass(frozen=True)
class LeftAlone:
    """One module patch() looked at and did not change, with the reason."""

    module: str
    what: str
    reason: str


@dataclass
class PatchReport:
    """What patch() did to a model: `changed` and `left_alone` list the modules,
    `counts()` sums them, `to_dict()` gives the whole report as plain data."""

    model: str
    backend: str
    attention: bool
    skip_fuse: bool
    changed: list[Change] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _processors: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        """{"attention": changed attention modules, "skip merge": changed merges}."""
        out = {ATTENTION: 0, SKIP_MERGE: 0}
        for c in self.changed:
            out[c.what] = out.get(c.what, 0) + 1
        return out

    def calls(self) -> dict[str, tuple[int, int]]:
        """Per patched diffusers attention module: (calls served by the skipdit op,
        calls handed to the original processor because they carried an attention
        mask), counted in eager mode since patching."""
        return {name: (p.served, p.delegated) for name, p in self._processors.items()}

    def to_dict(self) -> dict:
        return {
            "model": self.model, "backend": self.backend, "attention": self.attention,
            "skip_fuse": self.skip_fuse, "counts": self.counts(),
            "changed": [asdict(c) for c in self.changed],
            "left_alone": [asdict(a) for a in self.left_alone], "notes": list(self.notes),
        }

    def __str__(self) -> str:
        head = f"skipdit_fast.patch({self.model}, backend={self.backend!r})"
        if not self.changed and not self.left_alone:
            lines = [f"{head}: nothing to patch (no attention layer or long-skip merge found)"]
            lines += [f"  note: {n}" for n in self.notes]
            return "\n".join(lines)
        c = self.counts()
        lines = [f"{head}: {c[ATTENTION]} attention modules and {c[SKIP_MERGE]} skip merges changed, "
                 f"{len(self.left_alone)} modules left alone"]
        groups: dict[tuple, list[Change]] = {}
        for ch in self.changed:
            groups.setdefault((ch.what, ch.op, ch.backend, ch.how), []).append(ch)
        for (what, op, backend, how), items in groups.items():
            lines.append(f"  {what} x{len(items)} -> ops.{op} [{backend}]: {how}")
            for ch in items[:8]:
                lines.append(f"      {ch.module}" + (f"  ({ch.detail})" if ch.detail else ""))
            if len(items) > 8:
                lines.append(f"      ... and {len(items) - 8} more")
        if self.left_alone:
            lines.append("  left alone:")
            for a in self.left_alone[:20]:
                lines.append(f"      {a.module} [{a.what}]: {a.reason}")
            if len(self.left_alone) > 20:
                lines.append(f"      ... and {len(self.left_alone) - 20} more (see .left_alone)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# running an op on the backend a patch asked for

_EXPLICIT: dict[tuple, backends.Impl] = {}


def _explicit(op: str, name: str, device, dtype, needs_grad: bool, features: tuple) -> backends.Impl:
    key = (op, name, device, dtype, needs_grad, features)
    impl = _EXPLICIT.get(key)
    if impl is None:
        if dtype not in backends._FLOAT:
            raise TypeError(f"{op}: inputs must be float16, bfloat16, float32 or float64, got {dtype}")
        impl = backends.registry()[op][name]
        why = impl.reasons(backends.Query(op, device, dtype, needs_grad, features))
        if why:
            raise backends.BackendError(
                f"backend {name!r} (given to skipdit_fast.patch) cannot run {op} on {device.type} "
                f"{str(dtype).replace('torch.', '')}{' with backward' if needs_grad else ''}: {'; '.join(why)}")
        _EXPLICIT[key] = impl
    return impl


class Runner:
    """The ops of one patch() call, on its backend ('auto' defers to ops.*)."""

    __slots__ = ("backend",)

    def __init__(self, backend: str):
        self.backend = backend

    def attention(self, q, k, v, scale=None):
        if self.backend == "auto":
            return ops.attention(q, k, v, scale)
        impl = _explicit("attention", self.backend, q.device, q.dtype, ops._needs_grad(q, k, v), (q.shape[-1],))
        return impl.fn(q, k, v, scale)

    def skip_fuse(self, x, skip, norm_weight, norm_bias, weight, bias=None, eps=1e-6):
        if self.backend == "auto":
            return ops.skip_fuse(x, skip, norm_weight, norm_bias, weight, bias, eps)
        impl = _explicit("skip_fuse", self.backend, x.device, x.dtype,
                         ops._needs_grad(x, skip, norm_weight, norm_bias, weight, bias),
                         (x.shape[-1], weight.shape[0]))
        return impl.fn(x, skip, norm_weight, norm_bias, weight, bias, eps)

    def describe(self, op: str, device, dtype, features: tuple) -> str:
        """The backend that serves op for these inputs now (inference), for the report.
        Also settles the choice for training (needs_grad) ahead of time: backend
        selection is not traceable by torch.compile(fullgraph=True) the first time a
        (device, dtype, shape) combination is seen, so patch() makes it seen."""
        if device.type == "meta":
            return f"{self.backend}, chosen per call"
        if self.backend == "auto":
            name = backends.pick(op, device, dtype, False, features).backend
            try:
                backends.pick(op, device, dtype, True, features)
            except backends.BackendError:  # inference-only inputs; training would say so
                pass
            return name
        _explicit(op, self.backend, device, dtype, False, features)
        try:
            _explicit(op, self.backend, device, dtype, True, features)
        except backends.BackendError:
            pass
        return self.backend

    def __repr__(self) -> str:
        return f"Runner({self.backend!r})"


# ---------------------------------------------------------------------------------------
# shared helpers for the handlers

def _float_param(m: nn.Module) -> torch.Tensor | None:
    for p in m.parameters():
        if p.is_floating_point():
            return p
    return None


def _has_hooks(m: nn.Module) -> str | None:
    if "forward" in m.__dict__ and _RECORD not in m.__dict__:
        return "its forward was already replaced (by another library's hooks, e.g. accelerate offloading)"
    if m._forward_pre_hooks or m._forward_hooks or getattr(m, "_backward_hooks", None):
        return "it has hooks (e.g. layerwise casting or offloading) that reading its weights directly would bypass"
    return None


def attention_head_dim_reason(dh: int) -> str | None:
    if dh % 8 != 0 or dh > 256:
        return f"head dim {dh}: ops.attention serves multiples of 8 up to 256"
    return None


def _set_forward(m: nn.Module, fn: Callable, **record) -> None:
    m.__dict__["forward"] = functools.partial(fn, m)  # pickles and deep-copies with m
    m.__dict__[_RECORD] = {"kind": "forward", **record}


def _scalar_attrs(m: nn.Module) -> tuple:
    return tuple(sorted((k, v) for k, v in vars(m).items()
                        if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))


def _layout_key(m: nn.Module) -> tuple:
    return (type(m), _scalar_attrs(m), tuple((n, tuple(p.shape)) for n, p in m.named_parameters()),
            tuple((n, type(c), _scalar_attrs(c)) for n, c in m.named_modules()))


def _random_state(m: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float64 CPU values for every parameter and floating buffer of m (other
    buffers copied to the CPU): the probe's weights."""
    out = {}
    for n, p in m.named_parameters():
        scale = 1.0 / max(1, p.shape[-1]) ** 0.5 if p.dim() >= 2 else 0.5
        base = 1.0 if p.dim() == 1 and n.endswith("weight") else 0.0
        out[n] = base + scale * torch.randn(tuple(p.shape), generator=gen, dtype=torch.float64)
    for n, b in m.named_buffers():
        if b.is_floating_point():
            out[n] = torch.randn(tuple(b.shape), generator=gen, dtype=torch.float64)
        elif b.device.type == "meta":
            raise RuntimeError(f"buffer {n} is on the meta device")
        else:
            out[n] = b.detach().cpu()
    return out


def _close(got: torch.Tensor, want: torch.Tensor) -> str | None:
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return f"the replacement returns {getattr(got, 'shape', type(got))}, the original {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    tol = 1e-5 * want.abs().max().item() + 1e-9
    return None if err <= tol else f"outputs differ by {err:.3g} (allowed {tol:.3g})"


class _Prober:
    """Runs an original forward and its replacement on random float64 weights and
    inputs on the CPU (the replacement's ops on the reference backend: the probe
    checks what is computed, not where); remembers the verdict per layout."""

    def __init__(self, runner: "Runner"):
        self.runner = runner
        self.verdicts: dict[tuple, str | None] = {}

    def check(self, m: nn.Module, run: Callable[[dict], torch.Tensor],
              install: Callable[[], None], uninstall: Callable[[], None]) -> str | None:
        """run(state) computes the output of m with the random state given to
        torch.func.functional_call; it runs before install() and after."""
        key = _layout_key(m)
        if key in self.verdicts:
            why = self.verdicts[key]
            if why is None:
                install()
            return why
        why = None
        backend, self.runner.backend = self.runner.backend, "reference"
        # dropout (proj_drop in train mode) would make the two runs differ at random
        drops = [d for d in m.modules() if isinstance(d, nn.modules.dropout._DropoutNd) and d.training]
        for d in drops:
            d.training = False
        try:
            state = _random_state(m, torch.Generator().manual_seed(1234))
            with torch.no_grad():
                want = run(state)
                install()
                try:
                    got = run(state)
                except Exception:
                    uninstall()
                    raise
            why = _close(got, want)
            if why is not None:
                uninstall()
                why = f"probe: the replacement does not reproduce this module's forward ({why})"
        except Exception as e:  # the original does not run on the probe: not our layout
            why = f"probe failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            self.runner.backend = backend
            for d in drops:
                d.training = True
        self.verdicts[key] = why
        return why


class _MergePair(nn.Module):
    """skip_linears[j](skip_norms[j](cat), [x]) as one module, for the probe."""

    def __init__(self, norm: nn.Module, lin: nn.Module, nargs: int):
        super().__init__()
        self.norm, self.lin, self.nargs = norm, lin, nargs

    def forward(self, cat, x):
        h = self.norm(cat)
        return self.lin(h, x) if self.nargs == 2 else self.lin(h)


def _call(m: nn.Module, state: dict, *args):
    return torch.func.functional_call(m, state, args)


# ---------------------------------------------------------------------------------------
# fused-qkv self-attention (timm layout: official DiT / Skip-DiT / Latte)

_QKV_CHILDREN = {"qkv", "proj", "attn_drop", "proj_drop", "q_norm", "k_norm", "norm"}


def _fused_qkv_forward(self, x, attn_mask=None):
    """qkv projection -> BSHD views -> ops.attention -> (norm) -> proj -> proj_drop."""
    rec = self.__dict__[_RECORD]
    if attn_mask is not None:  # masks are not served by the op: the original forward
        return rec["original"](self, x, attn_mask=attn_mask)
    B, N, _ = x.shape
    q, k, v = self.qkv(x).view(B, N, 3, rec["heads"], -1).unbind(2)
    if rec["qk_norm"]:
        q, k = self.q_norm(q), self.k_norm(k)
    o = rec["runner"].attention(q, k, v, rec["scale"]).reshape(B, N, -1)
    if rec["out_norm"]:
        o = self.norm(o)
    o = self.proj(o)
    drop = self._modules.get("proj_drop")
    return drop(o) if drop is not None else o


def _per_head_norm_ok(m: nn.Module | None, dh: int) -> bool:
    if m is None or isinstance(m, nn.Identity):
        return True
    shape = getattr(m, "normalized_shape", None)
    return isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) and tuple(shape) == (dh,)


def _fused_qkv_attention(name, m, runner, prober, report) -> bool:
    """Returns True when m is a fused-qkv attention candidate (changed or left alone)."""
    qkv, proj = m._modules.get("qkv"), m._modules.get("proj")
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return False

    def skip(reason):
        report.left_alone.append(LeftAlone(name, ATTENTION, reason))
        return True

    D = qkv.in_features
    if qkv.out_features != 3 * D:
        return skip(f"qkv is Linear({D}, {qkv.out_features}), not a fused q/k/v projection of width {D}")
    heads = getattr(m, "num_heads", getattr(m, "heads", None))
    if not isinstance(heads, int) or heads <= 0 or D % heads:
        return skip(f"no usable head count (num_heads / heads = {heads!r}) for width {D}")
    dh = D // heads
    why = attention_head_dim_reason(dh)
    if why:
        return skip(why)
    extra = sorted(set(m._modules) - _QKV_CHILDREN)
    if extra:
        return skip(f"submodules {extra} beyond a plain fused-qkv attention")
    drop = m._modules.get("attn_drop")
    if drop is not None and (not isinstance(drop, nn.Dropout) or drop.p > 0):
        return skip(f"attention dropout ({drop}): ops.attention has none")
    q_norm, k_norm, out_norm = (m._modules.get(n) for n in ("q_norm", "k_norm", "norm"))
    if not (_per_head_norm_ok(q_norm, dh) and _per_head_norm_ok(k_norm, dh)):
        return skip("q/k norms other than a per-head LayerNorm / RMSNorm")
    if (q_norm is None) != (k_norm is None):
        return skip("a q norm without a k norm (or the reverse)")
    params = [p for p in inspect.signature(m.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if [p.name for p in params][1:] not in ([], ["attn_mask"]) or not params:
        return skip(f"forward{inspect.signature(m.forward)} takes more than (x, attn_mask=None)")
    if "forward" in m.__dict__:
        return skip("its forward was already replaced (another library's hooks, e.g. accelerate offloading)")
    scale = getattr(m, "scale", None)
    record = dict(original=type(m).forward, runner=runner, heads=heads,
                  scale=float(scale) if isinstance(scale, (int, float)) else None,
                  qk_norm=q_norm is not None and not isinstance(q_norm, nn.Identity),
                  out_norm=out_norm is not None and not isinstance(out_norm, nn.Identity))
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    why = prober.check(m, lambda st: _call(m, st, x),
                       lambda: _set_forward(m, _fused_qkv_forward, **record), lambda: _undo(m))
    if why:
        return skip(why)
    p = _float_param(m)
    report.changed.append(Change(name, ATTENTION, "attention", runner.describe("attention", p.device, p.dtype, (dh,)),
                                 "fused-qkv forward (timm layout) -> BSHD views of qkv -> ops.attention",
                                 f"{heads} heads x {dh}" + (", qk-norm" if record["qk_norm"] else "")))
    return True


# ---------------------------------------------------------------------------------------
# official long-skip merges: skip_linears[j](skip_norms[j](cat([x, skip], -1)))

def _deferred_norm_forward(self, inputs, *args, **kwargs):
    """The merge's LayerNorm, folded into the skip_fuse of its skip_linear."""
    return inputs


def _fused_skip_linear_forward(self, cat, *args, **kwargs):
    rec = self.__dict__[_RECORD]
    norm, lin = rec["norm"], rec["linear"]
    D = cat.shape[-1] // 2
    return rec["runner"].skip_fuse(cat[..., :D], cat[..., D:], norm.weight, norm.bias, lin.weight, lin.bias, norm.eps)


def _official_skip_merges(name, m, runner, prober, report) -> bool:
    norms, lins = m._modules.get("skip_norms"), m._modules.get("skip_linears")
    if not (isinstance(norms, nn.ModuleList) and isinstance(lins, nn.ModuleList)):
        return False
    prefix = f"{name}." if name else ""
    if len(norms) != len(lins):
        report.left_alone.append(LeftAlone(f"{prefix}skip_norms", SKIP_MERGE,
                                           f"{len(norms)} skip_norms but {len(lins)} skip_linears"))
        return True
    for j, (norm, wrap) in enumerate(zip(norms, lins)):
        where = f"{prefix}skip_linears.{j}"

        def skip(reason):
            report.left_alone.append(LeftAlone(where, SKIP_MERGE, reason))

        if _RECORD in norm.__dict__ or _RECORD in wrap.__dict__:
            skip("already patched")
            continue
        lin = wrap if isinstance(wrap, nn.Linear) else wrap._modules.get("linear")
        if not isinstance(lin, nn.Linear):
            skip("neither a Linear nor a module holding one as .linear")
            continue
        w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
        eps = getattr(norm, "eps", None)
        if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.dim() == 1
                and b.shape == w.shape and isinstance(eps, float)):
            skip(f"skip_norms.{j} is not an affine LayerNorm (weight, bias, eps)")
            continue
        if lin.in_features != w.shape[0] or w.shape[0] % 2:
            skip(f"skip_norms.{j} normalizes {w.shape[0]} channels, skip_linears.{j} takes {lin.in_features}")
            continue
        why = next(filter(None, (_has_hooks(norm), _has_hooks(lin) if lin is not wrap else None,
                                 "its forward was already replaced" if "forward" in wrap.__dict__ else None)), None)
        if why:
            skip(why)
            continue
        D = w.shape[0] // 2
        nargs = sum(1 for p in inspect.signature(wrap.forward).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        if nargs not in (1, 2):
            skip(f"skip_linears.{j}.forward takes {nargs} arguments; the official layout takes (cat) or (cat, x)")
            continue
        g = torch.Generator().manual_seed(11)
        x, s = (torch.randn(2, 5, D, generator=g, dtype=torch.float64) for _ in range(2))
        cat = torch.cat([x, s], dim=-1)
        lin_name = "" if lin is wrap else "linear."
        pair = _MergePair(norm, wrap, nargs)

        def install(norm=norm, wrap=wrap, lin=lin):
            _set_forward(norm, _deferred_norm_forward, partner=wrap)
            _set_forward(wrap, _fused_skip_linear_forward, runner=runner, norm=norm, linear=lin)

        def uninstall(norm=norm, wrap=wrap):
            _undo(norm)
            _undo(wrap)

        why = prober.check(pair, lambda st, pair=pair, cat=cat, x=x: _call(pair, st, cat, x), install, uninstall)
        if why:
            skip(why)
            continue
        p = lin.weight
        report.changed.append(Change(
            where, SKIP_MERGE, "skip_fuse", runner.describe("skip_fuse", p.device, p.dtype, (D, lin.out_features)),
            f"skip_norms[j] -> pass-through, skip_linears[j]{'.linear' if lin_name else ''} -> ops.skip_fuse "
            "on the halves of the concatenation", f"D={D}"))
    return True


# ---------------------------------------------------------------------------------------
# skipdit_fast's own models

def _ours(name, m, report) -> bool:
    from . import models

    if isinstance(m, models.Attention):
        report.left_alone.append(LeftAlone(name, ATTENTION, "already runs skipdit_fast.ops.attention"))
        return True
    if isinstance(m, models.DiT) and m.config.skip:
        prefix = f"{name}." if name else ""
        for j in range(len(m.skip_linears)):
            report.left_alone.append(LeftAlone(f"{prefix}skip_linears.{j}", SKIP_MERGE,
                                               "already runs skipdit_fast.ops.skip_fuse (DiT.merge)"))
        return True  # named_modules() still visits its blocks' Attention modules
    return False


# ---------------------------------------------------------------------------------------
# patch / unpatch

def _unwrap(obj):
    """A pipeline's transformer, a compiled module's original."""
    if not isinstance(obj, nn.Module):
        inner = getattr(obj, "transformer", None)
        if isinstance(inner, nn.Module):
            obj = inner
        else:
            raise TypeError(f"expected a torch.nn.Module or a pipeline with a .transformer, got {type(obj).__name__}")
    return getattr(obj, "_orig_mod", obj)


def _uses_diffusers(model: nn.Module) -> bool:
    if "diffusers" not in sys.modules:  # a model holding diffusers modules imported it
        return False
    return any(type(m).__module__.startswith("diffusers.") for m in model.modules())


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
    if _uses_diffusers(model):
        from . import _diffusers as diff

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
    from . import models

    walk = diff.Walk(runner, report, attention, skip_fuse) if diff is not None else None
    done: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in done:
            continue
        if _RECORD in m.__dict__:  # patched by a patch() call on another module
            report.left_alone.append(LeftAlone(name, "module", "already patched (by an earlier patch call)"))
            continue
        if isinstance(m, models.DiT) and m.config.skip:
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


def _undo(m: nn.Module) -> bool:
    rec = m.__dict__.pop(_RECORD, None)
    if rec is None:
        return False
    if rec["kind"] == "forward":
        m.__dict__.pop("forward", None)
    elif rec["kind"] == "processor":
        if m.processor is rec["ours"]:  # not replaced by the user since
            m.set_processor(rec["original"])
    return True


def _restore_all(model: nn.Module) -> int:
    n = sum(_undo(m) for m in model.modules())
    model.__dict__.pop(_ROOT, None)
    return n


def unpatch(model) -> int:
    """Restores every module patch() changed inside `model` (original processors and
    forwards; parameters were never touched, so outputs are bitwise the original's).
    Returns the number of modules restored (0 for a model that was not patched)."""
    return _restore_all(_unwrap(model))


# ---------------------------------------------------------------------------------------
# Skip-Cache

class _CacheHook:
    """What enable_skip_cache() leaves on a model: its SkipCache and the run
    boundaries (a pipeline's set_timesteps, or a timestep above the previous one)."""

    def __init__(self, cache: SkipCache, auto_reset: bool, kind: str):
        self.cache, self.auto_reset, self.kind = cache, auto_reset, kind
        self.last_t: float | None = None
        self.scheduler = None

    def reset(self) -> None:
        self.cache.reset()
        self.last_t = None

    @torch._dynamo.disable
    def before_step(self, t) -> None:
        if isinstance(t, torch.Tensor):
            tv = float(t.reshape(-1)[0].item())
        else:
            tv = float(t)
        if self.auto_reset and self.last_t is not None and tv > self.last_t:
            self.cache.reset()
        self.last_t = tv
        self.cache.next_timestep(tv)


class _ResetOnSetTimesteps:
    """Instance-level scheduler.set_timesteps: the original, then a cache reset."""

    def __init__(self, scheduler, hook: _CacheHook):
        self.scheduler, self.hook = scheduler, hook

    def __call__(self, *args, **kwargs):
        out = type(self.scheduler).set_timesteps(self.scheduler, *args, **kwargs)
        self.hook.reset()
        return out


def _dit_cached_forward(self, x, t, y, cache=None):
    hook = self.__dict__[_CACHE]
    if cache is None:
        cache = hook.cache
        hook.before_step(t)
    return type(self).forward(self, x, t, y, cache=cache)


def enable_skip_cache(target, interval: int = 2, branch: int = 4, *, start: float = 1000, stop: float = 20,
                      threshold: float | None = None, cache: SkipCache | None = None,
                      auto_reset: bool = True) -> SkipCache:
    """Turns Skip-Cache on for a model with long skips and returns its SkipCache
    (read .report() after a run). target: skipdit_fast.models.DiT (skip=True), a
    diffusers HunyuanDiT2DModel, or a pipeline holding one as .transformer
    (HunyuanDiTPipeline; its classifier-free guidance runs both halves in one
    forward, so each half keeps its own cached features). interval / branch / start /
    stop / threshold: SkipCache's arguments (or pass a ready `cache`). auto_reset: a
    forward whose timestep is above the previous one starts a new sampling run (a
    pipeline's set_timesteps always does). Enabling again replaces the cache."""
    pipe = None if isinstance(target, nn.Module) else target
    model = _unwrap(target)
    if cache is None:
        cache = SkipCache(interval, branch, start, stop, threshold=threshold)
    if _CACHE in model.__dict__:
        disable_skip_cache(target)
    from . import models

    if isinstance(model, models.DiT):
        if not model.config.skip:
            raise ValueError("Skip-Cache needs long skips: this DiT has none (a '-skip' model has)")
        if cache.branch > model.depth // 2:
            raise ValueError(f"SkipCache branch {cache.branch} too large for this model "
                             f"(depth {model.depth}: at most {model.depth // 2})")
        hook = _CacheHook(cache, auto_reset, "DiT")
        model.__dict__[_CACHE] = hook
        model.__dict__["forward"] = functools.partial(_dit_cached_forward, model)
    elif _uses_diffusers(model):
        from . import _diffusers as diff

        hook = _CacheHook(cache, auto_reset, type(model).__name__)
        diff.enable_cache(model, hook)  # raises with the reason when it cannot
    else:
        raise ValueError(
            f"enable_skip_cache: {type(model).__name__} is not a model whose block loop skipdit_fast can "
            "drive (skipdit_fast.models.DiT with skip=True, diffusers HunyuanDiT2DModel or a pipeline "
            "holding one as .transformer)")
    sched = getattr(pipe, "scheduler", None) if pipe is not None else None
    if sched is not None and callable(getattr(sched, "set_timesteps", None)) and "set_timesteps" not in vars(sched):
        sched.__dict__["set_timesteps"] = _ResetOnSetTimesteps(sched, hook)
        hook.scheduler = sched
    return cache


def disable_skip_cache(target) -> SkipCache | None:
    """Turns Skip-Cache off again (the model's own forward back); returns the cache
    that was enabled (its last report stays readable), or None if none was."""
    model = _unwrap(target)
    hook = model.__dict__.pop(_CACHE, None)
    if hook is None:
        return None
    model.__dict__.pop("forward", None)
    sched = hook.scheduler
    if sched is not None and isinstance(vars(sched).get("set_timesteps"), _ResetOnSetTimesteps):
        del sched.__dict__["set_timesteps"]
    return hook.cache
