"""`auto`, measured: the fastest backend that is correct on this device, for this shape.

On the first `auto` call of an op for a shape bucket (skipdit_fast.ops.backends builds
the Query: op, device, dtype, backward or not, the widths, the sizes rounded up to
powers of two, and the CPU thread count), the Tuner

1. runs every candidate backend that serves the inputs (defs.OpDef.static_order; the
   `torch` backend is always one) once on the call's own inputs: its warm-up (Triton
   compiles there) and the output that is checked;
2. checks that output, on a bounded slice of the inputs (reference.*_subproblem), against
   the fp64 reference with the DESIGN.md budget: error <= 2 x the error of the
   reference run in the same dtype + TOL[dtype] x max|truth|; for a call that needs
   gradients, each gradient too (on the slice, with a fixed random grad_out);
3. times the candidates that passed, round-robin (CUDA events on a GPU, perf_counter on
   the CPU), a few rounds within a small budget (TIME_BUDGET_S); a call that needs
   gradients is timed forward + backward;
4. chooses the fastest of them. A candidate that raised, is out of budget or is not
   faster than torch loses to torch. The decision (every candidate's time, error and
   verdict) is kept in memory and in the device's cache file (decisions.DecisionFile).

No timing happens inside a torch.compile trace, a CUDA-graph capture, a torch.jit trace,
or on inputs that are not real tensors (meta, fake, functorch-wrapped): backends then
reads a decision made before (the cache) or takes the static order, and does not keep
that choice as a measured one. SKIPDIT_FAST_AUTOTUNE=0 turns measuring off (the static
order everywhere). Measuring never touches the global RNG (its random gradients come
from a private generator).
"""

from __future__ import annotations

import contextvars
import math
import os
import statistics
import threading
import time
from typing import Any, Callable

import torch

from . import defs
from .decisions import Decision, DecisionFile, Result, device_name, dtype_name, record_key

# DESIGN.md section 4: atol of the budget, relative to the largest |truth| of each tensor
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# timing budget per decision (all candidates together), and the rounds it buys
TIME_BUDGET_S = {"cuda": 0.05, "cpu": 0.3}
MIN_ROUNDS, MAX_ROUNDS = 5, 40
MIN_SAMPLE_S = {"cuda": 1e-4, "cpu": 5e-4}   # calls batched so that one sample takes at least this

Timer = Callable[[dict[str, Callable[[], Any]], torch.device], dict[str, float]]


def enabled() -> bool:
    """SKIPDIT_FAST_AUTOTUNE=0 (or false / off / no) turns measuring off."""
    return os.environ.get("SKIPDIT_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def unmeasurable(device: torch.device, args) -> str | None:
    """Why the call with these inputs cannot be timed now (None: it can)."""
    if args is None:
        return "no inputs to measure on"
    if torch.jit.is_tracing():
        return "inside a torch.jit trace"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "inside a CUDA-graph capture"
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in (torch.Tensor, torch.nn.Parameter)
                                            or a.device.type == "meta" or wrapped(a)):
            return "inputs are not plain tensors (meta, fake, a tensor subclass or a functorch transform)"
    return None


