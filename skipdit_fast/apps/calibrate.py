"""`skipdit-fast calibrate`: a cache schedule for a speedup target
(skipdit_fast.analysis.calibrate): one uncached calibration run measures the error of
each step kind (cached with K, hybrid with K, FORA-style reuse, extrapolated reuse) at each step after
each gap, and the time of each kind is measured; the least-error schedule within the
time budget is planned, then checked and improved on real sampling runs of the
calibration labels (--rollouts), and written as a schedule file for `skipdit-fast
sample --cache-schedule FILE`, SkipCache(schedule=FILE) or enable_skip_cache(schedule=FILE).

    skipdit-fast calibrate --model tiny-skipdit --speedup 2.5 --out sched.json
    skipdit-fast calibrate --model DiT-XL/2-skip --ckpt DiT-XL-2-skip.pt --steps 250 --speedup 2 \
        --cfg-scale 4 --out s.json

--speedup is a measured-time target (uncached step time * steps / planned time) on
this device at --time-batch samples: calibrate where you sample. --cost blocks (or
--budget N blocks) plans in block counts with plain cached steps only.
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import (check_output_file, device_arg, device_from_arg, float_range, nonneg_int, positive_int, seed_int,
                     steps_int)

SHIPPED = ("tiny-skipdit", "tiny-latte-skip", "tiny-dit", "tiny-latte")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..analysis.calibrate import MODES

    p.add_argument("--model", default="tiny-skipdit", help="a shipped model (tiny-skipdit, tiny-latte-skip) or a "
                   "name such as DiT-XL/2-skip / Latte-XL/2-skip with --ckpt (default tiny-skipdit)")
    p.add_argument("--ckpt", help="checkpoint of a non-shipped --model")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--speedup", type=float_range(1.0), help="target speedup (>= 1): measured time, or block "
                      "count with --cost blocks")
    what.add_argument("--budget", type=positive_int, help="target: at most this many blocks (units) per run "
                      "(plans in blocks, plain cached steps only)")
    p.add_argument("--cost", choices=("time", "blocks"), default="time", help="plan in measured step time (default; "
                   "every step kind) or in block counts (plain cached steps only)")
    p.add_argument("--modes", choices=MODES, nargs="+",
                   help="the step kinds to consider (default all: " + ", ".join(MODES) + "; --cost blocks: cached "
                   "only)")
    p.add_argument("--rollouts", type=nonneg_int, default=48, help="local-search sampling runs that check and improve "
                   "the plan (default 48; 0: the plan of the error model alone)")
    p.add_argument("--cfg-scale", type=float_range(1.0), default=1.0, help="classifier-free guidance of the "
                   "checking runs (default 1; the error table is measured without)")
    p.add_argument("--retime", type=nonneg_int, default=2, help="times the plan may be searched again when its "
                   "measured speedup on the calibration run misses --speedup or overshoots it by more than "
                   "--overshoot (default 2; 0: trust the step times)")
    p.add_argument("--overshoot", type=float_range(0.0), default=0.05, help="fraction above --speedup a measured "
                   "speedup may be before the plan is searched again to spend the time it leaves (default 0.05)")
    p.add_argument("--validate-seeds", type=seed_int, nargs="*", help="seeds the searched schedule and the best "
                   "candidates that met the target are compared on (default: the 3 after --seed; no values: no "
                   "validation)")
    p.add_argument("--propagate-samples", type=positive_int, help="samples the amplification copies carry "
                   "(default all; fewer make a large calibration batch cheaper)")
    p.add_argument("--time-batch", type=positive_int, help="batch the step times are measured at (default: the "
                   "calibration batch); use the batch you sample with")
    p.add_argument("--steps", type=steps_int, default=50, help="sampling steps the schedule is for (default 50)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--classes", type=nonneg_int, nargs="+", help="calibration labels (default: one per class, at most 10)")
    p.add_argument("--num-samples", type=positive_int, default=4, help="unconditional models: calibration samples (default 4)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the calibration run")
    p.add_argument("--max-gap", type=positive_int, default=12, help="longest run of steps on one full step's features "
                   "(default 12)")
    p.add_argument("--branches", type=positive_int, nargs="+", help="the K to consider (default: every K with 2K < depth)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--out", required=True, help="the schedule file to write (JSON)")


def _load(name: str, ckpt: str | None, device):
    from ..models import DiT, Latte
    from ..pretrained import load_pretrained

    if name in SHIPPED:
        if ckpt:
            raise ValueError(f"{name} is a shipped model: it takes no --ckpt")
        return load_pretrained(name, device=device)
    model = (Latte if name.startswith("Latte") else DiT).from_name(name)
    if ckpt:
        model.load_checkpoint(ckpt)
    else:
        print(f"no --ckpt for {name}: random weights (the schedule then says nothing about a trained model)",
              file=sys.stderr)
    return model.to(device).eval()


def main(args: argparse.Namespace) -> int:
    from ..analysis.calibrate import calibrate

    def fail(msg: str) -> int:
        print(f"skipdit-fast calibrate: {msg}", file=sys.stderr)
        return 2

    if args.steps < 2:
        return fail(f"--steps must be >= 2, got {args.steps}")
    if args.speedup is not None and not args.speedup >= 1:
        return fail(f"--speedup must be >= 1, got {args.speedup}")
    check_output_file(args.out, "--out")   # before the calibration run, not after it
    try:
        device = device_from_arg(args.device)
        model = _load(args.model, args.ckpt, device)
    except (ValueError, OSError, RuntimeError) as e:
        return fail(str(e))
    cfg = model.config
    if not cfg.skip:
        return fail(f"Skip-Cache needs long skips: {args.model} has none")
    kw = {}
    if cfg.class_conditional:
        labels = args.classes or list(range(min(10, cfg.num_classes)))
        bad = [c for c in labels if not 0 <= c < cfg.num_classes]
        if bad:
            return fail(f"--classes must be in 0..{cfg.num_classes - 1}, got {bad}")
    else:
        if args.classes:
            return fail(f"{args.model} is unconditional: use --num-samples, not --classes")
        labels, kw = None, {"num_samples": args.num_samples}
    t0 = time.perf_counter()
    try:
        sched = calibrate(model, speedup=args.speedup, budget=args.budget, labels=labels, steps=args.steps,
                          seed=args.seed, sampler=args.sampler, max_gap=args.max_gap, branches=args.branches,
                          modes=args.modes, cost=args.cost, rollouts=args.rollouts, cfg_scale=args.cfg_scale,
                          time_batch=args.time_batch, retime=args.retime, overshoot=args.overshoot,
                          validate_seeds=args.validate_seeds,
                          propagate_samples=args.propagate_samples, name=args.model, **kw)
    except ValueError as e:
        return fail(str(e))
    m = sched.meta
    m["calibration_seconds"] = time.perf_counter() - t0
    sched.save(args.out)
    extra = f", predicted speedup {m['predicted_speedup']:.2f}x" if "predicted_speedup" in m else ""
    if m.get("retimed"):
        kept = next((r for r in m["retimed"] if r.get("picked")), m["retimed"][-1])
        extra += f", measured {kept['measured_speedup']:.2f}x on the calibration run"
    if "measured_error" in m:
        extra += f", calibration-run RMS error {m['measured_error']:.4g} ({m['rollouts']} runs)"
    if m.get("validation"):
        extra += f", picked on seeds {m['validation']['seeds']}: {m['validation']['picked']}"
    print(f"{args.model}: {sched} ; predicted error {m['predicted_error']:.4g}{extra} "
          f"(calibrated in {m['calibration_seconds']:.1f} s); wrote {args.out}")
    return 0
