"""How well calibrate's time model predicts a schedule's measured speedup.

    OMP_WAIT_POLICY=PASSIVE python bench/time_model.py [--model tiny-skipdit] [--batch 30]
        [--schedules bench/results/fidelity-cpu/pareto.json ...] [--out time_model.json]

Measures the step times the way measure_errors does (measure_step_seconds: each kind's
fixed interval of period --period, and the keeping cost of a full step from the cheapest
reuse kind at period 2 too), then times whole sampling runs of a set of schedules against
the uncached run, interleaved, the fastest of --rounds each (process CPU time on a CPU,
synchronized wall time on a GPU), and prints for each schedule the measured speedup next
to the predicted one with the keeping cost and without it (keep_seconds = 0: the model
before the keeping cost). Schedules: fixed intervals of every kind at N = 2, 4 and 13,
and the calibrated schedules of --schedules files (a bench/fidelity.py --pareto
pareto.json or calibrated.json). Measure on the machine and batch you plan for; on a
shared machine the ratios are what holds, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from skipdit_fast import SkipCache  # noqa: E402
from skipdit_fast.analysis.calibrate import (ErrorTable, fastest_runs, interval_code,  # noqa: E402
                                             make_actions, measure_step_seconds)
from skipdit_fast.cache.schedule import CacheSchedule  # noqa: E402
from skipdit_fast.files import write_atomic  # noqa: E402
from skipdit_fast.pretrained import load_pretrained  # noqa: E402
from skipdit_fast.sampling.diffusion import sample  # noqa: E402


def schedules_of(model, steps: int, files) -> dict[str, CacheSchedule]:
    out = {}
    for a in make_actions(model):
        for n in (2, 4, 13):
            out[f"interval N={n} {a}"] = CacheSchedule.from_code(interval_code(a.code, steps, n), model.depth)
    for f in files:
        d = json.loads(Path(f).read_text())
        for t, sd in d["schedules"].items():
            s = CacheSchedule.from_dict(sd, source=f)
            if s.steps != steps or s.depth != model.depth:
                raise ValueError(f"--schedules {f}: target {t} has {s.steps} steps and depth {s.depth}, "
                                 f"not --steps {steps} and the model's depth {model.depth}")
            out[f"calibrated {t}x ({Path(f).parent.name}/{Path(f).name})"] = s
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-skipdit")
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--period", type=int, default=13, help="measure_step_seconds(period=) (calibrate: max gap + 1)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each schedule, the fastest counts")
    p.add_argument("--schedules", nargs="*", default=[])
    p.add_argument("--out", help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 2 or args.rounds < 1:
        p.error("--batch and --rounds must be >= 1, --steps >= 2")
    model = load_pretrained(args.model).eval()
    cond = getattr(model.config, "class_conditional", True)
    kw = dict(labels=[j % model.config.num_classes for j in range(args.batch)]) if cond else \
        dict(num_samples=args.batch)
    try:
        scheds = schedules_of(model, args.steps, args.schedules)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        sec = measure_step_seconds(model, make_actions(model), batch=args.batch, steps=args.steps,
                                   period=args.period, **({"labels": kw["labels"]} if cond else {}))
        keep = sec.pop("keep", 0.0)
        none = (np.zeros((args.steps, 1, 0)), [], model.depth, [0.0] * args.steps)   # times only
        with_keep = ErrorTable(*none, seconds=sec, keep_seconds=keep)
        without = ErrorTable(*none, seconds=sec)
        runs = {"uncached": None, **scheds}
        best = fastest_runs(lambda sc: sample(model, steps=args.steps, **kw,
                                              cache=None if sc is None else SkipCache(schedule=sc)),
                            runs, args.rounds, next(model.parameters()).device)
    F = sec["F"]
    print(f"{args.model}, batch {args.batch}, {args.steps} steps: step times / full step: " +
          ", ".join(f"{k} {v / F:.3f}" for k, v in sec.items() if k != "F") + f", keep {keep / F:.3f}")
    rows = []
    print(f"{'schedule':58s} measured  predicted  (no keep)")
    for name, s in scheds.items():
        m = best["uncached"] / best[name]
        r = {"schedule": name, "code": s.code, "keeping_steps": len(s.keeping_steps), "measured": m,
             "predicted": with_keep.predicted_speedup(s), "predicted_no_keep": without.predicted_speedup(s)}
        rows.append(r)
        print(f"{name:58s} {m:7.2f}x  {r['predicted']:7.2f}x  {r['predicted_no_keep']:7.2f}x")
    err = [abs(r["predicted"] / r["measured"] - 1) for r in rows]
    err0 = [abs(r["predicted_no_keep"] / r["measured"] - 1) for r in rows]
    print(f"mean |predicted / measured - 1|: {sum(err) / len(err):.3f} with the keeping cost, "
          f"{sum(err0) / len(err0):.3f} without; worst {max(err):.3f} vs {max(err0):.3f}")
    if args.out:
        write_atomic(args.out, json.dumps({"model": args.model, "batch": args.batch, "steps": args.steps,
                                           "period": args.period, "rounds": args.rounds, "threads":
                                           torch.get_num_threads(), "step_seconds": sec, "keep_seconds": keep,
                                           "uncached_s": best["uncached"], "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
