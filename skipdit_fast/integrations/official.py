"""patch() handlers for the layouts of the official DiT / Skip-DiT / Latte code (by
structure, not class name): fused-qkv self-attention (timm layout) and the long-skip
merges skip_linears[j](skip_norms[j](cat([x, skip]))); and skipdit_fast's own
models, which already run on the ops. Every replacement is first checked side by side
against the original on random float64 weights and inputs (the probe)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Callable

import torch
import torch.nn as nn

from .common import (ATTENTION, SKIP_MERGE, _RECORD, Change, Runner, _float_param, _has_hooks,
                     _set_forward, _undo, attention_head_dim_reason)

_SCALARS = (bool, int, float, str, type(None))


def _attr_key(v):
    """A hashable stand-in for an attribute value: scalars (and tuples / lists of them)
    by value, anything else (a tensor, a callable, a config object) by identity, so
    that two modules share a probe verdict only when nothing their forward may read
    differs."""
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(e, _SCALARS) for e in v):
        return (type(v).__name__, tuple(v))
    return ("id", id(v))


def _attrs(m: nn.Module) -> tuple:
    return tuple(sorted((k, _attr_key(v)) for k, v in vars(m).items() if not k.startswith("_")))


def _layout_key(m: nn.Module) -> tuple:
    """What a probe verdict may be shared by: the class, every public attribute (see
    _attr_key), parameter and buffer shapes, and the same for every submodule."""
    return (type(m), tuple((n, type(c), _attrs(c)) for n, c in m.named_modules()),
            tuple((n, tuple(p.shape)) for n, p in m.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()))


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
        return report.leave(name, ATTENTION, reason)

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


def _is_list_item(node, attr: str) -> bool:
    """node is `self.<attr>[...]`."""
    return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == attr and isinstance(node.value.value, ast.Name) and node.value.value.id == "self")


def _merge_dataflow_reason(fn) -> tuple[int, str | None]:
    """(number of skip_norms calls in method fn, None when every result of a skip_norms[j] call goes
    only into a skip_linears[j] call as its first argument (directly, or through a local
    name whose every read is such an argument or the norm call's own input): the
    patched norm passes its input through, so no other code may read its output; else
    the reason)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    norm_names, lin_names = set(), set()
    for node in ast.walk(tree):  # local aliases: skip_norm = self.skip_norms[i]
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if _is_list_item(node.value, "skip_norms"):
                norm_names.add(node.targets[0].id)
            elif _is_list_item(node.value, "skip_linears"):
                lin_names.add(node.targets[0].id)

    def is_call(node, attr, names):
        return isinstance(node, ast.Call) and (_is_list_item(node.func, attr) or (
            isinstance(node.func, ast.Name) and node.func.id in names))

    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    norm_calls = [n for n in ast.walk(tree) if is_call(n, "skip_norms", norm_names)]
    for call in norm_calls:
        parent = parents.get(call)
        if is_call(parent, "skip_linears", lin_names) and parent.args and parent.args[0] is call:
            continue
        if not (isinstance(parent, ast.Assign) and len(parent.targets) == 1 and isinstance(parent.targets[0], ast.Name)):
            return len(norm_calls), (f"line {call.lineno}: the result of a skip_norms call is used other than as "
                                     "skip_linears' input")
        var = parent.targets[0].id
        own_inputs = {id(n) for arg in call.args for n in ast.walk(arg)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load) and id(n) not in own_inputs:
                use = parents.get(n)
                if not (is_call(use, "skip_linears", lin_names) and use.args and use.args[0] is n):
                    return len(norm_calls), (f"line {n.lineno}: `{var}` (the normalized concatenation) is read "
                                             "other than as skip_linears' input")
    return len(norm_calls), None


def _normalized_cat_reason(owner: nn.Module) -> str | None:
    """_merge_dataflow_reason over every method of owner's class (and its bases below
    nn.Module) that reads self.skip_norms; a reason also when no source can be read."""
    found = False
    for cls in type(owner).__mro__:
        if cls in (nn.Module, object):
            break
        for fname, fn in vars(cls).items():
            if not inspect.isfunction(fn):
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                return f"{cls.__name__}.{fname}: source not available to check how the merges are used"
            if "skip_norms" not in src:
                continue
            calls, why = _merge_dataflow_reason(fn)
            found = found or calls > 0
            if why:
                return f"{cls.__name__}.{fname}, {why}"
    if not found:
        return f"no method of {type(owner).__name__} applies skip_norms (the merges run elsewhere)"
    return None


def _official_skip_merges(name, m, runner, prober, report) -> bool:
    norms, lins = m._modules.get("skip_norms"), m._modules.get("skip_linears")
    if not (isinstance(norms, nn.ModuleList) and isinstance(lins, nn.ModuleList)):
        return False
    prefix = f"{name}." if name else ""
    if len(norms) != len(lins):
        report.leave(f"{prefix}skip_norms", SKIP_MERGE, f"{len(norms)} skip_norms but {len(lins)} skip_linears")
        return True
    why = _normalized_cat_reason(m)
    if why:
        for j in range(len(lins)):
            report.leave(f"{prefix}skip_linears.{j}", SKIP_MERGE,
                         f"the model may read the normalized concatenation beyond skip_linears: {why}")
        return True
    for j, (norm, wrap) in enumerate(zip(norms, lins)):
        where = f"{prefix}skip_linears.{j}"

        def skip(reason):
            report.leave(where, SKIP_MERGE, reason)

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
    from .. import models

    if isinstance(m, models.layers.Attention):
        report.leave(name, ATTENTION, "already runs skipdit_fast.ops.attention")
        return True
    if isinstance(m, (models.DiT, models.Latte)) and m.config.skip:
        prefix = f"{name}." if name else ""
        for j in range(len(m.skip_linears)):
            report.leave(f"{prefix}skip_linears.{j}", SKIP_MERGE,
                         f"already runs skipdit_fast.ops.skip_fuse ({type(m).__name__}.merge)")
        return True  # named_modules() still visits its blocks' Attention modules
    return False
