"""`skipdit-fast bench`: kernel benchmarks against the competitors, in one run.

For every op and shape it times each implementation side by side in one process:

    eager                 the pure-PyTorch reference (skipdit_fast.ops.reference), i.e. what a
                          model without this package runs
    compile               torch.compile of that same eager code (default mode)
    compile-max-autotune  torch.compile(mode="max-autotune-no-cudagraphs") (GPU, target shapes)
    sdpa[...]             torch SDPA (attention): the backend PyTorch picks, and each one forced
    gemm-floor            skip_fuse only: one GEMM (M, 2D) x (2D, D_out) + bias on a ready-made
                          normalized input (cuBLAS on a GPU) -- the floor a fused kernel aims at
    cpu / cuda / triton   our backends, called through skipdit_fast.ops with that backend chosen

Which of our backends run is read from skipdit_fast.ops.backends (registry/explain), so a
kernel that lands shows up without edits here; one that cannot run says why.

Timing: on a GPU, CUDA events around every call (median of many, after warm-up), the
inputs rotating over sets larger than twice the L2 cache, like triton.testing.do_bench
with a cold cache; on the CPU, perf_counter around calls (batched to >= 1 ms per sample),
the rows of one table sampled round-robin so that they all see the same machine load.
Rates are expressed against the device's copy bandwidth and matmul rate measured at the
start of the same run; all ratios come from times of the same run.

The package, by job:

    timing    Timer, quantile summaries, peak memory of a call, input-set sizing, device peaks
    cases     per op: shapes, inputs, eager and public calls, FLOP / byte counts (SPECS)
    runner    BenchRunner: the rows of each table (Row), their check, timing and ratios
    extras    dispatch overhead; end-to-end sampling
    report    tables, targets, the plot
    results   environment, JSON / markdown files, results folders and their README
    here      the `skipdit-fast bench` command (add_arguments, run, main)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time

import torch

from ..ops import autotune, backends
from .cases import OPS, SPECS, Case, InputSet, elem_size
from .extras import dispatch_overhead, sampling_benchmark, sampling_configs, sampling_model
from .report import check_targets, format_report, format_table, format_targets, write_plot
from .results import (README_BEGIN, README_END, _write_json, _write_text, backend_status, environment,
                      result_folder_name, save_results, update_results_readme)
from .runner import BenchRunner, Row, add_rates, add_ratios
from .timing import Timer, cache_bytes, measure_peaks, peak_memory_bytes, summarize

EXTRAS = ("dispatch", "sampling")
SCHEMA_VERSION = 1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

__all__ = ["BenchRunner", "Case", "DTYPES", "EXTRAS", "InputSet", "OPS", "README_BEGIN", "README_END", "Row",
           "SCHEMA_VERSION", "SPECS", "Timer", "add_arguments", "add_rates", "add_ratios", "check_targets",
           "dispatch_overhead", "elem_size", "format_report", "format_table", "format_targets", "main",
           "peak_memory_bytes", "result_folder_name", "run", "sampling_benchmark", "sampling_configs",
           "sampling_model", "save_results", "summarize", "update_results_readme", "write_plot"]

# ---------------------------------------------------------------------------
# CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=OPS + EXTRAS,
                   help="what to run (repeatable); default: every op, the dispatch overhead and "
                        "(without --quick) end-to-end sampling")
    p.add_argument("--quick", action="store_true", help="few small shapes, no torch.compile (seconds)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedup over eager by shape (matplotlib)")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--save", metavar="ROOT",
                   help="write bench.json, bench.md and speedup.png to ROOT/<date>-<device>/ and "
                        "refresh the latest-results section of ROOT/README.md")
    p.add_argument("--save-dir", metavar="DIR", help="like --save, into this folder")
    from ..apps.common import device_arg, positive_float, positive_int

    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), type=device_arg,
                   help="auto: the GPU when there is one, else the CPU")
    p.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--compile", dest="compile_mode", default="auto",
                   choices=("auto", "none", "default", "targets", "all"),
                   help="torch.compile competitors: none; default mode; default + max-autotune on the "
                        "DESIGN.md target shapes; or max-autotune everywhere (auto: none with --quick, "
                        "targets on a GPU, default on the CPU)")
    p.add_argument("--budget", type=positive_float, default=None, metavar="SECONDS",
                   help="stop starting new rows after this many seconds (the rest is listed as skipped)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("skipdit-fast bench: --device cuda but no CUDA device is available")
    return torch.device(name)


def run(args) -> dict:
    t_start = time.monotonic()
    wanted = args.op or list(OPS) + ["dispatch"] + ([] if args.quick else ["sampling"])
    deadline = compile_deadline = None
    if args.budget:
        # end-to-end sampling comes last: keep a share of the budget for it
        ops_budget = args.budget - (min(60.0, 0.3 * args.budget) if "sampling" in wanted else 0.0)
        deadline = t_start + ops_budget
        compile_deadline = t_start + 0.7 * ops_budget
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    ops_ = [o for o in OPS if o in wanted]
    torch.manual_seed(0)
    # the auto rows measure their candidates in this run: no decisions from (or into) the
    # user's autotune cache file
    autotune.TUNER.reset(persist=False)
    backends.forget()
    log = (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True))
    env = environment(device)
    result: dict = {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": sys.argv[1:],
        "settings": {"quick": bool(args.quick), "dtype": str(dtype).replace("torch.", ""),
                     "ops": wanted, "compile": args.compile_mode, "budget_s": args.budget,
                     "cache_bytes": cache_bytes(device),
                     "timing": ("CUDA events per call, median; inputs rotate over sets > 2x L2"
                                if device.type == "cuda" else
                                "perf_counter per call (batched to >= 1 ms), median; inputs rotate over >= 64 MiB")},
        "env": env, "backends": backend_status(device, dtype, ops_),
        "rows": [], "unavailable": [], "errors": [], "dispatch": [], "sampling": None,
    }
    log(f"skipdit-fast bench on {env['device']['name']} ({device.type}), {result['settings']['dtype']}")
    result["peaks"] = measure_peaks(device, dtype, args.quick)
    pk = result["peaks"]
    log(f"  peaks: copy {pk['copy_GBps']:.0f} GB/s, {pk['matmul_dtype']} matmul {pk['matmul_TFLOPs'] * 1000:.0f} GFLOP/s")
    runner = BenchRunner(device, dtype, args.quick, compile_mode=args.compile_mode, deadline=deadline,
                    compile_deadline=compile_deadline, log=log)
    result["settings"]["compile"] = runner.compile_mode
    for op in ops_:
        runner.run_op(op)
        add_rates(runner.rows, result["peaks"])
        result["rows"], result["unavailable"], result["errors"] = runner.rows, runner.unavailable, runner.errors
        _write_partial(result, args)  # partial results survive a kill
    if "dispatch" in wanted:
        result["dispatch"] = dispatch_overhead(args.quick)
        _write_partial(result, args)
    if "sampling" in wanted:
        if args.budget and t_start + args.budget - time.monotonic() < 20:
            result["sampling"] = {"skipped": "time budget (--budget) used up"}
        else:
            log("  end-to-end sampling ...")
            result["sampling"] = sampling_benchmark(device, dtype, args.quick)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return result


def _write_partial(result: dict, args) -> None:
    if args.json:
        _write_json(result, args.json)
    if args.markdown:
        _write_text(format_report(result), args.markdown)


def main(args) -> int:
    from ..apps.common import check_output_dir, check_output_file

    for flag in ("--json", "--plot", "--markdown"):   # before the run, not after it
        path = getattr(args, flag[2:])
        if path:
            check_output_file(path, flag)
    if args.save:
        check_output_dir(args.save, "--save")
    if args.save_dir:
        check_output_dir(args.save_dir, "--save-dir")
    result = run(args)
    report = format_report(result)
    print(report)
    if args.json:
        _write_json(result, args.json)
    if args.markdown:
        _write_text(report, args.markdown)
    if args.plot:
        err = write_plot(result, args.plot)
        if err:
            print(f"skipdit-fast bench: no plot: {err}", file=sys.stderr)
            return 1
    if args.save or args.save_dir:
        folder = save_results(result, args.save, folder=args.save_dir)
        print(f"results written to {folder}/", file=sys.stderr)
    ours_errors = [e for e in result["errors"] if e.get("kind") in ("ours", "torch", "auto") or e.get("impl") == "*"]
    if ours_errors:
        print(f"skipdit-fast bench: {len(ours_errors)} error(s) in our backends (see above)", file=sys.stderr)
        return 1
    return 0
