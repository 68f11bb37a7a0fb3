"""skipdit_fast.tune(model, example_inputs): measure `auto` for every shape a model uses,
before it matters (before torch.compile traces it or a CUDA graph captures it).

    report = skipdit_fast.tune(pipe.transformer, (latents, t), {"encoder_hidden_states": ...})
    print(report)       # per op and shape: each candidate's time and error, the winner, why

It runs one forward of the model with backend `auto`; every op call on a shape bucket
not decided yet is measured (skipdit_fast.ops.autotune) and the decision is written to
the cache file; decisions made before are reused (force=True measures them again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import autotune, backends, defs
from .decisions import Decision


@dataclass
class TuneReport:
    model: str
    decisions: list[Decision] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "seconds": self.seconds,
                "decisions": [{**d.to_json(), "source": d.source, "vs_torch": d.vs_torch()} for d in self.decisions]}

    def rows(self) -> list[dict]:
        """One row per decision: what it is for, the winner, and each candidate."""
        out = []
        for d in self.decisions:
            od = defs.OPS[d.op]
            shape = " ".join(f"{n}={v}" for n, v in zip(od.feature_names, d.features))
            shape += (" " if shape else "") + " ".join(f"{n}<={v}" for n, v in zip(od.size_names, d.sizes))
            out.append({"op": d.op, "shape": shape, "dtype": d.dtype, "direction": "fwd+bwd" if d.grad else "fwd",
                        "backend": d.backend, "vs_torch": d.vs_torch(), "source": d.source, "tune_s": d.tune_s,
                        "candidates": d.results})
        return out

    def to_markdown(self) -> str:
        lines = [f"### autotune decisions: {self.model}", "",
                 "| op | shape | dtype | direction | chosen | vs torch | candidate | time | rel. error | "
                 "budget used | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows():
            for i, c in enumerate(r["candidates"]):
                head = ([r["op"], r["shape"], r["dtype"], r["direction"], f"**{r['backend']}**",
                         _ratio(r["vs_torch"])] if i == 0 else [""] * 6)
                lines.append("| " + " | ".join(head + [c.backend, _ms(c.ms), _num(c.rel_err), _num(c.budget),
                                                       c.verdict.replace("|", "/")]) + " |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        lines = [f"skipdit_fast.tune({self.model}): {len(self.decisions)} shape buckets, {self.seconds:.2f} s"]
        for r in self.rows():
            lines.append(f"  {r['op']} {r['direction']} {r['dtype']} {r['shape']}: {r['backend']} "
                         f"({_ratio(r['vs_torch'])} torch; {r['source']}"
                         + (f", measured in {r['tune_s']:.2f} s" if r["source"] == "measured" else "") + ")")
            for c in r["candidates"]:
                lines.append(f"      {c.backend:8s} {_ms(c.ms):>10s}  rel. error {_num(c.rel_err):>8s}  "
                             f"budget used {_num(c.budget):>7s}  {c.verdict}")
        if not self.decisions:
            lines.append("  no op call went through `auto` (an explicit backend, or no skipdit_fast op in this model)")
        return "\n".join(lines)


def _ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1000:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def tune(model, example_inputs=(), example_kwargs: dict | None = None, *, force: bool = False,
         grad: bool = False) -> TuneReport:
    """Runs model(*example_inputs, **example_kwargs) once with backend `auto` and returns
    what `auto` decided for every op call of it. example_inputs: a tuple of positional
    arguments or one tensor. grad=True runs the forward with gradients enabled, so that
    the training shapes (forward + backward) are measured; otherwise under no_grad.
    force=True measures again buckets decided before (also those in the cache file)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    name = type(getattr(model, "_orig_mod", model)).__name__
    if torch.compiler.is_compiling():
        raise RuntimeError("skipdit_fast.tune measures eagerly: call it outside torch.compile")
    recorded: list[Decision] = []
    rec_token = autotune.TUNER.recording.set(recorded)
    force_token = autotune.TUNER.forcing.set(set() if force else None)
    t0 = time.perf_counter()
    try:
        backends.forget()  # every call is decided (and recorded) afresh
        with backends.use_backend("auto"), torch.set_grad_enabled(grad):
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        autotune.TUNER.forcing.reset(force_token)
        autotune.TUNER.recording.reset(rec_token)
        backends.forget()
    return TuneReport(name, recorded, time.perf_counter() - t0)
