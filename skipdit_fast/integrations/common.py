"""What every patch handler shares: the report (PatchReport, Change, LeftAlone), the
records left on changed modules and how to undo them, the Runner that calls the ops
on the backend patch() was given, and small module helpers. Imports only the op
layer; the handlers (official.py, diffusers.py) and the entry points import it."""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import ops
from ..ops import autocast as _autocast
from ..ops import autotune, backends

ATTENTION, SKIP_MERGE = "attention", "skip merge"
_RECORD = "_skipdit_patch"          # on each changed module: how to undo it
_ROOT = "_skipdit_patch_root"       # on the model patch() was called on: (args, report)
_CACHE = "_skipdit_cache"           # on a model with Skip-Cache enabled: _CacheHook


# ---------------------------------------------------------------------------------------
# the report

class Chosen(str):
    """Change.backend: the backend's name (a plain str to compare and print) that also
    carries the query patch() made for the module (op, device, dtype, widths), so that
    the report can list what `auto` measured for it later."""

    query: tuple = ()

    def __new__(cls, name: str, query: tuple = ()):
        s = super().__new__(cls, name)
        s.query = query
        return s

    def __reduce__(self):
        return Chosen, (str(self), self.query)


@dataclass(frozen=True)
class Change:
    """One module that patch() changed."""

    module: str      # qualified name in the patched model
    what: str        # "attention" or "skip merge"
    op: str          # the skipdit op it now calls: "attention" or "skip_fuse"
    backend: str     # the backend that runs it for the model's device and dtype before any
                     # measuring (`auto`: its static order; PatchReport.auto_choices: measured)
    how: str         # what was swapped
    detail: str = ""

    def auto_choices(self) -> list[dict]:
        """What `auto` measured for this module's op, device, dtype and widths (every
        shape bucket and direction): the backend chosen and its ratio vs torch."""
        query = getattr(self.backend, "query", ())
        if not query:
            return []
        op, device, dtype, features = query
        out = []
        for d in autotune.TUNER.decisions(device):
            if (d.op, d.dtype, d.features) == (op, str(dtype).replace("torch.", ""), tuple(features)):
                out.append({"sizes": d.sizes, "direction": "fwd+bwd" if d.grad else "fwd", "backend": d.backend,
                            "vs_torch": d.vs_torch(), "source": d.source})
        return out


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

    def leave(self, module: str, what: str, reason: str) -> bool:
        """Records a module left alone; True, so that a handler can `return report.leave(...)`."""
        self.left_alone.append(LeftAlone(module, what, reason))
        return True

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

    def auto_choices(self) -> dict[str, list[dict]]:
        """Per changed module that runs `auto`: what was measured for it so far (filled
        by its first calls, or ahead of them by skipdit_fast.tune(model, inputs))."""
        if self.backend != "auto":
            return {}
        return {c.module: c.auto_choices() for c in self.changed}

    def to_dict(self) -> dict:
        return {
            "model": self.model, "backend": self.backend, "attention": self.attention,
            "skip_fuse": self.skip_fuse, "counts": self.counts(),
            "changed": [{**asdict(c), "backend": str(c.backend), "auto": c.auto_choices()} for c in self.changed],
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
                lines.append(f"      {ch.module}" + (f"  ({ch.detail})" if ch.detail else "")
                             + (_measured(ch.auto_choices()) if self.backend == "auto" else ""))
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


def _measured(choices: list[dict]) -> str:
    if not choices:
        return ""
    parts = [f"{c['backend']} {'-' if c['vs_torch'] is None else format(c['vs_torch'], '.2f')}x torch "
             f"({c['direction']}, sizes <= {'x'.join(map(str, c['sizes']))})" for c in choices[:4]]
    more = f", and {len(choices) - 4} more" if len(choices) > 4 else ""
    return "  auto measured: " + "; ".join(parts) + more


# ---------------------------------------------------------------------------------------
# running an op on the backend a patch asked for

class Runner:
    """The ops of one patch() call, on its backend ('auto': skipdit_fast's choice at
    each call, as the ops themselves make it)."""

    __slots__ = ("backend",)

    def __init__(self, backend: str):
        self.backend = backend

    def _pick(self, op, device, dtype, needs_grad, features):
        try:
            return backends.pick(op, device, dtype, needs_grad, features, backend=self.backend)
        except backends.BackendError as e:
            raise backends.BackendError(f"{e} (backend {self.backend!r} was given to skipdit_fast.patch)") from None

    def attention(self, q, k, v, scale=None):
        if self.backend == "auto":
            return ops.attention(q, k, v, scale)
        dtype = _autocast.target(q)  # under torch.autocast: as SDPA there (ops/autocast.py)
        if dtype is not None:
            with _autocast.disabled(q):
                return self.attention(*_autocast.attention_args(dtype, q, k, v, scale))
        impl = self._pick("attention", q.device, q.dtype, ops._needs_grad(q, k, v), (q.shape[-1],))
        return impl.fn(q, k, v, scale)

    def skip_fuse(self, x, skip, norm_weight, norm_bias, weight, bias=None, eps=1e-6):
        if self.backend == "auto":
            return ops.skip_fuse(x, skip, norm_weight, norm_bias, weight, bias, eps)
        dtype = _autocast.target(x)  # under torch.autocast: as cat + LayerNorm + linear there
        if dtype is not None:
            with _autocast.disabled(x):
                return self.skip_fuse(*_autocast.skip_fuse_args(dtype, x, skip, norm_weight, norm_bias, weight,
                                                                bias, eps))
        impl = self._pick("skip_fuse", x.device, x.dtype, ops._needs_grad(x, skip, norm_weight, norm_bias, weight, bias),
                          (x.shape[-1], weight.shape[0]))
        return impl.fn(x, skip, norm_weight, norm_bias, weight, bias, eps)

    def describe(self, op: str, device, dtype, features: tuple) -> str:
        """The backend that serves op for these inputs (inference) before anything is
        measured, for the report (an explicit backend is checked here: BackendError
        when it cannot serve them); its query travels with it (Chosen) so that the report
        can show what `auto` measures for the module later."""
        if device.type == "meta":
            return f"{self.backend}, chosen per call"
        name = self._pick(op, device, dtype, False, features).backend
        return Chosen(name, (op, device, dtype, tuple(features)))

    def __repr__(self) -> str:
        return f"Runner({self.backend!r})"


# ---------------------------------------------------------------------------------------
# module helpers

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


def _unwrap(obj):
    """A pipeline's transformer, a compiled module's original."""
    if not isinstance(obj, nn.Module):
        inner = getattr(obj, "transformer", None)
        if isinstance(inner, nn.Module):
            obj = inner
        else:
            raise TypeError(f"expected a torch.nn.Module or a pipeline with a .transformer, got {type(obj).__name__}")
    return getattr(obj, "_orig_mod", obj)


def uses_diffusers(model: nn.Module) -> bool:
    if "diffusers" not in sys.modules:  # a model holding diffusers modules imported it
        return False
    return any(type(m).__module__.startswith("diffusers.") for m in model.modules())


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
