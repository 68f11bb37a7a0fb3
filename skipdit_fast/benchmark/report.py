"""The human-readable report: tables per op and direction, the targets DESIGN.md
section 6 sets (judged on the worst shape), the dispatch and end-to-end tables, and
the speedup plot."""

from __future__ import annotations

import math
import os

from ..ops import native
from .cases import OPS

# ---------------------------------------------------------------------------
# small helpers

def _fmt_time(ms: float | None) -> str:
    """3-4 significant digits: 12.3 us, 456.7 us, 1.234 ms, 12.35 ms, 123.5 ms, 1.23 s."""
    if ms is None or not math.isfinite(ms):
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.1f} ms"
    if ms >= 10:
        return f"{ms:.2f} ms"
    if ms >= 1:
        return f"{ms:.3f} ms"
    return f"{ms * 1000:.1f} us"


def _fmt_rate(r: dict) -> str:
    if r["bound"] == "compute":
        v = r["TFLOPs"]
        return f"{v:.1f} TFLOP/s" if v >= 1 else f"{v * 1000:.1f} GFLOP/s"
    v = r["GBps"]
    return f"{v:.0f} GB/s" if v >= 10 else f"{v:.2f} GB/s"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _short(msg: str, n: int = 160) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


# ---------------------------------------------------------------------------
# output: tables, JSON, plot

