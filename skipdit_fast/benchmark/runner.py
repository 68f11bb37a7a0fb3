"""The benchmark of one op: the rows of each table (Row: eager, torch.compile, SDPA,
the GEMM floor, each of our backends), their first call and output check, their
timing (one row after the other on a GPU, round-robin on the CPU) and peak memory,
and the ratios and rates derived from the times of one run."""

from __future__ import annotations

import contextlib
import gc
import time
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..ops.reference import sdpa_bshd
from .cases import SPECS, Case, InputSet, elem_size, set_bytes
from .report import _fmt_ratio, _fmt_time, _short
from .timing import Timer, n_sets_for, peak_memory_bytes, summarize

# Relative max error (vs the eager output of the same dtype) above which a row is marked
# as a mismatch: a benchmark of a wrong kernel is not a result. Loose on purpose: this is
# a sanity check, the tests hold the real error budgets.
MISMATCH_REL = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def _raise_dynamo_limits() -> None:
    """Each (shape, direction) compiles its own graph: lift dynamo's recompile limits so
    that it never silently falls back to eager after the 8th shape."""
    try:
        cfg = torch._dynamo.config
    except AttributeError:
        return
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), 512))


# ---------------------------------------------------------------------------
# implementations (rows)

@dataclass
class Row:
    """One row of a table: an implementation of the op to time (or, with `reason`, one
    that does not run here)."""

    name: str
    kind: str  # eager | compile | sdpa | floor | torch (our torch backend) | ours | auto
    fn: Callable | None = None  # args -> output
    ctx: Callable[[], Any] = contextlib.nullcontext
    sets: Callable | None = None  # (case, direction) -> list[InputSet]; None: the shared sets
    reason: str | None = None  # why it does not run here
    backend: str | None = None
    note: str | None = None


