"""`skipdit-fast probe`: the feature-stability probe (skipdit_fast.analysis.probe) on
one or more models, side by side: per sampling step the cosine similarity and relative
L1 change of the deep features (and of every block's output) against the step before,
and how much an error in the cached deep features is amplified by the deep stack.

    skipdit-fast probe                                   # the shipped tiny DiT and Skip-DiT
    skipdit-fast probe --model DiT-XL/2-skip --ckpt DiT-XL-2-skip.pt --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt

Writes probe.json and two plots (similarity.png, amplification.png; matplotlib) to
--out-dir and prints the means with a verdict read off the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..files import save_figure, write_atomic
from .common import (TRAINING_TIMESTEPS, UsageError, check_branch, check_output_dir, device_arg, device_from_arg,
                     int_range, nonneg_int, positive_int, read_checkpoint, seed_int)

SHIPPED = ("tiny-dit", "tiny-skipdit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", help="a shipped model (tiny-dit, tiny-skipdit) or a DiT name such as "
                   "DiT-XL/2-skip; repeat to compare (default: tiny-dit and tiny-skipdit)")
    p.add_argument("--ckpt", action="append", help="checkpoint of each non-shipped --model, in order")
    p.add_argument("--steps", type=int_range(2, TRAINING_TIMESTEPS), default=50,
                   help="DDPM steps of the probed run, 2..1000 (default 50)")
    p.add_argument("--branch", type=positive_int, default=2, help="K: the deep features are the input of block depth-K "
                   "(default 2)")
    p.add_argument("--power-iters", type=positive_int, default=10, help="power iterations per amplification estimate "
                   "(default 10)")
    p.add_argument("--spectral-every", type=nonneg_int, default=1, help="estimate the amplification every n-th step "
                   "(default 1; 0: never)")
    p.add_argument("--classes", type=nonneg_int, nargs="+",
                   help="labels to sample (default: one per class, at most 10)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--out-dir", default="probe-out", help="where probe.json and the plots go (default probe-out/)")


def _load(name: str, ckpt: str | None, device):
    from ..models import DiT
    from ..pretrained import load_pretrained

    if name in SHIPPED:
        if ckpt:
            raise UsageError(f"--model {name} is a shipped model: it takes no --ckpt")
        try:
            return load_pretrained(name, device=device)
        except FileNotFoundError as e:
            raise UsageError(f"--model {name}: {e}") from None
    try:
        model = DiT.from_name(name)
    except ValueError as e:
        raise UsageError(f"--model {name}: {e}") from None
    if ckpt:
        model.load_state_dict_strict(read_checkpoint(ckpt, "--ckpt"))
    else:
        print(f"no --ckpt for {name}: random weights (the probe then says nothing about a trained model)",
              file=sys.stderr)
    return model.to(device).eval()


def write_plots(results: list[dict], out_dir: str) -> list[str]:
    """similarity.png (deep features per step; every block, mean over steps) and
    amplification.png (per step), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [s for s in r["steps"] if s["deep_cosine"] is not None]
        a.plot([s["t"] for s in steps], [s["deep_cosine"] for s in steps], label=r["model"])
        b.plot(range(r["depth"]), r["summary"]["mean_block_cosine"], marker="o", label=r["model"])
    a.set(xlabel="timestep t", ylabel="cosine similarity to the step before",
          title=f"deep features (input of block depth-{results[0]['branch']})")
    a.invert_xaxis()
    b.set(xlabel="block", ylabel="mean cosine similarity over steps", title="every block's output")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "similarity.png")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        steps = [s for s in r["steps"] if s["amplification"] is not None]
        ax.plot([s["t"] for s in steps], [s["amplification"] for s in steps], label=r["model"])
    ax.set(xlabel="timestep t", ylabel="largest singular value of the deep stack's Jacobian",
           title="amplification of an error in the cached features")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "amplification.png")))
    plt.close("all")
    return paths


def _save(fig, path: str) -> str:
    return save_figure(fig, path)


def verdict(results: list[dict]) -> list[str]:
    """Lines comparing models with and without long skips, read off the means."""
    def by_skip(flag):
        return [r for r in results if r["skip"] is flag]

    lines = []
    for s in by_skip(True):
        for v in by_skip(False):
            cs, cv = s["summary"]["mean_deep_cosine"], v["summary"]["mean_deep_cosine"]
            as_, av = s["summary"]["mean_amplification"], v["summary"]["mean_amplification"]
            if cs is not None and cv is not None:
                more = "more" if cs > cv else "less"
                lines.append(f"{s['model']} vs {v['model']}: deep features change {'less' if cs > cv else 'more'} "
                             f"between steps (mean cosine {cs:.4f} vs {cv:.4f}: {more} stable with long skips)")
            if as_ is not None and av is not None:
                lines.append(f"{s['model']} vs {v['model']}: an error in the cached features is amplified "
                             f"{as_:.3g}x vs {av:.3g}x on average ({'less' if as_ < av else 'more'} with long skips)")
    return lines


def main(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.probe import probe

    names = args.model or list(SHIPPED)
    ckpts = list(args.ckpt or [])
    non_shipped = [n for n in names if n not in SHIPPED]
    if ckpts and len(ckpts) != len(non_shipped):
        raise UsageError(f"{len(ckpts)} --ckpt for {len(non_shipped)} non-shipped --model "
                         f"({', '.join(non_shipped) or 'none'}); give one per such model, in order")
    check_output_dir(args.out_dir, "--out-dir")
    device = device_from_arg(args.device)
    models = []
    it = iter(ckpts)
    for n in names:
        models.append((n, _load(n, None if n in SHIPPED else next(it, None), device)))
    for name, model in models:
        check_branch(model, args.branch, "--branch", name)
        bad = [c for c in args.classes or [] if not 0 <= c < model.config.num_classes]
        if bad:
            raise UsageError(f"--classes: {name} has classes 0..{model.config.num_classes - 1}, got {bad}")
    results = []
    for name, model in models:
        cfg = model.config
        labels = args.classes if args.classes else list(range(min(cfg.num_classes, 10)))
        t0 = time.perf_counter()
        r = probe(model, labels, steps=args.steps, branch=args.branch, power_iters=args.power_iters,
                  spectral_every=args.spectral_every, seed=args.seed, name=name)
        d = r.to_dict()
        d["skip"] = bool(cfg.skip)
        d["seconds"] = time.perf_counter() - t0
        results.append(d)
        s = d["summary"]
        amp = f"{s['mean_amplification']:.3g}x (max {s['max_amplification']:.3g}x)" \
            if s["mean_amplification"] is not None else "not estimated"
        print(f"{name}: {args.steps} steps in {d['seconds']:.1f} s; deep features (input of block "
              f"{cfg.depth - args.branch}): mean cosine {s['mean_deep_cosine']:.4f}, mean relative L1 change "
              f"{s['mean_deep_delta']:.4f}; amplification {amp}")
    for line in verdict(results):
        print(line)
    path = os.path.join(args.out_dir, "probe.json")
    write_atomic(path, json.dumps({"torch": torch.__version__, "device": str(device), "results": results},
                                  indent=1).encode())
    written = [path]
    try:
        written += write_plots(results, args.out_dir)
    except ImportError as e:
        print(f"skipdit-fast probe: no plots ({e}; `pip install matplotlib`)", file=sys.stderr)
    print("wrote " + ", ".join(written))
    return 0