def format_table(rows: list[dict], floor_col: bool = False) -> str:
    """A markdown table of benchmark rows (one op and direction)."""
    extra = [k for k in ("vs_compile", "vs_sdpa", "vs_best_backend") if any(k in r for r in rows)]
    head = ["shape", "impl", "median", "IQR", "p10-p90", "rate", "% roofline", "peak mem", "vs eager"]
    head += [k.replace("_", " ") for k in extra] + ["vs best"]
    if floor_col:
        head.append("/ gemm")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        med = r["median_ms"]
        iqr = f"{100 * (r['p75_ms'] - r['p25_ms']) / med:.1f}%" if med > 0 else "-"
        spread = f"{_fmt_time(r['p10_ms'])}-{_fmt_time(r['p90_ms'])}"
        if "TFLOPs" in r:
            rate = _fmt_rate(r)
            pct = f"{r['pct_roofline']:.0f}%"
        else:
            rate = pct = "-"
        name = r["impl"] + (f" ({r['note']})" if r.get("note") and r["impl"] in ("sdpa", "auto") else "")
        if r.get("mismatch"):
            name += " MISMATCH"
        if r.get("impl") == r.get("best_competitor"):
            name += " *"
        cells = [r["shape"], name, _fmt_time(med) + (" (h)" if r.get("host_bound") else ""), iqr, spread, rate, pct,
                 _fmt_bytes(r.get("peak_mem_bytes")), _fmt_ratio(r.get("vs_eager"))] + [_fmt_ratio(r.get(k)) for k in extra] + [_fmt_ratio(r.get("vs_best"))]
        if floor_col:
            cells.append(_fmt_ratio(r.get("vs_floor")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(result: dict) -> list[dict]:
    """The DESIGN.md section 6 (and issue 3/4/12) targets this run can judge, per backend
    of ours, and auto against its candidates: {"target", "backend", "value", "ok"}
    (value is the worst case over the shapes)."""
    rows, out = result["rows"], []
    gpu = result["env"]["device"]["type"] == "cuda"
    bf16 = result["settings"]["dtype"] == "bfloat16"
    ours = sorted({r["impl"] for r in rows if r["kind"] == "ours"})

    def add(target, backend, sel, key, worst, bound, ge=True):
        vals = [r[key] for r in sel if r.get(key) is not None]
        if not vals:
            return
        v = worst(vals)
        out.append({"target": target, "backend": backend, "value": v, "ok": v >= bound if ge else v <= bound,
                    "shapes": len(vals)})

    for b in ours:
        if gpu and bf16:
            sf = [r for r in rows if r["op"] == "skip_fuse" and r["direction"] == "fwd" and r["impl"] == b
                  and r["params"]["D"] == 1152 and r["params"]["M"] >= 4096]
            add("skip_fuse fwd, M >= 4096, D 1152: >= 2x eager", b, sf, "vs_eager", min, 2.0)
            add("skip_fuse fwd, M >= 4096, D 1152: >= 1.3x torch.compile", b, sf, "vs_compile", min, 1.3)
            add("skip_fuse fwd, M >= 4096, D 1152: <= 1.15x the bare GEMM", b, sf, "vs_floor", max, 1.15, ge=False)
            at = [r for r in rows if r["op"] == "attention" and r["direction"] == "fwd" and r["impl"] == b
                  and r["params"]["Dh"] == 72]
            add("attention fwd, Dh 72, N 256/1024/4096: >= 1.3x best SDPA", b,
                [r for r in at if r["params"]["N"] >= 256], "vs_sdpa", min, 1.3)
            add("attention fwd, temporal N 16: >= 1.5x best SDPA", b,
                [r for r in at if r["params"]["N"] == 16], "vs_sdpa", min, 1.5)
        if not gpu:
            sf = [r for r in rows if r["op"] == "skip_fuse" and r["direction"] == "fwd" and r["impl"] == b
                  and 512 <= r["params"]["M"] <= 4096 and 384 <= r["params"]["D"] <= 1152]
            add("skip_fuse fwd on the CPU, M 512..4096, D 384..1152: no slower than eager", b, sf,
                "vs_eager", min, 1.0)
            # Temporaries beyond the output (temp_MiB, set per row by _finish_row): the CPU
            # kernel normalizes row chunks into one buffer of at most the library's
            # skip_fuse_cpu_fwd_chunk_bytes, so they stay bounded as M grows, where eager
            # holds the (M, 2D) concatenation and its normalized copy.
            sfm = [r for r in rows if r["op"] == "skip_fuse" and r["direction"] == "fwd"
                   and r["impl"] == b]
            chunk = native.constant("skip_fuse_cpu_fwd_chunk_bytes")
            add(f"skip_fuse fwd on the CPU: temporaries <= {chunk >> 20} MiB "
                "at every M (no (M, 2D) tensor beyond that), MiB", b,
                sfm, "temp_MiB", max, chunk / (1 << 20),
                ge=False)
    # issue 12: auto within 3% of the fastest single backend (its candidates) on every row
    for op in OPS:
        for direction in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["op"] == op and r["direction"] == direction and r["impl"] == "auto"]
            add(f"{op} {direction}: auto >= 0.97x the fastest single backend", "auto", sel, "vs_best_backend",
                min, 0.97)
            add(f"{op} {direction}: the backend auto chose, in its own row, >= 0.97x the fastest", "auto", sel,
                "choice_vs_best", min, 0.97)
    for d in result.get("dispatch") or []:
        if "extra_vs_direct_us" in d:
            out.append({"target": f"dispatch overhead of ops.{d['op']}: <= 5 us", "backend": "auto",
                        "value": d["extra_vs_direct_us"], "ok": d["extra_vs_direct_us"] <= 5.0, "shapes": 1})
    samp = result.get("sampling") or {}
    if gpu and bf16 and samp.get("rows"):
        by = {r["config"]: r for r in samp["rows"] if "vs_eager_nocache" in r}
        for cfg, bound in (("ours ops, no cache", 1.4), ("ours ops, Skip-Cache N=2 K=4", 2.2)):
            if cfg in by:
                out.append({"target": f"sampling, {cfg}: >= {bound}x eager", "backend": "auto",
                            "value": by[cfg]["vs_eager_nocache"], "ok": by[cfg]["vs_eager_nocache"] >= bound,
                            "shapes": 1})
    return out


def format_targets(items: list[dict]) -> str:
    lines = ["| target | backend | worst over the shapes | met |", "|---|---|---|---|"]
    for t in items:
        if t["target"].startswith("dispatch"):
            v = f"{t['value']:+.1f} us"
        elif t["target"].endswith("MiB"):
            v = f"{t['value']:.1f} MiB"
        else:
            v = f"{t['value']:.2f}x"
        lines.append(f"| {t['target']} | {t['backend']} | {v} | {'yes' if t['ok'] else 'NO'} |")
    return "\n".join(lines)


def format_dispatch(rows: list[dict]) -> str:
    lines = ["| op | first call (auto measures) | auto chose | skipdit_fast.ops, decided | the chosen backend, "
             "direct | extra (target <= 5 us) | ATen call of similar cost | ops - ATen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | error: {r['error']} | | | | | | |")
            continue
        ok = "ok" if r["meets_target"] else "OVER"
        lines.append(f"| {r['op']} | {_fmt_time(r.get('first_call_ms'))} | {r.get('backend', '-')} | "
                     f"{r['ops_us']:.1f} us | {r['direct_op_us']:.1f} us | "
                     f"{r['extra_vs_direct_us']:+.1f} us ({ok}) | {r['aten_call']}: {r['aten_us']:.1f} us | "
                     f"{r['extra_vs_aten_us']:+.1f} us |")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The whole human-readable report (also the markdown file)."""
    env, peaks = result["env"], result.get("peaks") or {}
    dev = env["device"]
    out = [f"## skipdit-fast bench: {dev['name']} ({dev['type']}), {result['settings']['dtype']}",
           "",
           f"torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
           f"CUDA {env['versions']['cuda']}, commit {(env['git']['commit'] or '?')[:10]}"
           f"{' (dirty)' if env['git'].get('dirty') else ''}, {result['created']}"
           + (", --quick" if result["settings"]["quick"] else "")
           + (f", load average {env['load_average'][0]} on {dev.get('cores')} cores"
              if dev["type"] == "cpu" and env.get("load_average") else ""),
           ""]
    if peaks:
        mm = peaks["matmul_TFLOPs"]
        mm_s = f"{mm:.1f} TFLOP/s" if mm >= 1 else f"{mm * 1000:.1f} GFLOP/s"
        out.append(f"Measured peaks (this run): copy {peaks['copy_GBps']:.0f} GB/s (read + write), "
                   f"{peaks['matmul_dtype']} matmul {mm_s} "
                   f"({'x'.join(map(str, peaks['matmul_shape']))}).")
        out.append("")
    rows = result["rows"]
    for op in OPS:
        for direction in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["op"] == op and r["direction"] == direction]
            if not sel:
                continue
            out.append(f"### {op} {'forward' if direction == 'fwd' else 'forward + backward'}")
            out.append("")
            out.append(format_table(sel, floor_col=(op == "skip_fuse")))
            out.append("")
        missing = _group_unavailable([u for u in result["unavailable"] if u["op"] == op])
        if missing:
            out.append(f"Not timed for {op}:")
            out.extend(f"- {m}" for m in missing)
            out.append("")
        errs = [e for e in result["errors"] if e.get("op") == op]
        if errs:
            out.append(f"Errors for {op}:")
            out.extend(f"- {e.get('impl')} {e.get('shape', '')} {e.get('direction', '')}: {e['error']}" for e in errs)
            out.append("")
    tg = check_targets(result)
    if tg:
        out.append("### targets (DESIGN.md section 6, issues 3-4 and 12)")
        out.append("")
        out.append(format_targets(tg))
        out.append("")
    if result.get("dispatch"):
        out.append("### dispatch overhead (CPU, tiny tensors, per call)")
        out.append("")
        out.append(format_dispatch(result["dispatch"]))
        out.append("")
    samp = result.get("sampling")
    if samp:
        out.append("### end-to-end sampling")
        out.append("")
        if "skipped" in samp:
            out.append(f"skipped: {samp['skipped']}")
        else:
            out.append(f"{samp['model']} at {samp.get('image_size')} px, random weights, {samp['steps']} DDPM steps, "
                       f"batch {samp['batch']}, {samp['dtype']}; ideal = blocks total / blocks run")
            out.append("")
            out.append("| config | median | IQR | vs eager, no cache | blocks run / total | ideal |")
            out.append("|---|---|---|---|---|---|")
            for r in samp["rows"]:
                if "error" in r:
                    out.append(f"| {r['config']} | error: {r['error']} | | | | |")
                else:
                    iqr = 100 * (r["p75_ms"] - r["p25_ms"]) / r["median_ms"]
                    blocks = f"{r['blocks_run']} / {r['blocks_total']}" if "blocks_run" in r else "-"
                    out.append(f"| {r['config']} | {_fmt_time(r['median_ms'])} | {iqr:.1f}% | "
                               f"{_fmt_ratio(r.get('vs_eager_nocache'))} | {blocks} | "
                               f"{_fmt_ratio(r.get('ideal_speedup'))} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _group_unavailable(items: list[dict]) -> list[str]:
    """'impl (direction): reason [shapes]' lines, one per distinct (impl, reason)."""
    groups: dict = {}
    for u in items:
        key = (u["impl"], u["reason"])
        g = groups.setdefault(key, {"dirs": [], "shapes": []})
        if u["direction"] not in g["dirs"]:
            g["dirs"].append(u["direction"])
        if u["shape"] not in g["shapes"]:
            g["shapes"].append(u["shape"])
    lines = []
    for (impl, reason), g in groups.items():
        lines.append(f"{impl} ({', '.join(g['dirs'])}): {reason}"
                     + (f" [{'; '.join(g['shapes'])}]" if len(g["shapes"]) < 4 else ""))
    return lines


def write_plot(result: dict, path: str) -> str | None:
    """Speedup over eager by shape, one panel per (op, direction). Returns an error
    string when matplotlib is missing (it is an optional dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e}); `pip install matplotlib` for --plot"
    panels = []
    for op in OPS:
        for d in ("fwd", "fwd+bwd"):
            sel = [r for r in result["rows"] if r["op"] == op and r["direction"] == d]
            if sel:
                panels.append((op, d, sel))
    if not panels:
        return "no rows to plot"
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    all_impls = [i for i in dict.fromkeys(r["impl"] for r in result["rows"]) if i != "eager"]
    palette = plt.get_cmap("tab10").colors
    color = {impl: palette[k % len(palette)] for k, impl in enumerate(all_impls)}
    kinds = {r["impl"]: r["kind"] for r in result["rows"]}
    for ax, (op, d, sel) in zip(axes[:, 0], panels):
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        impls = [i for i in dict.fromkeys(r["impl"] for r in sel) if i != "eager"]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            ys = []
            for s in shapes:
                r = next((r for r in sel if r["shape"] == s and r["impl"] == impl), None)
                ys.append(r["vs_eager"] if r and r.get("vs_eager") else 0.0)
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
            ours = kinds.get(impl) == "ours"
            ax.bar(xs, ys, width, label=impl + (" (ours)" if ours else ""), color=color[impl],
                   hatch="//" if ours else None, edgecolor="black" if ours else None)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=8)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(f"{op} {d} ({result['env']['device']['name']}, {result['settings']['dtype']})", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
