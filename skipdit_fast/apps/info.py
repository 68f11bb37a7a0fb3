"""`skipdit-fast info`: versions, what the native library was built for, which
backends can run each op on this machine (and, for each that cannot, why), and the
autotune cache (`auto`'s measured decisions: file, key, how many)."""

from __future__ import annotations

import importlib.util
import json
import platform

from .. import __version__

# torch and the op layer are imported where they are used, not here: the command line
# parses its arguments (and answers --help) before paying for them.

# A representative query per op: typical DiT shapes; bf16 on GPU, fp32 on CPU.
_FEATURES = {"skip_fuse": (1152, 1152), "attention": (72,), "cache_delta": ()}
_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def _merge(fwd: list[str], bwd: list[str]) -> str:
    if not fwd and not bwd:
        return "ok"
    if not fwd:
        return "forward only (" + "; ".join(bwd) + ")"
    return "; ".join(fwd)


def _status_without_gpu(op: str, name: str) -> str:
    """What a backend would do on a GPU, read off this machine's build."""
    from ..ops import backends, defs, native, triton_ops

    if name in ("reference", "torch"):
        return "any device (no GPU here)"
    if name == "cpu":
        return "CPU tensors only"
    if name == "cuda":
        d = defs.OPS[op]
        why = backends._native(d.forward, "CUDA")()
        if why:
            return why
        bwd = d.backward
        has_bwd = bwd is None or native.has_kernel(bwd, "CUDA")
        via = " (backward: Triton kernel)" if bwd in triton_ops.ROUTED_TO_TRITON else ""
        return "kernel built" + ("" if has_bwd else " (forward only)") + via + "; no GPU here"
    why = backends._triton_available()
    if why:
        return why
    return "kernel present; no GPU here"


def collect() -> dict:
    import torch

    from ..ops import autotune, backends, native, triton_ops

    info: dict = {
        "skipdit_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpreter": triton_ops.interpreting(),
        "cuda_device": None,
        "library": {"path": native.LIBRARY_PATH, "loaded": native.available(), "error": native.load_error(),
                    "build": native.build_info()},
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda_device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                               "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1)}
    recs = native.ptxas_report()
    if recs:
        info["library"]["cuda_kernels"] = {
            "count": len({r["kernel"] for r in recs}),
            "archs": sorted({r["arch"] for r in recs}),
            "max_registers": max(r["registers"] or 0 for r in recs),
            "spill_bytes": sum((r["spill_stores"] or 0) + (r["spill_loads"] or 0) for r in recs),
        }
    table: dict = {}
    for op in backends.OPS:
        table[op] = {}
        for dev in ("cpu", "cuda"):
            row = {"auto": None, "backends": {}}
            if dev == "cuda" and not torch.cuda.is_available():
                row["backends"] = {n: _status_without_gpu(op, n) for n in backends.BACKENDS}
            else:
                dtype = getattr(torch, _DTYPE[dev])
                q = backends.Query(op, torch.device(dev), dtype, False, _FEATURES[op])
                qg = backends.Query(op, torch.device(dev), dtype, True, _FEATURES[op])
                fwd, bwd = backends.explain(q), backends.explain(qg)
                row["backends"] = {n: _merge(fwd[n], bwd[n]) for n in backends.BACKENDS}
                try:  # the static order; `auto` measures per shape (the autotune section)
                    row["auto"] = backends.candidates(q)[0].backend
                except backends.BackendError:
                    pass
            table[op][dev] = row
    info["backends"] = table
    info["autotune"] = autotune.status()
    return info


def format_text(info: dict) -> str:
    lines = [f"skipdit_fast {info['skipdit_fast']}",
             f"  python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), triton "
             f"{info['triton']}{' (interpreter: TRITON_INTERPRET=1)' if info['triton_interpreter'] else ''}",
             f"  {info['platform']}"]
    dev = info["cuda_device"]
    lines.append(f"  GPU: {dev['name']}, sm_{dev['capability'].replace('.', '')}, {dev['sms']} SMs, "
                 f"{dev['memory_gib']} GiB" if dev else "  GPU: none")
    lib = info["library"]
    lines += ["", f"native library: {lib['path']}"]
    if lib["loaded"]:
        b = lib["build"]
        lines.append(f"  built against torch {b.get('torch')} with {b.get('cxx')}, OpenMP {b.get('openmp')}")
        lines.append("  CUDA: " + (f"nvcc {b['cuda']}, archs {b.get('cuda_archs')}" if b.get("cuda")
                                   else "not built (no nvcc, a CPU-only torch, or an nvcc of another CUDA "
                                   "major version than torch's at build time)"))
        k = lib.get("cuda_kernels")
        if k:
            lines.append(f"  CUDA kernels: {k['count']} for {', '.join(k['archs'])}; max {k['max_registers']} "
                         f"registers, {k['spill_bytes']} spill bytes (ptxas report)")
    else:
        lines.append(f"  NOT LOADED: {lib['error']}")
    lines += ["", "backends per op (typical DiT shapes; fp32 on CPU, bf16 on GPU; auto -> its static first "
              "choice):"]
    for op, per_dev in info["backends"].items():
        lines.append(f"  {op}")
        for devname, d in per_dev.items():
            auto = f"auto -> {d['auto']}" if d["auto"] else ("auto -> none" if devname == "cpu" or
                                                             info["cuda_device"] else "")
            lines.append(f"    on {devname}:{' ' + auto if auto else ''}")
            for name, status in d["backends"].items():
                lines.append(f"      {name:10s} {status}")
    at = info["autotune"]
    lines += ["", "autotune (`auto` measures each shape bucket once and keeps the decision): "
              + ("on" if at["enabled"] else "off (SKIPDIT_FAST_AUTOTUNE=0: the static order above)"),
              f"  cache dir: {at['cache_dir']} (SKIPDIT_FAST_CACHE_DIR)"]
    for f in at["files"]:
        k = f["key"]
        lines.append(f"  {f['device']}: {f['path']}")
        lines.append(f"      key: {k['device']}, torch {k['torch']}, triton {k['triton']}, CUDA {k['cuda']}, "
                     f"skipdit_fast {k['skipdit_fast']}, commit {k['commit']}")
        lines.append(f"      {f['decisions']} decisions ({f['state']})")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args) -> int:
    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else format_text(info))
    return 0 if info["library"]["loaded"] else 1