def _fresh_function(fn, tag: int):
    """A copy of fn with its own code object. Dynamo keeps its graph cache and its
    automatic-dynamic shape history per code object: without this, shapes seen by one
    compiled variant (another head dim, another direction) would make the next one's
    dims symbolic."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        b = getattr(SDPBackend, name, None)
        if b is not None:
            out[name.lower().replace("_attention", "")] = b
    return out


def _sdpa_call(args):
    return sdpa_bshd(*args, None)  # the op's contract: contiguous BSHD out (what the torch backend runs)


def sdpa_choice(args) -> str | None:
    """Which SDPA backend PyTorch picks for these inputs (None if it cannot say)."""
    q, k, v = (t.transpose(1, 2) for t in args)
    try:
        idx = int(torch._fused_sdp_choice(q, k, v, None, 0.0, False))
    except Exception:  # private API; absent or changed
        return None
    for name, b in _sdpa_backends().items():
        try:
            if int(b.value if hasattr(b, "value") else b) == idx:
                return name
        except (TypeError, ValueError):
            continue
    return None


class BenchRunner:
    """Runs the benchmark of one or more ops and collects rows (a plain dict each)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool, *,
                 compile_mode: str = "auto", deadline: float | None = None,
                 compile_deadline: float | None = None, log=print):
        self.device = device
        self.dtype = dtype
        self.quick = quick
        self.timer = Timer(device, quick)
        self.deadline = deadline
        # compiling is the slow part: it stops earlier, so that the remaining rows still run
        self.compile_deadline = compile_deadline if compile_deadline is not None else deadline
        self.log = log
        self.rows: list[dict] = []
        self.unavailable: list[dict] = []
        self.errors: list[dict] = []
        self._compiled: dict = {}
        # which torch.compile variants run: "none", "default", "targets" (default everywhere,
        # max-autotune on target shapes), "all"
        if compile_mode == "auto":
            if quick:
                compile_mode = "none"
            else:
                compile_mode = "targets" if device.type == "cuda" else "default"
        self.compile_mode = compile_mode
        _raise_dynamo_limits()

    # -- implementations of one case ----------------------------------------
    def plan(self, spec, case: Case, direction: str) -> list[Row]:
        from ..ops import backends

        grad = direction == "fwd+bwd"
        out = [Row("eager", "eager", spec.eager)]
        out += self._compile_rows(spec, case, direction)
        if spec.op == "attention":
            out += self._sdpa_rows(case)
        if spec.op == "skip_fuse":
            out.append(self._gemm_floor(case, direction))
        q = backends.Query(spec.op, self.device, self.dtype, grad, spec.query_features(case.params))
        reasons = backends.explain(q)
        for name in backends.registry()[spec.op]:
            if name == "reference":
                continue  # the eager row is the reference backend
            why = reasons.get(name) or []
            if name == "triton" and self.device.type == "cpu" and not why:
                why = ["Triton on CPU tensors runs in the interpreter (TRITON_INTERPRET=1): "
                       "a correctness tool, not timed"]
            out.append(Row(name, "torch" if name == "torch" else "ours", spec.ours, backend=name,
                           ctx=(lambda n=name: backends.use_backend(**{spec.op: n})),
                           reason="; ".join(why) if why else None))
        # `auto`: measures its candidates on its first call (the tuner of this run has no
        # cache file: bench.run), then runs its choice
        out.append(Row("auto", "auto", spec.ours, backend="auto",
                       ctx=lambda: backends.use_backend(**{spec.op: "auto"})))
        return out

    def _compile_rows(self, spec, case, direction) -> list[Row]:
        modes = []
        why_default = why_max = None
        if self.compile_mode == "none":
            why_default = why_max = ("skipped (--quick / --compile none): torch.compile takes seconds "
                                     "to tens of seconds per graph")
        else:
            modes.append(("compile", "default"))
            if self.device.type != "cuda":
                why_max = "max-autotune is benchmarked on GPUs only"
            elif self.compile_mode == "all" or (self.compile_mode == "targets" and case.target
                                                 and direction == "fwd"):
                modes.append(("compile-max-autotune", "max-autotune-no-cudagraphs"))
            else:
                why_max = ("max-autotune (minutes of autotuning per graph) runs on the DESIGN.md target "
                           "shapes, forward, only (--compile all for every row)")
        out = []
        for name, mode in modes:
            # One compiled function per (op, direction, mode, widths): in a model the
            # widths (D, D_out; head dim) are fixed and token counts vary. Default mode
            # keeps dynamo's automatic dynamic shapes within that (what a user gets:
            # after the first shape, one dynamic-shape graph); max-autotune is static.
            key = (spec.op, direction, mode, spec.query_features(case.params))
            fn = self._compiled.get(key)
            if fn is None:
                fn = torch.compile(_fresh_function(spec.eager, len(self._compiled)),
                                   mode=None if mode == "default" else mode,
                                   dynamic=None if mode == "default" else False, fullgraph=True)
                self._compiled[key] = fn
            out.append(Row(name, "compile", fn))
        if why_default:
            out.append(Row("compile", "compile", reason=why_default))
        if why_max:
            out.append(Row("compile-max-autotune", "compile", reason=why_max))
        return out

    def _sdpa_rows(self, case) -> list[Row]:
        from torch.nn.attention import sdpa_kernel

        out = [Row("sdpa", "sdpa", _sdpa_call, note="PyTorch's own pick")]
        for name, b in _sdpa_backends().items():
            if self.device.type == "cpu" and name not in ("flash", "math"):
                out.append(Row(f"sdpa[{name}]", "sdpa", reason="not offered on CPU"))
                continue
            out.append(Row(f"sdpa[{name}]", "sdpa", _sdpa_call, ctx=(lambda b=b: sdpa_kernel([b]))))
        return out

    def _gemm_floor(self, case, direction) -> Row:
        p = case.params
        dev, dt = self.device, self.dtype

        def make_sets(n_hint=None):
            M, D, Do = p["M"], p["D"], p["D_out"]

            def one():
                a = torch.randn(M, 2 * D, device=dev, dtype=dt)
                w = torch.randn(Do, 2 * D, device=dev, dtype=dt) * (2 * D) ** -0.5
                b = 0.1 * torch.randn(Do, device=dev, dtype=dt)
                if direction == "fwd":
                    return InputSet((a, w, b))
                for t in (a, w, b):
                    t.requires_grad_(True)
                return InputSet((a, w, b), [a, w, b], torch.randn(M, Do, device=dev, dtype=dt))

            first = one()
            n = n_sets_for(set_bytes(first), dev)
            return [first] + [one() for _ in range(n - 1)]

        lib = "cuBLAS" if dev.type == "cuda" else "ATen CPU BLAS"
        return Row("gemm-floor", "floor", lambda args: F.linear(*args), sets=make_sets,
                    note=f"{lib} GEMM (M, 2D) x (2D, D_out) + bias on a ready normalized input")

    # -- running -------------------------------------------------------------
    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _make_sets(self, spec, case, direction) -> list[InputSet]:
        grad = direction == "fwd+bwd"
        first = spec.make(case.params, self.device, self.dtype, grad)
        n = n_sets_for(set_bytes(first), self.device)
        return [first] + [spec.make(case.params, self.device, self.dtype, grad) for _ in range(n - 1)]

    @staticmethod
    def _step(fn, direction):
        if direction == "fwd":
            def step(s):
                with torch.no_grad():
                    return fn(s.args)
        else:
            def step(s):
                out = fn(s.args)
                return torch.autograd.grad(out, s.leaves, s.grad_out)
        return step

    def run_op(self, op: str) -> None:
        spec = SPECS[op]
        cases = spec.cases(self.device, self.quick)
        for case in cases:
            for direction in case.directions:
                if self._out_of_time():
                    self.unavailable.append({"op": op, "shape": case.label, "direction": direction,
                                             "impl": "*", "reason": "time budget (--budget) used up"})
                    continue
                try:
                    self._run_case(spec, case, direction)
                except Exception as ex:  # keep going: the other shapes still run
                    self.errors.append({"op": op, "shape": case.label, "direction": direction, "impl": "*",
                                        "error": _short(f"{type(ex).__name__}: {ex}")})
                    self.log(f"  ERROR {op} {case.label} {direction}: {_short(ex)}")

    def _run_case(self, spec, case, direction) -> None:
        e = elem_size(self.dtype)
        flops, nbytes = spec.cost(case.params, direction, e)
        base = {"op": spec.op, "direction": direction, "shape": case.label, "params": case.params,
                "dtype": str(self.dtype).replace("torch.", ""), "flops": flops, "bytes": nbytes}
        try:
            sets = self._make_sets(spec, case, direction)
        except torch.cuda.OutOfMemoryError as ex:  # pragma: no cover - GPU only
            self.errors.append({**base, "impl": "*", "error": f"out of memory making inputs: {_short(ex)}"})
            return
        ref_out = None
        try:
            with torch.no_grad():
                ref_out = spec.eager(sets[0].args).float()
        except Exception as ex:  # e.g. eager attention's N x N scores out of memory
            self.log(f"  eager reference failed for {spec.op} {case.label}: {_short(ex)} (no output check)")
        choice = sdpa_choice(sets[0].args) if spec.op == "attention" else None
        case_rows, pending = [], []
        for impl in self.plan(spec, case, direction):
            if impl.reason:
                self.unavailable.append({**{k: base[k] for k in ("op", "shape", "direction")},
                                         "impl": impl.name, "reason": impl.reason})
                continue
            if impl.kind == "compile" and self.compile_deadline is not None \
                    and time.monotonic() > self.compile_deadline:
                self.unavailable.append({**{k: base[k] for k in ("op", "shape", "direction")},
                                         "impl": impl.name, "reason": "time budget (--budget) used up"})
                continue
            prepared = self._prepare_row(spec, impl, sets, direction, base, ref_out)
            if prepared is None:
                continue
            if self.device.type != "cpu":  # GPU: event timing, one row after the other
                try:
                    prepared["samples"] = self._time_one(prepared)
                except Exception as ex:  # one failing row must not end the run
                    self._row_error(prepared, ex)
                    continue
            pending.append(prepared)
        if self.device.type == "cpu" and pending:
            jobs = [(p["step"], p["sets"], p["impl"].ctx) for p in pending]
            try:
                for p, samples in zip(pending, self.timer.time_cpu_interleaved(jobs)):
                    p["samples"] = samples
            except Exception as ex:  # pragma: no cover - a row that ran once then failed
                for p in pending:
                    self._row_error(p, ex)
                pending = []
        for p in pending:
            self._measure_peak(p)
            row = self._finish_row(p, base, ref_out)
            if p["impl"].name == "sdpa" and choice:
                row["note"] = f"PyTorch picks {choice}"
                row["sdpa_choice"] = choice
            case_rows.append(row)
        del sets, ref_out
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        add_ratios(case_rows)
        self.rows.extend(case_rows)
        for r in case_rows:
            self.log(f"  {r['op']:<11} {r['direction']:<7} {r['shape']:<34} {r['impl']:<22} "
                     f"{_fmt_time(r['median_ms']):>10}  vs eager {_fmt_ratio(r.get('vs_eager'))}")

    def _prepare_row(self, spec, impl: Row, shared_sets, direction, base, ref_out) -> dict | None:
        """First call (compilation included) and output check of one row; None if it
        cannot run (recorded as unavailable or as an error)."""
        sets = shared_sets
        ident = {k: base[k] for k in ("op", "shape", "direction")}
        caught: list = []
        try:
            if impl.sets is not None:
                sets = impl.sets()
            step = self._step(impl.fn, direction)
            with impl.ctx():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        first = impl.fn(sets[0].args)
                    if direction == "fwd+bwd":
                        step(sets[0])  # compile the backward too
                    self.timer.sync()
                    first_s = time.perf_counter() - t0
        except Exception as ex:  # one failing row must not end the run
            why = _short(f"{type(ex).__name__}: {ex}")
            if impl.kind == "sdpa" and "No available kernel" in str(ex):
                msgs = [_short(str(w.message), 120) for w in caught][:2]
                self.unavailable.append({**ident, "impl": impl.name,
                                         "reason": "not available for these inputs" + (": " + "; ".join(msgs) if msgs else "")})
                return None
            self.errors.append({**ident, "impl": impl.name, "kind": impl.kind, "error": why})
            self.log(f"  ERROR {ident} {impl.name}: {why}")
            return None
        finally:
            self._sync_quietly()
        return {"impl": impl, "ident": ident, "step": step, "sets": sets, "first": first,
                "first_s": first_s}

    def _time_one(self, p: dict) -> list[float]:
        try:
            with p["impl"].ctx():
                samples = self.timer.time(p["step"], p["sets"])
            p["host_ms"] = getattr(self.timer, "last_host_ms", None)
            return samples
        finally:
            self._sync_quietly()

    def _measure_peak(self, p: dict) -> None:
        """Peak memory of one more call of the row (outputs and temporaries)."""
        try:
            with p["impl"].ctx():
                p["peak_mem_bytes"] = peak_memory_bytes(self.device, lambda: p["step"](p["sets"][0]))
        except Exception as ex:  # pragma: no cover - the row itself ran; keep its time
            self.log(f"  peak memory of {p['ident']} {p['impl'].name} not measured: {_short(ex)}")
        finally:
            self._sync_quietly()

    def _auto_decision(self, row: dict) -> None:
        """The decision the auto row ran: its backend, the tuning time, the ratio vs torch."""
        from ..ops import autotune, backends

        spec = SPECS[row["op"]]
        q = backends.Query(row["op"], self.device, self.dtype, row["direction"] == "fwd+bwd",
                           spec.query_features(row["params"]),
                           tuple(backends.bucket(n) for n in spec.query_sizes(row["params"])))
        try:
            d = autotune.TUNER.lookup(q, backends.candidates(q))
        except backends.BackendError:
            d = None
        if d is None:
            row["note"] = "auto: no measured decision (static order)"
            return
        row["chosen"] = d.backend
        row["tune_s"] = round(d.tune_s, 3)
        row["note"] = f"-> {d.backend}, measured in {d.tune_s:.2f} s"

    def _sync_quietly(self) -> None:
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # reported by the row itself / the next one
                pass

    def _row_error(self, p: dict, ex: Exception) -> None:
        impl = p["impl"]
        why = _short(f"{type(ex).__name__}: {ex}")
        self.errors.append({**p["ident"], "impl": impl.name, "kind": impl.kind, "error": why})
        self.log(f"  ERROR {p['ident']} {impl.name}: {why}")

    def _finish_row(self, p: dict, base, ref_out) -> dict:
        impl, ident, samples, sets = p["impl"], p["ident"], p["samples"], p["sets"]
        row = {**base, "impl": impl.name, "kind": impl.kind, **summarize(samples), "n_sets": len(sets)}
        host = p.get("host_ms")
        if host is not None:
            row["host_ms"] = host  # the CPU's time to launch one call
            row["host_bound"] = host > row["median_ms"]
        if p.get("peak_mem_bytes") is not None:
            row["peak_mem_bytes"] = p["peak_mem_bytes"]
            if row["op"] == "skip_fuse" and row["direction"] == "fwd":
                # temporaries beyond the output, also as a fraction of one (M, 2D) tensor
                e, p_ = elem_size(self.dtype), row["params"]
                row["temp_bytes"] = p["peak_mem_bytes"] - p_["M"] * p_["D_out"] * e
                row["temp_vs_cat"] = row["temp_bytes"] / (p_["M"] * 2 * p_["D"] * e)
                row["temp_MiB"] = row["temp_bytes"] / (1 << 20)
        if impl.backend:
            row["backend"] = impl.backend
        if impl.note:
            row["note"] = impl.note
        if impl.kind in ("compile", "auto"):
            row["first_call_s"] = round(p["first_s"], 3)
        if impl.kind == "auto":
            self._auto_decision(row)
        if impl.kind != "floor" and ref_out is not None:
            err = (p["first"].float() - ref_out).abs().max().item()
            scale = ref_out.abs().max().item() or 1.0
            row["max_rel_err_vs_eager"] = err / scale
            if not (err / scale <= MISMATCH_REL.get(self.dtype, 1e-3)):
                row["mismatch"] = True
                self.errors.append({**ident, "impl": impl.name, "kind": impl.kind,
                                    "error": f"output differs from eager: max rel error {err / scale:.3e}"})
        return row