# ---------------------------------------------------------------------------------------
# timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, float]:
    """Median ms per call of each fn, sampled round-robin (a different fn first each
    round) so that a change of machine load hits them alike; each fn has been called
    at least once before (its warm-up)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    names = list(fns)
    est = {}
    for n in names:  # one more warm call, and the estimate
        fns[n]()
        _sync(device)
        t0 = time.perf_counter()
        fns[n]()
        _sync(device)
        est[n] = max(time.perf_counter() - t0, 1e-7)
    inner = {n: max(1, math.ceil(MIN_SAMPLE_S[kind] / est[n])) for n in names}
    per_round = sum(est[n] * inner[n] for n in names)
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TIME_BUDGET_S[kind] / per_round)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    if kind == "cuda":
        events = []
        for r in range(rounds):
            for j in range(len(names)):
                n = names[(r + j) % len(names)]
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(inner[n]):
                    fns[n]()
                b.record()
                events.append((n, a, b))
        torch.cuda.synchronize(device)
        for n, a, b in events:
            samples[n].append(a.elapsed_time(b) / inner[n])
    else:
        for r in range(rounds):
            for j in range(len(names)):
                n = names[(r + j) % len(names)]
                t0 = time.perf_counter()
                for _ in range(inner[n]):
                    fns[n]()
                samples[n].append((time.perf_counter() - t0) * 1e3 / inner[n])
    return {n: statistics.median(s) for n, s in samples.items()}


# ---------------------------------------------------------------------------------------
# checking against the reference

def _budget(got: torch.Tensor, lowp: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(max error relative to max |truth|, error / allowed error): the flash-attn rule of
    DESIGN.md section 4. Non-finite values must sit where the truth has them."""
    if got.shape != truth.shape:
        return math.inf, math.inf
    got, lowp, truth = got.detach().double(), lowp.detach().double(), truth.detach().double()
    fin = torch.isfinite(truth)
    if not torch.equal(torch.isnan(got), torch.isnan(truth)) or not torch.equal(got[torch.isinf(truth)],
                                                                             truth[torch.isinf(truth)]):
        return math.inf, math.inf
    if not fin.any():
        return 0.0, 0.0
    scale = truth[fin].abs().max().item() or 1.0
    err = (got - truth)[fin].abs().max().item()
    both = fin & torch.isfinite(lowp)
    ref = (lowp - truth)[both].abs().max().item() if both.any() else 0.0
    allowed = 2 * ref + TOL.get(dtype, 1e-5) * scale
    return err / scale, (err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf))


def _leaves(args, like, grad: bool):
    """args with every tensor that requires grad in `like` replaced by a fresh leaf
    (detached: the caller's graph is never touched); the list of those leaves."""
    out, leaves = [], []
    for a, w in zip(args, like):
        if isinstance(a, torch.Tensor) and isinstance(w, torch.Tensor) and w.requires_grad and grad:
            a = a.detach().requires_grad_(True)
            leaves.append(a)
        elif isinstance(a, torch.Tensor):
            a = a.detach()
        out.append(a)
    return out, leaves


def _to64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _grad_out(out: torch.Tensor) -> torch.Tensor:
    """A fixed random gradient for out: the same values (drawn in fp32) for the truth,
    the reference in the inputs' dtype and every candidate."""
    g = torch.Generator(device=out.device).manual_seed(0)
    return torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float32).to(out.dtype)


class _Truth:
    """The fp64 reference (and the reference in the inputs' dtype) of the slice of one
    call's inputs that candidates are checked on: computed once per tuning."""

    def __init__(self, d: defs.OpDef, args, needs_grad: bool):
        self.like, self.needs_grad = args, needs_grad
        with torch.no_grad():
            self.sub, self.take = d.subproblem(tuple(args))
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(dev.type, enabled=False):  # the truth: fp64, whatever the caller's autocast
            self.out64, self.grads64 = self._run(d.reference, _to64(self.sub))
        # the reference in the inputs' dtype, under the caller's autocast like the candidates
        self.outlo, self.gradslo = self._run(d.reference, list(self.sub))

    def _run(self, fn, sub):
        if not self.needs_grad:
            with torch.no_grad():
                return fn(*sub), []
        a, leaves = _leaves(sub, self.like, True)
        with torch.enable_grad():
            out = fn(*a)
            return out.detach(), list(torch.autograd.grad(out, leaves, _grad_out(out)))

    def check(self, fn, out_full, dtype) -> tuple[float, float]:
        """(forward relative error, worst budget use over output and gradients)."""
        rel, worst = _budget(self.take(out_full), self.outlo, self.out64, dtype)
        if self.needs_grad:
            _, grads = self._run(fn, list(self.sub))
            for g, lo, t in zip(grads, self.gradslo, self.grads64):
                worst = max(worst, _budget(g, lo, t, dtype)[1])
        return rel, worst


# ---------------------------------------------------------------------------------------
# the tuner

def _short(e: BaseException, n: int = 140) -> str:
    s = " ".join(f"{type(e).__name__}: {e}".split())
    return s if len(s) <= n else s[: n - 3] + "..."


