"""Where results go: the environment of a run (device, versions, git commit, build),
the JSON and markdown files, the results folder <date>-<device>/ and the
latest-results section of the results README."""

from __future__ import annotations

import json
import os
import platform
import re
import sys

import torch

from ..ops.decisions import cpu_name, run_git
from ..files import write_atomic
from .report import format_report, write_plot

# ---------------------------------------------------------------------------
# environment

def git_info() -> dict:
    commit = run_git("rev-parse", "HEAD")
    status = run_git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "branch": run_git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def environment(device: torch.device) -> dict:
    from .. import __version__
    from ..ops import native as _lib

    dev: dict = {"type": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev.update(name=p.name, capability=list(torch.cuda.get_device_capability(device)),
                   sm_count=p.multi_processor_count, memory_bytes=p.total_memory,
                   l2_bytes=int(getattr(p, "L2_cache_size", 0) or 0))
    else:
        dev.update(name=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads())
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "skipdit_fast": __version__}
    try:
        from importlib.metadata import version
        versions["triton"] = version("triton")
    except Exception:
        versions["triton"] = None
    try:
        versions["cudnn"] = torch.backends.cudnn.version() if device.type == "cuda" else None
    except Exception:
        versions["cudnn"] = None
    build = dict(_lib.build_info()) if _lib.available() else {"load_error": _lib.load_error()}
    spills = [r for r in _lib.ptxas_report() if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) > 0]
    build["ptxas_kernels"] = len(_lib.ptxas_report())
    build["ptxas_kernels_spilling"] = len(spills)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"device": dev, "versions": versions, "git": git_info(), "build": build,
            "host": platform.node(), "load_average": load,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def device_slug(env: dict) -> str:
    name = env["device"]["name"] or env["device"]["type"]
    if env["device"]["type"] == "cpu":
        name = "cpu-" + name
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    s = re.sub(r"-(r|tm)-", "-", s)
    return s[:48].strip("-")


def backend_status(device: torch.device, dtype: torch.dtype, ops_: list[str]) -> dict:
    """op -> backend -> {"fwd": reason or None, "fwd+bwd": reason or None} (generic
    features, the shape-specific reasons are in `unavailable`)."""
    from ..ops import backends

    feats = {"skip_fuse": (1152, 1152), "attention": (72,), "cache_delta": ()}
    out = {}
    for op in ops_:
        out[op] = {}
        for grad in (False, True):
            reasons = backends.explain(backends.Query(op, device, dtype, grad, feats[op]))
            for name, why in reasons.items():
                d = out[op].setdefault(name, {})
                d["fwd+bwd" if grad else "fwd"] = "; ".join(why) if why else None
    return out


def _write_text(text: str, path: str) -> None:
    write_atomic(path, text)


def _write_json(result: dict, path: str) -> None:
    write_atomic(path, json.dumps(result, indent=1, default=str))


def result_folder_name(result: dict) -> str:
    return f"{result['created'][:10]}-{device_slug(result['env'])}"


def save_results(result: dict, root: str | None, folder: str | None = None) -> str:
    """Writes {bench.json, bench.md, speedup.png} to `folder` (default
    ROOT/<date>-<device>) and refreshes the latest-results section of the README.md in
    the folder's parent; returns the folder."""
    if folder is None:
        folder = os.path.join(root, result_folder_name(result))
    os.makedirs(folder, exist_ok=True)
    _write_json(result, os.path.join(folder, "bench.json"))
    _write_text(format_report(result), os.path.join(folder, "bench.md"))
    err = write_plot(result, os.path.join(folder, "speedup.png"))
    if err:
        print(f"skipdit-fast bench: no plot: {err}", file=sys.stderr)
    update_results_readme(os.path.dirname(os.path.abspath(folder)))
    return folder


README_BEGIN = "<!-- latest-results:begin (written by skipdit-fast bench --save; do not edit by hand) -->"
README_END = "<!-- latest-results:end -->"


def latest_per_device(root: str) -> dict[str, str]:
    """device slug -> the newest result folder (by the run's own timestamp)."""
    best: dict[str, tuple[str, str]] = {}
    if not os.path.isdir(root):
        return {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "bench.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                r = json.load(f)
            slug, created = device_slug(r["env"]), r["created"]
        except (OSError, ValueError, KeyError):
            continue
        if slug not in best or created > best[slug][0]:
            best[slug] = (created, name)
    return {k: v[1] for k, v in sorted(best.items())}


def update_results_readme(root: str) -> None:
    """Rewrites the section between the markers of ROOT/README.md with the latest table
    of each device found under ROOT (nothing else in the file changes)."""
    readme = os.path.join(root, "README.md")
    if not os.path.isfile(readme):
        return
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        return
    parts = [README_BEGIN, ""]
    latest = latest_per_device(root)
    if not latest:
        parts.append("No results yet.")
    for slug, folder in latest.items():
        md = os.path.join(root, folder, "bench.md")
        try:
            with open(md) as f:
                body = f.read()
        except OSError:
            continue
        body = re.sub(r"^## ", "### ", body, flags=re.M)
        body = re.sub(r"^### (?=\w+ (forward|dispatch|end-to-end))", "#### ", body, flags=re.M)
        parts.append(f"### {slug}: [{folder}/]({folder}/) ([JSON]({folder}/bench.json))")
        parts.append("")
        parts.append(body.split("\n", 1)[1].strip() if body.startswith("### ") else body.strip())
        parts.append("")
    parts.append(README_END)
    new = text[: text.index(README_BEGIN)] + "\n".join(parts) + text[text.index(README_END) + len(README_END):]
    with open(readme, "w") as f:
        f.write(new)