def add_ratios(case_rows: list[dict]) -> None:
    """Ratios within one (op, shape, direction), from times of the same run.

    vs_eager = t_eager / t_row; vs_compile / vs_sdpa = time of the fastest
    torch.compile / SDPA row / t_row; vs_best = t_best_competitor / t_row, where the
    competitors are the rows that compute the op and are not ours (eager, compile,
    sdpa); vs_floor = t_row / t_gemm_floor (skip_fuse; lower is better, 1.0 = the GEMM)."""
    by = {r["impl"]: r for r in case_rows}
    eager = by.get("eager")
    comp = [r for r in case_rows if r["kind"] in ("eager", "compile", "sdpa")]
    best = min(comp, key=lambda r: r["median_ms"]) if comp else None
    floor = by.get("gemm-floor")
    fastest = {}
    for kind in ("compile", "sdpa"):
        rows = [r for r in case_rows if r["kind"] == kind]
        if rows:
            fastest[kind] = min(r["median_ms"] for r in rows)
    backends_ = [r for r in case_rows if r["kind"] in ("ours", "torch")]
    best_backend = min(backends_, key=lambda r: r["median_ms"]) if backends_ else None
    for r in case_rows:
        if r["kind"] == "auto" and best_backend is not None:
            r["vs_best_backend"] = best_backend["median_ms"] / r["median_ms"]
            r["best_backend"] = best_backend["impl"]
            if r.get("chosen") in by:  # the choice alone, without the auto row's own timing noise
                r["choice_vs_best"] = best_backend["median_ms"] / by[r["chosen"]]["median_ms"]
        r["vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
        for kind, t in fastest.items():
            r[f"vs_{kind}"] = t / r["median_ms"]
        r["vs_best"] = best["median_ms"] / r["median_ms"] if best else None
        r["best_competitor"] = best["impl"] if best else None
        if floor is not None:
            r["vs_floor"] = r["median_ms"] / floor["median_ms"]


def add_rates(rows: list[dict], peaks: dict) -> None:
    """TFLOP/s, GB/s and the fraction of the roofline, from the measured peaks: the
    roofline time is max(flops / matmul rate, bytes / copy bandwidth)."""
    pf = peaks["matmul_TFLOPs"] * 1e12
    pb = peaks["copy_GBps"] * 1e9
    for r in rows:
        t = r["median_ms"] * 1e-3
        r["TFLOPs"] = r["flops"] / t / 1e12
        r["GBps"] = r["bytes"] / t / 1e9
        t_flop, t_byte = r["flops"] / pf, r["bytes"] / pb
        r["bound"] = "compute" if t_flop >= t_byte else "memory"
        r["roofline_ms"] = max(t_flop, t_byte) * 1e3
        r["pct_roofline"] = 100.0 * max(t_flop, t_byte) / t