class Tuner:
    """Decisions of `auto`: in memory per (device, record key), backed by one cache file
    per device. `timer` (fns, device) -> {name: ms} is injectable (tests)."""

    def __init__(self, timer: Timer | None = None, persist: bool = True):
        self.timer: Timer = timer or measure
        self.persist = persist
        self._lock = threading.RLock()
        self._memory: dict[tuple[str, str], Decision] = {}
        self._files: dict[str, DecisionFile] = {}
        # set by skipdit_fast.ops.tune.tune(): decisions used in its forward, re-measure
        self.recording: contextvars.ContextVar[list | None] = contextvars.ContextVar("skipdit_tune_rec",
                                                                                       default=None)
        self.forcing: contextvars.ContextVar[set | None] = contextvars.ContextVar("skipdit_tune_force",
                                                                                   default=None)

    def reset(self, persist: bool | None = None) -> None:
        """Forgets every decision in memory (files are read again when persisting)."""
        with self._lock:
            self._memory.clear()
            self._files.clear()
            if persist is not None:
                self.persist = persist

    # -- keys and files ------------------------------------------------------------------
    @staticmethod
    def _device(device: torch.device) -> torch.device:
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    @staticmethod
    def record_key(q) -> str:
        threads = torch.get_num_threads() if q.device.type == "cpu" else None
        return record_key(q.op, dtype_name(q.dtype), q.needs_grad, q.features, q.sizes, threads)

    def file(self, device: torch.device) -> DecisionFile:
        """The device's cache file, its decisions loaded into memory on first use."""
        device = self._device(device)
        dev = str(device)
        f = self._files.get(dev)
        if f is None:
            f = self._files[dev] = DecisionFile(device)
            if self.persist:
                for k, d in f.load().items():
                    self._memory.setdefault((dev, k), d)
        return f

    def decisions(self, device: torch.device | None = None) -> list[Decision]:
        """Every decision held for `device` (all devices: None), loading its file."""
        with self._lock:
            if device is not None:
                self.file(device)
                dev = str(self._device(device))
                return [d for (dv, _), d in self._memory.items() if dv == dev]
            return list(self._memory.values())

    # -- lookups (no measuring) ----------------------------------------------------------
    def lookup(self, q, candidates) -> Decision | None:
        """The decision for q already made (memory or file), if its backend still serves q
        (and tune(force=True) is not measuring q again)."""
        names = {c.backend for c in candidates}
        key = self.record_key(q)
        forcing = self.forcing.get()
        if forcing is not None and key not in forcing:
            return None
        with self._lock:
            self.file(q.device)
            d = self._memory.get((str(self._device(q.device)), key))
            if d is None or d.backend not in names:
                return None
            self._note(d)
            return d

    def lookup_dynamic(self, q, candidates) -> str | None:
        """For a torch.compile graph whose sizes are symbolic: the backend that won most of
        the buckets measured for q's op, device, dtype, direction and widths (a symbolic
        width, None, matches any), ties to the static order; None when none was measured."""
        order = [c.backend for c in candidates]
        want = (q.op, dtype_name(q.dtype), q.needs_grad)
        with self._lock:
            self.file(q.device)
            dev = str(self._device(q.device))
            wins: dict[str, int] = {}
            for (dv, _), d in self._memory.items():
                if (dv == dev and (d.op, d.dtype, d.grad) == want and d.backend in order
                        and len(d.features) == len(q.features)
                        and all(f is None or f == g for f, g in zip(q.features, d.features))):
                    wins[d.backend] = wins.get(d.backend, 0) + 1
        if not wins:
            return None
        return max(order, key=lambda n: (wins.get(n, 0), -order.index(n)))

    def _note(self, d: Decision) -> None:
        rec = self.recording.get()
        if rec is not None and all(x is not d for x in rec):
            rec.append(d)

    def note_only(self, q, backend: str) -> None:
        """For tune()'s report: a bucket with a single candidate (nothing to measure)."""
        if self.recording.get() is not None:
            self._note(Decision(q.op, device_name(q.device), dtype_name(q.dtype), q.needs_grad, tuple(q.features),
                                tuple(q.sizes), None, backend, [Result(backend, verdict="the only candidate")],
                                source="only candidate"))

    # -- measuring -------------------------------------------------------------------------
    def decide(self, q, candidates, args) -> Decision | None:
        """The decision for q, measured on this call's inputs unless made before (and not
        being re-measured by tune(force=True)). None when the inputs are bad for the op
        itself (its reference, which runs the op's own argument checks, raised): the
        caller then runs its static choice, whose call raises the op's error."""
        with self._lock:
            d = self.lookup(q, candidates)  # made by another thread meanwhile
            if d is not None:
                return d
            d = self._measure(q, candidates, args)
            if d is None:
                return None
            key = self.record_key(q)
            forcing = self.forcing.get()
            if forcing is not None:
                forcing.add(key)
            dev = str(self._device(q.device))
            self._memory[(dev, key)] = d
            if self.persist:
                self.file(q.device).save({key: d})
            self._note(d)
            return d

    def _measure(self, q, candidates, args) -> Decision | None:
        t_start = time.perf_counter()
        d = defs.OPS[q.op]
        names = [c.backend for c in candidates]
        fallback = "torch" if "torch" in names else names[0]
        results: dict[str, Result] = {n: Result(n) for n in names}
        try:  # the reference checks the arguments as every backend does
            truth = _Truth(d, args, q.needs_grad)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            for r in results.values():
                r.verdict = f"not measured: the reference of the check ran out of memory ({_short(e, 80)})"
            return self._decision(q, fallback, results, t_start)
        except Exception:  # bad input (the op's own error comes from the call itself)
            return None
        steps: dict[str, Callable[[], Any]] = {}
        for c in candidates:
            r = results[c.backend]
            try:
                with torch.no_grad():
                    out = c.fn(*args)
                _sync(q.device)
                r.rel_err, r.budget = truth.check(c.fn, out, q.dtype)
                del out
            except Exception as e:  # a failing kernel loses; it must not fail the call
                r.verdict = f"raised {_short(e)}"
                continue
            if not (r.budget <= 1.0):
                r.verdict = f"out of the error budget ({r.budget:.3g}x the allowed error)"
                continue
            steps[c.backend] = self._step(c.fn, args, q.needs_grad)
        if steps:
            try:
                for name, ms in self.timer(steps, q.device).items():
                    results[name].ms = ms
            except Exception as e:  # pragma: no cover - each step ran once already
                for name in steps:
                    results[name].verdict = f"raised while timed: {_short(e)}"
        timed = [n for n in names if results[n].ms is not None and not results[n].verdict]
        # ties go to torch (what the model had), then to the static order
        winner = min(timed, key=lambda n: (results[n].ms, n != "torch", names.index(n))) if timed else fallback
        t_torch = results["torch"].ms if "torch" in timed else None
        for n, r in results.items():
            if n == winner:
                r.verdict = ("chosen: fastest correct" if len(timed) > 1 else
                             "chosen: the only correct candidate" if timed else
                             f"chosen as the fallback, no candidate passed ({r.verdict or 'not run'})")
            elif not r.verdict:
                if t_torch is not None and r.ms >= t_torch and winner == "torch":
                    r.verdict = f"not faster than torch ({r.ms / t_torch:.2f}x its time)"
                else:
                    r.verdict = f"slower: {r.ms / results[winner].ms:.2f}x the time of {winner}"
        return self._decision(q, winner, results, t_start)

    @staticmethod
    def _decision(q, winner: str, results: dict[str, Result], t_start: float) -> Decision:
        return Decision(q.op, device_name(q.device), dtype_name(q.dtype), q.needs_grad, tuple(q.features),
                        tuple(q.sizes), torch.get_num_threads() if q.device.type == "cpu" else None, winner,
                        list(results.values()), "measured", time.perf_counter() - t_start,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @staticmethod
    def _step(fn, args, needs_grad: bool) -> Callable[[], Any]:
        if not needs_grad:
            def step():
                with torch.no_grad():
                    return fn(*args)
            return step
        a, leaves = _leaves(args, args, True)
        with torch.no_grad():
            g = _grad_out(fn(*a))

        def step():
            with torch.enable_grad():
                return torch.autograd.grad(fn(*a), leaves, g)
        return step


TUNER = Tuner()


def status() -> dict:
    """For `skipdit-fast info`: whether measuring is on, the cache dir, and per device its
    file, key and how many decisions it holds."""
    from .decisions import cache_dir

    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    files = []
    for dev in devices:
        f = TUNER.file(dev)
        if f.state == "not read":  # persist off (bench): read it for the report only
            f.load()
        files.append({"device": str(dev), "path": f.path, "key": f.key, "state": f.state, "decisions": f.count})
    return {"enabled": enabled(), "persist": TUNER.persist, "cache_dir": cache_dir(), "files": files,
            "in_memory": len(TUNER.decisions())}
